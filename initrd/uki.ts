// Builds a Unified Kernel Image: systemd's EFI stub with the kernel, initrd, cmdline and
// os-release added as PE sections, then signs it. ukify is not in this Debian, so the section
// addresses are computed here from the stub's own section table.
import { execFileSync } from "node:child_process";
import { readFileSync, statSync } from "node:fs";
import { readPe } from "./pe.ts";

export const STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

export interface UkiPart {
  section: ".osrel" | ".cmdline" | ".initrd" | ".linux";
  file: string;
}

export interface UkiLayoutEntry {
  section: string;
  file: string;
  /** Absolute VMA (image base + RVA), as objcopy and `objdump -h` show it. */
  vma: bigint;
  size: number;
}

const PAGE = 0x1000;
const alignUp = (n: bigint, a: bigint) => ((n + a - 1n) / a) * a;

/**
 * Places each part after the stub's last section, page aligned. The kernel goes last: it is
 * the largest part and the stub hands it over in place.
 */
export function computeLayout(stub: Uint8Array, parts: readonly UkiPart[], sizeOf: (file: string) => number): UkiLayoutEntry[] {
  const pe = readPe(stub);
  const align = BigInt(Math.max(PAGE, pe.sectionAlignment));
  let next = 0n;
  for (const s of pe.sections) {
    const end = BigInt(s.virtualAddress + s.virtualSize);
    if (end > next) next = end;
  }
  next = alignUp(next, align);
  const ordered = [...parts].sort((a, b) => Number(a.section === ".linux") - Number(b.section === ".linux"));
  return ordered.map((p) => {
    const size = sizeOf(p.file);
    const entry = { section: p.section, file: p.file, vma: pe.imageBase + next, size };
    next = alignUp(next + BigInt(size), align);
    return entry;
  });
}

export function buildUki(out: string, parts: readonly UkiPart[], stub = STUB): UkiLayoutEntry[] {
  const layout = computeLayout(readFileSync(stub), parts, (f) => statSync(f).size);
  const args: string[] = [];
  for (const e of layout) {
    args.push("--add-section", `${e.section}=${e.file}`, "--change-section-vma", `${e.section}=0x${e.vma.toString(16)}`);
  }
  execFileSync("objcopy", [...args, stub, out], { stdio: ["ignore", "inherit", "inherit"] });
  return layout;
}

export interface SigningKey {
  key: string;
  cert: string;
}

export function signUki(input: string, out: string, k: SigningKey): void {
  execFileSync("sbsign", ["--key", k.key, "--cert", k.cert, "--output", out, input], { stdio: ["ignore", "ignore", "inherit"] });
}
