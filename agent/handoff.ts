// The hand-off: what the OS is given when the initrd leaves. Which init runs and with what
// arguments (systemd told it was switched), which mounts stay (the kernel's modules and
// firmware) and which go, and what is forgotten first.
import type { Cmdline } from "./cmdline.ts";
import type { AgentConfig } from "./config.ts";
import { BootError, describe } from "./errors.ts";
import type { Logger } from "./log.ts";
import { type EspResult, unmountEsps } from "./stages/esp.ts";
import { bindImagesForOs, releaseImages } from "./stages/images.ts";
import { SYSROOT } from "./stages/root.ts";
import { SSH_DIR } from "./stages/sidecar.ts";
import { podHandoff, type VmPlan } from "./stages/vm.ts";
import { findInit, isSystemd, resolveInRoot } from "./switchroot.ts";
import type { Crypt, Files, Mounts, Processes } from "./sys/index.ts";

export interface HandoffTarget {
  /** What is exec'd, as named: argv[0] (busybox picks its applet by it). */
  init: string;
  /** The same init resolved inside the new root (/sbin/init -> /usr/lib/systemd/systemd). */
  resolved: string;
  /** Its arguments, before what systemd is told about the initrd. */
  app: string[];
}

/** What runs as PID 1 after the switch: a VM's app under the pod reaper, else the root's init. */
export function handoffTarget(sys: Files & Mounts, log: Logger, cmdline: Cmdline, config: AgentConfig, vm?: VmPlan): HandoffTarget {
  if (vm?.app.length) {
    // The pod reaper goes where the root lets it survive the move (/run, else /dev): vm.ts.
    const pod = podHandoff(sys, vm.app);
    return { init: pod.init, resolved: pod.init, app: pod.args };
  }
  const init = chooseInit(sys, cmdline, config);
  // Resolved the way exec will after the chroot: symlinks followed, never out of the new root.
  const resolved = resolveInRoot(sys, SYSROOT, init) ?? init;
  log.info(`handoff: init ${init}${resolved === init ? "" : ` is ${resolved}`}${isSystemd(resolved) ? " (systemd: switched root)" : ""}`);
  return { init, resolved, app: [...cmdline.app] };
}

export function chooseInit(sys: Files, cmdline: Cmdline, config: AgentConfig): string {
  const candidates = cmdline.init ? [cmdline.init] : config.initCandidates;
  const init = findInit(sys, SYSROOT, candidates);
  if (!init) throw new BootError(`no init in the root: tried ${candidates.join(", ")}`);
  return init;
}

/**
 * systemd must be told it comes from an initrd, as systemd's own initrd does at its switch_root:
 * `--switched-root --system --deserialize FD`, the fd holding the state it reads (here only the
 * initrd's start). Other inits get the `--` args as they are.
 */
export function initArgs(resolved: string, app: readonly string[], stateFd?: number): string[] {
  if (!isSystemd(resolved)) return [...app];
  return ["--switched-root", "--system", ...(stateFd === undefined ? [] : ["--deserialize", String(stateFd)]), ...app];
}

/**
 * systemd 252 reads no RD_TIMESTAMP from its environment: it learns when the initrd started the
 * way its own initrd tells it, as `initrd-timestamp=<realtime µs> <monotonic µs>` in the state
 * it deserializes, and `systemd-analyze` then shows the "(initrd)" part. preinit noted that
 * time in RD_TIMESTAMP (dracut's format, the same two numbers). null when it is not there.
 */
export function initrdState(rdTimestamp: string | undefined): string | null {
  const m = /^(\d{1,20}) (\d{1,20})$/.exec(rdTimestamp?.trim() ?? "");
  return m ? `initrd-timestamp=${m[1]} ${m[2]}\n` : null;
}

/** The fd for `--deserialize`, made last (only the exec inherits it); undefined when systemd gets none. */
export function initrdStateFd(sys: Processes, log: Logger, target: HandoffTarget): number | undefined {
  if (!isSystemd(target.resolved)) return undefined;
  const state = initrdState(process.env.RD_TIMESTAMP);
  if (!state) {
    log.warn("handoff: no RD_TIMESTAMP; systemd will not show the initrd's time");
    return undefined;
  }
  try {
    return sys.inheritableData("initrd-state", state);
  } catch (e) {
    log.warn(`handoff: initrd state for systemd: ${describe(e)}`);
    return undefined;
  }
}

/**
 * The mounts the OS keeps, and the ones it must not get. The kernel came from the UKI, so its
 * modules and firmware stay, bound read-only into the new root from the verified image (its
 * dm-verity device stays open under them). Everything else the initrd mounted under /run (the
 * images, the ESPs) is let go: /run moves into the OS, where it would stay mounted and busy
 * until systemd's shutdown failed to unmount it.
 */
export function handOverMounts(sys: Files & Mounts & Crypt, log: Logger, config: AgentConfig, esp?: EspResult, inUse: readonly string[] = []): void {
  const kept = bindImagesForOs(sys, log, config, SYSROOT);
  // An image the sidecar beside the OS runs from cannot be closed (libcryptsetup would retry the
  // removal for ~5 s before it gives up): it is left open for that sidecar.
  releaseImages(sys, log, config, kept, new Set(inUse));
  if (esp) unmountEsps(sys, log, esp);
}

export function initEnv(): string[] {
  return Object.entries(process.env)
    .filter((kv): kv is [string, string] => kv[1] !== undefined)
    .map(([k, v]) => `${k}=${v}`);
}

/**
 * The ssh host key and the admin socket stay with the initrd: /run moves into the OS, which
 * has no business with the sidecar's key (the sidecar beside the OS took its own copy).
 */
export function forgetSecrets(sys: Files): void {
  if (sys.exists(SSH_DIR)) sys.removeTreeOnDevice(SSH_DIR, sys.lstat(SSH_DIR).dev);
}
