// The real Sys's readRegular (agent/sys/regular.ts) under Bun, as root, on real files like those
// the OS's root could leave at the top of the pool (issue #23): a FIFO nobody writes to, a
// sparse 1 GiB file, a device node on a nodev mount, a symlink, a directory. Each comes back at
// once: refused, never waited for, never read. The decisions built on it: test/unit/poolfiles.test.ts.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-poolfiles-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("Sys.readRegular on the real machine", () => {
  it("a FIFO, a sparse 1 GiB file, a device node, a symlink and a directory are refused at once; a regular file is read", () => {
    expect(process.getuid?.()).toBe(0);
    // A timeout: if a read blocked, this is what would end it (and fail the test).
    const json = execFileSync("unshare", ["-m", "--propagation", "private", BUN, "test/system/helpers/readregular.ts", `${dir}/top`], { encoding: "utf8", timeout: 30_000 });
    const r = JSON.parse(json) as Record<string, { result: string; ms: number }>;
    expect(Object.fromEntries(Object.entries(r).map(([k, v]) => [k, v.result]))).toEqual({
      "initos.json": 'read: {"root":"@root"}',
      missing: "none",
      fifo: "refused: a FIFO, not a regular file",
      big: "refused: 1073741824 bytes, more than the 65536 allowed",
      zero: expect.stringMatching(/^error: openat2\(".*\/top", "zero"\): EACCES$/), // nodev: not even opened
      link: "refused: a symlink, or a symlink on its path (links there are not followed)",
      initos: "refused: a directory, not a regular file",
    });
    for (const [name, { ms }] of Object.entries(r)) expect(ms, name).toBeLessThan(500);
  });
});
