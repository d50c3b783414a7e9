import { execFileSync } from "node:child_process";
import { lstatSync, mkdtempSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterEach, describe, expect, it } from "vitest";
import { type CpioEntry, writeCpio } from "../../initrd/cpio.ts";

const dirs: string[] = [];
const tmp = () => {
  const d = mkdtempSync(`${tmpdir()}/initos-cpio-`);
  dirs.push(d);
  return d;
};
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const entries: CpioEntry[] = [
  { path: "init", type: "file", mode: 0o755, data: Buffer.from("#!/bin/sh\necho hi\n") },
  { path: "etc/initos/config.json", type: "file", mode: 0o644, data: () => Buffer.from('{"modules":[]}\n') },
  { path: "usr/lib/odd", type: "file", mode: 0o600, data: Buffer.alloc(3, 7) }, // size not a multiple of 4
  { path: "empty", type: "file", mode: 0o644, data: Buffer.alloc(0) },
  { path: "lib", type: "symlink", target: "usr/lib" },
  { path: "tmp", type: "dir", mode: 0o1777 },
  { path: "dev/console", type: "char", mode: 0o600, major: 5, minor: 1 },
];

describe("writeCpio", () => {
  it("round-trips through the real cpio tool: contents, modes, symlinks, parents", () => {
    const d = tmp();
    writeCpio(`${d}/a.cpio`, entries.filter((e) => e.type !== "char"), 1700000000);
    execFileSync("sh", ["-c", `mkdir x && cd x && cpio -idm --quiet < ../a.cpio`], { cwd: d });
    const x = `${d}/x`;
    expect(readFileSync(`${x}/init`, "utf8")).toBe("#!/bin/sh\necho hi\n");
    expect(lstatSync(`${x}/init`).mode & 0o7777).toBe(0o755);
    expect(readFileSync(`${x}/etc/initos/config.json`, "utf8")).toBe('{"modules":[]}\n');
    expect(readFileSync(`${x}/usr/lib/odd`)).toEqual(Buffer.alloc(3, 7));
    expect(lstatSync(`${x}/usr/lib/odd`).mode & 0o7777).toBe(0o600);
    expect(readFileSync(`${x}/empty`).length).toBe(0);
    expect(readlinkSync(`${x}/lib`)).toBe("usr/lib");
    expect(lstatSync(`${x}/tmp`).mode & 0o7777).toBe(0o1777);
    expect(lstatSync(`${x}/etc/initos`).isDirectory()).toBe(true); // parent added automatically
    expect(lstatSync(`${x}/init`).mtimeMs).toBe(1700000000 * 1000);
  });

  it("lists device nodes with their major/minor and root ownership", () => {
    const d = tmp();
    writeCpio(`${d}/a.cpio`, entries, 0);
    const listing = execFileSync("sh", ["-c", `cpio -itv --quiet < a.cpio`], { cwd: d, encoding: "utf8" });
    expect(listing).toMatch(/^crw------- +1 root +root +5, +1 .* dev\/console$/m);
    expect(listing).toMatch(/^lrwxrwxrwx .* lib -> usr\/lib$/m);
  });

  it("is deterministic: same entries in any order give identical bytes, padded to 512", () => {
    const d = tmp();
    const n1 = writeCpio(`${d}/1.cpio`, entries, 42);
    writeCpio(`${d}/2.cpio`, [...entries].reverse(), 42);
    expect(readFileSync(`${d}/1.cpio`).equals(readFileSync(`${d}/2.cpio`))).toBe(true);
    expect(n1 % 512).toBe(0);
    writeCpio(`${d}/3.cpio`, entries, 43);
    expect(readFileSync(`${d}/1.cpio`).equals(readFileSync(`${d}/3.cpio`))).toBe(false);
  });
});
