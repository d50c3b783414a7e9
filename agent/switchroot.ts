// switch_root: leave the initramfs for the real root, for good.
//
// Every step that destroys something is guarded first, because after the initramfs is emptied
// there is nothing left to recover with: the checks run before anything is moved or deleted.
import type { Logger } from "./log.ts";
import { FS_MAGIC, MNT_DETACH, MS } from "./sys/consts.ts";
import type { Files, Mounts, Processes } from "./sys/index.ts";

/** Mounts the new root inherits. Submounts (/dev/pts, /dev/shm, efivarfs) move with them. */
const API_MOUNTS = ["/dev", "/proc", "/sys", "/run"] as const;
const MAX_SYMLINKS = 40; // the kernel's own limit for one path walk
/** The initrd's own directory in /run: what is mounted below it never moves into the OS. */
const INITRD_RUN = "/run/initos";

export class SwitchRootRefused extends Error {
  constructor(reason: string) {
    super(`switch_root refused: ${reason}`);
    this.name = "SwitchRootRefused";
  }
}

export interface SwitchRootPlan {
  newRoot: string;
  /** Path of the init inside the new root, e.g. /sbin/init. */
  init: string;
  args: readonly string[];
  env: readonly string[];
  /** Last words before exec, after the old root is gone (e.g. restoring kernel settings). */
  beforeExec?: () => void;
  /**
   * Called once, just before "/" becomes the new root (pivot_root or MS_MOVE + chroot): from
   * then on a failure must not write anything (see the failure policy), since "/" is the OS.
   */
  onPointOfNoReturn?: () => void;
}

/** Where a walk inside the new root stopped, and why. */
export type RootWalk = { resolved: string } | { failed: "missing" | "not a directory" | "too many symlinks"; at: string };

/**
 * Walks `path` inside `root` the way the kernel will after the switch: absolute symlinks (e.g.
 * /sbin/init -> /lib/systemd/systemd) point into the new root, not into the initramfs, and ".."
 * cannot climb above it. `makeMissing`, when given, is asked to create a missing directory (it
 * returns false to stop there); with it every component must be a directory.
 */
export function walkInRoot(sys: Pick<Files, "lstat" | "readlink">, root: string, path: string, makeMissing?: (here: string) => boolean): RootWalk {
  let pending = path.split("/").filter(Boolean);
  const done: string[] = [];
  let hops = 0;
  const at = (name: string) => `/${[...done, name].join("/")}`;
  while (pending.length > 0) {
    const name = pending.shift()!;
    if (name === ".") continue;
    if (name === "..") {
      done.pop(); // cannot climb above the new root, just like after chroot
      continue;
    }
    const here = `${root}${at(name)}`;
    const st = sys.lstat(here);
    if (st.kind === "link") {
      if (++hops > MAX_SYMLINKS) return { failed: "too many symlinks", at: at(name) };
      const target = sys.readlink(here);
      if (target.startsWith("/")) done.length = 0;
      pending = [...target.split("/").filter(Boolean), ...pending];
      continue;
    }
    // Every parent is a real directory by now, so a missing one is made exactly once.
    if (st.kind === "missing" && !makeMissing?.(here)) return { failed: "missing", at: at(name) };
    if (st.kind !== "missing" && st.kind !== "dir" && (makeMissing || pending.length > 0)) return { failed: "not a directory", at: at(name) };
    done.push(name);
  }
  return { resolved: `/${done.join("/")}` };
}

/** `path` resolved inside `root` (see walkInRoot), relative to it; null if it does not exist. */
export function resolveInRoot(sys: Pick<Files, "lstat" | "readlink">, root: string, path: string): string | null {
  const w = walkInRoot(sys, root, path);
  return "resolved" in w ? w.resolved : null;
}

/** Picks the first init candidate that exists and is executable in the new root. */
export function findInit(sys: Pick<Files, "lstat" | "readlink">, root: string, candidates: readonly string[]): string | null {
  for (const c of candidates) {
    const resolved = resolveInRoot(sys, root, c);
    if (!resolved) continue;
    const st = sys.lstat(`${root}${resolved}`);
    if (st.kind === "file" && (st.mode & 0o111) !== 0) return c;
  }
  return null;
}

/** Whether an init, resolved inside the new root, is systemd (decided on the file, not the name asked for). */
export function isSystemd(resolved: string): boolean {
  return /(^|\/)systemd$/.test(resolved);
}

/** The program systemd execs as PID 1 once every unit is stopped: it kills, unmounts, detaches. */
export function isSystemdShutdown(initExe: string): boolean {
  return /(^|\/)systemd-shutdown$/.test(initExe);
}

/** The guards: nothing is touched unless all of them pass. Throws SwitchRootRefused. */
export function checkSwitchRoot(sys: Files & Mounts & Processes, plan: SwitchRootPlan): void {
  // Only PID 1 may do this: another process would strand the real init in an empty initramfs.
  if (sys.pid() !== 1) throw new SwitchRootRefused(`not PID 1 (pid ${sys.pid()})`);
  // We are about to delete everything on "/"; make sure "/" is the disposable initramfs.
  const magic = sys.statfsType("/");
  if (magic !== FS_MAGIC.RAMFS && magic !== FS_MAGIC.TMPFS) {
    throw new SwitchRootRefused(`/ is not an initramfs (statfs magic 0x${magic.toString(16)})`);
  }
  // A new root on the same device as "/" means the mount did not happen: switching into it
  // would delete the very files we are switching to.
  const rootDev = sys.lstat("/").dev;
  const newDev = sys.lstat(plan.newRoot);
  if (newDev.kind !== "dir") throw new SwitchRootRefused(`${plan.newRoot} is not a directory`);
  if (newDev.dev === rootDev) throw new SwitchRootRefused(`${plan.newRoot} is not a mount (same device as /)`);
  checkInit(sys, plan);
}

/**
 * The init must exist, and be where exec will look for it, before anything is destroyed: a
 * missing init after the switch is a panic (or, for the failure policy, a boot past the point
 * of no return with nothing left to recover with). An init kept in one of the API mounts (the
 * VM pod reaper in /run/initos, or /dev/.initos) is checked where it is now, and only reaches
 * the new root if that mount is mounted and the new root has a directory to move it onto:
 * otherwise the move detaches it, init included.
 */
function checkInit(sys: Files & Mounts, plan: SwitchRootPlan): void {
  const carrier = API_MOUNTS.find((m) => plan.init.startsWith(`${m}/`));
  if (!findInit(sys, carrier ? "" : plan.newRoot, [plan.init])) {
    throw new SwitchRootRefused(`init ${plan.init} not found or not executable in ${carrier ?? plan.newRoot}`);
  }
  if (!carrier) return;
  if (!sys.mountPoints().includes(carrier)) {
    throw new SwitchRootRefused(`init ${plan.init} lives in ${carrier}, which is not a mount (it would stay behind)`);
  }
  // The same test the move makes: anything but a directory (a symlink would be followed in the
  // initramfs, not in the new root) gets the mount detached.
  if (sys.lstat(`${plan.newRoot}${carrier}`).kind !== "dir") {
    throw new SwitchRootRefused(`init ${plan.init} lives in ${carrier}, which ${plan.newRoot} has no directory for (it would be detached)`);
  }
}

/** Performs the switch and execs the new init. Only returns by throwing, before the point of no return. */
export function switchRoot(sys: Files & Mounts & Processes, log: Logger, plan: SwitchRootPlan): never {
  checkSwitchRoot(sys, plan);
  const { newRoot } = plan;
  const rootDev = sys.lstat("/").dev;

  // Flush anything written to the new root (logs, the timeline) before mounts start moving.
  sys.sync();
  // Shared propagation would replay our MS_MOVEs into peer mounts; make the tree private first.
  sys.mount(null, "/", null, MS.REC | MS.PRIVATE);

  const mountPoints = sys.mountPoints(); // read now: /proc is about to move
  // Whatever else is mounted in the initramfs (image binds over /lib/modules) would pin its
  // devices forever once the initramfs is unreachable: detach it, deepest first.
  // The initrd's own mounts under /run (images, ESPs) would move into the OS with /run: the
  // boot lets go of them before; one still there is detached here, and named.
  const inside = (m: string, dir: string) => m === dir || m.startsWith(`${dir}/`);
  for (const m of [...mountPoints].reverse()) {
    const initrds = m.startsWith(`${INITRD_RUN}/`);
    if (m === "/" || inside(m, newRoot) || (API_MOUNTS.some((a) => inside(m, a)) && !initrds)) continue;
    if (initrds) log.warn(`switch_root: ${m} still mounted; detached, not moved into the OS`);
    sys.umount(m, MNT_DETACH);
  }

  const mounted = new Set(mountPoints);
  for (const m of API_MOUNTS) {
    if (!mounted.has(m)) continue;
    const target = `${newRoot}${m}`;
    if (sys.lstat(target).kind === "dir") {
      sys.mount(m, target, null, MS.MOVE);
    } else {
      // The new root has nowhere to put it; detach rather than leave it pinned in the old root.
      log.warn(`switch_root: ${target} missing, detaching ${m}`);
      sys.umount(m, MNT_DETACH);
    }
  }

  // Keep a handle on the old root for the cleanup: after chroot the path "/" means the new root,
  // but /proc/self/fd/<fd> still leads to the initramfs (see removeOldRoot).
  const oldRootFd = sys.openDir("/");
  // The point of no return: past here "/etc/passwd" may be the user's file, not the initramfs'.
  plan.onPointOfNoReturn?.();
  sys.chdir(newRoot);
  try {
    // Works on real root filesystems; the initramfs (rootfs) itself cannot be pivoted away.
    sys.pivotRoot(".", ".");
    sys.umount(".", MNT_DETACH);
  } catch {
    // rootfs: the classic move-over-/ and chroot, as every initramfs switch_root does.
    sys.mount(".", "/", null, MS.MOVE);
    sys.chroot(".");
  }
  sys.chdir("/");

  removeOldRoot(sys, log, `/proc/self/fd/${oldRootFd}`, rootDev);
  sys.close(oldRootFd);

  const argv = [plan.init, ...plan.args];
  log.info(`switch_root: exec ${argv.join(" ")}`);
  plan.beforeExec?.();
  return sys.execve(plan.init, argv, plan.env);
}

/**
 * Frees the initramfs memory: its files are unreachable after the switch but still in RAM.
 * The old root is reached through an fd opened before the switch; st_dev checks keep the walk
 * from crossing into any mount (which would delete the user's files).
 */
function removeOldRoot(sys: Files, log: Logger, oldRoot: string, rootDev: number): void {
  const n = sys.removeTreeOnDevice(oldRoot, rootDev);
  log.info(`switch_root: freed initramfs (${n} entries)`);
}
