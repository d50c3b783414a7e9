// The watchdog for a trial boot: a hang anywhere after this point resets the machine, and the
// firmware's BootOrder then brings back the previous slot. A hardware watchdog (i6300esb under
// QEMU, iTCO on PCs, wdat_wdt from ACPI) is used when a driver bound one; the UKI's kernel
// (Debian's cloud kernel) has neither i6300esb nor iTCO_wdt, so there the fallback is softdog,
// a kernel timer: it resets the machine when userspace (the agent, then the OS) stops petting,
// but a kernel that hangs with it takes softdog down too.
//
// Measured (test/integration/watchdog.test.ts, QEMU TCG, cloud kernel 6.1, timeout 5 s): softdog
// resets the machine 4.95-5.12 s after the last pet ("softdog: Initiating system reboot", an
// emergency restart: no "reboot:" line, QEMU -no-reboot exits); closed without the magic 'V' it
// stays armed (the kernel says "watchdog did not stop!") and resets 5.0 s after the close, so
// an exec (switch_root) that closes the close-on-exec fd hands a running watchdog to the OS;
// after 'V' and a close it is stopped (15 s without a reset). nowayout=0 in this kernel.
// softdog cannot tell the time left (WDIOC_GETTIMELEFT: timeLeft() is null).
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Clock, Files, Modules, WatchdogHandle, Watchdogs } from "../sys/index.ts";
import type { Coldplug } from "./devices.ts";

/** The identity softdog reports (drivers/watchdog/softdog.c). */
export const SOFTDOG_IDENTITY = "Software Watchdog";

export interface ArmedWatchdog {
  handle: WatchdogHandle;
  kind: "hardware" | "softdog";
  /** What it protects against, in a few words (also logged). */
  covers: string;
}

/** The watchdog devices the kernel registered: watchdogN and its driver's identity. */
export function watchdogDevices(sys: Files): { name: string; identity: string }[] {
  return sys
    .readdir("/sys/class/watchdog")
    .filter((n) => /^watchdog\d+$/.test(n))
    .sort((a, b) => Number(a.slice(8)) - Number(b.slice(8)))
    .map((name) => ({ name, identity: sys.readFile(`/sys/class/watchdog/${name}/identity`)?.trim() ?? "" }));
}

/**
 * Arms a watchdog with `seconds` of timeout: a hardware one when a driver is bound (coldplug
 * first, for drivers the kernel has), else softdog (loaded here). Null, with the reason logged,
 * when there is none: the caller decides whether a trial may go on without.
 */
export function armWatchdog(sys: Files & Modules & Watchdogs, log: Logger, cold: Coldplug, seconds: number): ArmedWatchdog | null {
  cold.scan();
  let devs = watchdogDevices(sys);
  let dev = devs.find((d) => d.identity !== SOFTDOG_IDENTITY) ?? devs.find((d) => d.identity === SOFTDOG_IDENTITY);
  if (!dev) {
    try {
      if (sys.loadModule("softdog").matched.length === 0) {
        log.warn("watchdog: no hardware watchdog and no softdog module: none armed");
        return null;
      }
    } catch (e) {
      log.warn(`watchdog: no hardware watchdog, and softdog did not load: ${describe(e)}`);
      return null;
    }
    devs = watchdogDevices(sys);
    dev = devs.find((d) => d.identity === SOFTDOG_IDENTITY);
    if (!dev) {
      log.warn("watchdog: softdog loaded but no watchdog device appeared: none armed");
      return null;
    }
  }
  let handle: WatchdogHandle;
  try {
    handle = sys.openWatchdog(`/dev/${dev.name}`, seconds);
  } catch (e) {
    log.warn(`watchdog: ${describe(e)}: none armed`);
    return null;
  }
  const kind = handle.identity === SOFTDOG_IDENTITY ? "softdog" : "hardware";
  const covers = kind === "softdog" ? "catches hangs of the agent and of userspace, not of the kernel" : "resets the machine on any hang, the kernel's too";
  const asked = handle.timeout === seconds ? "" : ` (asked ${seconds}s)`;
  log.info(`watchdog: ${kind === "softdog" ? "softdog" : `${handle.identity} (hardware)`} on ${handle.path}, ${handle.timeout}s${asked}: ${covers}`);
  return { handle, kind, covers };
}

/**
 * Pets `dog` every third of its timeout from the event loop, so a blocked agent stops the pets
 * and the machine is reset. Returns a function that stops petting (the watchdog stays armed:
 * disarm or release it after). A failing pet is logged once and ends the petting.
 */
export function keepPetting(sys: Clock, log: Logger, dog: WatchdogHandle): () => void {
  const every = Math.max(1000, Math.floor((dog.timeout * 1000) / 3));
  let cancel: (() => void) | null = null;
  const tick = () => {
    try {
      dog.pet();
    } catch (e) {
      log.err(`watchdog: pet failed: ${describe(e)}`);
      cancel = null;
      return;
    }
    cancel = sys.after(every, tick);
  };
  tick();
  return () => {
    cancel?.();
    cancel = null;
  };
}

/**
 * Opens again the watchdog a previous process closed still armed (PID 1 at the switch): the
 * running one, hardware first, as armWatchdog chose it; it is not armed anew. Null, logged,
 * when there is none (then nothing pets it, and it fires: the trial falls back).
 */
export function reopenWatchdog(sys: Files & Watchdogs, log: Logger, seconds: number): WatchdogHandle | null {
  const devs = watchdogDevices(sys);
  const dev = devs.find((d) => d.identity !== SOFTDOG_IDENTITY) ?? devs.find((d) => d.identity === SOFTDOG_IDENTITY);
  if (!dev) {
    log.warn("watchdog: none to take over from PID 1");
    return null;
  }
  try {
    const handle = sys.openWatchdog(`/dev/${dev.name}`, seconds);
    log.info(`watchdog: ${handle.identity} on ${handle.path} taken over from PID 1 (${handle.timeout}s)`);
    return handle;
  } catch (e) {
    log.warn(`watchdog: taking over ${dev.name}: ${describe(e)}`);
    return null;
  }
}
