// Stages "unlock" and "pool": find the encrypted volumes, get their key (TPM or recovery
// passphrase, see unlock.ts), open them all, mount the btrfs pool, read the host config on it
// and mount the root subvolume with its binds on /sysroot.
import { z } from "zod";
import type { Cmdline } from "../cmdline.ts";
import type { CtlHandler } from "../ctl.ts";
import type { AgentConfig } from "../config.ts";
import { BootError, describe } from "../errors.ts";
import { HOST_CONFIG_ENV, HOST_CONFIG_JSON, type HostConfig, parseHostEnv, parseHostJson } from "../hostconfig.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import { CRYPT_ACTIVATE_ALLOW_DISCARDS, CRYPT_ACTIVATE_NO_READ_WORKQUEUE, CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE, TPM_KDF } from "../sys/cryptsetup.ts";
import type { Sys, TpmOps } from "../sys/index.ts";
import { SIDECAR_ROOT } from "../sys/sidecar.ts";
import { type Coldplug, waitUntil } from "./devices.ts";
import { type EspResult, mountEsp } from "./esp.ts";
import type { MountedRoot } from "./root.ts";
import { SYSROOT } from "./root.ts";
import { RecoverySidecar, RemoteSecrets } from "./recovery.ts";
import { ensureHostKey, HOST_KEY, SSH_DIR } from "./sidecar.ts";
import { unlock, type UnlockOps, type UnlockResult } from "./unlock.ts";

const POOL = "/run/initos/pool";
/** The latch digest: any non-zero extension will do; a fixed one makes the PCR predictable. */
const LATCH_DIGEST = Buffer.from("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "hex");

/** What the installer writes beside the sealed blob: which PCRs and which LUKS keyslot. */
export const SealInfoSchema = z.object({ pcrs: z.array(z.number().int().min(0).max(23)).min(1), latchPcr: z.number().int().min(0).max(23), keyslot: z.number().int().min(0) }).strict();
export type SealInfo = z.output<typeof SealInfoSchema>;
export const sealPaths = (espMount: string, dir: string) => ({
  pub: `${espMount}/${dir}/tpm/root.pub`,
  priv: `${espMount}/${dir}/tpm/root.priv`,
  info: `${espMount}/${dir}/tpm/root.json`,
});

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

/** The PCR values a sealed key must see at a future boot: today's, and the latch still zero. */
export function expectedPcrs(tpm: TpmOps, pcrs: readonly number[], latchPcr: number): Map<number, Uint8Array> {
  const now = tpm.pcrRead(pcrs);
  now.set(latchPcr, new Uint8Array(32));
  return now;
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
  esp: EspResult,
  volumes: readonly string[],
  opened: OpenedVolume[],
  /** Starts the recovery sidecar the first time a human is asked; null if none can run. */
  recovery?: () => Promise<RemoteSecrets | null>,
): UnlockOps {
  const booted = esp.slots[0]!;
  const espMount = mountEsp(sys, booted);
  const paths = sealPaths(espMount, cfg.esp.dir);
  let tpm: TpmOps | undefined;
  let info: SealInfo | undefined;
  let consoleLine: Promise<string | null> | undefined;
  let lastWasRemote = false;
  let remoteSecrets: RemoteSecrets | null = null;
  const readSeal = () => {
    const text = sys.readFile(paths.info);
    const pub = sys.readBytes(paths.pub);
    const priv = sys.readBytes(paths.priv);
    if (text === null || !pub || !priv) throw new Error(`no sealed key on the ESP (slot ${booted.name})`);
    info = SealInfoSchema.parse(JSON.parse(text));
    return { pub, priv, pcrs: [...info.pcrs, info.latchPcr] };
  };
  return {
    async waitForTpm() {
      const start = performance.now();
      while (!sys.exists("/dev/tpmrm0")) {
        if (performance.now() - start > cfg.tpm.waitSeconds * 1000) {
          log.warn(`unlock: no /dev/tpmrm0 after ${cfg.tpm.waitSeconds}s`);
          return false;
        }
        await sys.sleep(50);
      }
      tpm = sys.tpm(SIDECAR_ROOT);
      return true;
    },
    unsealKey() {
      const s = readSeal();
      return { key: tpm!.unseal({ pub: s.pub, priv: s.priv }, s.pcrs), slot: info!.keyslot };
    },
    latch() {
      tpm!.extend(info?.latchPcr ?? cfg.tpm.latchPcr, LATCH_DIGEST);
    },
    latchHolds() {
      try {
        const s = readSeal();
        tpm!.unseal({ pub: s.pub, priv: s.priv }, s.pcrs).fill(0);
        return false;
      } catch {
        return true;
      }
    },
    openWithKey(key, slot) {
      for (const [i, dev] of volumes.entries()) {
        if (opened.some((o) => o.device === dev)) continue;
        try {
          const start = performance.now();
          const r = sys.luks.open(dev, `initos-pool${i}`, key, OPEN_FLAGS, slot);
          opened.push({ device: dev, mapper: r.path });
          log.info(`unlock: opened ${dev} with keyslot ${r.slot} in ${(performance.now() - start).toFixed(0)}ms`);
        } catch (e) {
          log.debug(`unlock: ${dev}: ${describe(e)}`);
        }
      }
      return opened.length > 0;
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
    reseal(passphrase) {
      // A fresh key: the old one may be known to whoever changed the machine's state.
      const key = sys.randomBytes(32);
      const expected = expectedPcrs(tpm!, cfg.tpm.pcrs, cfg.tpm.latchPcr);
      let slot = -1;
      for (const o of opened) slot = sys.luks.addKey(o.device, passphrase, key, TPM_KDF);
      // The keyslot of the previous TPM key (known if its blob was read) is of no use any more.
      if (info && info.keyslot !== slot) for (const o of opened) sys.luks.destroySlot(o.device, info.keyslot);
      const blob = tpm!.seal(key, expected);
      key.fill(0);
      // The one write to the ESP outside install mode, and only on the operator's yes.
      sys.mount(null, espMount, null, MS.REMOUNT | MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
      try {
        sys.mkdirp(`${espMount}/${cfg.esp.dir}/tpm`);
        sys.writeBytes(paths.pub, blob.pub);
        sys.writeBytes(paths.priv, blob.priv);
        sys.writeFile(paths.info, JSON.stringify({ pcrs: cfg.tpm.pcrs, latchPcr: cfg.tpm.latchPcr, keyslot: slot }) + "\n");
        sys.sync();
      } finally {
        sys.mount(null, espMount, null, MS.REMOUNT | MS.RDONLY | MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
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
export async function unlockPool(sys: Sys, log: Logger, cold: Coldplug, cfg: AgentConfig, cmdline: Cmdline, esp: EspResult, sidecar: RecoverySidecar, admin: CtlHandler): Promise<UnlockedPool> {
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
    const result = await unlock(log, realUnlockOps(sys, log, cfg, esp, volumes, opened, recovery), { tries: cfg.passphraseTries, checkLatch: cmdline.latchCheck });
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

export function readHostConfig(sys: Sys, top: string): HostConfig {
  const json = sys.readFile(`${top}/${HOST_CONFIG_JSON}`);
  if (json !== null) return parseHostJson(json);
  const env = sys.readFile(`${top}/${HOST_CONFIG_ENV}`);
  if (env !== null) return parseHostEnv(env);
  throw new BootError(`no ${HOST_CONFIG_JSON} or ${HOST_CONFIG_ENV} at the top of the pool`);
}

/** Mounts the root subvolume named by the host config, and its binds, on /sysroot. */
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
    for (const b of config.binds) {
      if (sys.lstat(`${POOL}/${b.subvol}`).kind !== "dir") continue; // optional: only when present
      if (sys.lstat(`${SYSROOT}${b.path}`).kind !== "dir") {
        log.warn(`pool: ${b.path} does not exist in ${config.root}; ${b.subvol} not mounted`);
        continue;
      }
      sys.mount(dev, `${SYSROOT}${b.path}`, "btrfs", flags, `subvol=${b.subvol},${devOpts}`);
      bound.push(`${b.subvol}->${b.path}`);
    }
    log.info(`pool: root ${config.root} on ${SYSROOT} (${rw ? "rw" : "ro"})${bound.length ? `, ${bound.join(" ")}` : ""}`);
    return { device: dev, fstype: "btrfs", path: SYSROOT, config };
  } finally {
    sys.umount(POOL, MNT_DETACH);
  }
}
