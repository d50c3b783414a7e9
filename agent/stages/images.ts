// Stage "images": open every image named in the signed config with dm-verity against its root
// hash, mount it read-only, and bind its directories (modules, firmware) into place.
//
// Trust: the root hash and the verity parameters come from the UKI; the image and its hash
// tree's superblock come from a disk anyone could have written. A superblock that says other
// parameters than the pinned ones is refused, and every data block is checked before the image
// is mounted, so a copy that differs by one byte is never mounted. The other slot's copy is
// tried next; it is only as good as its match with the same root hash and parameters.
import type { AgentConfig } from "../config.ts";
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import type { Crypt, Devices, Files, Modules, Mounts } from "../sys/index.ts";
import { walkInRoot } from "../switchroot.ts";
import type { Coldplug } from "./devices.ts";
import { type EspResult, mountEsp } from "./esp.ts";

export type Image = AgentConfig["images"][number];

export interface MountedImage {
  name: string;
  slot: string;
  device: string;
  mountPoint: string;
  verified: boolean;
}

export const IMAGES_DIR = "/run/initos/images";

/** Opens `image` from the first slot whose copy verifies; with `allowUnverified`, falls back to an unverified mount. */
export async function openImage(sys: Files & Mounts & Devices & Crypt, log: Logger, esp: EspResult, dir: string, image: Image, allowUnverified: boolean): Promise<MountedImage> {
  const failures: string[] = [];
  const mountPoint = `${IMAGES_DIR}/${image.name}`;
  for (const slot of esp.slots) {
    const base = `${mountEsp(sys, slot)}/${dir}/${image.name}`;
    if (!sys.exists(`${base}.sqfs`) || !sys.exists(`${base}.verity`)) {
      failures.push(`slot ${slot.name}: ${image.name}.sqfs or .verity missing`);
      continue;
    }
    let device: string;
    try {
      device = await sys.verityOpen(`initos-${image.name}`, `${base}.sqfs`, `${base}.verity`, image.rootHash, image.verity);
    } catch (e) {
      failures.push(`slot ${slot.name}: ${describe(e)}`);
      log.err(`image ${image.name}: slot ${slot.name} copy rejected: ${describe(e)}`);
      continue;
    }
    mountSquashfs(sys, device, mountPoint);
    const fell = failures.length ? ` (after ${failures.length} bad cop${failures.length > 1 ? "ies" : "y"})` : "";
    log.info(`image ${image.name}: verified from slot ${slot.name}${fell}, root hash ${image.rootHash.slice(0, 12)}..., mounted on ${mountPoint}`);
    return { name: image.name, slot: slot.name, device, mountPoint, verified: true };
  }
  if (allowUnverified) {
    for (const slot of esp.slots) {
      const file = `${slot.mountPoint}/${dir}/${image.name}.sqfs`;
      if (!sys.exists(file)) continue;
      const device = sys.attachLoop(file);
      mountSquashfs(sys, device, mountPoint);
      log.warn(`image ${image.name}: NOT VERIFIED, mounted from slot ${slot.name} because initos.insecure=1 and Secure Boot is off`);
      return { name: image.name, slot: slot.name, device, mountPoint, verified: false };
    }
  }
  throw new BootError(`image ${image.name}: no copy matches root hash ${image.rootHash.slice(0, 16)}... (${failures.join("; ")})`);
}

function mountSquashfs(sys: Files & Mounts, device: string, mountPoint: string): void {
  sys.mkdirp(mountPoint);
  sys.mount(device, mountPoint, "squashfs", MS.RDONLY | MS.NODEV | MS.NOSUID);
}

/** Binds directories of a mounted image over initramfs paths (e.g. modules → /lib/modules). */
export function bindImage(sys: Files & Mounts, log: Logger, image: Image, mounted: MountedImage): void {
  for (const b of image.binds) {
    const from = `${mounted.mountPoint}/${b.from}`;
    if (sys.lstat(from).kind !== "dir") throw new BootError(`image ${image.name}: has no ${b.from}/ to bind on ${b.to}`);
    sys.mkdirp(b.to);
    sys.mount(from, b.to, null, MS.BIND);
    log.debug(`image ${image.name}: ${b.from} bound on ${b.to}`);
  }
}

/**
 * Opens, mounts and binds every configured image. When an image brings a new module tree,
 * the module index is re-read and coldplug runs again for the drivers that were missing.
 */
export async function setupImages(sys: Files & Mounts & Modules & Devices & Crypt, log: Logger, cfg: AgentConfig, esp: EspResult, allowUnverified: boolean, cold: Coldplug): Promise<MountedImage[]> {
  const atBoot = cfg.images.filter((image) => {
    if (image.onDemand) log.info(`image ${image.name}: opened on demand, not at boot`);
    return !image.onDemand;
  });
  // All of them at once: the kernel checks each on its own worker thread (see verityOpen), so
  // the check of the tools image runs beside the modules image's instead of after it. Each
  // settles before any fails the stage: nothing is still being opened behind the failure policy.
  const opened = await Promise.allSettled(atBoot.map((image) => openImage(sys, log, esp, cfg.esp.dir, image, allowUnverified)));
  const failed = opened.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
  const mounted = opened.map((r) => (r as PromiseFulfilledResult<MountedImage>).value);
  atBoot.forEach((image, i) => bindImage(sys, log, image, mounted[i]!));
  if (cfg.images.some((i) => i.binds.some((b) => b.to === "/lib/modules"))) {
    sys.reloadModuleIndex();
    cold.forget();
    const more = cold.scan();
    log.info(`modules: ${more.length ? `loaded ${more.join(" ")}` : "nothing more to load"} from the modules image`);
  }
  return mounted;
}

const MODULES_DIR = "/lib/modules";
const RELEASE = "/proc/sys/kernel/osrelease";
/** libmount's table of userspace mount options, in the /run that moves into the OS. */
export const UTAB = "/run/mount/utab";

/** One image directory bound into the new root for the OS. */
export interface OsBind {
  image: string;
  /** In the image, e.g. modules/6.1.0-57-cloud-amd64. */
  from: string;
  /** In the new root, e.g. /lib/modules/6.1.0-57-cloud-amd64. */
  to: string;
}

/**
 * What the OS keeps of the images: the config's binds, into the new root. A module tree is
 * narrowed to the running kernel's release, so trees the OS has for other kernels stay visible.
 */
export function osBinds(cfg: AgentConfig, release: string): OsBind[] {
  return cfg.images.flatMap((image) =>
    image.binds.map((b) =>
      b.to === MODULES_DIR ? { image: image.name, from: `${b.from}/${release}`, to: `${MODULES_DIR}/${release}` } : { image: image.name, from: b.from, to: b.to },
    ),
  );
}

/**
 * `path` resolved inside `root` as the OS will see it: symlinks followed (/lib -> usr/lib on a
 * merged-/usr root) but never out of the root, and the directories that are missing made.
 * Returns the resolved path, relative to the root; throws naming what is in the way.
 */
export function mountPointInRoot(sys: Files, root: string, path: string): string {
  const w = walkInRoot(sys, root, path, (here) => (sys.mkdirp(here), true));
  if ("resolved" in w) return w.resolved;
  throw new BootError(w.failed === "too many symlinks" ? `${path}: too many symlinks in the root` : `${path}: ${w.at} is not a directory in the root`);
}

/**
 * Binds one image directory into the root, read-only. The target is opened by the kernel inside
 * the root with no symlink on the way (openat2) and the bind goes onto that fd: what was
 * resolved is what gets mounted over, even if the root's owner planted a link (see pool.ts).
 */
function bindIntoRoot(sys: Files & Mounts, root: string, source: string, resolved: string): void {
  const fd = sys.openDirInRoot(root, resolved);
  try {
    sys.mount(source, `/proc/self/fd/${fd}`, null, MS.BIND);
  } finally {
    sys.close(fd);
  }
  sys.mount(null, `${root}${resolved}`, null, MS.BIND | MS.REMOUNT | MS.RDONLY | MS.NOSUID | MS.NODEV);
}

/**
 * Binds the images' modules and firmware into the new root for the OS (see osBinds): the kernel
 * comes from the UKI, so no distribution carries its modules. Missing mount points are made; a
 * read-only root that has no /lib/modules/<release> gets the image's whole module tree over its
 * /lib/modules instead (that hides the root's own trees, said in one line). A bind that cannot
 * be made is logged and the boot goes on: the OS matters more than a driver. The binds are
 * marked as the initrd's (see markInitrdMounts). Returns the names of the images the OS now
 * holds open.
 */
export function bindImagesForOs(sys: Files & Mounts, log: Logger, cfg: AgentConfig, root: string): Set<string> {
  const release = sys.readFile(RELEASE)?.trim() ?? "";
  const kept = new Set<string>();
  const marks: { src: string; target: string; root: string }[] = [];
  for (const b of osBinds(cfg, release)) {
    const mounted = `${IMAGES_DIR}/${b.image}`;
    if (!sys.mountPoints().includes(mounted)) continue;
    let source = `${mounted}/${b.from}`;
    if (sys.lstat(source).kind !== "dir") {
      log.warn(`image ${b.image}: has no ${b.from}/ for the OS's ${b.to}`);
      continue;
    }
    let to = b.to;
    let resolved: string;
    // A read-only root that lacks a mount point cannot get it: said in one line (a warning: it
    // is how that root was mounted, and the boot goes on), anything else in the way is an error.
    const notBound = (e: unknown) => {
      const line = `image ${b.image}: ${b.to} not bound for the OS: ${describe(e)}`;
      if (isReadOnly(e)) log.warn(line);
      else log.err(line);
    };
    try {
      resolved = mountPointInRoot(sys, root, to);
    } catch (e) {
      const parent = to.slice(0, to.lastIndexOf("/"));
      if (parent !== MODULES_DIR || !isReadOnly(e)) {
        notBound(e);
        continue;
      }
      // No directory for the release: the whole tree goes over the root's /lib/modules.
      source = source.slice(0, source.lastIndexOf("/"));
      to = parent;
      try {
        resolved = mountPointInRoot(sys, root, to);
      } catch (e2) {
        notBound(e2);
        continue;
      }
      log.warn(`image ${b.image}: read-only root has no ${b.to}; its ${to} is hidden under the image's`);
    }
    try {
      bindIntoRoot(sys, root, source, resolved);
    } catch (e) {
      log.err(`image ${b.image}: ${to} not bound for the OS: ${describe(e)}`);
      continue;
    }
    kept.add(b.image);
    marks.push({ src: `/dev/mapper/initos-${b.image}`, target: resolved, root: source.slice(mounted.length) });
    log.info(`image ${b.image}: ${source.slice(mounted.length + 1)} bound read-only on the OS's ${to}${resolved === to ? "" : ` (${resolved})`}`);
  }
  if (marks.length) markInitrdMounts(sys, marks);
  return kept;
}

const isReadOnly = (e: unknown) => (e as { code?: string }).code === "EROFS";

/** libmount's escapes for utab fields (as in /proc/self/mountinfo). */
const mangle = (s: string) => s.replace(/[\\ \t\n]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, "0")}`);

/**
 * Marks the binds as mounts made by the initrd (x-initrd.mount, in libmount's utab, which moves
 * into the OS with /run; libmount matches an entry to the mount by its root and target). systemd
 * then leaves them mounted while it stops the OS, and systemd-shutdown unmounts them at the very
 * end, once every process is gone, before it detaches the DM devices under them. Stopped like any
 * other mount instead, one could still be busy (udev loading a module from it) and fail in red.
 */
export function markInitrdMounts(sys: Files, marks: readonly { src: string; target: string; root: string }[]): void {
  sys.mkdirp("/run/mount");
  const lines = marks.map((m) => `SRC=${mangle(m.src)} TARGET=${mangle(m.target)} ROOT=${mangle(m.root)} OPTS=x-initrd.mount\n`);
  sys.writeFile(UTAB, (sys.readFile(UTAB) ?? "") + lines.join(""));
}

/**
 * Lets go of the images in the initramfs' namespace before the switch: their mounts are under
 * /run, which moves into the OS. Detached lazily, so that what still uses an image keeps it:
 * the binds into the new root (`kept`), or the sidecar beside the OS, whose own namespace has
 * its own bind. An image nothing holds any more is closed (its verity device and loop devices).
 */
export function releaseImages(sys: Mounts & Crypt, log: Logger, cfg: AgentConfig, kept: ReadonlySet<string>, besideUses: ReadonlySet<string> = new Set()): void {
  for (const image of cfg.images) {
    const mountPoint = `${IMAGES_DIR}/${image.name}`;
    if (!sys.mountPoints().includes(mountPoint)) continue;
    sys.umount(mountPoint, MNT_DETACH);
    if (kept.has(image.name) || besideUses.has(image.name)) {
      log.info(`image ${image.name}: unmounted from ${mountPoint}; open for ${kept.has(image.name) ? "the OS" : "the sidecar beside the OS"}`);
      continue;
    }
    try {
      sys.luks.close(`initos-${image.name}`);
      log.info(`image ${image.name}: unmounted and closed`);
    } catch (e) {
      // Something else still holds it (an unverified loop mount, a process on it).
      log.info(`image ${image.name}: unmounted from ${mountPoint}; still open (${describe(e)})`);
    }
  }
}
