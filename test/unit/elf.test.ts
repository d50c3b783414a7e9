import { execFileSync } from "node:child_process";
import { readFileSync, realpathSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { readElfDeps, readElfDepsFile } from "../../initrd/elf.ts";
import { collectLibs, findLib } from "../../initrd/libs.ts";

/** What binutils says, to compare against. */
function readelf(path: string): { needed: string[]; interp?: string; soname?: string } {
  const d = execFileSync("readelf", ["-dW", path], { encoding: "utf8" });
  const l = execFileSync("readelf", ["-lW", path], { encoding: "utf8" });
  return {
    needed: [...d.matchAll(/\(NEEDED\)\s+Shared library: \[([^\]]+)\]/g)].map((m) => m[1]!),
    soname: /\(SONAME\)\s+Library soname: \[([^\]]+)\]/.exec(d)?.[1],
    interp: /Requesting program interpreter: ([^\]]+)\]/.exec(l)?.[1],
  };
}

const KOFFI = "node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node";

describe("ELF reader", () => {
  for (const file of ["/usr/bin/ls", "/usr/bin/qemu-system-x86_64", findLib("libkmod.so.2")!, KOFFI]) {
    it(`matches readelf on ${file}`, () => {
      const want = readelf(file);
      const got = readElfDepsFile(file);
      expect(got.needed).toEqual(want.needed);
      expect(got.interp).toBe(want.interp);
      expect(got.soname).toBe(want.soname);
    });
  }

  it("reports a static binary as needing nothing", () => {
    const deps = readElfDepsFile("/bin/busybox");
    expect(deps).toEqual({ interp: undefined, needed: [] });
  });

  it("refuses non-ELF input with the file name in the message", () => {
    expect(() => readElfDeps(Buffer.from("#!/bin/sh\n"), "script.sh")).toThrow("script.sh: not an ELF file");
    const elf32 = Buffer.alloc(64);
    elf32.set([0x7f, 0x45, 0x4c, 0x46, 1, 1]);
    expect(() => readElfDeps(elf32, "x")).toThrow(/ELF64/);
  });
});

describe("collectLibs", () => {
  it("closes over DT_NEEDED and dlopened names, with the interpreter under /usr/lib64", () => {
    const libs = collectLibs(["/usr/bin/ls"], ["libkmod.so.2"]);
    const paths = libs.map((l) => l.path);
    expect(paths).toContain("usr/lib64/ld-linux-x86-64.so.2");
    expect(paths).toContain("usr/lib/x86_64-linux-gnu/libc.so.6");
    expect(paths).toContain("usr/lib/x86_64-linux-gnu/libselinux.so.1"); // ls → libselinux
    expect(paths).toContain("usr/lib/x86_64-linux-gnu/libkmod.so.2");
    for (const dep of readElfDepsFile(findLib("libkmod.so.2")!).needed) expect(paths).toContain(`usr/lib/x86_64-linux-gnu/${dep}`);
    // Sources are real files, not the symlinks: the cpio stores contents.
    for (const l of libs) expect(realpathSync(l.source)).toBe(l.source);
  });

  it("names the missing library and who needed it", () => {
    expect(() => collectLibs([], ["libnope.so.9"])).toThrow("library libnope.so.9 (needed by dlopen) not found");
  });

  it("reads the compiled agent's needs from the file, not from a list", () => {
    const deps = readElfDeps(readFileSync("/usr/bin/ls"));
    expect(deps.needed.length).toBeGreaterThan(0);
  });
});
