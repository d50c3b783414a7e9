// Stage "unlock" on the machine: find the encrypted volumes of the pool and open them all with
// the key the TPM releases, or the recovery passphrase from a human (the decisions are
// unlock.ts's; this file does them on LUKS2 volumes, the TPM and the console or ssh).
import type { AdminCaps } from "../admin.ts";
import type { Cmdline } from "../cmdline.ts";
import type { AgentConfig } from "../config.ts";
import { migrateLegacy, reseal, requirement, unsealTokens, type UnsealedKey } from "../diskkey/diskkey.ts";
import type { BootTpm } from "../diskkey/latch.ts";
import { releaseKeys } from "../diskkey/release.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { CRYPT_ACTIVATE_ALLOW_DISCARDS, CRYPT_ACTIVATE_NO_READ_WORKQUEUE, CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE } from "../sys/cryptsetup.ts";
import type { Clock, Console, Crypt, Devices, Files, Modules, Mounts } from "../sys/index.ts";
import { type Coldplug, waitUntil } from "./devices.ts";
import type { SecureBoot } from "./early.ts";
import { type EspResult, mountEsp } from "./esp.ts";
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

/** Block devices (disks and partitions) holding a LUKS header, by libblkid. */
export function findLuksVolumes(sys: Files & Devices): string[] {
  return sys
    .readdir("/sys/class/block")
    .filter((n) => !/^(loop|ram|dm-|sr)/.test(n))
    .map((n) => `/dev/${n}`)
    .filter((d) => {
      try {
        return sys.probe(d)?.TYPE === "crypto_LUKS";
      } catch {
        return false;
      }
    })
    .sort();
}

const OPEN_FLAGS = CRYPT_ACTIVATE_ALLOW_DISCARDS | CRYPT_ACTIVATE_NO_READ_WORKQUEUE | CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE;

/** An opened volume: the LUKS device and its /dev/mapper path. */
export interface OpenedVolume {
  device: string;
  mapper: string;
}

/**
 * The pool's volumes as the unlock opens them: which are open, and which keyslot opened each,
 * the two things a reseal must know (what it may remove, what it must keep).
 */
class OpenVolumes {
  /** Per device: keyslots a key the TPM released opened this boot (what a reseal may remove). */
  readonly provenTpmSlots = new Map<string, Set<number>>();
  /** Per device: the keyslot the recovery passphrase opened (never removed). */
  readonly passphraseSlots = new Map<string, number>();

  constructor(
    private readonly sys: Crypt & Clock,
    private readonly log: Logger,
    readonly devices: readonly string[],
    /** Each volume as it is opened (the caller's list: it mounts them). */
    readonly opened: OpenedVolume[],
  ) {}

  isOpen(dev: string): boolean {
    return this.opened.some((o) => o.device === dev);
  }

  /** Opens `dev` with `key` (only keyslot `slot` when given); the keyslot, or null when the key does not fit. */
  open(dev: string, key: Uint8Array, slot?: number): number | null {
    const { sys, log } = this;
    const start = sys.now();
    try {
      const r = sys.luks.open(dev, `initos-pool${this.devices.indexOf(dev)}`, key, OPEN_FLAGS, slot);
      this.opened.push({ device: dev, mapper: r.path });
      log.info(`unlock: opened ${dev} with keyslot ${r.slot} in ${(sys.now() - start).toFixed(0)}ms`);
      return r.slot;
    } catch (e) {
      log.debug(`unlock: ${dev}: ${describe(e)}`);
      return null;
    }
  }

  allOpen(): boolean {
    return this.devices.every((d) => this.isOpen(d));
  }
}

/** The real side effects of unlocking; see UnlockOps. */
export function realUnlockOps(
  sys: Files & Mounts & Modules & Crypt & Console & Clock,
  log: Logger,
  cfg: AgentConfig,
  tpm: BootTpm,
  secureBoot: SecureBoot,
  esp: EspResult,
  volumes: readonly string[],
  opened: OpenedVolume[],
  /** Starts remote admin the first time a human is asked; null if none can run. */
  recovery?: () => Promise<RemoteSecrets | null>,
  /** The boot's images and the pool's driver, still on their way when the unlock starts (see boot.ts). */
  images: () => Promise<unknown> = async () => {},
): UnlockOps {
  const req = requirement(cfg);
  const vols = new OpenVolumes(sys, log, volumes, opened);
  const human = new PassphrasePrompt(sys, recovery);
  return {
    hasTpm: tpm.present,
    alreadyLatched: tpm.latched,
    unsealKeys: () => releaseKeys(sys, log, tpm.tpm, req, mountEsp(sys, esp.slots[0]!), cfg.esp.dir, volumes),
    latch: () => tpm.latch("after the unseal attempt"),
    async beforeOpen() {
      await images();
      loadCryptModules(sys, log);
    },
    latchHolds() {
      const quiet = { ...log, info() {}, warn() {}, err() {}, debug() {} };
      const again = unsealTokens(sys, quiet, tpm.tpm, req, volumes);
      again.forEach((k) => k.key.fill(0));
      return again.length === 0;
    },
    openWithTpmKeys(keys: readonly UnsealedKey[]) {
      for (const k of keys) {
        if (vols.isOpen(k.device)) continue;
        // Only the keyslot the token names: a forged token cannot make this key try the others.
        const slot = vols.open(k.device, k.key, k.keyslot);
        if (slot === null) {
          log.err(`unlock: ${k.device}: the key of ${k.token < 0 ? "the ESP seal" : `token ${k.token}`} does not open keyslot ${k.keyslot}, which ${k.token < 0 ? "it" : "the token"} names`);
          continue;
        }
        vols.provenTpmSlots.set(k.device, (vols.provenTpmSlots.get(k.device) ?? new Set()).add(slot));
        if (k.token < 0) migrateLegacy(sys, log, tpm.tpm, req, secureBoot, k.device, k.key, slot);
      }
      return vols.allOpen();
    },
    openWithPassphrase(passphrase) {
      let any = false;
      for (const dev of volumes) {
        if (vols.isOpen(dev)) continue;
        const slot = vols.open(dev, passphrase);
        if (slot === null) continue;
        vols.passphraseSlots.set(dev, slot);
        any = true;
      }
      return any;
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
      // A fresh key per volume: the old one may be known to whoever changed the machine's state.
      for (const [dev, slot] of vols.passphraseSlots) {
        const r = reseal(sys, log, tpm.tpm, req, secureBoot, dev, passphrase, slot, vols.provenTpmSlots.get(dev) ?? new Set());
        log.info(`unlock: ${dev}: sealed a new key as token ${r.token} for keyslot ${r.keyslot}` + (r.removed.length ? `; removed keyslots ${r.removed.join(",")}` : "") + (r.kept.length ? `; kept tokens ${r.kept.join(",")} (nothing proved their keyslots hold a TPM key)` : ""));
      }
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
  const volumes = await waitUntil(sys, log, cold, "an encrypted volume (LUKS2)", cmdline.rootWaitSeconds ?? cfg.rootWaitSeconds, () => {
    const v = findLuksVolumes(sys);
    return v.length ? v : null;
  });
  log.info(`unlock: encrypted volumes ${volumes.join(" ")}`);
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
    const result = await unlock(log, realUnlockOps(sys, log, cfg, tpm, secureBoot, esp, volumes, opened, recovery, images), { tries: cfg.passphraseTries, checkLatch: cmdline.latchCheck });
    return { devices: opened.map((o) => o.mapper), result };
  } finally {
    // The ssh client that sent the passphrase is still reading its answer; give it a moment
    // before the boot goes on (and sshd with it), or it sees the connection drop instead.
    if (remote.answeredOk) await sys.sleep(3000);
    remoteAdmin.route(admin);
  }
}

