// Builds a Unified Kernel Image: systemd's EFI stub with the kernel, initrd, cmdline and
// os-release added as PE sections, then signs it. ukify is not in this Debian, so the section
// addresses are computed here from the stub's own section table.
//
// Optional sections: .pcrpkey (the PCR signer's public key) and .pcrsig (the signed PCR 11
// policy, initrd/measure.ts). The stub measures every section into PCR 11 except .pcrsig,
// which cannot sign itself.
import { execFileSync } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { pcrSignature } from "./measure.ts";
import { peChecksum, peHeaderOffsets, peSection, readPe } from "./pe.ts";

export const STUB = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

export interface UkiPart {
  section: ".osrel" | ".cmdline" | ".initrd" | ".pcrpkey" | ".pcrsig" | ".linux";
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

export function buildUki(out: string, parts: readonly UkiPart[], stub = STUB, env: NodeJS.ProcessEnv = process.env): UkiLayoutEntry[] {
  const layout = computeLayout(readFileSync(stub), parts, (f) => statSync(f).size);
  const args: string[] = [];
  for (const e of layout) {
    args.push("--add-section", `${e.section}=${e.file}`, "--change-section-vma", `${e.section}=0x${e.vma.toString(16)}`);
  }
  execFileSync("objcopy", [...args, stub, out], { stdio: ["ignore", "inherit", "inherit"], env });
  fixTimestamp(out, stub);
  return layout;
}

/**
 * objcopy (binutils 2.40) writes the current time into the COFF header, ignoring
 * SOURCE_DATE_EPOCH, so two builds of one UKI differed in it and in the checksum over it
 * (measured: bytes 137-140 and 217-220). It is set back to the stub's own (0 in Debian's) and
 * the checksum recomputed (40 ms for a 60 MB UKI): the same parts give the same bytes on every
 * machine (issue #15). Neither field is measured into PCR 11 (only sections are); Authenticode
 * signing comes after.
 */
function fixTimestamp(file: string, stub = STUB): void {
  const data = readFileSync(file);
  const off = peHeaderOffsets(data);
  const stubData = readFileSync(stub);
  data.writeUInt32LE(stubData.readUInt32LE(peHeaderOffsets(stubData).timeDateStamp), off.timeDateStamp);
  data.writeUInt32LE(peChecksum(data, off.checkSum), off.checkSum);
  writeFileSync(file, data);
}

/** A UKI's contents as files. Every one of them is measured into PCR 11 by the stub. */
export interface UkiInputs {
  linux: string;
  initrd: string;
  /** The .cmdline section's file, byte for byte (NUL-terminated). */
  cmdline: string;
  osrel: string;
  /** The PCR signer's public key (PEM): added as .pcrpkey. */
  pcrpkey?: string;
  /**
   * The PCR signer's private key (PEM): adds .pcrsig, the signed PCR 11 policy of exactly these
   * sections. Without it the UKI can never unseal a key sealed to the signer.
   */
  pcrKey?: { path: string; passphraseEnv?: string };
}

/**
 * Builds a UKI from `inputs`; with a PCR key, first signs the PCR 11 value the stub will measure
 * for the very files that go into the image (.pcrsig is written into `workDir`).
 */
export function buildUkiFrom(out: string, inputs: UkiInputs, workDir: string, stub = STUB): UkiLayoutEntry[] {
  const parts: UkiPart[] = [
    { section: ".osrel", file: inputs.osrel },
    { section: ".cmdline", file: inputs.cmdline },
    { section: ".initrd", file: inputs.initrd },
  ];
  if (inputs.pcrpkey) {
    const text = readFileSync(inputs.pcrpkey, "utf8");
    if (text.includes("PRIVATE KEY")) throw new Error(`--pcrpkey ${inputs.pcrpkey} holds a private key: embed the public key`);
    const key = createPublicKey(text);
    if (key.asymmetricKeyType !== "rsa") throw new Error(`--pcrpkey ${inputs.pcrpkey}: expected an RSA public key, got ${key.asymmetricKeyType}`);
    parts.push({ section: ".pcrpkey", file: inputs.pcrpkey });
  }
  if (inputs.pcrKey) {
    if (!inputs.pcrpkey) throw new Error("a PCR signature needs the public key embedded too (--pcrpkey)");
    const sig = pcrSignature(
      { linux: inputs.linux, initrd: inputs.initrd, cmdline: inputs.cmdline, osrel: inputs.osrel, pcrpkey: inputs.pcrpkey },
      inputs.pcrKey.path,
      inputs.pcrKey.passphraseEnv,
    );
    writeFileSync(`${workDir}/pcrsig`, sig);
    parts.push({ section: ".pcrsig", file: `${workDir}/pcrsig` });
  }
  parts.push({ section: ".linux", file: inputs.linux });
  // No child needs the PCR key's passphrase: objcopy does not get it in its environment either.
  const env = { ...process.env };
  if (inputs.pcrKey?.passphraseEnv) delete env[inputs.pcrKey.passphraseEnv];
  return buildUki(out, parts, stub, env);
}

/** The sections `buildUkiFrom` adds to the stub, in the order of UkiInputs. */
const ADDED = [".linux", ".initrd", ".cmdline", ".osrel", ".pcrpkey"] as const;

/**
 * Adds the signed PCR 11 policy (.pcrsig) to a UKI built without one (`make sign`, on the
 * machine that holds the PCR key): its measured sections are taken back out of the image and
 * the UKI is rebuilt from them with the signature, by the same layout as at build time, so the
 * result is byte for byte what `build.ts uki --pcr-key` gives from the same parts (a section
 * cannot just be appended: the kernel must stay the last section, see computeLayout). Refuses
 * a UKI that already has a .pcrsig or is already Authenticode-signed (that signature would be
 * lost), or that has no .pcrpkey (no key could match the signature).
 */
export function signPcr(unsigned: string, out: string, pcrKey: { path: string; passphraseEnv?: string }, workDir: string, stub = STUB): UkiLayoutEntry[] {
  const data = readFileSync(unsigned);
  const pe = readPe(data);
  if (pe.certificateTable.size !== 0) throw new Error(`${unsigned} is already Authenticode-signed: give the unsigned UKI`);
  if (pe.sections.some((s) => s.name === ".pcrsig")) throw new Error(`${unsigned} already has a .pcrsig`);
  const files: Record<string, string> = {};
  for (const name of ADDED) {
    const bytes = peSection(data, name, pe);
    if (!bytes) throw new Error(`${unsigned} has no ${name} section${name === ".pcrpkey" ? " (built without --pcrpkey: it can never unseal)" : ""}`);
    files[name] = `${workDir}/${name.slice(1)}`;
    writeFileSync(files[name]!, bytes);
  }
  return buildUkiFrom(
    out,
    { linux: files[".linux"]!, initrd: files[".initrd"]!, cmdline: files[".cmdline"]!, osrel: files[".osrel"]!, pcrpkey: files[".pcrpkey"]!, pcrKey },
    workDir,
    stub,
  );
}
