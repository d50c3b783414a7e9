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
import { MS } from "../sys/consts.ts";
import type { Sys } from "../sys/index.ts";
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
export function openImage(sys: Sys, log: Logger, esp: EspResult, dir: string, image: Image, allowUnverified: boolean): MountedImage {
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
      device = sys.verityOpen(`initos-${image.name}`, `${base}.sqfs`, `${base}.verity`, image.rootHash, image.verity);
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

function mountSquashfs(sys: Sys, device: string, mountPoint: string): void {
  sys.mkdirp(mountPoint);
  sys.mount(device, mountPoint, "squashfs", MS.RDONLY | MS.NODEV | MS.NOSUID);
}

/** Binds directories of a mounted image over initramfs paths (e.g. modules → /lib/modules). */
export function bindImage(sys: Sys, log: Logger, image: Image, mounted: MountedImage): void {
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
export function setupImages(sys: Sys, log: Logger, cfg: AgentConfig, esp: EspResult, allowUnverified: boolean, cold: Coldplug): MountedImage[] {
  const mounted: MountedImage[] = [];
  for (const image of cfg.images) {
    const m = openImage(sys, log, esp, cfg.esp.dir, image, allowUnverified);
    bindImage(sys, log, image, m);
    mounted.push(m);
  }
  if (cfg.images.some((i) => i.binds.some((b) => b.to === "/lib/modules"))) {
    sys.reloadModuleIndex();
    cold.forget();
    const more = cold.scan();
    log.info(`modules: ${more.length ? `loaded ${more.join(" ")}` : "nothing more to load"} from the modules image`);
  }
  return mounted;
}
