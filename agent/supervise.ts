// Services PID 1 keeps running (sshd, and later what the signed config names): restarted with
// backoff when they exit, their output to kmsg line by line. Their PIDs are registered so the
// orphan reaper leaves them to the runtime, which reports their exit.
import { spawn } from "node:child_process";
import type { Logger } from "./log.ts";
import { ownChildren } from "./pid1.ts";

export interface Service {
  name: string;
  argv: string[];
  env?: Record<string, string>;
}

const MIN_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30_000;
/** A run this long counts as healthy: the next failure starts the backoff afresh. */
const HEALTHY_MS = 60_000;

export function nextBackoff(previousMs: number, ranMs: number): number {
  if (ranMs >= HEALTHY_MS) return MIN_BACKOFF_MS;
  return Math.min(MAX_BACKOFF_MS, Math.max(MIN_BACKOFF_MS, previousMs * 2));
}

export interface Supervised {
  /** Stops the service for good (before switch_root: nothing of the initrd may outlive it). */
  stop(): void;
}

export function supervise(log: Logger, svc: Service, backoffMs = MIN_BACKOFF_MS / 2, handle = { stopped: false, current: undefined as (() => void) | undefined }): Supervised {
  const started = performance.now();
  const child = spawn(svc.argv[0]!, svc.argv.slice(1), { env: svc.env ?? {}, stdio: ["ignore", "pipe", "pipe"] });
  if (child.pid) ownChildren.add(child.pid);
  log.info(`supervise: ${svc.name} started (pid ${child.pid ?? "?"})`);
  for (const stream of [child.stdout, child.stderr]) {
    let rest = "";
    stream.setEncoding("utf8");
    stream.on("data", (d: string) => {
      const lines = (rest + d).split("\n");
      rest = lines.pop()!;
      for (const l of lines) if (l.trim()) log.info(`${svc.name}: ${l.trim()}`);
    });
  }
  let done = false;
  const restart = (why: string) => {
    if (done) return;
    done = true;
    if (child.pid) ownChildren.delete(child.pid);
    if (handle.stopped) return;
    const delay = nextBackoff(backoffMs, performance.now() - started);
    log.warn(`supervise: ${svc.name} ${why}; restarting in ${(delay / 1000).toFixed(0)}s`);
    setTimeout(() => handle.stopped || supervise(log, svc, delay, handle), delay);
  };
  handle.current = () => child.kill("SIGTERM");
  child.on("exit", (code, signal) => restart(signal ? `killed by ${signal}` : `exited with ${code}`));
  child.on("error", (e) => restart(`failed to start: ${e.message}`));
  return {
    stop() {
      handle.stopped = true;
      handle.current?.();
      log.info(`supervise: ${svc.name} stopped`);
    },
  };
}
