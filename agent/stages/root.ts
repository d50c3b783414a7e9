// Stage "root": wait (bounded) for the root device named on the cmdline, mount it on /sysroot.
// The same steps mount a VM's extra disks (see vm.ts) under it.
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS } from "../sys/consts.ts";
import type { Clock, Devices, Files, Modules, Mounts } from "../sys/index.ts";
import { type Coldplug, waitUntil } from "./devices.ts";

export const SYSROOT = "/sysroot";

export interface RootRequest {
  /** /dev/..., LABEL=, UUID=, PARTUUID=, PARTLABEL= */
  spec: string;
  fstypes?: readonly string[];
  options?: string;
  rw: boolean;
  waitSeconds: number;
  /** Where to mount it (default /sysroot), and what to call it in messages (default "root"). */
  target?: string;
  what?: string;
}

export interface MountedRoot {
  device: string;
  fstype: string;
  path: string;
}

function lookup(sys: Files & Devices, spec: string): string | null {
  if (spec.startsWith("/dev/")) return sys.exists(spec) ? spec : null;
  return sys.resolveDevice(spec);
}

export async function mountRoot(sys: Files & Mounts & Modules & Devices & Clock, log: Logger, cold: Coldplug, req: RootRequest): Promise<MountedRoot> {
  const what = req.what ?? "root";
  const target = req.target ?? SYSROOT;
  const device = await waitUntil(sys, log, cold, `${what} device ${req.spec}`, req.waitSeconds, () => lookup(sys, req.spec));
  let fstypes = req.fstypes;
  if (!fstypes?.length) {
    const type = sys.probe(device)?.TYPE;
    if (!type) throw new BootError(`${what} ${device}: no filesystem recognised${what === "root" ? "; set rootfstype=" : ""}`);
    fstypes = [type];
  }
  // The filesystem driver may live in the modules image (btrfs does), not in the initrd.
  for (const t of fstypes) {
    try {
      sys.loadModule(t);
    } catch {
      // built in, or not a module at all: the mount below reports what matters
    }
  }
  const flags = req.rw ? 0 : MS.RDONLY;
  sys.mkdirp(target);
  const errors: string[] = [];
  for (const fstype of fstypes) {
    try {
      sys.mount(device, target, fstype, flags, req.options ?? null);
      log.info(`${what}: mounted ${device} (${fstype}${req.options ? `, ${req.options}` : ""}, ${req.rw ? "rw" : "ro"}) on ${target}`);
      return { device, fstype, path: target };
    } catch (e) {
      errors.push(describe(e));
    }
  }
  throw new BootError(`${what} ${device}: mount failed: ${errors.join("; ")}`);
}
