// A private, consistent copy of the build outputs the benchmark uses. Other people run `make`
// in this checkout while a bench runs for many minutes: booting build/installer.img while it is
// being rewritten, or measuring a half-written agent.cpio, gives garbage. So: wait until no
// input has changed for a few seconds, copy them (sparse), and check nothing moved meanwhile.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, statSync } from "node:fs";
import { dirname } from "node:path";
import { cpioFiles } from "./sizes.ts";

/** Relative to build/. The first group is needed; the rest is only reported. */
export const NEEDED = ["installer.img", "reference.efi", "boot.img", "initrd.img", "vmlinuz", "agent.cpio"];
const REPORTED = [
  "target.efi", "initos.efi", "base.cpio", "base.cpio.zst", "agent.cpio.zst", "initos-agent", "reference.cpio", "reference.initrd",
  "images/modules.sqfs", "images/tools.sqfs",
];

const QUIET_MS = 10_000;

function mtimes(build: string, files: string[]): Map<string, number> {
  return new Map(files.filter((f) => existsSync(`${build}/${f}`)).map((f) => [f, statSync(`${build}/${f}`).mtimeMs]));
}

/** A complete archive ends with its trailer (cpioFiles throws on a torn one). */
function complete(cpio: string): boolean {
  try {
    return cpioFiles(cpio).length > 0;
  } catch {
    return false;
  }
}

const same = (a: Map<string, number>, b: Map<string, number>) => a.size === b.size && [...a].every(([k, v]) => b.get(k) === v);

/** Copies the inputs from `build` into `dir`; returns `dir`. Throws after `timeoutMs` of churn. */
export async function snapshotInputs(build: string, dir: string, timeoutMs = 600_000): Promise<string> {
  const files = [...NEEDED, ...REPORTED];
  for (const f of NEEDED) if (!existsSync(`${build}/${f}`)) throw new Error(`${build}/${f} is missing: run make all build/reference.efi (make bench does)`);
  const start = Date.now();
  for (let said = false; ; ) {
    const before = mtimes(build, files);
    const newest = Math.max(...before.values());
    const quietFor = Date.now() - newest;
    if (quietFor >= QUIET_MS) {
      for (const f of before.keys()) {
        mkdirSync(dirname(`${dir}/${f}`), { recursive: true });
        execFileSync("cp", ["--sparse=always", `${build}/${f}`, `${dir}/${f}`]);
      }
      if (same(before, mtimes(build, files)) && complete(`${dir}/agent.cpio`)) return dir;
    }
    if (Date.now() - start > timeoutMs) throw new Error(`build outputs kept changing for ${timeoutMs / 1000} s (someone is running make)`);
    if (!said) console.log("bench: build outputs are being rewritten (make running?); waiting until they settle");
    said = true;
    await new Promise((r) => setTimeout(r, Math.max(1000, QUIET_MS - quietFor)));
  }
}
