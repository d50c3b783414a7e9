// Stage "unlock" on the machine: find the encrypted volumes of the pool and open them all with
// the key the TPM releases, or the recovery passphrase from a human (the decisions are
// unlock.ts's; this file does them on LUKS2 volumes, the TPM and the console or ssh).
import type { AdminCaps } from "../admin.ts";
import type { Cmdline } from "../cmdline.ts";
import type { AgentConfig } from "../config.ts";
import { migrateLegacy, type PoolMember, reseal, requirement, unsealTokens, type UnsealedKey } from "../diskkey/diskkey.ts";
import { KEY_KDF_BOUND, type KdfBound, PASSPHRASE_KDF_BOUND, parseLuksHeader, triableSlots, unprotected } from "../diskkey/luksheader.ts";
import type { BootTpm } from "../diskkey/latch.ts";
import { releaseKeys } from "../diskkey/release.ts";
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { CRYPT_ACTIVATE_ALLOW_DISCARDS, CRYPT_ACTIVATE_NO_READ_WORKQUEUE, CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE } from "../sys/cryptsetup.ts";
import type { Clock, Console, Crypt, Devices, Files, Modules, Mounts } from "../sys/index.ts";
import { type Coldplug, waitUntil } from "./devices.ts";
import type { SecureBoot } from "./early.ts";
import { type EspResult, mountEsp, partitions } from "./esp.ts";
import { PassphrasePrompt, type RemoteAdmin, RemoteSecrets } from "./remote.ts";
import { unlock, type UnlockOps, type UnlockResult } from "./unlock.ts";

/**
 * dm-crypt and the ciphers LUKS2 uses by default. The kernel would ask /sbin/modprobe for them
 * on demand, and there is no modprobe here: load them before the first LUKS operation.
 */
const CRYPT_MODULES = ["dm_crypt", "xts", "ecb", "aesni_intel", "algif_skcipher"];
export function loadCryptModules(sys: Modules, log: Logger): void {
  for (const m of CRYPT_MODULES) {
    try {
      sys.loadModule(m);
    } catch (e) {
      log.debug(`crypt modules: ${m}: ${describe(e)}`); // aesni_intel needs AES-NI; xts works without
    }
  }
}

const isLuks = (sys: Devices, dev: string): boolean => {
  try {
    return sys.probe(dev)?.TYPE === "crypto_LUKS";
  } catch {
    return false;
  }
};

/**
 * The LUKS2 partitions of the boot disk (libblkid): where the pool's first volume is. Nothing
 * else is probed before the latch: another disk's header (a USB stick's, an evil maid's) is not
 * read while the TPM can still release the key.
 */
export function luksOnDisk(sys: Files & Devices, disk: string): string[] {
  return partitions(sys)
    .filter((p) => p.disk === disk)
    .map((p) => p.device)
    .filter((d) => isLuks(sys, d));
}

/** LUKS2 block devices (disks and partitions) that are not on `disk`: read only after the latch. */
export function luksElsewhere(sys: Files & Devices, disk: string): string[] {
  const onBootDisk = new Set(partitions(sys).filter((p) => p.disk === disk).map((p) => p.device));
  return sys
    .readdir("/sys/class/block")
    .filter((n) => !/^(loop|ram|dm-|sr|zram)/.test(n))
    .map((n) => `/dev/${n}`)
    .filter((d) => d !== disk && !onBootDisk.has(d) && isLuks(sys, d))
    .sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
}

const OPEN_FLAGS = CRYPT_ACTIVATE_ALLOW_DISCARDS | CRYPT_ACTIVATE_NO_READ_WORKQUEUE | CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE;

/** An opened volume: the LUKS device and its /dev/mapper path. */
export interface OpenedVolume {
  device: string;
  mapper: string;
}

/** What the pool's first volume holds, read once it is open: what every other volume must match. */
export interface PoolIdentity {
  /** The btrfs UUID (FSID), from libblkid. */
  fsid: string;
  /** btrfs devices in the filesystem (the superblock's num_devices). */
  devices: number;
  /** Device UUIDs (libblkid UUID_SUB) already open: a second copy of one is not another device. */
  members: Set<string>;
}

/** btrfs's primary superblock: 64 KiB in; magic at 0x40, num_devices (u64) at 0x88. */
const SUPER = 0x10000;
const BTRFS_MAGIC = "_BHRfS_M";

/**
 * The pool's identity from its first volume, once opened. Its contents are inside the
 * encryption the pool's own secret opened, so they are the pool's; libblkid gives the UUIDs,
 * and the one field it does not print (how many devices the filesystem has) is read from the
 * superblock, whose magic is checked first. null when the volume holds no btrfs: then no other
 * volume is opened, and the mount says what is wrong.
 */
export function poolIdentity(sys: Files & Devices, mapper: string): PoolIdentity | null {
  const p = sys.probe(mapper);
  if (p?.TYPE !== "btrfs" || !p.UUID) return null;
  const sb = sys.readBytes(mapper, SUPER + 0x100);
  if (!sb || sb.length < SUPER + 0x100 || Buffer.from(sb.subarray(SUPER + 0x40, SUPER + 0x48)).toString("latin1") !== BTRFS_MAGIC) return null;
  const devices = Number(new DataView(sb.buffer, sb.byteOffset).getBigUint64(SUPER + 0x88, true));
  return { fsid: p.UUID.toLowerCase(), devices: Math.max(1, Math.min(devices, 1024)), members: new Set(p.UUID_SUB ? [p.UUID_SUB.toLowerCase()] : []) };
}

/**
 * The pool's volumes as the unlock opens them: which are open, and which keyslot opened each,
 * the two things a reseal must know (what it may remove, what it must keep). The first volume
 * is /dev/mapper/initos-pool0; others follow in the order they join.
 */
class OpenVolumes {
  /** Per device: keyslots a key the TPM released opened this boot (what a reseal may remove). */
  readonly provenTpmSlots = new Map<string, Set<number>>();
  /** Per device: the keyslot the recovery passphrase opened (never removed). */
  readonly passphraseSlots = new Map<string, number>();
  identity: PoolIdentity | null = null;

  constructor(
    private readonly sys: Files & Devices & Crypt & Clock,
    private readonly log: Logger,
    readonly first: string,
    readonly disk: string,
    /** Each volume as it is opened (the caller's list: it mounts them). */
    readonly opened: OpenedVolume[],
  ) {}

  isOpen(dev: string): boolean {
    return this.opened.some((o) => o.device === dev);
  }

  /**
   * The keyslots of `dev` that `bound` lets a secret be tried in (only `only` when given), or
   * the reason none may be: a null cipher anywhere refuses the whole volume.
   */
  triable(dev: string, bound: KdfBound, only?: number): { slots: number[]; refused: string[] } | string {
    let meta;
    try {
      meta = parseLuksHeader(dev, this.sys.luks.header(dev));
    } catch (e) {
      return `its LUKS2 metadata cannot be read: ${describe(e)}`;
    }
    const why = unprotected(meta);
    if (why) return `${why}: a null cipher opens with any key`;
    return triableSlots(meta, bound, only);
  }

  /**
   * Opens `dev` with `key`, trying `slots` in order (undefined: any keyslot, in one call, when
   * every keyslot may be tried); the keyslot, or null when the key fits none.
   */
  open(dev: string, key: Uint8Array, slots: readonly (number | undefined)[]): number | null {
    const { sys, log } = this;
    const name = `initos-pool${this.opened.length}`;
    for (const slot of slots) {
      const start = sys.now();
      try {
        const r = sys.luks.open(dev, name, key, OPEN_FLAGS, slot);
        this.opened.push({ device: dev, mapper: r.path });
        log.info(`unlock: opened ${dev} with keyslot ${r.slot} in ${(sys.now() - start).toFixed(0)}ms`);
        return r.slot;
      } catch (e) {
        log.debug(`unlock: ${dev} keyslot ${slot}: ${describe(e)}`);
      }
    }
    return null;
  }

  /**
   * The first volume, with a secret: a refused header fails the boot (this disk is the one the
   * firmware booted; nothing else may stand in for its pool).
   */
  openFirst(key: Uint8Array, bound: KdfBound, only?: number): number | null {
    const t = this.triable(this.first, bound, only);
    if (typeof t === "string") throw new BootError(`unlock: refused ${this.first}: ${t}; nothing opened`);
    for (const r of t.refused) this.log.warn(`unlock: ${this.first}: not tried: ${r}`);
    const slot = this.open(this.first, key, only === undefined && !t.refused.length ? [undefined] : t.slots);
    if (slot !== null) this.identity = poolIdentity(this.sys, this.opened[0]!.mapper);
    return slot;
  }

  /**
   * The pool's other volumes, opened with the secret that opened the first (one secret per
   * pool), each on another disk and read only now, after the latch. A volume joins only if the
   * secret opens it and it holds the pool's btrfs as a device not open yet; every other LUKS2
   * volume gets one line and stays closed (an encrypted backup drive, a copy of a token, a
   * volume someone sealed to this TPM).
   */
  joinOthers(key: Uint8Array, bound: KdfBound, opened: (dev: string, slot: number) => void): void {
    const { log, sys } = this;
    const id = this.identity;
    for (const dev of luksElsewhere(sys, this.disk)) {
      if (!id) {
        log.warn(`unlock: ignored ${dev}: the pool's first volume ${this.first} holds no btrfs to match it with`);
        continue;
      }
      if (id.members.size >= id.devices) {
        log.info(`unlock: ignored ${dev}: not this pool's (btrfs ${id.fsid} has ${id.devices} device(s), all open)`);
        continue;
      }
      const t = this.triable(dev, bound);
      if (typeof t === "string") {
        log.warn(`unlock: ignored ${dev}: ${t}`);
        continue;
      }
      const slot = this.open(dev, key, t.refused.length ? t.slots : [undefined]);
      if (slot === null) {
        log.info(`unlock: ignored ${dev}: the pool's ${bound === KEY_KDF_BOUND ? "key" : "passphrase"} opens none of its keyslots${t.refused.length ? ` (not tried: ${t.refused.join("; ")})` : ""}`);
        continue;
      }
      const mapper = this.opened.at(-1)!.mapper;
      const p = sys.probe(mapper);
      const sub = p?.UUID_SUB?.toLowerCase();
      const why =
        p?.TYPE !== "btrfs" || p.UUID?.toLowerCase() !== id.fsid ? `it holds ${p?.TYPE ?? "nothing known"} ${p?.UUID ?? ""}, not the pool's btrfs ${id.fsid}`.replace("  ", " ")
        : !sub || id.members.has(sub) ? `it is a second copy of pool device ${sub ?? "(no device UUID)"}`
        : null;
      if (why) {
        this.opened.pop();
        sys.luks.close(mapper.slice(mapper.lastIndexOf("/") + 1));
        log.warn(`unlock: ignored ${dev}: ${why}; closed`);
        continue;
      }
      id.members.add(sub!);
      opened(dev, slot);
      log.info(`unlock: ${dev} joins the pool (btrfs ${id.fsid}, device ${id.members.size} of ${id.devices})`);
    }
  }
}

/** The real side effects of unlocking; see UnlockOps. */
export function realUnlockOps(
  sys: Files & Mounts & Modules & Devices & Crypt & Console & Clock,
  log: Logger,
  cfg: AgentConfig,
  tpm: BootTpm,
  secureBoot: SecureBoot,
  esp: EspResult,
  first: string,
  opened: OpenedVolume[],
  /** Starts remote admin the first time a human is asked; null if none can run. */
  recovery?: () => Promise<RemoteSecrets | null>,
  /** The boot's images and the pool's driver, still on their way when the unlock starts (see boot.ts). */
  images: () => Promise<unknown> = async () => {},
): UnlockOps {
  const req = requirement(cfg);
  const vols = new OpenVolumes(sys, log, first, esp.disk, opened);
  const human = new PassphrasePrompt(sys, recovery);
  const proven = (dev: string, slot: number) => vols.provenTpmSlots.set(dev, (vols.provenTpmSlots.get(dev) ?? new Set()).add(slot));
  return {
    hasTpm: tpm.present,
    alreadyLatched: tpm.latched,
    // Only the first volume's tokens: the pool has one secret, sealed there.
    unsealKeys: () => releaseKeys(sys, log, tpm.tpm, req, mountEsp(sys, esp.slots[0]!), cfg.esp.dir, [first]),
    latch: () => tpm.latch("after the unseal attempt"),
    async beforeOpen() {
      await images();
      loadCryptModules(sys, log);
    },
    latchHolds() {
      const quiet = { ...log, info() {}, warn() {}, err() {}, debug() {} };
      const again = unsealTokens(sys, quiet, tpm.tpm, req, [first]);
      again.forEach((k) => k.key.fill(0));
      return again.length === 0;
    },
    openWithTpmKeys(keys: readonly UnsealedKey[]) {
      for (const k of keys) {
        if (vols.isOpen(first)) break;
        // Only the keyslot the token names: a forged token cannot make this key try the others.
        const slot = vols.openFirst(k.key, KEY_KDF_BOUND, k.keyslot);
        if (slot === null) {
          log.err(`unlock: ${k.device}: the key of ${k.token < 0 ? "the ESP seal" : `token ${k.token}`} does not open keyslot ${k.keyslot}, which ${k.token < 0 ? "it" : "the token"} names`);
          continue;
        }
        proven(first, slot);
        const members: PoolMember[] = [];
        vols.joinOthers(k.key, KEY_KDF_BOUND, (dev, s) => (proven(dev, s), members.push({ device: dev, slot: s })));
        if (k.token < 0) migrateLegacy(sys, log, tpm.tpm, req, secureBoot, first, k.key, slot, members);
      }
      return vols.isOpen(first);
    },
    openWithPassphrase(passphrase) {
      const slot = vols.openFirst(passphrase, PASSPHRASE_KDF_BOUND);
      if (slot === null) return false;
      vols.passphraseSlots.set(first, slot);
      vols.joinOthers(passphrase, PASSPHRASE_KDF_BOUND, (dev, s) => vols.passphraseSlots.set(dev, s));
      return true;
    },
    readSecret: (prompt) => human.read(prompt),
    reportResult: (ok, resealed) => human.report(ok, resealed),
    confirm: (question) => human.confirm(question),
    resealRefusal() {
      if (!tpm.present) return "no TPM";
      if (secureBoot !== "on") return `Secure Boot is ${secureBoot}: PCR 7 would vouch for nothing`;
      return null;
    },
    reseal(passphrase) {
      // One fresh key for the pool: the old one may be known to whoever changed the machine's state.
      const volume = (device: string) => ({ device, passphraseSlot: vols.passphraseSlots.get(device)!, provenTpmSlots: vols.provenTpmSlots.get(device) ?? new Set<number>() });
      const others = opened.filter((o) => o.device !== first && vols.passphraseSlots.has(o.device)).map((o) => volume(o.device));
      const r = reseal(sys, log, tpm.tpm, req, secureBoot, passphrase, volume(first), others);
      log.info(`unlock: ${first}: sealed a new key as token ${r.token} for keyslot ${r.keyslot}` + (r.removed.length ? `; removed keyslots ${r.removed.join(",")}` : "") + (r.kept.length ? `; kept tokens ${r.kept.join(",")} (nothing proved their keyslots hold a TPM key)` : ""));
      for (const o of r.others) log.info(`unlock: ${o.device}: the same key in keyslot ${o.keyslot}` + (o.removed.length ? `; removed keyslots ${o.removed.join(",")}` : ""));
    },
  };
}

export interface UnlockedPool {
  /** Opened /dev/mapper devices of the pool. */
  devices: string[];
  result: UnlockResult;
}

/**
 * Opens the encrypted pool. `remoteAdmin` is the boot's: started here the first time a human is
 * asked (or already running in sidecar mode); while the unlock waits, it answers `unlock` and
 * `reseal` with the passphrase loop and everything else as `admin`. The boot plan stops it
 * before switch_root.
 */
export async function unlockPool(sys: Files & Mounts & Modules & Devices & Crypt & Clock & Console, log: Logger, cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, tpm: BootTpm, secureBoot: SecureBoot, esp: EspResult, remoteAdmin: RemoteAdmin, admin: AdminCaps, images: () => Promise<unknown>): Promise<UnlockedPool> {
  const found = await waitUntil(sys, log, cold, `the pool's LUKS2 partition on the boot disk ${esp.disk}`, cmdline.rootWaitSeconds ?? cfg.rootWaitSeconds, () => {
    const v = luksOnDisk(sys, esp.disk);
    return v.length ? v : null;
  });
  // The installer makes exactly one; a second one on the booted disk is not the installer's,
  // and nothing says which of them the machine's secret belongs to.
  if (found.length > 1) throw new BootError(`unlock: the boot disk ${esp.disk} has several LUKS2 partitions (${found.join(", ")}); the pool's first volume must be the only one`);
  const first = found[0]!;
  log.info(`unlock: pool volume ${first} on the boot disk ${esp.disk}`);
  const opened: OpenedVolume[] = [];
  const remote = new RemoteSecrets();
  const waiting: AdminCaps = { ...admin, passphrase: { run: remote.handle } };
  let started: Promise<boolean> | undefined;
  const recovery = async () => {
    started ??= remoteAdmin.start(cold, cfg, cmdline, waiting).then((up) => {
      if (up) log.info("recovery: the passphrase is also accepted over ssh: ssh root@<host> unlock (or reseal)");
      return up;
    });
    return (await started) ? remote : null;
  };
  try {
    const result = await unlock(log, realUnlockOps(sys, log, cfg, tpm, secureBoot, esp, first, opened, recovery, images), { tries: cfg.passphraseTries, checkLatch: cmdline.latchCheck });
    return { devices: opened.map((o) => o.mapper), result };
  } finally {
    // The ssh client that sent the passphrase is still reading its answer; give it a moment
    // before the boot goes on (and sshd with it), or it sees the connection drop instead.
    if (remote.answeredOk) await sys.sleep(3000);
    remoteAdmin.route(admin);
  }
}

