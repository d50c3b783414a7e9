// Duties of PID 1 that run beside the boot: reaping orphans, turning signals into power
// actions, and routing any uncaught error into the failure policy instead of an exit (an
// exiting PID 1 is a kernel panic).
import { describe } from "./errors.ts";
import { read } from "node:fs";
import type { Logger } from "./log.ts";
import { RB } from "./sys/consts.ts";
import type { Files, Processes } from "./sys/index.ts";
import { ownChildren } from "./sys/spawn.ts";

/** PIDs of zombies whose parent is `parent`, from /proc/<pid>/stat. */
export function findZombies(sys: Pick<Files, "readFile">, pids: readonly string[], parent: number): number[] {
  const out: number[] = [];
  for (const p of pids) {
    if (!/^\d+$/.test(p)) continue;
    const stat = sys.readFile(`/proc/${p}/stat`);
    if (!stat) continue;
    // "pid (comm) S ppid ...": comm may contain spaces and parens, so split after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    if (rest[0] === "Z" && Number(rest[1]) === parent) out.push(Number(p));
  }
  return out;
}

/** Zombies anywhere on the machine (state Z in /proc/<pid>/stat): should stay 0 under PID 1's care. */
export function countZombies(sys: Pick<Files, "readFile" | "readdir">): number {
  return sys
    .readdir("/proc")
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      const stat = sys.readFile(`/proc/${p}/stat`);
      return stat !== null && stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
    }).length;
}

export interface Pid1Hooks {
  /** Waits for one exited child without blocking; true if it was reaped. */
  reap(pid: number): boolean;
  listPids(): string[];
  onFatal(error: unknown): void;
  /**
   * SIGTERM, SIGINT, SIGPWR: the power action, by default at once; jail mode stops its jails
   * first (boot.ts shutdown).
   */
  power?: (action: "poweroff" | "reboot", why: string) => void;
}

/** The installed reaper (installPid1Handlers), for reapNow. */
let reaper: (() => number) | undefined;

/**
 * One pass of the orphan reaper now, as if SIGCHLD had come: for code that waits for processes
 * to be gone from /proc (stopping services). The same rules: the runtime's own children are
 * left to it. Nothing happens until PID 1's handlers are installed (tests, other roles).
 */
export function reapNow(): number {
  return reaper?.() ?? 0;
}

export function reapOrphans(sys: Files & Processes, hooks: Pid1Hooks): number {
  let n = 0;
  for (const pid of findZombies(sys, hooks.listPids(), sys.pid())) {
    if (ownChildren.has(pid)) continue;
    if (hooks.reap(pid)) n++;
  }
  return n;
}

export function powerAction(sys: Processes, log: Logger, action: "poweroff" | "reboot", why: string): void {
  log.info(`${why}: ${action}`);
  sys.sync();
  sys.reboot(action === "poweroff" ? RB.POWER_OFF : RB.AUTOBOOT);
}

export const SIGPWR = 30;

/**
 * Calls `onSignal` for each byte (a signal number) read from `fd`, for as long as the process
 * lives. Each read waits on a worker thread, so the event loop is never blocked.
 */
export function watchSignalPipe(fd: number, onSignal: (signo: number) => void): void {
  const buf = Buffer.alloc(16);
  const next = () =>
    read(fd, buf, 0, buf.length, null, (err, n) => {
      if (err || n === 0) return; // closed: nothing more to watch
      for (let i = 0; i < n; i++) onSignal(buf[i]!);
      next();
    });
  next();
}

export function installPid1Handlers(sys: Files & Processes, log: Logger, hooks: Pid1Hooks & { relaySignal?: (sig: number) => number }): void {
  reaper = () => reapOrphans(sys, hooks);
  process.on("SIGCHLD", reaper);
  const power = hooks.power ?? ((action, why) => powerAction(sys, log, action, why));
  process.on("SIGTERM", () => power("poweroff", "SIGTERM"));
  process.on("SIGINT", () => power("reboot", "SIGINT (ctrl-alt-del)"));
  // The runtime owns SIGPWR (JavaScriptCore's thread suspension); sigrelay hands us the ones
  // other processes send.
  if (hooks.relaySignal) {
    try {
      watchSignalPipe(hooks.relaySignal(SIGPWR), () => power("poweroff", "SIGPWR"));
    } catch (e) {
      log.warn(`SIGPWR will be ignored: ${describe(e)}`);
    }
  }
  process.on("uncaughtException", (e) => hooks.onFatal(e));
  process.on("unhandledRejection", (e) => hooks.onFatal(e));
}

/** A "Name:  1234 kB" field of /proc/self/status, in KiB. */
export function procStatusKiB(sys: Files, field: string): number | null {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(sys.readFile("/proc/self/status") ?? "");
  return m ? Number(m[1]) : null;
}

export function memAvailableKiB(sys: Files): number | null {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(sys.readFile("/proc/meminfo") ?? "");
  return m ? Number(m[1]) : null;
}
