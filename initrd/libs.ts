// Collects the shared libraries that binaries in the initrd need, transitively, by reading
// DT_NEEDED from the ELF files themselves. Libraries loaded with dlopen (koffi's targets) are
// named explicitly by the caller and walked the same way.
import { existsSync, realpathSync } from "node:fs";
import { readElfDepsFile } from "./elf.ts";

export const LIB_DIRS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

/** Where the initrd keeps libraries; /lib and /lib64 are symlinks into /usr (merged /usr). */
export const INITRD_LIB_DIR = "usr/lib/x86_64-linux-gnu";

export interface LibFile {
  /** Path inside the initrd, without a leading slash. */
  path: string;
  /** Real file on the build host. */
  source: string;
}

export function findLib(soname: string, dirs = LIB_DIRS): string | null {
  for (const d of dirs) {
    const p = `${d}/${soname}`;
    if (existsSync(p)) return p;
  }
  return null;
}

/** In the initrd, /lib64/ld-linux-x86-64.so.2 lives at usr/lib64/... behind the /lib64 symlink. */
export function initrdPathFor(absPath: string): string {
  return absPath.replace(/^\/(usr\/)?/, "usr/");
}

/**
 * The closure of libraries for `elfs` (paths on the host) plus `dlopened` sonames. Throws,
 * naming the soname and who needs it, when one cannot be found: a missing library in the
 * initrd is a boot that dies before its first log line.
 */
export function collectLibs(elfs: readonly string[], dlopened: readonly string[] = []): LibFile[] {
  const out = new Map<string, LibFile>();
  const queue: { soname: string; by: string }[] = dlopened.map((s) => ({ soname: s, by: "dlopen" }));
  for (const e of elfs) {
    const deps = readElfDepsFile(e);
    if (deps.interp) out.set(initrdPathFor(deps.interp), { path: initrdPathFor(deps.interp), source: realpathSync(deps.interp) });
    for (const n of deps.needed) queue.push({ soname: n, by: e });
  }
  const seen = new Set<string>();
  while (queue.length) {
    const { soname, by } = queue.shift()!;
    if (seen.has(soname)) continue;
    seen.add(soname);
    const found = findLib(soname);
    if (!found) throw new Error(`library ${soname} (needed by ${by}) not found in ${LIB_DIRS.join(":")}`);
    const path = `${INITRD_LIB_DIR}/${soname}`;
    out.set(path, { path, source: realpathSync(found) });
    for (const n of readElfDepsFile(found).needed) queue.push({ soname: n, by: soname });
  }
  return [...out.values()].sort((a, b) => (a.path < b.path ? -1 : 1));
}
