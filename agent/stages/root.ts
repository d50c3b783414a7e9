// Stage "root": wait for the root device named on the cmdline, then mount it on /sysroot.
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS } from "../sys/consts.ts";
import type { Sys } from "../sys/index.ts";

export const SYSROOT = "/sysroot";
const POLL_MS = 50;

export interface RootRequest {
  /** /dev/..., LABEL=, UUID=, PARTUUID=, PARTLABEL= */
  spec: string;
  fstypes?: readonly string[];
  options?: string;
  rw: boolean;
  waitSeconds: number;
}

export interface MountedRoot {
  device: string;
  fstype: string;
  path: string;
}

function lookup(sys: Sys, spec: string): string | null {
  if (spec.startsWith("/dev/")) return sys.exists(spec) ? spec : null;
  return sys.resolveDevice(spec);
}

/**
 * Polls for the device. Bounded: a disk that never appears must end in the failure policy
 * with a line saying what was awaited and for how long, not in a silent hang.
 */
export async function waitForDevice(sys: Sys, log: Logger, spec: string, waitSeconds: number, now = () => performance.now()): Promise<string> {
  const start = now();
  let dev = lookup(sys, spec);
  if (dev) return dev;
  log.info(`root: waiting up to ${waitSeconds}s for ${spec}`);
  while (now() - start < waitSeconds * 1000) {
    await sys.sleep(POLL_MS);
    dev = lookup(sys, spec);
    if (dev) {
      log.info(`root: ${spec} is ${dev} after ${((now() - start) / 1000).toFixed(2)}s`);
      return dev;
    }
  }
  throw new BootError(`root device ${spec} did not appear within ${waitSeconds}s`);
}

export async function mountRoot(sys: Sys, log: Logger, req: RootRequest): Promise<MountedRoot> {
  const device = await waitForDevice(sys, log, req.spec, req.waitSeconds);
  let fstypes = req.fstypes;
  if (!fstypes?.length) {
    const type = sys.probe(device)?.TYPE;
    if (!type) throw new BootError(`root ${device}: no filesystem recognised; set rootfstype=`);
    fstypes = [type];
  }
  const flags = req.rw ? 0 : MS.RDONLY;
  sys.mkdirp(SYSROOT);
  const errors: string[] = [];
  for (const fstype of fstypes) {
    try {
      sys.mount(device, SYSROOT, fstype, flags, req.options ?? null);
      log.info(`root: mounted ${device} (${fstype}${req.options ? `, ${req.options}` : ""}, ${req.rw ? "rw" : "ro"}) on ${SYSROOT}`);
      return { device, fstype, path: SYSROOT };
    } catch (e) {
      errors.push((e as Error).message);
    }
  }
  throw new BootError(`root ${device}: mount failed: ${errors.join("; ")}`);
}
