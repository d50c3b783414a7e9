// The trial as it runs: PID 1 finds out at boot whether this boot is one (or the fallback from
// one), arms the watchdog and pets it through the initrd; at the switch it lets go of the
// watchdog still armed, and the agent beside the OS opens it again, pets it, and commits once
// the OS has stayed up long enough (and the control plane said so, when the policy asks).
//
// The deadline: a trial not committed `trialSeconds` after power-on is abandoned. Nobody pets
// the watchdog any more and it resets the machine, into BootOrder's first entry: the old slot.
// So a hang anywhere (the agent, the OS's userspace, a boot that waits for ever, a control
// plane that never says commit) ends in the old slot, as a crash or a panic does.
import type { AgentConfig } from "../config.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { keepPetting } from "../stages/watchdog.ts";
import type { Clock, Files, WatchdogHandle } from "../sys/index.ts";
import type { UpdateFirmware } from "./apply.ts";
import { type BootVerdict, commitWaitsFor, onBoot, orderWith, recordCommitted, type Trial } from "./trial.ts";

export interface FirmwareWithNext extends UpdateFirmware {
  bootNext(): number | null;
}

/** Seconds since power-on (the kernel's), from /proc/uptime. */
export function uptimeSeconds(sys: Files): number {
  const up = Number((sys.readFile("/proc/uptime") ?? "").split(" ")[0]);
  return Number.isFinite(up) ? up : 0;
}

/** PID 1, once the esp stage knows the booted slot: what this boot is, the record updated. */
export function checkBoot(firmware: FirmwareWithNext, log: Logger, bootedSlot: string | null, version: number): BootVerdict {
  const verdict = onBoot(firmware.loadState(), { bootedSlot, version, bootNext: firmware.bootNext() });
  if (verdict.changed) firmware.saveState(verdict.state);
  if (verdict.kind === "failed") log.err(verdict.note);
  else if (verdict.kind === "normal" && verdict.note) log.warn(verdict.note);
  else if (verdict.kind === "pending") log.info(`update: version ${verdict.trial.version} waits in slot ${verdict.trial.slot} for its trial boot (BootNext)`);
  else if (verdict.kind === "trial") log.info(`update: this boot is the trial of version ${verdict.trial.version} in slot ${verdict.trial.slot}; it commits only after the OS has been up a while`);
  return verdict;
}

/**
 * The running trial: pets the watchdog until the deadline, commits when asked to and allowed.
 * One per process (PID 1 in the initrd; the agent beside the OS after the switch).
 */
export class TrialRun {
  private stopPetting: (() => void) | null = null;
  private stopDeadline: (() => void) | null = null;
  private commitAsked = false;
  private committed = false;
  private rootAt: number | null = null;

  constructor(
    private readonly sys: Files & Clock,
    private readonly log: Logger,
    readonly trial: Trial,
    private readonly policy: AgentConfig["update"],
    private watchdog: WatchdogHandle | null,
  ) {}

  /** Seconds of the trial left before its deadline (from power-on). */
  left(): number {
    return this.policy.trialSeconds - uptimeSeconds(this.sys);
  }

  /** Pets the watchdog (every third of its timeout) until the deadline; then lets it fire. */
  startPetting(): void {
    const wd = this.watchdog;
    if (!wd || this.stopPetting) return;
    const left = this.left();
    if (left <= 0) return this.abandon(wd);
    this.stopPetting = keepPetting(this.sys, this.log, wd);
    this.stopDeadline = this.sys.after(left * 1000, () => this.abandon(wd));
  }

  private abandon(wd: WatchdogHandle): void {
    this.halt();
    this.log.err(`update: the trial of version ${this.trial.version} did not commit within ${this.policy.trialSeconds} s of power-on; no longer petting the watchdog (${wd.identity}): the machine resets into slot ${this.trial.from.slot} within ${wd.timeout} s`);
  }

  private halt(): void {
    this.stopPetting?.();
    this.stopDeadline?.();
    this.stopPetting = this.stopDeadline = null;
  }

  /** At the switch: PID 1 closes the watchdog still armed, for the agent beside the OS. */
  release(): void {
    this.halt();
    if (!this.watchdog) return;
    this.watchdog.release();
    this.watchdog = null;
    this.log.info(`update: trial: the watchdog stays armed across the switch; the sidecar beside the OS pets it until the commit`);
  }

  /** Beside the OS: the OS runs from now on (the root was reached). */
  rootReached(): void {
    this.rootAt ??= this.sys.now();
  }

  upSeconds(): number | null {
    return this.rootAt === null ? null : (this.sys.now() - this.rootAt) / 1000;
  }

  /** What the commit still waits for; null when it may happen. */
  waitsFor(): string | null {
    if (this.committed) return null;
    return commitWaitsFor({ upSeconds: this.upSeconds(), healthSeconds: this.policy.healthSeconds, policy: this.policy.commit, commitAsked: this.commitAsked });
  }

  /** `commit` from the control plane: commits now if allowed, else when it is. */
  ask(firmware: UpdateFirmware): { ok: boolean; text: string } {
    if (this.committed) return { ok: true, text: `commit: version ${this.trial.version} is already committed` };
    if (this.left() <= 0) return { ok: false, text: `commit: the trial's deadline (${this.policy.trialSeconds} s after power-on) has passed; the machine goes back to slot ${this.trial.from.slot}` };
    this.commitAsked = true;
    const waits = this.waitsFor();
    if (waits) return { ok: true, text: `commit: noted; version ${this.trial.version} still waits for ${waits}, then commits` };
    return this.commit(firmware);
  }

  /** Commits if every condition holds now (the beside agent calls this on a timer). */
  tryCommit(firmware: UpdateFirmware): boolean {
    if (this.committed || this.waitsFor() !== null || this.left() <= 0) return false;
    return this.commit(firmware).ok;
  }

  isCommitted(): boolean {
    return this.committed;
  }

  private commit(firmware: UpdateFirmware): { ok: boolean; text: string } {
    const t = this.trial;
    try {
      const state = firmware.loadState();
      const order = firmware.bootOrder();
      const fromEntry = order.find((n) => n !== t.entry);
      firmware.setBootOrder(orderWith(order, t.entry, fromEntry));
      firmware.saveState(recordCommitted(state, t));
    } catch (e) {
      const text = `commit: writing BootOrder: ${describe(e)}`;
      this.log.err(`update: ${text}`);
      return { ok: false, text };
    }
    this.committed = true;
    this.halt();
    if (this.watchdog) {
      this.watchdog.disarm();
      this.log.info(`update: the ${this.watchdog.identity} watchdog is disarmed; an OS that wants one (systemd's RuntimeWatchdogSec=) opens it itself`);
      this.watchdog = null;
    }
    const text = `update: version ${t.version} committed: slot ${t.slot} is the default boot from now on`;
    this.log.info(text);
    return { ok: true, text };
  }
}
