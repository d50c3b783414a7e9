// Container jails: what the agent prepares for crun (rootfs, shares, bundle, cgroups) and the
// crun command the supervisor runs. crun (from the verified tools image) makes the namespaces,
// mounts and limits from the spec (spec.ts); the agent writes no container runtime of its own.
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import type { Clock, Files, Mounts, Processes } from "../sys/index.ts";
import { toolArgv, toolExec } from "../sys/tools.ts";
import { imageSubvolume, type Jail, jailSubvolume, POOL_MOUNT } from "../jailsconfig.ts";
import { shiftOwners } from "./idshift.ts";
import type { SpecMount } from "./spec.ts";

export { containerSpec, type SpecMount, type SpecOptions } from "./spec.ts";

/** crun's state (one directory per running container): in /run, gone at reboot with them. */
export const CRUN_ROOT = "/run/initos/crun";
/** Each jail's bundle (config.json) and its staged shares. */
export const JAILS_RUN = "/run/initos/jails";
export const CGROUP_ROOT = "/sys/fs/cgroup";
/** The parent of every jail's cgroup (spec.ts: cgroupsPath /initos/<name>/run). */
export const JAILS_CGROUP = `${CGROUP_ROOT}/initos`;
const CGROUP2_SUPER_MAGIC = 0x63677270;
/** The controllers the spec's limits need. */
const CONTROLLERS = ["cpu", "memory", "pids"];

/**
 * A jail's own cgroup, which outlives its runs: crun makes and removes <it>/run (spec.ts) at
 * each start and end, so the counters here (memory.events: the OOM kills) add up every run's.
 */
export const jailCgroup = (name: string) => `${JAILS_CGROUP}/${name}`;

/** Makes the jail's cgroup (jailCgroup) with the controllers /initos has, for crun's run/ below it. */
export function makeJailCgroup(sys: Pick<Files, "readFile" | "writeFile" | "mkdirp">, jail: Jail): void {
  const dir = jailCgroup(jail.name);
  sys.mkdirp(dir);
  const enabled = (sys.readFile(`${JAILS_CGROUP}/cgroup.subtree_control`) ?? "").trim().split(/\s+/).filter(Boolean);
  if (enabled.length) sys.writeFile(`${dir}/cgroup.subtree_control`, enabled.map((c) => `+${c}`).join(" "));
}

/** How crun is run: from the tools image (toolExec: crun re-executes /proc/self/exe, which must be crun, not ld.so). */
export interface CrunOptions {
  crun?: { argv: string[]; env: Record<string, string> };
  /** crun's state directory. */
  root?: string;
  /** "disabled" only where there is no cgroup v2 (a test host): then the spec has no limits. */
  cgroupManager?: "cgroupfs" | "disabled";
}

const crunOf = (o: CrunOptions) => ({ ...(o.crun ?? toolExec("crun")), root: o.root ?? CRUN_ROOT });

/**
 * The jail as a service for agent/supervise.ts: crun in the foreground, so its stdout/stderr
 * is the jail's console and its exit is the jail's death (crun run waits for the container's
 * PID 1 and exits with its status).
 */
export function containerService(jail: Jail, bundle: string, o: CrunOptions = {}): { name: string; argv: string[]; env: Record<string, string> } {
  const crun = crunOf(o);
  return {
    name: `jail-${jail.name}`,
    argv: [...crun.argv, "--root", crun.root, `--cgroup-manager=${o.cgroupManager ?? "cgroupfs"}`, "run", "--bundle", bundle, jail.name],
    env: crun.env,
  };
}

/** Writes the bundle's config.json (root-only: it names the jail's paths and ids); the bundle's path. */
export function writeBundle(sys: Pick<Files, "mkdirp" | "writeBytes">, jail: Jail, spec: object, dir = JAILS_RUN): string {
  const bundle = `${dir}/${jail.name}`;
  sys.mkdirp(bundle, 0o700);
  sys.writeBytes(`${bundle}/config.json`, Buffer.from(JSON.stringify(spec, null, 1) + "\n"), 0o600);
  return bundle;
}

/**
 * The jail's rootfs: a fresh writable snapshot @jail-<name> of its image (so the image stays
 * pristine and each start begins from it), owned by its id range. An old snapshot (the last
 * run's) is deleted first. A failure leaves no snapshot behind.
 *
 * The shift costs one lstat + lchown per inode, measured on a loop-mounted btrfs on this host
 * (2 cores): debootstrap's Debian 12 minbase, 5157 inodes, 170-280 ms; /usr/share, 54893 inodes,
 * 1.8-2.1 s (26-30k inodes/s); the snapshot itself ~0.1 s. An idmapped mount of the image
 * would cost nothing per inode; not tried with crun 1.8.1.
 *
 * The jail's root (host uid idBase) must be able to walk to the snapshot: crun makes the rootfs
 * private from inside the user namespace (EACCES, measured, under a 0700 directory), so the
 * pool's top level must be searchable by others (mkfs.btrfs makes it 0755).
 */
export function prepareRootfs(
  sys: Pick<Files, "lstat" | "readdir" | "lchown" | "chmod"> & Pick<Processes, "run"> & Pick<Clock, "now">,
  log: Logger,
  jail: Jail,
  pool = POOL_MOUNT,
  btrfs = toolArgv("btrfs"),
): string {
  const image = `${pool}/${imageSubvolume(jail.image)}`;
  const target = `${pool}/${jailSubvolume(jail.name)}`;
  // lstat, not a followed stat: the pool's top level is the admin's, and a symlink named like an image is not one.
  if (sys.lstat(image).kind !== "dir") throw new BootError(`jail ${jail.name}: image ${jail.image} is not imported (image import ${jail.image})`);
  if (sys.lstat(target).kind !== "missing") deleteSubvolume(sys, jail, target, btrfs);
  try {
    sys.run([...btrfs, "subvolume", "snapshot", image, target]);
  } catch (e) {
    throw new BootError(`jail ${jail.name}: snapshot of ${imageSubvolume(jail.image)} failed: ${describe(e)}`);
  }
  const t0 = sys.now();
  try {
    const r = shiftOwners(sys, target, jail.idBase);
    const ms = Math.round(sys.now() - t0);
    log.info(`jail ${jail.name}: rootfs ${jailSubvolume(jail.name)} from ${imageSubvolume(jail.image)}, ${r.inodes} inodes owned from uid/gid ${jail.idBase} (${ms} ms)`);
    if (r.overflow) log.warn(`jail ${jail.name}: ${r.overflow} owners beyond 65535 in image ${jail.image} are nobody (65534) in the jail`);
  } catch (e) {
    try {
      sys.run([...btrfs, "subvolume", "delete", target]);
    } catch (d) {
      log.warn(`jail ${jail.name}: ${jailSubvolume(jail.name)} left behind: ${describe(d)}`);
    }
    throw new BootError(`jail ${jail.name}: shifting the owners of ${jailSubvolume(jail.name)} failed: ${describe(e)}`);
  }
  return target;
}

function deleteSubvolume(sys: Pick<Files, "lstat" | "readdir"> & Pick<Processes, "run">, jail: Jail, path: string, btrfs: string[]): void {
  try {
    deleteJailTree(sys, path, btrfs);
  } catch (e) {
    // A plain directory there, or a subvolume the kernel would not drop: the admin's to clear.
    throw new BootError(`jail ${jail.name}: the old ${jailSubvolume(jail.name)} could not be deleted: ${describe(e)}`);
  }
}

/** BTRFS_FIRST_FREE_OBJECTID: the inode number of every subvolume's root directory. */
const SUBVOL_ROOT_INO = 256;

/**
 * Deletes a jail's rootfs snapshot, and first, when it holds any, the subvolumes its root made
 * inside it, deepest first.
 *
 * Why: an unprivileged uid may create a subvolume in a directory it owns (measured on this
 * kernel, as uid 100000), so a jail's root can. `btrfs subvolume delete` refuses a subvolume
 * that holds another ("Directory not empty"), btrfs-progs 6.2 has no --recursive, and the host
 * has no shell to clear it: without this the jail never started again.
 *
 * They are found by walking the tree with lstat, never following a symlink, as a directory on
 * another st_dev whose inode is a subvolume root's. Not from `btrfs subvolume list`: that
 * prints the names the jail chose, line breaks included, so a name could forge a line naming
 * another subvolume of the pool. The jail has ended: nothing in its tree moves meanwhile.
 */
export function deleteJailTree(sys: Pick<Files, "lstat" | "readdir"> & Pick<Processes, "run">, path: string, btrfs: string[]): void {
  // lstat: a symlink at @jail-NAME (the pool's top level is the admin's) is not followed to what it names.
  const kind = sys.lstat(path).kind;
  if (kind !== "dir") throw new Error(`${path} is a ${kind}, not a subvolume`);
  try {
    sys.run([...btrfs, "subvolume", "delete", path]);
    return;
  } catch (e) {
    const nested = nestedSubvolumes(sys, path);
    if (!nested.length) throw e;
    for (const p of nested) sys.run([...btrfs, "subvolume", "delete", p]);
  }
  sys.run([...btrfs, "subvolume", "delete", path]);
}

/** The subvolumes below `root` (see deleteJailTree), each after those inside it. */
function nestedSubvolumes(sys: Pick<Files, "lstat" | "readdir">, root: string): string[] {
  const found: { path: string; depth: number }[] = [];
  const todo = [{ path: root, depth: 0 }];
  for (let dir = todo.pop(); dir !== undefined; dir = todo.pop()) {
    const dev = sys.lstat(dir.path).dev;
    for (const name of sys.readdir(dir.path)) {
      const p = { path: `${dir.path}/${name}`, depth: dir.depth + 1 };
      const c = sys.lstat(p.path);
      if (c.kind !== "dir") continue;
      if (c.dev === dev) todo.push(p);
      else if (c.ino === SUBVOL_ROOT_INO) {
        found.push(p);
        todo.push(p);
      }
    }
  }
  return found.sort((a, b) => b.depth - a.depth).map((f) => f.path);
}

const shareName = (s: Jail["shares"][number]) => (s.dir ? `${s.subvol}/${s.dir}` : s.subvol);

/**
 * The jail's shares, each resolved inside the pool by the kernel (openat2 RESOLVE_IN_ROOT |
 * RESOLVE_NO_SYMLINKS) and bind-mounted from that very directory onto a staging point
 * <dir>/<name>/shares/<i> that crun then binds into the jail. Jails write into their shares:
 * a symlink one of them left there must not lead a bind out of the pool, and staging the
 * resolved directory leaves no window between the check and crun's mount.
 *
 * A share that is missing, or not a directory, or reached through a symlink, stops the jail
 * (one line naming it): started without its data an app could write to its rootfs instead and
 * lose it at the next start. Not created either: a typo would silently make an empty share.
 * Another jail's rootfs (@jail-*) is never a share; an image (@img-*) only read-only.
 */
export function resolveShares(sys: Pick<Files, "openDirInRoot" | "close" | "mkdirp"> & Pick<Mounts, "mount" | "umount">, jail: Jail, pool = POOL_MOUNT, dir = JAILS_RUN): SpecMount[] {
  const staged: SpecMount[] = [];
  try {
    jail.shares.forEach((s, i) => {
      const what = `jail ${jail.name}: share ${shareName(s)} (for ${s.path})`;
      if (s.subvol.startsWith("@jail-")) throw new BootError(`${what} is a jail's rootfs; not started`);
      if (s.subvol.startsWith("@img-") && !s.readOnly) throw new BootError(`${what} is an image: it can only be shared readOnly; not started`);
      let fd: number;
      try {
        fd = sys.openDirInRoot(pool, shareName(s));
      } catch (e) {
        const errno = (e as { errno?: number }).errno;
        const why = errno === 2 ? "does not exist" : errno === 40 ? "passes through a symlink" : errno === 20 ? "is not a directory" : `cannot be opened: ${describe(e)}`;
        throw new BootError(`${what} ${why}; not started`);
      }
      const stage = `${dir}/${jail.name}/shares/${i}`;
      try {
        sys.mkdirp(stage, 0o700);
        sys.mount(`/proc/self/fd/${fd}`, stage, null, MS.BIND);
        staged.push({ source: stage, destination: s.path, readOnly: s.readOnly });
        const flags = MS.REMOUNT | MS.BIND | MS.NOSUID | MS.NODEV | (s.readOnly ? MS.RDONLY : 0);
        sys.mount(null, stage, null, flags);
      } finally {
        sys.close(fd);
      }
    });
  } catch (e) {
    unstage(sys, staged);
    throw e;
  }
  return staged;
}

function unstage(sys: Pick<Mounts, "umount">, staged: readonly SpecMount[]): void {
  for (const m of staged) {
    try {
      sys.umount(m.source, MNT_DETACH);
    } catch {
      // already gone
    }
  }
}

/**
 * crun's state of the jail: gone with a clean exit, left behind when crun itself was killed,
 * and then `crun run` refuses the name. --force: a container still running is killed first; an
 * unknown one is not an error. Through ld.so (toolArgv) like the other tools, since Processes.run
 * passes no environment; delete does not re-execute itself, unlike run.
 */
export function deleteCrunState(sys: Pick<Processes, "run">, log: Logger, jail: Jail, o: CrunOptions = {}): void {
  const crun = o.crun ? o.crun.argv : toolArgv("crun");
  try {
    sys.run([...crun, "--root", o.root ?? CRUN_ROOT, "delete", "--force", jail.name]);
  } catch (e) {
    if (!/does not exist|No such file/.test(describe(e))) log.warn(`jail ${jail.name}: crun delete: ${describe(e)}`);
  }
}

/**
 * After the jail has ended (or to clear what a crash left): crun's state, the staged shares
 * and the rootfs snapshot. Idempotent: what is not there is skipped.
 */
export function removeContainer(
  sys: Pick<Files, "lstat" | "readdir"> & Pick<Mounts, "umount" | "mountPoints"> & Pick<Processes, "run">,
  log: Logger,
  jail: Jail,
  o: CrunOptions & { pool?: string; btrfs?: string[]; dir?: string } = {},
): void {
  deleteCrunState(sys, log, jail, o);
  const sharesDir = `${o.dir ?? JAILS_RUN}/${jail.name}/shares`;
  const mounted = new Set(sys.mountPoints());
  unstage(
    sys,
    sys
      .readdir(sharesDir)
      .map((i) => ({ source: `${sharesDir}/${i}`, destination: "", readOnly: false }))
      .filter((m) => mounted.has(m.source)),
  );
  const target = `${o.pool ?? POOL_MOUNT}/${jailSubvolume(jail.name)}`;
  if (sys.lstat(target).kind === "missing") return;
  try {
    deleteJailTree(sys, target, o.btrfs ?? toolArgv("btrfs"));
  } catch (e) {
    log.warn(`jail ${jail.name}: ${jailSubvolume(jail.name)} not deleted: ${describe(e)}`);
  }
}

/**
 * cgroup v2 at /sys/fs/cgroup (nsdelegate: a jail's cgroup namespace is a delegation
 * boundary), with cpu, memory and pids enabled for the children of the root and of /initos,
 * so that crun's limits in /initos/<name> apply. The agent stays in the root cgroup, which
 * the no-internal-processes rule does not cover; /initos holds only jails.
 */
export function setupCgroups(sys: Pick<Files, "readFile" | "writeFile" | "mkdirp"> & Pick<Mounts, "mount" | "statfsType">, log: Logger): void {
  if (sys.statfsType(CGROUP_ROOT) !== CGROUP2_SUPER_MAGIC) {
    sys.mkdirp(CGROUP_ROOT);
    sys.mount("cgroup2", CGROUP_ROOT, "cgroup2", MS.NOSUID | MS.NODEV | MS.NOEXEC, "nsdelegate");
  }
  const available = (sys.readFile(`${CGROUP_ROOT}/cgroup.controllers`) ?? "").trim().split(/\s+/);
  const wanted = CONTROLLERS.filter((c) => available.includes(c));
  const missing = CONTROLLERS.filter((c) => !available.includes(c));
  if (missing.length) log.warn(`jails: cgroup controllers ${missing.join(", ")} missing in this kernel: those limits do not apply`);
  if (!wanted.length) return;
  const enable = wanted.map((c) => `+${c}`).join(" ");
  sys.writeFile(`${CGROUP_ROOT}/cgroup.subtree_control`, enable);
  sys.mkdirp(JAILS_CGROUP);
  sys.writeFile(`${JAILS_CGROUP}/cgroup.subtree_control`, enable);
}
