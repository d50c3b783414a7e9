// Helpers for scenarios on an installed machine's disk: other UKIs on its ESP (signed with the
// same db key, with or without a PCR signature), and host-side looks at and edits of its LUKS2
// header (through a loop device at the partition's offset: no device-mapper needed).
import { execFileSync, spawnSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";

export const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const TEST_SB_KEY = "/usr/share/ovmf/PkKek-1-snakeoil.key";
const TEST_SB_CERT = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
export const PCR_KEY = "build/keys/pcr-test.key";
export const PCR_PUB = "build/keys/pcr.pub.pem";

function partitionStart(disk: string, name: string): number {
  const t = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as { partitiontable: { partitions: { start: number; name?: string }[] } };
  const p = t.partitiontable.partitions.find((x) => x.name === name);
  if (!p) throw new Error(`${disk}: no partition named ${name}`);
  return p.start * 512;
}

/** Writes `file` as the firmware's removable-media boot path on the disk's ESP `slot` (a or b). */
export function putUki(disk: string, file: string, slot = "a"): void {
  execFileSync("mcopy", ["-o", "-i", `${disk}@@${partitionStart(disk, `initos-${slot}`)}`, file, "::/EFI/BOOT/BOOTX64.EFI"]);
}

/** The names on an ESP directory (mdir -b), e.g. to show nothing secret is there. */
export function espFiles(disk: string, dir: string, slot = "a"): string[] {
  const r = spawnSync("mdir", ["-b", "-i", `${disk}@@${partitionStart(disk, `initos-${slot}`)}`, `::/${dir}`], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.split("\n").filter(Boolean) : [];
}

/** Runs `fn` with the disk's LUKS2 partition on a loop device (read-only unless `rw`). */
export function withLuks<T>(disk: string, fn: (dev: string) => T, rw = false): T {
  const off = partitionStart(disk, "initos-luks");
  const dev = execFileSync("losetup", ["-f", "--show", ...(rw ? [] : ["-r"]), "-o", String(off), disk], { encoding: "utf8" }).trim();
  try {
    return fn(dev);
  } finally {
    execFileSync("losetup", ["-d", dev]);
  }
}

/** Every token in the header, by id. */
export function tokens(disk: string): Map<number, Record<string, unknown>> {
  return withLuks(disk, (dev) => {
    const meta = JSON.parse(execFileSync("cryptsetup", ["luksDump", "--dump-json-metadata", dev], { encoding: "utf8" })) as { tokens: Record<string, Record<string, unknown>> };
    return new Map(Object.entries(meta.tokens).map(([id, t]) => [Number(id), t]));
  });
}

/** Replaces token `id` with `json` (a forged token, as anyone with the disk could write). */
export function replaceToken(disk: string, id: number, json: Record<string, unknown>): void {
  withLuks(
    disk,
    (dev) => execFileSync("cryptsetup", ["token", "import", "--token-id", String(id), "--token-replace", dev], { input: JSON.stringify(json) }),
    true,
  );
}

/** Whether `passphrase` opens a keyslot (cryptsetup's own check, no activation). */
export function passphraseOpens(disk: string, passphrase: string): boolean {
  return withLuks(disk, (dev) => spawnSync("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", dev], { input: passphrase }).status === 0);
}

/** The production UKI's .pcrsig section: the PCR key's signature an attacker can copy off the ESP. */
export function pcrSignatureOf(uki: string, out: string): string {
  execFileSync("objcopy", ["-O", "binary", "--only-section=.pcrsig", uki, out]);
  if (readFileSync(out).length === 0) throw new Error(`${uki} has no .pcrsig`);
  return out;
}

export interface UkiVariant {
  cmdline: string;
  /** The initrd (default: the installed machine's). */
  initrd?: string;
  /** Sign PCR 11 with the PCR key, as the build does for production UKIs. */
  pcrSigned: boolean;
}

/**
 * Another UKI from the build's parts, signed with the same (test) db key: `pcrSigned` makes it
 * a production UKI (the PCR key signs its PCR 11), otherwise it is any other UKI of the build.
 */
export function variantUki(dir: string, name: string, v: UkiVariant): string {
  const unsigned = `${dir}/${name}.unsigned.efi`;
  execFileSync(
    BUN,
    [
      "initrd/build.ts", "uki", "--kernel", "build/kernel.json", "--initrd", v.initrd ?? "build/target.initrd", "--cmdline", v.cmdline,
      "--pcrpkey", PCR_PUB, ...(v.pcrSigned ? ["--pcr-key", PCR_KEY] : []), "--out", unsigned,
    ],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  const out = `${dir}/${name}.efi`;
  execFileSync("bash", ["-c", 'sbsign --key <(openssl pkey -in "$1" -passin env:P) --cert "$2" --output "$3" "$4"', "-", TEST_SB_KEY, TEST_SB_CERT, out, unsigned], {
    env: { ...process.env, P: "snakeoil" },
    stdio: ["ignore", "ignore", "inherit"],
  });
  return out;
}

/** An initrd made of the installed machine's plus one more segment holding `files`. */
export function initrdWith(dir: string, name: string, files: Record<string, string>): string {
  const adds = Object.entries(files).flatMap(([dest, content], i) => {
    const f = `${dir}/${name}-add${i}`;
    writeFileSync(f, content);
    return ["--add", `${dest}=${f}`];
  });
  execFileSync(BUN, ["initrd/build.ts", "initrd-extra", ...adds, "--out", `${dir}/${name}.cpio`], { stdio: ["ignore", "ignore", "inherit"] });
  execFileSync("sh", ["-c", `zstd -q -3 -f ${dir}/${name}.cpio -o ${dir}/${name}.cpio.zst && cat build/target.initrd ${dir}/${name}.cpio.zst > ${dir}/${name}.initrd`]);
  return `${dir}/${name}.initrd`;
}
