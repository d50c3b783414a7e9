// openat2 through koffi, for real, as root in a private mount namespace: a mount onto
// /proc/self/fd/<fd> lands on exactly the directory openDirInRoot resolved inside the new root.
// Resolution itself is tested without root in test/unit/openat2.test.ts.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-openat2-`);
const root = `${dir}/root`;
afterAll(() => rmSync(dir, { recursive: true, force: true }));

mkdirSync(`${root}/home`, { recursive: true });
mkdirSync(`${dir}/outside`);

describe("openDirInRoot (openat2 RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)", () => {
  it("a mount onto /proc/self/fd/<fd> lands on the resolved directory", () => {
    expect(process.getuid?.()).toBe(0);
    const script = `${dir}/ns.ts`;
    writeFileSync(
      script,
      `import { statSync } from "node:fs";
import { openDirInRoot, mount } from ${JSON.stringify(resolve("agent/sys/libc.ts"))};
const dev = (p: string) => statSync(p).dev;
const before = dev(${JSON.stringify(`${root}/home`)}) === dev(${JSON.stringify(root)});
const fd = openDirInRoot(${JSON.stringify(root)}, "/home");
mount("tmpfs", "/proc/self/fd/" + fd, "tmpfs", 0, "size=1m");
const home = dev(${JSON.stringify(`${root}/home`)}) !== dev(${JSON.stringify(root)});
console.log(JSON.stringify({ before, home, outside: dev(${JSON.stringify(`${dir}/outside`)}) === dev(${JSON.stringify(root)}) }));
`,
    );
    const out = execFileSync("unshare", ["-m", "--propagation", "private", BUN, script], { encoding: "utf8" });
    expect(JSON.parse(out)).toEqual({ before: true, home: true, outside: true });
  });
});
