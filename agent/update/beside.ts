// The update beside the running OS: `update` writes the inactive slot as in sidecar mode, and a
// trial boot is carried to its end here. PID 1 armed the watchdog and let go of it at the switch,
// still armed; this process opens it again and pets it until the commit or the deadline, and
// commits once the OS has been up `healthSeconds` (and, by policy, the control plane said so).
import type { AdminCaps, CtlResponse, StatusField } from "../admin.ts";
import type { AgentConfig } from "../config.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { EFIVARS_DIR } from "../efi/vars.ts";
import { Coldplug } from "../stages/devices.ts";
import { type EspResult, findEsps } from "../stages/esp.ts";
import { reopenWatchdog } from "../stages/watchdog.ts";
import type { Sys } from "../sys/index.ts";
import { pollUntil } from "../wait.ts";
import { realUpdateDeps, updateCommand } from "./apply.ts";
import { efiFirmware } from "./firmware.ts";
import { TrialRun } from "./session.ts";
import { updateStatus } from "./status.ts";

/** How often the trial checks whether it may commit. */
const COMMIT_POLL_MS = 2000;

export interface BesideUpdate {
  update: AdminCaps["update"];
  commit: AdminCaps["commit"];
  status(): StatusField[];
}

/**
 * Sets up the update side of the agent beside the OS. `agentExe`: PID 1's executable while it
 * is still the initrd's agent (the OS's init replaces it at the switch: the root was reached).
 */
export async function besideUpdate(sys: Sys, log: Logger, config: AgentConfig, reboot: () => string, agentExe: string): Promise<BesideUpdate> {
  const none = (why: string): BesideUpdate => ({ update: { refused: why }, commit: { refused: why }, status: () => updateStatus(sys, config, undefined, undefined) });
  if (sys.readdir(EFIVARS_DIR).length === 0) return none("no EFI variables (not booted through UEFI)");
  const firmware = efiFirmware(sys, log);
  let esp: EspResult;
  try {
    esp = await findEsps(sys, log, new Coldplug(sys, log), config.esp.slots, 0);
  } catch (e) {
    return none(`the boot disk's slots are not found: ${describe(e)}`);
  }
  const run = continueTrial(sys, log, config, esp, firmware, agentExe);
  const command = updateCommand(log, () => realUpdateDeps(sys, log, config, () => esp, firmware), reboot);
  return {
    update: { run: command },
    commit: run
      ? { run: async (): Promise<CtlResponse> => run.ask(firmware) }
      : { refused: "no trial is running (this boot is not an update's trial, or it has committed)" },
    status: () => [...updateStatus(sys, config, esp, firmware), ...(run ? [["trial", run.isCommitted() ? "committed" : `waits for ${run.waitsFor() ?? "nothing"}; ${Math.max(0, Math.floor(run.left()))} s left before its deadline`] as StatusField] : [])],
  };
}

/** The trial PID 1 started, when this boot is one: the watchdog again, then the commit. */
function continueTrial(sys: Sys, log: Logger, config: AgentConfig, esp: EspResult, firmware: ReturnType<typeof efiFirmware>, agentExe: string): TrialRun | null {
  let trial;
  try {
    trial = firmware.loadState().trial;
  } catch (e) {
    log.warn(`update: cannot read the update record: ${describe(e)}`);
    return null;
  }
  const booted = esp.slots.find((s) => s.booted)?.name;
  if (!trial?.started || trial.slot !== booted || trial.version !== config.version) return null;
  const dog = reopenWatchdog(sys, log, config.update.watchdogSeconds);
  const run = new TrialRun(sys, log, trial, config.update, dog);
  run.startPetting();
  log.info(`update: the trial of version ${trial.version} goes on beside the OS: it commits once the OS has been up ${config.update.healthSeconds} s${config.update.commit === "manual" ? " and the control plane said `commit`" : ""}`);
  void (async () => {
    // The root is reached when PID 1 is no longer the initrd's agent (it exec'd the OS's init).
    const reached = await pollUntil(sys, run.left() * 1000, 250, () => {
      try {
        return sys.readlink("/proc/1/exe").startsWith(agentExe) ? null : true;
      } catch {
        return null;
      }
    });
    if (!reached) return; // the deadline: TrialRun stops petting, the watchdog resets
    run.rootReached();
    while (!run.isCommitted() && run.left() > 0) {
      if (run.tryCommit(firmware)) return;
      await sys.sleep(COMMIT_POLL_MS);
    }
  })().catch((e: unknown) => log.err(`update: the trial: ${describe(e)}`));
  return run;
}
