// Stages "unlock" and "pool": find the encrypted volumes, get their key (TPM or recovery
// passphrase, see unlock.ts), open them all, mount the btrfs pool, read the host config on it
// and mount the root subvolume with its binds on /sysroot.
import type { Cmdline } from "../cmdline.ts";
import type { CtlHandler } from "../ctl.ts";
import type { AgentConfig } from "../config.ts";
import { BootError, describe } from "../errors.ts";
import { HOST_CONFIG_ENV, HOST_CONFIG_JSON, type HostConfig, parseHostEnv, parseHostJson } from "../hostconfig.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import { CRYPT_ACTIVATE_ALLOW_DISCARDS, CRYPT_ACTIVATE_NO_READ_WORKQUEUE, CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE } from "../sys/cryptsetup.ts";
import type { Sys } from "../sys/index.ts";
import { migrateLegacy, reseal, requirement, unsealTokens, type UnsealedKey } from "../diskkey/diskkey.ts";
import { releaseKeys } from "../diskkey/release.ts";
import { type EspResult, mountEsp } from "./esp.ts";
import { markInitrdMounts } from "./images.ts";
import type { BootTpm } from "../diskkey/latch.ts";
import type { SecureBoot } from "./early.ts";
import { type Coldplug, waitUntil } from "./devices.ts";
import type { MountedRoot } from "./root.ts";
import { SYSROOT } from "./root.ts";
import { RecoverySidecar, RemoteSecrets } from "./recovery.ts";
import { ensureHostKey, HOST_KEY, SSH_DIR } from "./sidecar.ts";
import { unlock, type UnlockOps, type UnlockResult } from "./unlock.ts";

const POOL = "/run/initos/pool";

/**
 * dm-crypt and the ciphers LUKS2 uses by default. The kernel would ask /sbin/modprobe for them
 * on demand, and there is no modprobe here: load them before the first LUKS operation.
 */
const CRYPT_MODULES = ["dm_crypt", "xts", "ecb", "aesni_intel", "algif_skcipher"];
export function loadCryptModules(sys: Sys, log: Logger): void {
  for (const m of CRYPT_MODULES) {
    try {
      sys.loadModule(m);
    } catch (e) {
      log.debug(`crypt modules: ${m}: ${describe(e)}`); // aesni_intel needs AES-NI; xts works without
    }
  }
}

/** Block devices (disks and partitions) holding a LUKS header, by libblkid. */
export function findLuksVolumes(sys: Sys): string[] {
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

/** The real side effects of unlocking; see UnlockOps. */
export function realUnlockOps(
  sys: Sys,
  log: Logger,
  cfg: AgentConfig,
  tpm: BootTpm,
  secureBoot: SecureBoot,
  esp: EspResult,
  volumes: readonly string[],
  opened: OpenedVolume[],
  /** Starts the recovery sidecar the first time a human is asked; null if none can run. */
  recovery?: () => Promise<RemoteSecrets | null>,
): UnlockOps {
  const req = requirement(cfg);
  let consoleLine: Promise<string | null> | undefined;
  let lastWasRemote = false;
  let remoteSecrets: RemoteSecrets | null = null;
  /** Per device: keyslots a key the TPM released opened this boot (what a reseal may remove). */
  const provenTpmSlots = new Map<string, Set<number>>();
  /** Per device: the keyslot the recovery passphrase opened (never removed). */
  const passphraseSlots = new Map<string, number>();
  const isOpen = (dev: string) => opened.some((o) => o.device === dev);
  const open = (dev: string, key: Uint8Array, slot?: number): number | null => {
    const start = performance.now();
    try {
      const r = sys.luks.open(dev, `initos-pool${volumes.indexOf(dev)}`, key, OPEN_FLAGS, slot);
      opened.push({ device: dev, mapper: r.path });
      log.info(`unlock: opened ${dev} with keyslot ${r.slot} in ${(performance.now() - start).toFixed(0)}ms`);
      return r.slot;
    } catch (e) {
      log.debug(`unlock: ${dev}: ${describe(e)}`);
      return null;
    }
  };
  return {
    hasTpm: tpm.present,
    alreadyLatched: tpm.latched,
    unsealKeys: () => releaseKeys(sys, log, tpm.tpm, req, mountEsp(sys, esp.slots[0]!), cfg.esp.dir, volumes),
    latch: () => tpm.latch("after the unseal attempt"),
    latchHolds() {
      const quiet = { ...log, info() {}, warn() {}, err() {}, debug() {} };
      const again = unsealTokens(sys, quiet, tpm.tpm, req, volumes);
      again.forEach((k) => k.key.fill(0));
      return again.length === 0;
    },
    openWithTpmKeys(keys: readonly UnsealedKey[]) {
      for (const k of keys) {
        if (isOpen(k.device)) continue;
        // Only the keyslot the token names: a forged token cannot make this key try the others.
        const slot = open(k.device, k.key, k.keyslot);
        if (slot === null) {
          log.err(`unlock: ${k.device}: the key of ${k.token < 0 ? "the ESP seal" : `token ${k.token}`} does not open keyslot ${k.keyslot}, which ${k.token < 0 ? "it" : "the token"} names`);
          continue;
        }
        provenTpmSlots.set(k.device, (provenTpmSlots.get(k.device) ?? new Set()).add(slot));
        if (k.token < 0) migrateLegacy(sys, log, tpm.tpm, req, secureBoot, k.device, k.key, slot);
      }
      return volumes.every(isOpen);
    },
    openWithPassphrase(passphrase) {
      let any = false;
      for (const dev of volumes) {
        if (isOpen(dev)) continue;
        const slot = open(dev, passphrase);
        if (slot === null) continue;
        passphraseSlots.set(dev, slot);
        any = true;
      }
      return any;
    },
    async readSecret(prompt) {
      const remote = (remoteSecrets = recovery ? await recovery() : null);
      // One console read at a time: a read still pending from the last prompt keeps its place.
      consoleLine ??= sys.readLine(prompt, false).finally(() => (consoleLine = undefined));
      const fromConsole = consoleLine.then((line) => ({ line, remote: false }));
      const winner = remote ? await Promise.race([fromConsole, remote.next().then((line) => ({ line, remote: true }))]) : await fromConsole;
      lastWasRemote = winner.remote;
      return winner.line;
    },
    reportResult(ok, resealed) {
      if (lastWasRemote) remoteSecrets?.report(ok, resealed);
    },
    async confirm(question) {
      // Over ssh the operator chose with the command (reseal vs unlock): nobody may be at the
      // console to answer a question there.
      if (lastWasRemote) return remoteSecrets?.wantReseal === true;
      const a = await sys.readLine(question, true);
      return /^y(es)?$/i.test(a?.trim() ?? "");
    },
    resealRefusal() {
      if (!tpm.present) return "no TPM";
      if (secureBoot !== "on") return `Secure Boot is ${secureBoot}: PCR 7 would vouch for nothing`;
      return null;
    },
    reseal(passphrase) {
      // A fresh key per volume: the old one may be known to whoever changed the machine's state.
      for (const [dev, slot] of passphraseSlots) {
        const r = reseal(sys, log, tpm.tpm, req, secureBoot, dev, passphrase, slot, provenTpmSlots.get(dev) ?? new Set());
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
 * Opens the encrypted pool. `sidecar` is the boot's recovery sidecar: started here the first
 * time a human is asked (or already running in sidecar mode); while the unlock waits, `unlock`
 * and `reseal` requests go to it and the rest to `admin`. The boot plan stops it before
 * switch_root.
 */
export async function unlockPool(sys: Sys, log: Logger, cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, tpm: BootTpm, secureBoot: SecureBoot, esp: EspResult, sidecar: RecoverySidecar, admin: CtlHandler): Promise<UnlockedPool> {
  const volumes = await waitUntil(sys, log, cold, "an encrypted volume (LUKS2)", cmdline.rootWaitSeconds ?? cfg.rootWaitSeconds, () => {
    const v = findLuksVolumes(sys);
    return v.length ? v : null;
  });
  log.info(`unlock: encrypted volumes ${volumes.join(" ")}`);
  loadCryptModules(sys, log);
  const opened: OpenedVolume[] = [];
  const remote = new RemoteSecrets();
  const route: CtlHandler = (req) => (req.cmd === "unlock" || req.cmd === "reseal" ? remote.handle(req) : admin(req));
  let started: Promise<boolean> | undefined;
  const recovery = async () => {
    started ??= sidecar.start(sys, log, cold, cfg, cmdline, route).then((up) => {
      if (up) log.info("recovery: the passphrase is also accepted over ssh: ssh root@<host> unlock (or reseal)");
      return up;
    });
    return (await started) ? remote : null;
  };
  try {
    const result = await unlock(log, realUnlockOps(sys, log, cfg, tpm, secureBoot, esp, volumes, opened, recovery), { tries: cfg.passphraseTries, checkLatch: cmdline.latchCheck });
    return { devices: opened.map((o) => o.mapper), result };
  } finally {
    // The ssh client that sent the passphrase is still reading its answer; give it a moment
    // before the boot goes on (and sshd with it), or it sees the connection drop instead.
    if (remote.answeredOk) await sys.sleep(3000);
    sidecar.route(admin);
  }
}

/** The sidecar's ssh host key on the pool: inside the encryption, beside the host config. */
export const POOL_HOST_KEY = "initos/ssh_host_ed25519";

/**
 * Clients should see one host key across boots, so it is kept on the encrypted pool: copied into
 * /run for the sidecar when it is there; else this boot's key (the one a remote unlock already
 * showed, or a new one) is saved — the only write to the pool outside install mode, once per
 * machine. A failure here costs a changing host key, not the boot.
 */
function keepHostKey(sys: Sys, log: Logger, dev: string): void {
  const onPool = `${POOL}/${POOL_HOST_KEY}`;
  try {
    // The OS's root can put symlinks on the pool: through one, the read below would take an
    // initramfs file as the key and the write would land in the initramfs. Nothing runs in
    // the OS while the initrd looks, so checking first is enough.
    for (const p of [`${POOL}/initos`, onPool]) if (sys.lstat(p).kind === "link") throw new BootError(`${p} is a symlink`);
    const saved = sys.readBytes(onPool);
    if (saved && saved.length > 0) {
      sys.mkdirp(SSH_DIR, 0o700);
      sys.writeBytes(HOST_KEY, saved, 0o600);
      return;
    }
    const key = sys.readBytes(ensureHostKey(sys))!;
    sys.mount(dev, POOL, "btrfs", MS.REMOUNT | MS.NOSUID | MS.NODEV);
    try {
      sys.mkdirp(`${POOL}/initos`, 0o700);
      sys.writeBytes(onPool, key, 0o600);
      sys.sync();
    } finally {
      sys.mount(dev, POOL, "btrfs", MS.REMOUNT | MS.RDONLY | MS.NOSUID | MS.NODEV);
    }
    log.info(`pool: ssh host key saved as ${POOL_HOST_KEY} (first boot)`);
  } catch (e) {
    log.warn(`pool: ssh host key not kept on the pool: ${describe(e)}`);
  }
}

/** The host config at the top of the pool; a symlink there could point into the initramfs. */
export function readHostConfig(sys: Sys, top: string): HostConfig {
  for (const [name, parse] of [[HOST_CONFIG_JSON, parseHostJson], [HOST_CONFIG_ENV, parseHostEnv]] as const) {
    const path = `${top}/${name}`;
    if (sys.lstat(path).kind === "link") throw new BootError(`host config ${name} is a symlink; refusing it`);
    const text = sys.readFile(path);
    if (text !== null) return parse(text);
  }
  throw new BootError(`no ${HOST_CONFIG_JSON} or ${HOST_CONFIG_ENV} at the top of the pool`);
}

const ENOENT = 2;
const ENOTDIR = 20;
const ELOOP = 40;

/** Why a bind target could not be resolved inside the root, from the errno of openDirInRoot. */
function unresolved(e: unknown): string {
  switch ((e as { errno?: number }).errno) {
    case ELOOP:
      return "a symlink in the path (a bind target must be a real directory of the root)";
    case ENOTDIR:
      return "not a directory";
    default:
      return describe(e);
  }
}

/**
 * Mounts the root subvolume named by the host config, and its binds, on /sysroot.
 *
 * The host config and everything in the root subvolume are written by the OS's root user, and
 * these mounts happen in the initramfs' own namespace: a bind path that left /sysroot (".." in
 * the config, or a symlink such as /home -> /../../usr/bin in the root) would mount over the
 * initramfs (/usr/bin, /etc/initos, /run/initos/images/sidecar), replacing what the sidecar
 * beside the OS runs. So ".." never parses (hostconfig.ts), every target is resolved by the
 * kernel inside /sysroot without following any symlink (openat2), and the mount goes onto the
 * fd that was resolved, not onto the path again: what was checked is what gets mounted. A bind
 * refused for that is skipped with one line and the root still boots (see hostconfig.ts). A root
 * whose bind target is a symlink on purpose (/home -> var/home, as on Fedora's atomic desktops)
 * names the real directory in its host config instead.
 */
export function mountPool(sys: Sys, log: Logger, devices: readonly string[], rw: boolean, rootOverride: string | undefined, cfg: AgentConfig): MountedRoot & { config: HostConfig } {
  try {
    sys.loadModule("btrfs");
  } catch {
    // built in, or the mount below says what is wrong
  }
  // Every opened device is named, so a pool spanning several volumes assembles without a scan.
  const devOpts = devices.map((d) => `device=${d}`).join(",");
  const dev = devices[0]!;
  sys.mkdirp(POOL, 0o700);
  sys.mount(dev, POOL, "btrfs", MS.RDONLY | MS.NOSUID | MS.NODEV, `subvolid=5,${devOpts}`);
  try {
    const config = readHostConfig(sys, POOL);
    for (const line of config.refused) log.err(line);
    if (cfg.ssh.authorizedKeys.length) keepHostKey(sys, log, dev);
    const from = rootOverride ? "initos.root on the cmdline" : "the host config";
    if (rootOverride) config.root = rootOverride;
    if (sys.lstat(`${POOL}/${config.root}`).kind !== "dir") {
      throw new BootError(`root subvolume ${config.root} (from ${from}) is not in the pool`);
    }
    const flags = (rw ? 0 : MS.RDONLY) | MS.NODEV;
    sys.mkdirp(SYSROOT);
    sys.mount(dev, SYSROOT, "btrfs", rw ? 0 : MS.RDONLY, `subvol=${config.root},${devOpts}`);
    const bound: string[] = [];
    const marks: { src: string; target: string; root: string }[] = [];
    for (const b of config.binds) {
      if (sys.lstat(`${POOL}/${b.subvol}`).kind !== "dir") continue; // optional: only when present
      let fd: number;
      try {
        fd = sys.openDirInRoot(SYSROOT, b.path);
      } catch (e) {
        if ((e as { errno?: number }).errno === ENOENT) log.warn(`pool: ${b.path} does not exist in ${config.root}; ${b.subvol} not mounted`);
        else log.err(`pool: refused bind ${b.subvol} on ${b.path}: ${unresolved(e)}; not mounted`);
        continue;
      }
      try {
        sys.mount(dev, `/proc/self/fd/${fd}`, "btrfs", flags, `subvol=${b.subvol},${devOpts}`);
      } finally {
        sys.close(fd);
      }
      bound.push(`${b.subvol}->${b.path}`);
      marks.push({ src: dev, target: b.path, root: `/${b.subvol}` });
    }
    // The binds are the initrd's mounts, like the root: marked x-initrd.mount (see
    // markInitrdMounts), systemd leaves them to systemd-shutdown, which unmounts them once every
    // process is gone. Stopped with the OS instead, /var/log fails in red: systemd knows no unit
    // for a mount it did not make, so journald's flush service (RequiresMountsFor=/var/log/journal)
    // is not stopped before it and journald still holds its files (measured on Debian 12).
    if (marks.length) markInitrdMounts(sys, marks);
    log.info(`pool: root ${config.root} on ${SYSROOT} (${rw ? "rw" : "ro"})${bound.length ? `, ${bound.join(" ")}` : ""}`);
    return { device: dev, fstype: "btrfs", path: SYSROOT, config };
  } finally {
    sys.umount(POOL, MNT_DETACH);
  }
}
