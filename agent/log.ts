// Logging for PID 1: short plain lines to /dev/kmsg (so they land in the kernel log with a
// timestamp and survive into the real OS's journal) and to the console; plus the boot timeline.
import { closeSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from "node:fs";

export type Level = "err" | "warn" | "info" | "debug";
const KMSG_LEVEL: Record<Level, number> = { err: 3, warn: 4, info: 6, debug: 7 };

export interface Logger {
  err(msg: string): void;
  warn(msg: string): void;
  info(msg: string): void;
  debug(msg: string): void;
}

export interface StageRecord {
  name: string;
  /** Seconds since kernel start (CLOCK_MONOTONIC), like kmsg timestamps. */
  start: number;
  durationMs: number;
  ok: boolean;
  error?: string;
}

/**
 * Writes to /dev/kmsg and the console. The kernel already echoes kmsg records below its
 * console loglevel to the console, so those are not written twice; the rest (info under
 * `quiet`, or everything when kmsg is unavailable) is written to the console directly.
 */
export class KmsgLogger implements Logger {
  private kmsg = -1;
  private console = true;
  private consoleLoglevel: number | undefined;
  verbose = false;
  /** `quiet` on the cmdline keeps info lines off the console (they still go to kmsg). */
  quiet = false;

  constructor(
    private readonly kmsgPath = "/dev/kmsg",
    private readonly printkPath = "/proc/sys/kernel/printk",
  ) {}

  private kernelEchoes(level: number): boolean {
    if (this.consoleLoglevel === undefined) {
      try {
        this.consoleLoglevel = Number(readFileSync(this.printkPath, "utf8").trim().split(/\s+/)[0]) || 0;
      } catch {
        this.consoleLoglevel = 0; // unknown: assume the kernel echoes nothing
      }
    }
    return level < this.consoleLoglevel;
  }

  /** The last lines logged, for `ctl log`. */
  private ring: string[] = [];
  recent(): string[] {
    return [...this.ring];
  }

  private line(level: Level, msg: string): void {
    // One line per record: a stray newline would split it into an unprefixed kmsg record.
    const text = msg.replace(/[\r\n]+/g, " ");
    this.ring.push(`${uptime().toFixed(3)} ${level} ${text}`);
    if (this.ring.length > 500) this.ring.shift();
    if (this.kmsg === -1) {
      try {
        this.kmsg = openSync(this.kmsgPath, "w");
      } catch {
        this.kmsg = -2; // no kmsg (tests, or /dev not mounted): console only
      }
    }
    let echoed = false;
    if (this.kmsg >= 0) {
      try {
        writeSync(this.kmsg, `<${KMSG_LEVEL[level]}>initos: ${text}\n`);
        echoed = this.kernelEchoes(KMSG_LEVEL[level]);
      } catch {
        // a full ring buffer must never take PID 1 down; the console still gets the line
      }
    }
    const wanted = level === "err" || level === "warn" || (level === "info" && !this.quiet) || (level === "debug" && this.verbose);
    if (this.console && wanted && !echoed) {
      try {
        writeSync(1, `initos: ${text}\n`);
      } catch {
        this.console = false;
      }
    }
  }

  err(msg: string): void {
    this.line("err", msg);
  }
  warn(msg: string): void {
    this.line("warn", msg);
  }
  info(msg: string): void {
    this.line("info", msg);
  }
  debug(msg: string): void {
    if (this.verbose) this.line("debug", msg);
  }

  close(): void {
    if (this.kmsg >= 0) closeSync(this.kmsg);
    this.kmsg = -1;
  }
}

/**
 * Seconds since boot, comparable with kmsg timestamps. Anchored once on /proc/uptime (Bun's
 * hrtime counts from process start, not from boot) and advanced with performance.now().
 */
let anchor: { uptime: number; perf: number } | undefined;
export function uptime(): number {
  if (!anchor) {
    let up = 0;
    try {
      up = Number(readFileSync("/proc/uptime", "utf8").split(" ")[0]);
    } catch {
      // no /proc (unit tests): time since process start still orders the stages
    }
    anchor = { uptime: up, perf: performance.now() };
  }
  return anchor.uptime + (performance.now() - anchor.perf) / 1000;
}

/** Where the boot's timeline is kept: in /run, which moves into the OS. */
export const TIMELINE_PATH = "/run/initos/boot.json";

/** `early 12ms, modules 340ms, ...`: the stages in one line (a failed one says so). */
export function summarizeStages(stages: readonly Pick<StageRecord, "name" | "durationMs" | "ok">[]): string {
  return stages.map((s) => `${s.name} ${s.durationMs.toFixed(0)}ms${s.ok === false ? " FAILED" : ""}`).join(", ");
}

/** The stages of a saved timeline (boot.json), or null when it cannot be read. */
export function savedStages(text: string | null): StageRecord[] | null {
  try {
    const t = JSON.parse(text ?? "") as { stages?: unknown };
    return Array.isArray(t.stages) ? (t.stages as StageRecord[]) : null;
  } catch {
    return null;
  }
}

export class Timeline {
  readonly stages: StageRecord[] = [];
  constructor(private readonly path = TIMELINE_PATH) {}

  record(r: StageRecord): void {
    this.stages.push(r);
  }

  toJSON(): object {
    return { agentStart: this.stages[0]?.start ?? null, stages: this.stages };
  }

  /** Persisted in /run, which moves into the new root, so the OS can read it after handoff. */
  save(): void {
    try {
      mkdirSync(this.path.replace(/\/[^/]+$/, ""), { recursive: true });
      writeFileSync(this.path, JSON.stringify(this.toJSON(), null, 1) + "\n");
    } catch {
      // /run may not be mounted yet when the first stage fails; the log lines still exist
    }
  }

  /** One line per stage, for the console: `timeline: early 12ms, modules 340ms, ...`. */
  summary(): string {
    return summarizeStages(this.stages);
  }
}
