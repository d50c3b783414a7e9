// Services PID 1 keeps running (sshd, and what the signed config names): restarted with
// backoff when they exit, their output to kmsg line by line. Their PIDs are registered so the
// orphan reaper leaves them to the runtime, which reports their exit.
//
// Stopping one is bounded and awaited, and takes everything it started with it: each service
// starts in a session of its own, so its processes can be found (the session, and every child of
// one of them, even in a session of its own: dropbear's connections, a pty's shell), sent
// SIGTERM, SIGKILL after a bound, and waited for until /proc no longer shows them. Before
// switch_root a last sweep ends whatever escaped (an orphan that left its session): nothing of
// the initrd may run on in the OS.
import type { Logger } from "./log.ts";
import { reapNow } from "./pid1.ts";
import type { Clock, Files, Processes } from "./sys/index.ts";

/** What supervising touches: processes, the clock, and /proc to find what a service started. */
export type SuperviseSys = Processes & Clock & Pick<Files, "readdir" | "readFile">;

export interface Service {
  name: string;
  argv: string[];
  env?: Record<string, string>;
  /** Runs before each start and restart (a jail: what its last run left behind); a throw is a failed start. */
  beforeStart?: () => void;
  /**
   * Asks it to stop on its own before any signal (a VM: the ACPI power button); it then has the
   * stop's `termMs` to exit before SIGTERM (which a hypervisor takes as pulling the plug).
   */
  askStop?: () => Promise<void>;
}

/** What a supervised service is doing, for status. */
export interface ServiceState {
  running: boolean;
  /** The running incarnation's pid. */
  pid?: number;
  /** sys.now() when it last started. */
  since: number;
  restarts: number;
  /** How the last incarnation ended: "exited with 3", "killed by SIGKILL", ... */
  last?: string;
}

const MIN_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30_000;
/** A run this long counts as healthy: the next failure starts the backoff afresh. */
const HEALTHY_MS = 60_000;

export function nextBackoff(previousMs: number, ranMs: number): number {
  if (ranMs >= HEALTHY_MS) return MIN_BACKOFF_MS;
  return Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, previousMs * 2));
}

/** How long stopping may take: SIGTERM, then SIGKILL after `termMs`, then `killMs` to be gone. */
export interface StopBounds {
  termMs: number;
  killMs: number;
  /** How often /proc is looked at meanwhile. */
  pollMs: number;
}
export const STOP_BOUNDS: StopBounds = { termMs: 5000, killMs: 5000, pollMs: 50 };

export interface Supervised {
  readonly name: string;
  /**
   * Stops the service for good, with every process it started (before switch_root: nothing of
   * the initrd may outlive it). Resolves once they are gone, or the bounds have passed.
   */
  stop(sys: SuperviseSys, bounds?: StopBounds): Promise<void>;
  state(): ServiceState;
}

export function supervise(sys: SuperviseSys, log: Logger, svc: Service): Supervised {
  const handle: Handle = { stopped: false, running: false, since: sys.now(), restarts: -1 };
  start(sys, log, svc, MIN_BACKOFF_MS / 2, handle);
  return {
    name: svc.name,
    state: () => ({ running: handle.running, pid: handle.running ? handle.pid : undefined, since: handle.since, restarts: Math.max(0, handle.restarts), last: handle.last }),
    async stop(sys, bounds = STOP_BOUNDS) {
      handle.stopped = true; // no restart from now on
      const pid = handle.pid;
      const t0 = sys.now();
      if (svc.askStop && handle.running) {
        await svc.askStop().catch((e: unknown) => log.warn(`stop ${svc.name}: could not ask it to stop: ${e instanceof Error ? e.message : String(e)}`));
        while (handle.running && sys.now() - t0 < bounds.termMs) await sys.sleep(bounds.pollMs);
      }
      const left = pid === undefined || !handle.running ? [] : await endProcesses(sys, log, svc.name, sessionAndDescendants(pid), bounds);
      log.info(`supervise: ${svc.name} stopped${left.length ? ` (${left.length} left)` : ""} in ${(sys.now() - t0).toFixed(0)}ms`);
    },
  };
}

interface Handle {
  stopped: boolean;
  /** The last incarnation's pid (its session's id too). */
  pid?: number;
  running: boolean;
  since: number;
  restarts: number;
  last?: string;
}

function start(sys: SuperviseSys, log: Logger, svc: Service, backoffMs: number, handle: Handle): void {
  const started = sys.now();
  handle.since = started;
  handle.restarts++;
  let child: { pid: number | undefined; exited: Promise<string> };
  try {
    svc.beforeStart?.();
    child = sys.spawnService(svc.argv, svc.env ?? {}, (line) => log.info(`${svc.name}: ${line}`));
  } catch (e) {
    child = { pid: undefined, exited: Promise.resolve(`failed to start: ${e instanceof Error ? e.message : String(e)}`) };
  }
  handle.pid = child.pid;
  handle.running = child.pid !== undefined;
  log.info(`supervise: ${svc.name} started (pid ${child.pid ?? "?"})`);
  void child.exited.then((why) => {
    handle.running = false;
    handle.last = why;
    if (handle.stopped) return;
    const delay = nextBackoff(backoffMs, sys.now() - started);
    log.warn(`supervise: ${svc.name} ${why}; restarting in ${(delay / 1000).toFixed(0)}s`);
    sys.after(delay, () => handle.stopped || start(sys, log, svc, delay, handle));
  });
}

/** A process as /proc/<pid>/stat shows it: what stopping needs to know. */
export interface Proc {
  pid: number;
  ppid: number;
  sid: number;
  /** R, S, D, Z (a zombie: dead, waiting to be reaped), ... */
  state: string;
  comm: string;
  /** starttime: with the pid it names one process (a pid is reused once its process is reaped). */
  start: number;
  kthread: boolean;
}

const PF_KTHREAD = 0x00200000;

/** "pid (comm) state ppid pgrp session ..." — comm may hold spaces and parens, so fields count from the last ')'. */
export function parseStat(stat: string): Proc | null {
  const open = stat.indexOf("(");
  const close = stat.lastIndexOf(")");
  if (open < 0 || close < open) return null;
  const f = stat.slice(close + 2).split(" "); // f[n - 3] is field n of proc(5)
  const p = { pid: Number(stat.slice(0, open)), comm: stat.slice(open + 1, close), state: f[0] ?? "?", ppid: Number(f[1]), sid: Number(f[3]), kthread: (Number(f[6]) & PF_KTHREAD) !== 0, start: Number(f[19]) };
  return Number.isInteger(p.pid) && Number.isInteger(p.ppid) ? p : null;
}

export function listProcs(sys: Pick<Files, "readdir" | "readFile">): Proc[] {
  const out: Proc[] = [];
  for (const name of sys.readdir("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const p = parseStat(sys.readFile(`/proc/${name}/stat`) ?? ""); // null: it went meanwhile
    if (p) out.push(p);
  }
  return out;
}

/** Picks a group's members out of the process table; `known` holds every member seen before. */
export type Members = (all: readonly Proc[], known: ReadonlyMap<string, Proc>) => Proc[];

const id = (p: Proc) => `${p.pid}@${p.start}`;

/**
 * A service's processes: its session (`sid`, the service's pid: spawned with setsid) and, again
 * and again, the children of any member, so a process that took a session of its own is still
 * found while its parent lives; once seen it stays a member after its parent is gone.
 */
export function sessionAndDescendants(sid: number): Members {
  return (all, known) => {
    const pids = new Set([...known.values()].map((p) => p.pid));
    const out: Proc[] = [];
    for (let grew = true; grew; ) {
      grew = false;
      for (const p of all) {
        if (pids.has(p.pid) || p.pid === 1) continue;
        if (p.sid === sid || pids.has(p.ppid)) {
          pids.add(p.pid);
          out.push(p);
          grew = true;
        }
      }
    }
    return out;
  };
}

/** Every process but PID 1, the caller and the kernel's threads (and what kthreadd runs). */
export function everythingBut(self: number): Members {
  return (all) => all.filter((p) => p.pid !== 1 && p.pid !== self && !p.kthread && p.ppid !== 2 && p.ppid !== 0);
}

const SIGKILL = 9;
const SIGTERM = 15;

const names = (ps: readonly Proc[]) => {
  const shown = ps.slice(0, 8).map((p) => `${p.pid} (${p.comm})`);
  return ps.length > shown.length ? `${shown.join(", ")} and ${ps.length - shown.length} more` : shown.join(", ");
};

/**
 * Ends a group of processes for good: SIGTERM to each member, SIGKILL to what is left after
 * `termMs`, then up to `killMs` more for them to go. Members are looked for again at every poll,
 * so a child forked meanwhile gets the same treatment; each is known by pid and start time, so a
 * pid reused by someone else is never signalled. Done when /proc shows none of them any more:
 * reaped, not only dead (a zombie would still be listed in the OS). PID 1's reaper runs at each
 * poll for orphans; the runtime reaps its own children. Returns what could not be ended
 * (uninterruptible sleep), which the caller can only log.
 */
export async function endProcesses(sys: SuperviseSys, log: Logger, what: string, members: Members, bounds: StopBounds = STOP_BOUNDS): Promise<Proc[]> {
  const t0 = sys.now();
  const known = new Map<string, Proc>();
  const sent = new Map<string, number>(); // member → the last signal it got
  let sig = SIGTERM;
  for (;;) {
    reapNow();
    const all = listProcs(sys);
    for (const p of members(all, known)) known.set(id(p), p);
    const now = new Map(all.map((p) => [id(p), p]));
    const alive = [...known.keys()].flatMap((k) => now.get(k) ?? []);
    if (!alive.length) return [];
    const elapsed = sys.now() - t0;
    if (sig === SIGTERM && elapsed >= bounds.termMs) {
      sig = SIGKILL;
      log.warn(`stop ${what}: SIGKILL to ${alive.length} left after ${(bounds.termMs / 1000).toFixed(0)}s: ${names(alive)}`);
    } else if (elapsed >= bounds.termMs + bounds.killMs) {
      log.err(`stop ${what}: ${alive.length} still there after SIGKILL: ${alive.map((p) => `${p.pid} (${p.comm}, state ${p.state})`).join(", ")}; going on`);
      return alive;
    }
    // Zombies are dead already: they only wait for their parent (or PID 1) to reap them.
    const due = alive.filter((p) => p.state !== "Z" && sent.get(id(p)) !== sig);
    if (due.length && sig === SIGTERM) log.info(`stop ${what}: SIGTERM to ${names(due)}`);
    for (const p of due) {
      sent.set(id(p), sig);
      try {
        sys.signal(p.pid, sig);
      } catch {
        // ESRCH: it went between the look and the signal
      }
    }
    await sys.sleep(bounds.pollMs);
  }
}

/**
 * Before switch_root: each service with all it started, then whatever of the initrd is still
 * running (an orphan that left its service's session, what an ssh session left behind): only
 * PID 1 goes on into the OS. The sidecar beside the OS is started after this.
 */
export async function stopServices(sys: SuperviseSys, log: Logger, services: readonly Supervised[], bounds: StopBounds = STOP_BOUNDS): Promise<void> {
  await Promise.all(services.map((s) => s.stop(sys, bounds)));
  await endProcesses(sys, log, "leftovers", everythingBut(sys.pid()), bounds);
}
