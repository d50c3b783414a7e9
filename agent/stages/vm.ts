// vm mode: a VM booted directly (cloud-hypervisor, QEMU microvm/q35), configured only by its
// kernel command line, as InitOS runs "serverless" containers:
//
//   initos.mode=vm root=/dev/vda rootflags=subvol=@ rw initos.share=z initos.disks=/dev/vdb:/x
//   initos.hostname=web1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 -- /bin/app arg1 arg2
//
// The root is the VM's first disk (btrfs, subvolume optional); the share (virtiofs, else 9p
// with the same tag) goes on /z; extra disks where named. After the pivot the app runs under a
// small reaper (initrd/pod.c) as PID 1, which powers the VM off when the app exits; with no
// `--` the root's own init runs.
import type { Cmdline } from "../cmdline.ts";
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS } from "../sys/consts.ts";
import type { Clock, Devices, Files, Modules, Mounts } from "../sys/index.ts";
import { resolveInRoot } from "../switchroot.ts";
import type { Coldplug } from "./devices.ts";
import { mountRoot, SYSROOT } from "./root.ts";

/** The reaper the app runs under: in the initrd, and copied into /run, which moves into the root. */
export const POD_SOURCE = "/usr/lib/initos/pod";
export const POD_PATH = "/run/initos/pod";
/**
 * Where the pod goes when the root has no /run to move /run onto (a read-only image without
 * one): /dev is the other API mount the pod can live in. It is a devtmpfs, so writable,
 * mounted without noexec, and it moves into the root like /run; /proc and /sys take no files.
 * A hidden directory only root can enter, so the app sees no stray command in its /dev.
 * The alternatives were worse: a tmpfs overlay over the whole root changes what the app's
 * writes do and costs memory; a tmpfs on the missing mount point's parent is impossible,
 * since that parent is "/"; and remounting a read-only root rw writes into a disk the VM
 * was told to keep unchanged (and fails on a read-only device).
 */
export const POD_PATH_DEV = "/dev/.initos/pod";
/**
 * What switch_root moves into the root, with the modes a distribution gives their mount
 * points (Debian's base-files). Container images often have none of them: a container
 * runtime makes them, so here vm mode does.
 */
const API_MOUNT_POINTS = [
  ["/dev", 0o755],
  ["/proc", 0o555],
  ["/sys", 0o555],
  ["/run", 0o755],
] as const;
const DEFAULT_SHARE = { tag: "z", path: "/z" };
/** Where a bare app name is looked for in the root, like a shell's PATH. */
const APP_PATH = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"];

export interface VmPlan {
  root: string;
  rw: boolean;
  /** The share to mount; `required` when named on the cmdline (a missing one is an error then). */
  share: { tag: string; path: string; required: boolean };
  disks: { device: string; path: string }[];
  hostname?: string;
  /** The app and its arguments, or empty: the root's init. */
  app: string[];
}

/** What the cmdline asks of the VM. Pure: the decisions, tested without a machine. */
export function vmPlan(cmdline: Cmdline): VmPlan {
  const [tag, path] = cmdline.share?.split(":") ?? [];
  const disks = (cmdline.disks?.split(",") ?? []).map((d) => {
    const i = d.indexOf(":");
    return { device: d.slice(0, i), path: d.slice(i + 1) };
  });
  for (const d of disks) {
    if (d.path === "/" || d.path.split("/").includes("..")) throw new BootError(`vm: initos.disks: ${d.device} cannot be mounted on ${d.path}`);
  }
  return {
    root: cmdline.root ?? "/dev/vda",
    rw: cmdline.rw,
    share: tag ? { tag, path: path ?? DEFAULT_SHARE.path, required: true } : { ...DEFAULT_SHARE, required: false },
    disks,
    hostname: cmdline.hostname,
    app: cmdline.app,
  };
}

/** The VM's root disk, on /sysroot. */
export function mountVmRoot(sys: Files & Mounts & Modules & Devices & Clock, log: Logger, cold: Coldplug, plan: VmPlan, cmdline: Cmdline, waitSeconds: number) {
  return mountRoot(sys, log, cold, {
    spec: plan.root,
    fstypes: cmdline.rootfstype?.split(",") ?? ["btrfs"],
    options: cmdline.rootflags,
    rw: plan.rw,
    waitSeconds,
  });
}

/** A mount point inside the root: made when missing, which needs a writable root. */
function mountPoint(sys: Files, plan: VmPlan, path: string, what: string): string {
  const target = `${SYSROOT}${path}`;
  const st = sys.lstat(target);
  if (st.kind === "dir") return target;
  if (st.kind !== "missing") throw new BootError(`vm: ${what}: ${path} in the root is not a directory`);
  if (!plan.rw) throw new BootError(`vm: ${what}: ${path} does not exist in the read-only root (add rw, or create it in the image)`);
  sys.mkdirp(target);
  return target;
}

/**
 * The API mount points in the root, made where missing when the root is writable. One that
 * cannot be made (read-only root, a refused mkdir, a file or symlink in its place, which is
 * left as it is) is only reported: switch_root then detaches that mount, the app runs without
 * it, and podHandoff keeps the pod out of it.
 */
function apiMountPoints(sys: Files, log: Logger, plan: VmPlan): void {
  const created: string[] = [];
  const missing: string[] = [];
  for (const [path, mode] of API_MOUNT_POINTS) {
    const target = `${SYSROOT}${path}`;
    const kind = sys.lstat(target).kind;
    if (kind === "dir") continue;
    if (kind !== "missing") {
      log.warn(`vm: ${path} in the root is not a directory: not mounted there`);
    } else if (!plan.rw) {
      missing.push(path);
    } else {
      try {
        sys.mkdirp(target, mode);
        created.push(path);
      } catch (e) {
        log.warn(`vm: cannot create ${path} in the root (${describe(e)}): not mounted there`);
      }
    }
  }
  if (created.length) log.info(`vm: created ${created.join(" ")} in the root (the image has none)`);
  if (missing.length) log.warn(`vm: ${missing.join(" ")} missing from the read-only root: not mounted there (boot with rw, or add them to the image)`);
}

/** The API mount points, extra disks, the share and the host name, once the root is mounted. */
export async function setupVmMounts(sys: Files & Mounts & Modules & Devices & Clock, log: Logger, cold: Coldplug, plan: VmPlan, waitSeconds: number): Promise<void> {
  apiMountPoints(sys, log, plan);
  for (const d of plan.disks) {
    const what = `disk ${d.path}`;
    await mountRoot(sys, log, cold, { spec: d.device, rw: plan.rw, waitSeconds, target: mountPoint(sys, plan, d.path, what), what });
  }
  mountShare(sys, log, plan);
  if (plan.hostname) {
    sys.writeFile("/proc/sys/kernel/hostname", plan.hostname);
    log.info(`vm: hostname ${plan.hostname}`);
  }
}

/**
 * virtiofs first (the faster one, and cloud-hypervisor's only kind); 9p with the same tag when
 * there is no virtiofs device with that tag (QEMU's built-in share). The kernel says "no such
 * tag" for both the same way, so both are tried.
 */
function mountShare(sys: Files & Mounts, log: Logger, plan: VmPlan): void {
  // The drivers (virtiofs, 9p, 9pnet_virtio) are loaded by the modules stage: the VM initrd's
  // config lists them.
  const { tag, path, required } = plan.share;
  const errors: string[] = [];
  const attempts: [string, string | null][] = [
    ["virtiofs", null],
    ["9p", "trans=virtio,version=9p2000.L,msize=262144,cache=loose"],
  ];
  let target: string | undefined;
  for (const [fstype, options] of attempts) {
    try {
      target ??= mountPoint(sys, plan, path, `share ${tag}`);
      sys.mount(tag, target, fstype, MS.NOSUID | MS.NODEV, options);
      log.info(`vm: share ${tag} (${fstype}) on ${path}`);
      return;
    } catch (e) {
      if (e instanceof BootError) {
        if (required) throw e;
        log.info(`vm: no share: ${e.message}`);
        return;
      }
      errors.push(`${fstype}: ${describe(e)}`);
    }
  }
  if (required) throw new BootError(`vm: share ${tag} (initos.share) could not be mounted: ${errors.join("; ")}`);
  log.info(`vm: no share tagged ${tag}`);
}

/** The app's path in the root, checked before the switch: after it there is nothing left to fail over to. */
function findApp(sys: Files, app: readonly string[]): string[] {
  const name = app[0]!;
  const candidates = name.startsWith("/") ? [name] : APP_PATH.map((d) => `${d}/${name}`);
  const found = candidates.find((c) => {
    const r = resolveInRoot(sys, SYSROOT, c);
    if (!r) return false;
    const st = sys.lstat(`${SYSROOT}${r}`);
    return st.kind === "file" && (st.mode & 0o111) !== 0;
  });
  if (!found) throw new BootError(`vm: app ${name} not found (or not executable) in the root`);
  if (!sys.exists(POD_SOURCE)) throw new BootError(`vm: ${POD_SOURCE} is not in this initrd; build the VM initrd`);
  return [found, ...app.slice(1)];
}

/** An API mount the pod can live in: mounted here, and with a directory in the root to move onto. */
const podHomeUsable = (sys: Files & Mounts, mount: string) => sys.mountPoints().includes(mount) && sys.lstat(`${SYSROOT}${mount}`).kind === "dir";

/**
 * What runs as PID 1 after the switch: the pod reaper, copied into a mount that moves into the
 * root (/run, else /dev: see POD_PATH_DEV), with the app's path and arguments. A root with
 * neither is refused here, before the point of no return, where the failure policy still has
 * all its options.
 */
export function podHandoff(sys: Files & Mounts, app: readonly string[]): { init: string; args: string[] } {
  const args = findApp(sys, app);
  const init = [POD_PATH, POD_PATH_DEV].find((p) => podHomeUsable(sys, `/${p.split("/")[1]}`));
  if (!init) throw new BootError("vm: the root has neither /run nor /dev for the pod reaper (boot with rw, or add them to the image)");
  sys.mkdirp(init.slice(0, init.lastIndexOf("/")), 0o700);
  sys.copyFile(POD_SOURCE, init);
  return { init, args };
}

