// The failure policy. PID 1 must never exit (the kernel would panic and the reason would scroll
// away), so every failure ends here: one line of cause, diagnostics kept in /run/initos, then a
// reboot after a delay long enough for a human to read the console.
import { describe } from "./errors.ts";
import type { Logger, Timeline } from "./log.ts";
import { RB } from "./sys/consts.ts";
import type { Clock, Files, Processes } from "./sys/index.ts";

export const DIAG_PATH = "/run/initos/failure.txt";

export function diagnostics(sys: Files, reason: string, timeline: Timeline): string {
  const section = (title: string, path: string) => `## ${title} (${path})\n${sys.readFile(path)?.trimEnd() ?? "(unreadable)"}\n`;
  return [
    `reason: ${reason}`,
    `timeline: ${timeline.summary()}`,
    "",
    section("cmdline", "/proc/cmdline"),
    section("partitions", "/proc/partitions"),
    section("mounts", "/proc/self/mounts"),
    section("modules", "/proc/modules"),
  ].join("\n");
}

/**
 * `recovery`, when given, tries to bring up the recovery sidecar (ssh with the UKI's keys): if
 * it comes up, the machine stays for an operator (status, log, reboot) instead of rebooting.
 *
 * `pastPointOfNoReturn`: switch_root already made the OS's root "/" (its execve failed, say).
 * Then every path below is the user's: diagnostics would land on their disk and the recovery
 * sidecar would rewrite their /etc/passwd, /etc/shells and /root/.ssh. Only the log (kmsg, an
 * fd opened long ago) and the reboot remain.
 */
export async function applyFailurePolicy(sys: Files & Processes & Clock, log: Logger, timeline: Timeline, error: unknown, delaySeconds: number, recovery?: () => Promise<boolean>, pastPointOfNoReturn = false): Promise<never> {
  const reason = describe(error);
  log.err(`boot failed: ${reason}`);
  if (pastPointOfNoReturn) {
    log.err("past switch_root: / is the OS now; nothing is written into it and no recovery sidecar starts");
    return rebootAfter(sys, log, delaySeconds);
  }
  try {
    sys.mkdirp("/run/initos", 0o700);
    sys.writeFile(DIAG_PATH, diagnostics(sys, reason, timeline));
    timeline.save();
    log.info(`diagnostics in ${DIAG_PATH}`);
  } catch (e) {
    log.warn(`cannot write diagnostics: ${describe(e)}`);
  }
  if (recovery) {
    try {
      if (await recovery()) {
        log.err("staying up for recovery over ssh: status, log, reboot, poweroff");
        for (;;) await sys.sleep(3_600_000);
      }
    } catch (e) {
      log.warn(`recovery sidecar: ${describe(e)}`);
    }
  }
  return rebootAfter(sys, log, delaySeconds);
}

async function rebootAfter(sys: Processes & Clock, log: Logger, delaySeconds: number): Promise<never> {
  log.err(`rebooting in ${delaySeconds}s`);
  await sys.sleep(delaySeconds * 1000);
  sys.sync();
  try {
    sys.reboot(RB.AUTOBOOT);
  } catch (e) {
    log.err(`reboot failed: ${describe(e)}; halting here`);
  }
  // Not reached on a real machine; if reboot was refused, stay alive rather than panic.
  for (;;) await sys.sleep(3_600_000);
}
