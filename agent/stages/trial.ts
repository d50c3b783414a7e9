// Stage "trial": whether this boot is an update's trial, or the fallback from one (update/).
// It runs before anything that could hang for long: unlock, root, sidecar. A trial waits for the
// images first (softdog, the watchdog of the UKI's kernel, is a module of the modules image);
// any other boot does not, and its images go on checking meanwhile.
//
// A trial boot arms the watchdog and pets it until the switch (then the agent beside the OS
// takes over) or until the trial's deadline; and its failures reboot at once, into the old
// slot, instead of waiting in the recovery sidecar. A fallback boot records the failure.
// Nothing here may stop a boot: the record is data, and a machine whose firmware variables
// cannot be read boots as if no update were pending.
import type { AgentConfig } from "../config.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { EFIVARS_DIR } from "../efi/vars.ts";
import type { Clock, Devices, Files, Modules, Watchdogs } from "../sys/index.ts";
import { efiFirmware } from "../update/firmware.ts";
import { checkBoot, type FirmwareWithNext, TrialRun } from "../update/session.ts";
import type { Coldplug } from "./devices.ts";
import type { EspResult } from "./esp.ts";
import { armWatchdog } from "./watchdog.ts";

export interface UpdateBoot {
  /** The firmware's variables; null without EFI (a direct kernel boot). */
  firmware: FirmwareWithNext | null;
  /** This boot's trial, when it is one. */
  run?: TrialRun;
}

export async function startTrial(sys: Files & Devices & Modules & Watchdogs & Clock, log: Logger, cold: Coldplug, config: AgentConfig, esp: EspResult, images: () => Promise<unknown>): Promise<UpdateBoot> {
  if (sys.readdir(EFIVARS_DIR).length === 0) return { firmware: null };
  const firmware = efiFirmware(sys, log);
  let verdict;
  try {
    verdict = checkBoot(firmware, log, esp.slots.find((s) => s.booted)?.name ?? null, config.version);
  } catch (e) {
    log.warn(`update: cannot read the update record (${describe(e)}); booting as if no update were pending`);
    return { firmware };
  }
  if (verdict.kind !== "trial") return { firmware };
  await images();
  const dog = armWatchdog(sys, log, cold, config.update.watchdogSeconds);
  if (!dog) log.warn("update: no watchdog for this trial: a hang is not caught; a crash, panic or failure still returns to the old slot");
  const run = new TrialRun(sys, log, verdict.trial, config.update, dog?.handle ?? null);
  run.startPetting();
  return { firmware, run };
}
