// Build properties: the initrd is reproducible, and changing only the agent does not redo the
// slow parts (kernel, modules, base segment, test images).
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createHash } from "node:crypto";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-build-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

describe("initrd build", () => {
  // Not the commit's time (SOURCE_DATE_EPOCH): a segment is rebuilt only when its inputs change,
  // so an incremental build and a fresh clone of the same commit would otherwise differ (#15).
  it("is byte-identical for the same inputs, whatever SOURCE_DATE_EPOCH: its times are fixed", () => {
    const base = (out: string, epoch: string) =>
      execFileSync(BUN, ["initrd/build.ts", "initrd-base", "--kernel", "build/kernel.json", "--preinit", "build/preinit", "--config", "initrd/config.json", "--out", out], {
        env: { ...process.env, SOURCE_DATE_EPOCH: epoch },
        stdio: "ignore",
      });
    base(`${dir}/a.cpio`, "1700000000");
    base(`${dir}/b.cpio`, "1700000000");
    base(`${dir}/c.cpio`, "1700000001");
    expect(sha(`${dir}/a.cpio`)).toBe(sha(`${dir}/b.cpio`));
    expect(sha(`${dir}/a.cpio`)).toBe(sha(`${dir}/c.cpio`));
    const listing = execFileSync("sh", ["-c", `TZ=UTC cpio -itv --quiet < ${dir}/a.cpio`], { encoding: "utf8" });
    expect(listing).toMatch(/Jan +1 +1970 init$/m);
  });

  it("after a change to the agent only the agent segment, the initrd and the UKIs are rebuilt", () => {
    // -n: print, do not run; -W: pretend this file just changed. make all must be up to date.
    const plan = execFileSync("make", ["-n", "-W", "agent/boot.ts", "all"], { encoding: "utf8" });
    expect(plan).toMatch(/bun build --compile .*agent\/main.ts/);
    expect(plan).toMatch(/initrd-agent/);
    expect(plan).toMatch(/build.ts uki/);
    for (const slow of ["initrd-base", "build.ts kernel", "build.ts testroot", "gcc -static"]) expect(plan).not.toContain(slow);
  });
});
