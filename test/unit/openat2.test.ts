// openat2 through koffi, for real: a bind target is resolved inside the new root by the kernel
// and symlinks are refused. That a mount onto /proc/self/fd/<fd> lands on exactly what was
// resolved needs root: test/system/openat2.test.ts.
import { closeSync, mkdirSync, mkdtempSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { openDirInRoot } from "../../agent/sys/libc.ts";
import { SysError } from "../../agent/sys/ffi.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-openat2-`);
const root = `${dir}/root`;
afterAll(() => rmSync(dir, { recursive: true, force: true }));

mkdirSync(`${root}/home`, { recursive: true });
mkdirSync(`${root}/a/b`, { recursive: true });
mkdirSync(`${dir}/outside`);
writeFileSync(`${root}/file`, "x");
symlinkSync("/../../outside", `${root}/link`); // what the OS's root could plant
symlinkSync("a", `${root}/rel`);

const errnoOf = (f: () => unknown): string => {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(SysError);
    return (e as SysError).code;
  }
  return "no error";
};

describe("openDirInRoot (openat2 RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS)", () => {
  it("opens a real directory of the root as an O_PATH fd", () => {
    const fd = openDirInRoot(root, "/a/b");
    try {
      expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe(`${root}/a/b`);
    } finally {
      closeSync(fd);
    }
  });

  it("refuses any symlink on the way, absolute or relative, last component or not", () => {
    expect(errnoOf(() => openDirInRoot(root, "/link"))).toBe("ELOOP");
    expect(errnoOf(() => openDirInRoot(root, "/rel/b"))).toBe("ELOOP");
  });

  it("names the call, the root and the path; ENOENT and ENOTDIR as usual", () => {
    expect(() => openDirInRoot(root, "/missing")).toThrow(`openat2(${JSON.stringify(root)}, "/missing"): ENOENT`);
    expect(errnoOf(() => openDirInRoot(root, "/file"))).toBe("ENOTDIR");
  });

  it("cannot climb out with ..: it stays at the root, as after chroot", () => {
    const fd = openDirInRoot(root, "/../../..");
    try {
      expect(readlinkSync(`/proc/self/fd/${fd}`)).toBe(root);
    } finally {
      closeSync(fd);
    }
  });
});
