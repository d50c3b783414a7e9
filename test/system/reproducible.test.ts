// The artifacts every host shares are the same bytes from any checkout of a commit: the signing
// machine must be able to rebuild from the same commit and compare before it signs (issue #15).
// A copy of the tracked files at another path builds the agent and the base segment, which
// must equal the ones `make all` built here. (Keys, root hashes and hosts are in the config
// segment, not in these.)
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");
const other = mkdtempSync(`${tmpdir()}/initos-other-checkout-`);
afterAll(() => rmSync(other, { recursive: true, force: true }));

describe("reproducible from another checkout", () => {
  it("the agent and the base segment built at another path are byte-identical to this build's", () => {
    execFileSync("sh", ["-c", `git ls-files -z | cpio -pdm0 --quiet "${other}"`]);
    symlinkSync(`${process.cwd()}/node_modules`, `${other}/node_modules`);
    // The kernel is an input (extracted once into the cache), not something the checkout makes.
    symlinkSync(`${process.cwd()}/.cache`, `${other}/.cache`);
    mkdirSync(`${other}/build`);
    copyFileSync("build/kernel.json", `${other}/build/kernel.json`);
    // The same commit time (the copy is no git checkout, so make would not find it itself).
    const epoch = execFileSync("git", ["log", "-1", "--format=%ct"], { encoding: "utf8" }).trim();
    execFileSync("make", ["-C", other, "--no-print-directory", "build/initos-agent", "build/base.cpio", `SOURCE_DATE_EPOCH=${epoch}`], { stdio: "ignore" });
    for (const f of ["initos-agent", "preinit", "base.cpio"]) expect(sha(`${other}/build/${f}`), f).toBe(sha(`build/${f}`));
  }, 600_000);
});
