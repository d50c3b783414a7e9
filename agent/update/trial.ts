// The A/B trial, as a state machine over one record the firmware keeps for us (an EFI variable:
// it survives power cuts and every slot and mode can read it, and no disk is written).
//
//   update     writes the inactive slot, then records a trial {slot, version, entry} and sets
//              BootNext to that slot's boot entry; BootOrder still starts with the running slot
//   trial boot the firmware consumed BootNext and booted the new slot: the agent marks the
//              trial started, arms the watchdog, and commits only late (committable below)
//   commit     BootOrder now starts with the new slot; the record is cleared, the outcome kept
//   fallback   any reset before the commit (crash, panic, failure policy, watchdog, power, an
//              admin's reboot) boots BootOrder's first entry: the old slot. Its agent finds the
//              trial record with BootNext gone and marks that version failed: not applied again
//              unless an admin forces it (anti-loop: what rolled back is not re-applied).
//
// Everything here is pure: the caller reads the record and the firmware's variables, and does
// what the returned decision says. The record is data (anyone with the machine can write EFI
// variables from the OS or the firmware's shell): it decides nothing about trust, only which
// boot is a trial; a forged record can at worst make a boot a trial (watchdog, late commit) or
// forget a failure.
import { z } from "zod";

export const TrialSchema = z
  .object({
    /** The slot being tried, its boot entry (Boot####) and the version written to it. */
    slot: z.string().regex(/^[a-z0-9]+$/),
    entry: z.number().int().min(0).max(0xffff),
    version: z.number().int().min(0),
    /** The slot and version it came from (where a failure falls back to). */
    from: z.object({ slot: z.string().regex(/^[a-z0-9]+$/), version: z.number().int().min(0) }).strict(),
    /** Set by the trial boot's agent as soon as it sees it is the trial. */
    started: z.boolean().default(false),
  })
  .strict();

const OutcomeSchema = z
  .object({
    version: z.number().int().min(0),
    slot: z.string().regex(/^[a-z0-9]+$/),
    outcome: z.enum(["written", "committed", "failed", "abandoned"]),
    detail: z.string().max(200).default(""),
  })
  .strict();

export const UpdateStateSchema = z
  .object({
    trial: TrialSchema.optional(),
    /** Versions whose trial failed (most recent last, bounded). */
    failed: z.array(z.number().int().min(0)).max(16).default([]),
    /** The last update's outcome, for `status`. */
    last: OutcomeSchema.optional(),
  })
  .strict();

export type Trial = z.output<typeof TrialSchema>;
export type UpdateState = z.output<typeof UpdateStateSchema>;
export type Outcome = z.output<typeof OutcomeSchema>;

export const EMPTY_STATE: UpdateState = { failed: [] };

/** Parses the stored record; a record that is not ours (garbage, an older format) counts as none. */
export function parseUpdateState(bytes: Uint8Array | null): { state: UpdateState; error?: string } {
  if (!bytes || bytes.length === 0) return { state: EMPTY_STATE };
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch {
    return { state: EMPTY_STATE, error: "update: the stored update record is not JSON; ignored" };
  }
  const r = UpdateStateSchema.safeParse(json);
  return r.success ? { state: r.data } : { state: EMPTY_STATE, error: "update: the stored update record is malformed; ignored" };
}

export function serializeUpdateState(s: UpdateState): Buffer {
  return Buffer.from(JSON.stringify(s));
}

const MAX_FAILED = 16;
const withFailed = (failed: readonly number[], v: number) => [...failed.filter((f) => f !== v), v].slice(-MAX_FAILED);

/** What this boot is, from the update's point of view. */
export type BootVerdict =
  /** No trial pending. */
  | { kind: "normal"; state: UpdateState; changed: boolean; note?: string }
  /** This boot is the trial: watchdog, late commit. */
  | { kind: "trial"; state: UpdateState; changed: boolean; trial: Trial }
  /** A trial is recorded but its BootNext was not used yet (this boot was chosen otherwise). */
  | { kind: "pending"; state: UpdateState; changed: false; trial: Trial }
  /** The trial ran and did not commit: this is the fallback into the old slot. */
  | { kind: "failed"; state: UpdateState; changed: true; trial: Trial; note: string };

export interface BootFacts {
  /** The slot this boot came from (LoaderDevicePartUUID), if known. */
  bootedSlot: string | null;
  /** This boot's version (the signed config's). */
  version: number;
  /** BootNext as the firmware has it now (it deletes it before booting it). */
  bootNext: number | null;
}

/** Decides, at boot, whether this is a trial, a fallback from one, or neither. */
export function onBoot(state: UpdateState, f: BootFacts): BootVerdict {
  const t = state.trial;
  if (!t) return { kind: "normal", state, changed: false };
  if (f.bootedSlot === t.slot) {
    if (f.version !== t.version) {
      // The slot holds something else than what was written (rewritten by hand?): no trial.
      const note = `update: slot ${t.slot} runs version ${f.version}, not the version ${t.version} its trial was for; trial dropped`;
      return { kind: "normal", state: { ...state, trial: undefined }, changed: true, note };
    }
    return t.started ? { kind: "trial", state, changed: false, trial: t } : { kind: "trial", state: { ...state, trial: { ...t, started: true } }, changed: true, trial: t };
  }
  if (f.bootNext === t.entry && !t.started) return { kind: "pending", state, changed: false, trial: t };
  // BootNext was consumed (or the trial had started) and we are not in the trial's slot: it
  // crashed, panicked, failed, hung into the watchdog, or was rebooted before its commit.
  const note = `update: the trial of version ${t.version} in slot ${t.slot} did not commit${t.started ? "" : " (its agent never ran: the kernel or the firmware failed it)"}; back on slot ${f.bootedSlot ?? "?"} (version ${f.version})`;
  return {
    kind: "failed",
    trial: t,
    note,
    changed: true,
    state: { trial: undefined, failed: withFailed(state.failed, t.version), last: { version: t.version, slot: t.slot, outcome: "failed", detail: "its trial boot did not commit" } },
  };
}

/** Whether an update to `version` may start; the refusal's line otherwise. */
export function mayApply(state: UpdateState, running: number, version: number, force: boolean): { ok: true; warning?: string } | { ok: false; refused: string } {
  if (version <= running) {
    if (!force) return { ok: false, refused: `update: version ${version} is not newer than the running version ${running} (--force to install it anyway)` };
    return { ok: true, warning: `update: --force: installing version ${version} over ${running}` };
  }
  if (state.failed.includes(version)) {
    if (!force) return { ok: false, refused: `update: version ${version} failed its trial before; not applied again (--force to try it again)` };
    return { ok: true, warning: `update: --force: trying version ${version} again after its failed trial` };
  }
  return { ok: true };
}

/** The record once an update wrote `slot`: its trial is next. */
export function recordWritten(state: UpdateState, trial: Omit<Trial, "started">): UpdateState {
  return { ...state, trial: { ...trial, started: false }, last: { version: trial.version, slot: trial.slot, outcome: "written", detail: "" } };
}

/** The record once the trial committed. */
export function recordCommitted(state: UpdateState, t: Trial): UpdateState {
  return { trial: undefined, failed: state.failed.filter((v) => v !== t.version), last: { version: t.version, slot: t.slot, outcome: "committed", detail: "" } };
}

/** BootOrder with `first` first and `second` next, the firmware's other entries after them. */
export function orderWith(order: readonly number[], first: number, second?: number): number[] {
  const head = second === undefined || second === first ? [first] : [first, second];
  return [...head, ...order.filter((n) => !head.includes(n))];
}

/** When the trial may commit: each condition, and whether it holds. */
export interface CommitInputs {
  /** Seconds since the switch into the OS; null while still in the initrd. */
  upSeconds: number | null;
  healthSeconds: number;
  policy: "auto" | "manual";
  /** The control plane said `commit`. */
  commitAsked: boolean;
}

/** null when the trial may commit now; else what it still waits for. */
export function commitWaitsFor(c: CommitInputs): string | null {
  if (c.upSeconds === null) return "the root";
  if (c.upSeconds < c.healthSeconds) return `the OS to stay up ${c.healthSeconds} s (up ${Math.floor(c.upSeconds)} s)`;
  if (c.policy === "manual" && !c.commitAsked) return "`commit` from the control plane";
  return null;
}

/** One line for `status`: the trial, or the last outcome. */
export function describeUpdate(state: UpdateState): string {
  const parts: string[] = [];
  if (state.trial) parts.push(`trial of version ${state.trial.version} in slot ${state.trial.slot} (${state.trial.started ? "running" : "next boot"})`);
  if (state.last) parts.push(`last: version ${state.last.version} ${state.last.outcome}${state.last.detail ? ` (${state.last.detail})` : ""}`);
  if (state.failed.length) parts.push(`failed versions: ${state.failed.join(", ")}`);
  return parts.join("; ") || "none";
}
