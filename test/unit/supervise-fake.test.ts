// supervise() (agent/supervise.ts) on the fake machine: a service's output in the log under its
// name, restarts after the backoff on the fake clock (never before), retries of a service that
// cannot start, and stop(): the service with everything in its session, and no restart after.
import { describe, expect, it } from "vitest";
import { type StopBounds, supervise } from "../../agent/supervise.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const ARGV = ["/run/initos/images/tools/usr/bin/svcd", "-f"];
const bounds: StopBounds = { termMs: 5000, killMs: 3000, pollMs: 50 };
const flush = () => new Promise((r) => setTimeout(r, 0));

function machine() {
  const s = new FakeSys().addProcess({ pid: 1, ppid: 0, sid: 0, comm: "initos-agent" });
  const log = silentLog();
  return { s, log };
}
const spawns = (s: FakeSys) => s.calls.filter((c) => c.startsWith("spawnService"));
/** The one running incarnation's pid. */
const running = (s: FakeSys) => {
  const pids = [...s.services.keys()];
  expect(pids).toHaveLength(1);
  return pids[0]!;
};
/** The running incarnation exits; the supervisor hears of it (a promise callback). */
async function exits(s: FakeSys, why = "exited with 1") {
  s.endProcess(running(s), why);
  await flush();
}
/** Moves the clock to just before `ms` from now and checks nothing started, then to `ms`: one start. */
function restartsAfter(s: FakeSys, ms: number) {
  const before = spawns(s).length;
  s.advance(ms - 1);
  expect(spawns(s).length, `restarted before ${ms}ms`).toBe(before);
  s.advance(1);
  expect(spawns(s).length, `not restarted at ${ms}ms`).toBe(before + 1);
}

describe("supervise: running a service", () => {
  it("starts it at once with its argv and only its environment", () => {
    const { s, log } = machine();
    supervise(s, log, { name: "svcd", argv: ARGV, env: { LD_LIBRARY_PATH: "/x" } });
    expect(spawns(s)).toEqual([`spawnService ${ARGV.join(" ")}`]);
    const pid = running(s);
    expect(s.services.get(pid)!.env).toEqual({ LD_LIBRARY_PATH: "/x" });
    expect(log.lines).toContain(`info: supervise: svcd started (pid ${pid})`);
  });

  it("puts each output line in the log, prefixed with the service's name", () => {
    const { s, log } = machine();
    supervise(s, log, { name: "svcd", argv: ARGV });
    const svc = s.services.get(running(s))!;
    svc.say("listening on 15022");
    svc.say("connection from 10.0.0.1");
    expect(log.lines.slice(-2)).toEqual(["info: svcd: listening on 15022", "info: svcd: connection from 10.0.0.1"]);
  });
});

describe("supervise: restarts with backoff (fake clock)", () => {
  it("restarts a service that exits after 1 s, 2 s, 4 s ... capped at 30 s, never before", async () => {
    const { s, log } = machine();
    supervise(s, log, { name: "svcd", argv: ARGV });
    for (const ms of [1000, 2000, 4000, 8000, 16_000, 30_000, 30_000]) {
      await exits(s);
      expect(log.lines.at(-1)).toBe(`warn: supervise: svcd exited with 1; restarting in ${ms / 1000}s`);
      restartsAfter(s, ms);
    }
    expect(spawns(s)).toHaveLength(8);
  });

  it("starts the backoff afresh after a healthy run of 60 s", async () => {
    const { s, log } = machine();
    supervise(s, log, { name: "svcd", argv: ARGV });
    for (const ms of [1000, 2000, 4000]) {
      await exits(s);
      restartsAfter(s, ms);
    }
    s.advance(59_999);
    await exits(s, "killed by signal 11");
    expect(log.lines.at(-1)).toBe("warn: supervise: svcd killed by signal 11; restarting in 8s"); // 1 ms short of healthy
    restartsAfter(s, 8000);
    s.advance(60_000);
    await exits(s);
    expect(log.lines.at(-1)).toBe("warn: supervise: svcd exited with 1; restarting in 1s");
    restartsAfter(s, 1000);
  });

  it("retries a service that fails to start the same way, and runs it once it can start", async () => {
    const { s, log } = machine();
    s.failToStart.set(ARGV[0]!, "ENOENT");
    supervise(s, log, { name: "svcd", argv: ARGV });
    expect(s.services.size).toBe(0);
    await flush();
    expect(log.lines).toContain("info: supervise: svcd started (pid ?)");
    expect(log.lines.at(-1)).toBe("warn: supervise: svcd failed to start: ENOENT; restarting in 1s");
    for (const ms of [1000, 2000, 4000]) {
      restartsAfter(s, ms);
      await flush();
    }
    expect(log.lines.at(-1)).toBe("warn: supervise: svcd failed to start: ENOENT; restarting in 8s");
    s.failToStart.delete(ARGV[0]!);
    restartsAfter(s, 8000);
    const pid = running(s);
    expect(log.lines.at(-1)).toBe(`info: supervise: svcd started (pid ${pid})`);
  });
});

describe("supervise: stop()", () => {
  it("ends the service and everything in its session (and what those started), and waits for them", async () => {
    const { s, log } = machine();
    const svc = supervise(s, log, { name: "svcd", argv: ARGV });
    const pid = running(s);
    s.addProcess({ pid: 600, ppid: pid, sid: pid, comm: "worker" })
      .addProcess({ pid: 601, ppid: 600, sid: 601, comm: "own-session" }) // left the session: still a descendant
      .addProcess({ pid: 700, ppid: 1, sid: 700, comm: "unrelated" });
    await svc.stop(s, bounds);
    expect([...s.procs.keys()].sort((a, b) => a - b)).toEqual([1, 700]);
    expect(s.lastSignal.get(pid)).toBe(15);
    expect(s.lastSignal.has(700)).toBe(false);
    expect(log.lines.some((l) => /^info: supervise: svcd stopped in \d+ms$/.test(l))).toBe(true);
    // The service's own exit (by the SIGTERM) restarts nothing.
    await flush();
    s.advance(120_000);
    expect(spawns(s)).toHaveLength(1);
    expect(log.lines.some((l) => l.includes("restarting"))).toBe(false);
  });

  it("no restart happens after stop() even when a restart was already scheduled", async () => {
    const { s, log } = machine();
    const svc = supervise(s, log, { name: "svcd", argv: ARGV });
    await exits(s);
    expect(s.timers).toHaveLength(1); // the restart in 1 s
    await svc.stop(s, bounds);
    s.advance(120_000);
    expect(spawns(s)).toHaveLength(1);
    expect(s.services.size).toBe(0);
  });

  it("a service that never started is stopped at once", async () => {
    const { s, log } = machine();
    s.failToStart.set(ARGV[0]!, "EACCES");
    const svc = supervise(s, log, { name: "svcd", argv: ARGV });
    await flush();
    await svc.stop(s, bounds);
    expect(s.calls.filter((c) => c.startsWith("signal"))).toEqual([]);
    expect(s.clock).toBe(0);
    s.advance(120_000);
    expect(spawns(s)).toHaveLength(1);
  });
});
