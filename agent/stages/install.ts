// Install mode (the USB installer): turns a blank disk into an initos machine, driven only by
// the signed install config in the installer's initrd.
//
//   GPT: ESP A | ESP B | LUKS2 (the rest)        UKI + verified images on both ESPs
//   LUKS2: keyslot 0 = 32 random bytes (PBKDF2, minimal), keyslot 1 = recovery passphrase (argon2id)
//   btrfs "INITOSROOT": @root (the root filesystem), @home, @log, @cache, initos.json; the
//        root filesystem is a NAME.tar or NAME.tar.zst on the stick, streamed (never whole in
//        memory) and checked against the signed sha256 from the one read of it
//   TPM: the 32 bytes sealed to the signed config's binding (PCR 7 + the PCR signer's PCR 11
//        policy + the latch PCR at zero) as a systemd-tpm2 token in the LUKS2 header; nothing
//        secret and nothing that carries policy on the ESPs
//
// This is the only place the agent writes to a disk, and it refuses a disk that is not blank
// unless the config says to overwrite it.
import { createHash } from "node:crypto";
import { Readable, pipeline } from "node:stream";
import zlib from "node:zlib";
import { z } from "zod";
import type { AgentConfig } from "../config.ts";
import { BootError, describe, zodIssue } from "../errors.ts";
import { type Bind, HOST_CONFIG_JSON, parseHostJson } from "../hostconfig.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import { RECOVERY_KDF, TPM_KDF } from "../sys/cryptsetup.ts";
import type { Clock, Console, Crypt, Devices, Files, Modules, Mounts, Processes, Tpm } from "../sys/index.ts";
import { toolArgv } from "../sys/tools.ts";
import { type Coldplug, waitUntil } from "./devices.ts";
import { ESP_TYPE, type EspResult, mountEsp } from "./esp.ts";
import type { MountedImage } from "./images.ts";
import { loadCryptModules } from "./volumes.ts";
import { keyslotPassphrase, requirement, sealKey } from "../diskkey/diskkey.ts";
import { sealedHostKeyPath, sealHostKey } from "../diskkey/hostkey.ts";
import { BUSYBOX, ensureHostKey } from "./sidecar.ts";
import type { BootTpm } from "../diskkey/latch.ts";
import type { SecureBoot } from "./early.ts";
import { describeBinding } from "../diskkey/token.ts";

export const INSTALL_CONFIG = "/etc/initos/install.json";

export const InstallConfigSchema = z
  .object({
    /** The disk to install to, e.g. /dev/vdb or /dev/nvme0n1. */
    target: z.string().regex(/^\/dev\/[\w/-]+$/, "expected a /dev path"),
    /** Allow a disk that is not blank. Everything on it is destroyed. */
    overwrite: z.boolean().default(false),
    /** Files on the installer's ESP under <esp dir>/<source>/: the target UKI and the root fs. */
    source: z.string().regex(/^[\w.-]+$/).default("install"),
    /**
     * The root filesystem under <source>/: NAME.tar, or NAME.tar.zst (zstd, decompressed as it
     * is read); the name decides, so what is unpacked how is signed too. sha256 is of the file
     * as stored (for .tar.zst: the compressed bytes).
     */
    rootfs: z
      .object({
        file: z.string().regex(/^[\w.-]+\.tar(\.zst)?$/, { error: (i) => `expected NAME.tar or NAME.tar.zst, not ${JSON.stringify(i.input)}` }),
        sha256: z.string().regex(/^[0-9a-f]{64}$/),
      })
      .strict(),
    root: z.string().regex(/^@?[\w.-]+$/).default("@root"),
    subvolumes: z.array(z.string().regex(/^@?[\w.-]+$/)).default(["@home", "@log", "@cache"]),
    /**
     * Each of the two ESPs (A/B), 500 MiB as InitOS's. Today one holds ~96 MB (the UKI 62 MB,
     * the verified images 32 MB): room to write an update's set beside the old one before the
     * switch, and for images that grow (firmware, more modules).
     */
    espMiB: z.number().int().min(64).max(4096).default(500),
  })
  .strict();
export type InstallConfig = z.output<typeof InstallConfigSchema>;

export function parseInstallConfig(text: string | null): InstallConfig {
  if (text === null) throw new BootError(`install: no ${INSTALL_CONFIG} in this initrd`);
  const r = InstallConfigSchema.safeParse(JSON.parse(text));
  if (r.success) return r.data;
  throw new BootError(`install: ${INSTALL_CONFIG}: ${zodIssue(r.error)}`);
}

/** How the root filesystem is stored, from its name (the schema admits only these two). */
export function rootfsFormat(file: string): "tar" | "tar.zst" {
  return file.endsWith(".tar.zst") ? "tar.zst" : "tar";
}

/** Bytes in, the bytes they decompress to out, as they come: never the whole file in memory. */
export type Decompressor = (input: AsyncIterable<Uint8Array>) => AsyncIterable<Uint8Array>;

/**
 * zstd in-process: the agent runs under Bun, whose node:zlib has createZstdDecompress (Bun
 * 1.4.5; on the host it decompresses the 125 MB Debian root at ~350 MB/s; in the installer,
 * under TCG, reading, decompressing and unpacking debian.tar.zst into the encrypted pool took
 * 14-37 s). Node 20, where the unit tests run, has none: they hand install() the zstd tool
 * instead. A decompressor is pure computation, not a side effect, so it is a parameter rather
 * than part of Sys. Measured in Bun 1.4.5: a stream cut short ends quietly, without an error;
 * only the signed hash catches that.
 */
export const runtimeZstd: Decompressor = (input) => {
  if (typeof zlib.createZstdDecompress !== "function") throw new Error("this runtime has no zstd (node:zlib createZstdDecompress)");
  // pipeline(): an error on either side ends the iteration below with that error.
  return pipeline(Readable.from(input), zlib.createZstdDecompress(), () => {});
};

/** /dev/vdb + 3 → /dev/vdb3; /dev/nvme0n1 + 3 → /dev/nvme0n1p3 */
export function partition(disk: string, n: number): string {
  return `${disk}${/\d$/.test(disk) ? "p" : ""}${n}`;
}

/** 32 characters without look-alikes; 8 groups of 5 = 200 bits. */
export function recoveryPassphrase(random: Uint8Array): string {
  const alphabet = "abcdefghjkmnpqrstuvwxyz23456789";
  const chars = [...random.subarray(0, 40)].map((b) => alphabet[b % alphabet.length]);
  return Array.from({ length: 8 }, (_, i) => chars.slice(i * 5, i * 5 + 5).join("")).join("-");
}

/**
 * Unpacks the root filesystem from the installer's stick into `dest`, reading it once: each
 * chunk is hashed and handed on (through the decompressor for a .tar.zst) to busybox tar's
 * stdin, so the bytes checked are the bytes unpacked (reading the stick twice, once to hash and
 * once to unpack, lets a stick that changes in between pass the check), and the file is never
 * whole in memory (a root filesystem can be larger than RAM). The hash can only be compared at
 * the end, after tar has written what it got: a mismatch then fails the install, leaving a
 * half-unpacked @root behind. That is acceptable because nothing can use it: the host config is
 * not written, the key is not sealed to the TPM and no ESP gets a UKI, so the disk never boots
 * and the next install starts over.
 *
 * Whatever stops reading early (tar at its end-of-archive blocks, the decompressor on garbage)
 * leaves the rest of the file to be read and hashed here: the file is always hashed whole, so a
 * stick that is not the signed one is reported as that, the cause, and not as tar's or zstd's
 * complaint about it.
 */
async function unpackVerified(sys: Files & Processes & Clock, log: Logger, rootfs: string, sha256: string, dest: string, unzstd: Decompressor): Promise<void> {
  const file = rootfs.slice(rootfs.lastIndexOf("/") + 1);
  const format = rootfsFormat(file);
  const hash = createHash("sha256");
  let read = 0;
  let unpacked = 0;
  const chunks = sys.readChunks(rootfs, 1 << 20)[Symbol.asyncIterator]();
  const next = async (): Promise<IteratorResult<Uint8Array>> => {
    const r = await chunks.next();
    if (!r.done) {
      hash.update(r.value);
      read += r.value.length;
    }
    return r;
  };
  // return() is a no-op: a consumer that stops does not close the file, drain() reads on.
  const stored: AsyncIterable<Uint8Array> = { [Symbol.asyncIterator]: () => ({ next, return: async () => ({ done: true, value: undefined }) }) };
  const drain = async () => {
    while (!(await next()).done);
  };
  async function* counted(src: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
    for await (const c of src) {
      unpacked += c.length;
      yield c;
    }
  }
  async function* decompressed(): AsyncGenerator<Uint8Array> {
    try {
      yield* unzstd(stored);
    } catch (e) {
      throw new BootError(`install: ${file}: zstd: ${describe(e)}`);
    }
  }
  const checked = () => {
    const sum = hash.digest("hex");
    if (sum !== sha256) throw new BootError(`install: ${file} has sha256 ${sum.slice(0, 16)}..., the signed config expects ${sha256.slice(0, 16)}...`);
  };
  const start = sys.now();
  log.info(`install: unpacking ${file} (${format === "tar.zst" ? "zstd" : "tar"}, streamed) into ${dest}`);
  try {
    await sys.runWithInput([BUSYBOX, "tar", "-x", "-f", "-", "-C", dest], counted(format === "tar.zst" ? decompressed() : stored));
  } catch (e) {
    await drain();
    checked();
    throw e;
  }
  await drain();
  checked();
  const mb = (n: number) => (n / 1e6).toFixed(1);
  log.info(`install: ${file}: ${mb(read)} MB read, sha256 as signed; ${mb(unpacked)} MB unpacked in ${((sys.now() - start) / 1000).toFixed(1)}s`);
}

/**
 * The binds the installed machine's boot will mount (the host config the install writes names
 * no binds, so the defaults: @home on /home, @log on /var/log, @cache on /var/cache), limited to
 * the subvolumes this install creates, parents first.
 *
 * They are mounted inside the new @root *before* the root filesystem is unpacked, so tar writes
 * Debian's /var/cache/debconf, /var/log/apt, ... straight into the subvolumes the OS will see
 * there, instead of into @root where the boot's binds would hide them under empty subvolumes.
 * The alternative, moving the content after the unpack, would write it twice: a rename between
 * btrfs subvolumes is EXDEV, so mv copies. Nothing of the root filesystem exists yet when the
 * mount points are made (the install owns this fresh disk), so no path can lead elsewhere. The
 * cost: a hard link across a bind (none in Debian) or a bound path that is a symlink in the
 * tarball fails the install with tar's line; the boot would refuse such a bind anyway.
 */
export function bindsToSeed(ic: InstallConfig, hostConfig: string): Bind[] {
  return parseHostJson(hostConfig)
    .binds.filter((b) => ic.subvolumes.includes(b.subvol))
    .sort((a, b) => a.path.split("/").length - b.path.split("/").length);
}

const LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const TARGET = "/run/initos/target";

/**
 * The recovery sidecar's ssh host key: made here, sealed (hostkey.ts) for the ESPs, and its
 * public half for the operator to pin. The private key is only in /run until the power-off.
 */
function recoveryHostKey(sys: Files & Processes & Clock, tpm: BootTpm, req: ReturnType<typeof requirement>, secureBoot: SecureBoot): { sealed: string; publicKey: string } {
  const file = ensureHostKey(sys);
  const key = sys.readBytes(file);
  if (!key) throw new BootError(`install: could not make the recovery ssh host key ${file}`);
  const sealed = sealHostKey(tpm.tpm, req, secureBoot, key);
  key.fill(0);
  const publicKey = /^(ssh-ed25519 [A-Za-z0-9+/=]+)/m.exec(sys.run([...toolArgv("dropbearkey"), "-y", "-f", file]))?.[1];
  if (!publicKey) throw new BootError("install: dropbearkey printed no public key for the recovery ssh host key");
  return { sealed, publicKey };
}

/** What install touches: nearly everything but the network. */
type InstallSys = Files & Mounts & Modules & Devices & Crypt & Tpm & Processes & Clock & Console;

/** The installer stick's files, all present before anything is written. */
interface Sources {
  rootfs: string;
  uki: string;
  /** Each verified image's files, from the slot the images stage verified it in: [from, name]. */
  images: [string, string][];
}

export async function install(sys: InstallSys, log: Logger, cold: Coldplug, cfg: AgentConfig, ic: InstallConfig, esp: EspResult, images: readonly MountedImage[], tpm: BootTpm, secureBoot: SecureBoot, unzstd: Decompressor = runtimeZstd): Promise<void> {
  // 0. A machine that cannot seal the key would get a disk only the passphrase opens, or one
  //    whose key any kernel could unseal: refuse before anything is written.
  if (secureBoot !== "on") throw new BootError(`install: refusing to install: Secure Boot is ${secureBoot}, so the disk key could not be sealed to anything that protects it`);
  if (!tpm.present) throw new BootError("install: refusing to install: no TPM to seal the disk key to");
  const req = requirement(cfg);
  if (req.signedPcrs.length && !req.signer) throw new BootError("install: refusing to install: the signed config names no PCR signer (tpm.pcrPublicKey)");

  // 1. Inputs first: nothing is touched until everything we will copy is present. The root
  //    filesystem's hash is checked as it is unpacked (step 4), from the one read of it.
  const src = sources(sys, cfg, ic, esp, images);
  await waitUntil(sys, log, cold, `install target ${ic.target}`, cfg.rootWaitSeconds, () => (sys.exists(ic.target) ? ic.target : null));
  if (!ic.overwrite) refuseIfNotBlank(sys, ic.target);

  // 2. Partitions: ESP A, ESP B, LUKS2.
  const [espA, espB, luksPart] = await partitionDisk(sys, log, cold, ic);

  // 3. LUKS2 with the TPM key and the recovery passphrase.
  log.info(`install: formatting ${luksPart} as LUKS2`);
  loadCryptModules(sys, log);
  const key = sys.randomBytes(32);
  const keyPass = keyslotPassphrase(key);
  const recovery = recoveryPassphrase(sys.randomBytes(40));
  const tpmSlot = sys.luks.format(luksPart, keyPass, TPM_KDF);
  sys.luks.addKey(luksPart, keyPass, Buffer.from(recovery), RECOVERY_KDF);
  const mapper = sys.luks.open(luksPart, "initos-install", keyPass, 0).path;

  // 4. btrfs, subvolumes, the root filesystem, the host config.
  try {
    await fillPool(sys, log, ic, mapper, src.rootfs, unzstd);
  } finally {
    sys.luks.close("initos-install");
  }

  // 5. Seal the key for the state this machine boots in: PCR 7 as now, PCR 11 as the PCR key
  //    signs it for production UKIs, the latch at zero; the token goes into the LUKS2 header.
  const sealed = sealKey(sys, tpm.tpm, req, secureBoot, luksPart, key, tpmSlot);
  key.fill(0);
  keyPass.fill(0);
  log.info(`install: sealed the disk key as token ${sealed.token} for keyslot ${sealed.keyslot}`);
  const hostKey = recoveryHostKey(sys, tpm, req, secureBoot);

  // 6. Both ESPs: the UKI at the removable-media path, the images, the sealed ssh host key.
  for (const [slot, part] of [["A", espA], ["B", espB]] as const) writeEsp(sys, cfg, slot, part, src, hostKey.sealed);

  // 7. The recovery passphrase, once, on the console only (never in the kernel log).
  //    The recovery sidecar's host key is public: the operator pins it before ever sending the
  //    passphrase to this machine over a network.
  sys.toConsole(`\n\nRECOVERY PASSPHRASE (shown once, write it down): ${recovery}\n\n`);
  log.info(`install: recovery ssh host key (pin it): ${hostKey.publicKey}`);
  log.info(`install: done: ${ic.target} has ${ic.root} and ${ic.subvolumes.join(" ")}, sealed to ${describeBinding([...req.pcrs, req.latchPcr], req.signedPcrs)}`);
}

/**
 * The files to install, each checked present: the root filesystem and the target UKI from the
 * installer's own slot, and every image from the slot whose copy the images stage verified
 * (the copy that was proven, not whichever slot comes first).
 */
function sources(sys: Files & Mounts, cfg: AgentConfig, ic: InstallConfig, esp: EspResult, images: readonly MountedImage[]): Sources {
  const dirOf = (slotName: string) => {
    const slot = esp.slots.find((s) => s.name === slotName);
    if (!slot) throw new BootError(`install: no ESP slot ${slotName}`);
    return `${mountEsp(sys, slot)}/${cfg.esp.dir}`;
  };
  const src = `${dirOf(esp.slots[0]!.name)}/${ic.source}`;
  const files: Sources = { rootfs: `${src}/${ic.rootfs.file}`, uki: `${src}/BOOTX64.EFI`, images: [] };
  for (const image of cfg.images) {
    const verified = images.find((m) => m.name === image.name && m.verified);
    if (!verified) throw new BootError(`install: image ${image.name} was not verified this boot; refusing to install it`);
    for (const ext of ["sqfs", "verity"]) files.images.push([`${dirOf(verified.slot)}/${image.name}.${ext}`, `${image.name}.${ext}`]);
  }
  for (const f of [files.rootfs, files.uki, ...files.images.map(([from]) => from)]) {
    if (sys.lstat(f).kind !== "file") throw new BootError(`install: ${f} is missing`);
  }
  return files;
}

/** Only a head read and seen to be zeros counts as blank: a disk that cannot be read (yet) may well hold someone's data. */
function refuseIfNotBlank(sys: Files, target: string): void {
  const head = sys.readBytes(target, 1 << 20);
  if (!head || head.length === 0) throw new BootError(`install: cannot read the first MiB of ${target}, so it cannot be shown blank; set "overwrite": true in the install config to destroy it`);
  if (head.some((b) => b !== 0)) throw new BootError(`install: ${target} is not blank (its first MiB has data); set "overwrite": true in the install config to destroy it`);
}

/** GPT: ESP A, ESP B (espMiB each), LUKS2 on the rest; their device paths once they appear. */
async function partitionDisk(sys: Processes & Files & Clock, log: Logger, cold: Coldplug, ic: InstallConfig): Promise<[string, string, string]> {
  log.info(`install: partitioning ${ic.target}`);
  const mib = 2048; // sectors
  const table = [
    "label: gpt",
    `start=${mib}, size=${ic.espMiB * mib}, type=${ESP_TYPE}, name="initos-a"`,
    `size=${ic.espMiB * mib}, type=${ESP_TYPE}, name="initos-b"`,
    `type=${LINUX_TYPE}, name="initos-luks"`,
  ].join("\n");
  sys.run([...toolArgv("sfdisk"), "-q", "--wipe", "always", ic.target], Buffer.from(`${table}\n`));
  const parts = [1, 2, 3].map((n) => partition(ic.target, n)) as [string, string, string];
  await waitUntil(sys, log, cold, `partition ${parts[2]}`, 10, () => (sys.exists(parts[2]) ? parts[2] : null));
  return parts;
}

/**
 * btrfs on the opened volume: the root and the other subvolumes, the root filesystem (with the
 * bound subvolumes mounted where the boot will bind them: see bindsToSeed), the host config.
 */
async function fillPool(sys: Files & Mounts & Modules & Processes & Clock, log: Logger, ic: InstallConfig, mapper: string, rootfs: string, unzstd: Decompressor): Promise<void> {
  log.info("install: creating the btrfs pool");
  const tool = (name: string, ...args: string[]) => sys.run([...toolArgv(name), ...args]);
  tool("mkfs.btrfs", "-q", "-f", "-L", "INITOSROOT", mapper);
  sys.loadModule("btrfs");
  sys.mkdirp(TARGET, 0o700);
  sys.mount(mapper, TARGET, "btrfs", 0, "subvolid=5");
  try {
    for (const sv of [ic.root, ...ic.subvolumes]) tool("btrfs", "-q", "subvolume", "create", `${TARGET}/${sv}`);
    const hostConfig = JSON.stringify({ root: ic.root }, null, 1) + "\n";
    const rootDir = `${TARGET}/${ic.root}`;
    const mounted: string[] = [];
    try {
      for (const b of bindsToSeed(ic, hostConfig)) {
        sys.mkdirp(`${rootDir}${b.path}`);
        sys.mount(mapper, `${rootDir}${b.path}`, "btrfs", 0, `subvol=${b.subvol}`);
        mounted.push(`${rootDir}${b.path}`);
      }
      await unpackVerified(sys, log, rootfs, ic.rootfs.sha256, rootDir, unzstd);
    } finally {
      for (const m of mounted.reverse()) sys.umount(m, 0);
    }
    sys.writeFile(`${TARGET}/${HOST_CONFIG_JSON}`, hostConfig);
  } finally {
    sys.sync();
    sys.umount(TARGET, 0);
  }
}

/** One ESP of the installed disk: FAT32, the UKI at the removable-media path, the images, the sealed host key. */
function writeEsp(sys: Files & Mounts & Modules & Processes, cfg: AgentConfig, slot: "A" | "B", part: string, src: Sources, sealedHostKey: string): void {
  sys.run([...toolArgv("mkfs.fat"), "-F", "32", "-s", "1", "-n", `INITOS_${slot}`, part]);
  const mnt = `${TARGET}-esp`;
  sys.mkdirp(mnt, 0o700);
  sys.loadModule("vfat");
  sys.mount(part, mnt, "vfat", MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
  try {
    sys.mkdirp(`${mnt}/EFI/BOOT`);
    sys.mkdirp(`${mnt}/${cfg.esp.dir}`);
    sys.copyFile(src.uki, `${mnt}/EFI/BOOT/BOOTX64.EFI`);
    for (const [from, name] of src.images) sys.copyFile(from, `${mnt}/${cfg.esp.dir}/${name}`);
    sys.writeFile(sealedHostKeyPath(mnt, cfg.esp.dir), sealedHostKey);
  } finally {
    sys.sync();
    sys.umount(mnt, MNT_DETACH);
  }
}
