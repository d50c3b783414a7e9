// Stage "root" of the installed machine: with the pool's volumes open (volumes.ts), mount the
// btrfs pool, read the host config on it and mount the root subvolume with its binds on
// /sysroot.
import { BootError, describe } from "../errors.ts";
import { HOST_CONFIG_ENV, HOST_CONFIG_JSON, type HostConfig, parseHostEnv, parseHostJson } from "../hostconfig.ts";
import type { Logger } from "../log.ts";
import type { AgentConfig } from "../config.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import { type Crypt, type Devices, type Files, type Modules, type Mounts, type Processes, RefusedFile } from "../sys/index.ts";
import { POOL_MOUNT } from "../jailsconfig.ts";
import { markInitrdMounts } from "./images.ts";
import type { MountedRoot } from "./root.ts";
import { SYSROOT } from "./root.ts";
import { dropbearPublicKey, ensureHostKey, HOST_KEY, SSH_DIR, sshPublicKey, wipeHostKey } from "./sidecar.ts";

const POOL = "/run/initos/pool";

/** The sidecar's ssh host key on the pool: inside the encryption, beside the host config. */
export const POOL_HOST_KEY = "initos/ssh_host_ed25519";

/**
 * Caps on what PID 1 reads from the pool, whose files the OS's root writes. A host config is a
 * few hundred bytes of JSON (the root, its binds, a list of jails): 64 KiB is ample, and bounds
 * the memory and the parse. A dropbear ed25519 key file is 83 bytes: 16 KiB is ample too.
 */
export const HOST_CONFIG_MAX = 64 * 1024;
export const POOL_KEY_MAX = 16 * 1024;

/**
 * The ssh host key once the pool is open. Two keys, two jobs:
 *  - the recovery host key (diskkey/hostkey.ts: sealed on the ESP, pinned by the operator) is
 *    what the initrd presents while the pool is locked, to whoever is about to send the
 *    passphrase. Nothing that runs after the pool is open may read it: it is never written to
 *    the pool (the OS's root reads the pool, this boot or any later one) and it leaves /run
 *    (which moves into the OS) here, before anything else runs.
 *  - the pool's own key (POOL_HOST_KEY, made for it) is what the sidecar beside the OS and jail
 *    mode's sshd present, so clients see one key there across boots. The OS's root can read
 *    it: it vouches for no more than the OS's own sshd key would.
 * So the key in /run (the recovery key, or one made this boot for a remote unlock) is wiped and
 * never saved; the pool's key takes its place. A pool with none, or with one that is not a
 * dropbear ed25519 key, or with a copy of the recovery key (what older versions saved there),
 * gets a new one: the only write to the pool outside install mode. A key file the pool has but
 * that is refused (a symlink, a FIFO, too big) is left as it is: a failure here costs a
 * changing host key beside the OS, not the boot, and the sidecar gets a key made for this boot.
 */
function keepHostKey(sys: Files & Mounts & Processes, log: Logger, dev: string): void {
  const onPool = `${POOL}/${POOL_HOST_KEY}`;
  // What the initrd presented so far: the pinned recovery key when it was unsealed this boot.
  const shown = sys.readBytes(HOST_KEY);
  const recovery = shown ? dropbearPublicKey(shown) : null;
  shown?.fill(0);
  let saved: Uint8Array | null = null;
  try {
    wipeHostKey(sys);
    saved = sys.readRegular(POOL, POOL_HOST_KEY, POOL_KEY_MAX);
    const pub = saved ? dropbearPublicKey(saved) : null;
    if (saved && pub && !(recovery && pub.equals(recovery))) {
      sys.mkdirp(SSH_DIR, 0o700);
      sys.writeBytes(HOST_KEY, saved, 0o600);
      return;
    }
    if (pub) log.warn(`pool: ${POOL_HOST_KEY} is the pinned recovery host key (${sshPublicKey(pub)}), saved there by an older version; replaced with a new key for the sidecar beside the OS`);
    else if (saved) log.warn(`pool: ${POOL_HOST_KEY} is not a dropbear ed25519 key; replaced with a new one`);
    // The OS's root can put symlinks on the pool: through one, the write below would land in
    // the initramfs. Nothing runs in the OS while the initrd looks, so checking first is enough.
    if (sys.lstat(`${POOL}/initos`).kind === "link") throw new BootError(`${POOL}/initos is a symlink`);
    const key = sys.readBytes(ensureHostKey(sys))!;
    const tmp = `${onPool}.new`;
    sys.mount(dev, POOL, "btrfs", MS.REMOUNT | MS.NOSUID | MS.NODEV);
    try {
      sys.mkdirp(`${POOL}/initos`, 0o700);
      if (sys.lstat(tmp).kind !== "missing") sys.unlink(tmp); // never written through
      sys.writeBytes(tmp, key, 0o600);
      sys.rename(tmp, onPool); // replaces the name (a stale key), never follows it
      sys.sync();
    } finally {
      key.fill(0);
      sys.mount(dev, POOL, "btrfs", MS.REMOUNT | MS.RDONLY | MS.NOSUID | MS.NODEV);
    }
    log.info(`pool: ssh host key saved as ${POOL_HOST_KEY} (${saved ? "replaced" : "first boot"})`);
  } catch (e) {
    const why = e instanceof RefusedFile ? `refused ${POOL_HOST_KEY} on the pool: ${e.why}` : describe(e);
    log.warn(`pool: ssh host key not kept on the pool: ${why}; the sidecar uses a key made for this boot`);
    try {
      wipeHostKey(sys);
      ensureHostKey(sys);
    } catch (e2) {
      log.warn(`pool: no ssh host key for this boot: ${describe(e2)}`);
    }
  } finally {
    saved?.fill(0);
  }
}

/**
 * The host config at the top of the pool, initos.json else initos.env. The OS's root writes
 * them, so each is read with readRegular: never through a symlink (one could point into the
 * initramfs), never a FIFO (PID 1 would wait forever for a writer), never more than
 * HOST_CONFIG_MAX. A refused file fails the boot with one line rather than falling back to the
 * other file or to a default: the host config chooses the root, and a guess would let whoever
 * planted the FIFO choose instead; the failure policy keeps the machine reachable to fix it.
 */
export function readHostConfig(sys: Files, top: string): HostConfig {
  for (const [name, parse] of [[HOST_CONFIG_JSON, parseHostJson], [HOST_CONFIG_ENV, parseHostEnv]] as const) {
    let bytes: Uint8Array | null;
    try {
      bytes = sys.readRegular(top, name, HOST_CONFIG_MAX);
    } catch (e) {
      if (e instanceof RefusedFile) throw new BootError(`refused the host config ${name} at the top of the pool: ${e.why}`);
      throw e;
    }
    if (bytes !== null) return parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("utf8"));
  }
  throw new BootError(`no ${HOST_CONFIG_JSON} or ${HOST_CONFIG_ENV} at the top of the pool`);
}

/**
 * The filesystem the kernel mounted is exactly the set of volumes the pool's secret opened:
 * every device btrfs has in it is one of them, and each of them is in it. A device the kernel
 * knew from elsewhere (a scan of another disk carrying the pool's FSID) or a volume that
 * joined without being part of the filesystem fails the boot before anything of it is read.
 */
export function checkAssembled(sys: Mounts & Devices, log: Logger, mountPoint: string, devices: readonly string[]): void {
  const fs = sys.btrfsDevices(mountPoint);
  const opened = devices.map((d) => sys.deviceNumber(d));
  const inFs = fs.devices.map((d) => sys.deviceNumber(d.path));
  const exact = fs.numDevices === devices.length && fs.devices.length === devices.length && inFs.every((n) => n !== null && opened.includes(n)) && opened.every((n) => n !== null && inFs.includes(n));
  if (!exact) {
    throw new BootError(`pool: the mounted btrfs ${fs.fsid} has ${fs.numDevices} device(s) (${fs.devices.map((d) => d.path).join(", ") || "none listed"}), but the volumes opened are ${devices.join(", ")}; closing every volume`);
  }
  log.info(`pool: btrfs ${fs.fsid} on ${devices.length} device(s): ${devices.join(" ")}`);
}

/** Closes the pool's opened volumes (their /dev/mapper names); a failure is one line each. */
function closeAll(sys: Crypt, log: Logger, devices: readonly string[]): void {
  for (const d of devices) {
    try {
      sys.luks.close(d.slice(d.lastIndexOf("/") + 1));
    } catch (e) {
      log.err(`pool: could not close ${d}: ${describe(e)}`);
    }
  }
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
 * Jail mode (a host config with jails and no root): the pool's top level stays mounted on /x,
 * writable, for the image store and the jails' snapshots. nodev: no device node on the pool is
 * ever a device (an image's are skipped at import, and a jail in its user namespace could not
 * open one anyway); setuid stays, or a jail's own sudo or ping would not work inside it.
 */
function mountForJails(sys: Mounts & Files, log: Logger, dev: string, devOpts: string, config: HostConfig): MountedRoot & { config: HostConfig } {
  sys.mkdirp(POOL_MOUNT, 0o700);
  sys.mount(dev, POOL_MOUNT, "btrfs", MS.NODEV, `subvolid=5,${devOpts}`);
  log.info(`pool: no root in the host config; jail mode with ${config.jails?.jails.length ?? 0} jail(s), the pool on ${POOL_MOUNT}`);
  return { device: dev, fstype: "btrfs", path: POOL_MOUNT, config };
}

/**
 * Mounts the root subvolume named by the host config, and its binds, on /sysroot.
 *
 * The host config and everything in the root subvolume are written by the OS's root user, and
 * these mounts happen in the initramfs' own namespace: a bind path that left /sysroot (".." in
 * the config, or a symlink such as /home -> /../../usr/bin in the root) would mount over the
 * initramfs (/usr/bin, /etc/initos, /run/initos/images/tools), replacing what the sidecar
 * beside the OS runs. So ".." never parses (hostconfig.ts), every target is resolved by the
 * kernel inside /sysroot without following any symlink (openat2), and the mount goes onto the
 * fd that was resolved, not onto the path again: what was checked is what gets mounted. A bind
 * refused for that is skipped with one line and the root still boots (see hostconfig.ts). A root
 * whose bind target is a symlink on purpose (/home -> var/home, as on Fedora's atomic desktops)
 * names the real directory in its host config instead.
 */
export function mountPool(sys: Files & Mounts & Modules & Processes & Devices & Crypt, log: Logger, devices: readonly string[], rw: boolean, rootOverride: string | undefined, cfg: AgentConfig): MountedRoot & { config: HostConfig } {
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
    try {
      checkAssembled(sys, log, POOL, devices);
    } catch (e) {
      sys.umount(POOL, MNT_DETACH);
      closeAll(sys, log, devices);
      throw e;
    }
    const config = readHostConfig(sys, POOL);
    for (const line of config.refused) log.err(line);
    if (cfg.ssh.authorizedKeys.length) keepHostKey(sys, log, dev);
    const from = rootOverride ? "initos.root on the cmdline" : "the host config";
    if (rootOverride) config.root = rootOverride;
    if (!config.root) return mountForJails(sys, log, dev, devOpts, config);
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
