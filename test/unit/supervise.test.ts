import { describe, expect, it } from "vitest";
import { endProcesses, everythingBut, nextBackoff, parseStat, sessionAndDescendants, type StopBounds, stopServices, type Supervised } from "../../agent/supervise.ts";
import type { Sys } from "../../agent/sys/index.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const TERM = 15;
const KILL = 9;
const bounds: StopBounds = { termMs: 5000, killMs: 3000, pollMs: 50 };
/** signal calls as [pid, sig, when on the fake clock]. */
function recordSignals(s: FakeSys): [number, number, number][] {
  const out: [number, number, number][] = [];
  const signal = s.signal.bind(s);
  s.signal = (pid, sig) => (out.push([pid, sig, s.clock]), signal(pid, sig));
  return out;
}

/** sshd as dropbear runs it: the listener (session 10), a connection in a session of its own, its shell and that shell's command. */
function sshdTree(s: FakeSys): FakeSys {
  return s
    .addProcess({ pid: 1, ppid: 0, sid: 0, comm: "initos-agent" })
    .addProcess({ pid: 2, ppid: 0, sid: 0, comm: "kthreadd", kthread: true })
    .addProcess({ pid: 3, ppid: 2, sid: 0, comm: "kworker/0:0", kthread: true })
    .addProcess({ pid: 10, ppid: 1, comm: "dropbear" })
    .addProcess({ pid: 20, ppid: 10, sid: 20, comm: "dropbear" }) // a connection: setsid()
    .addProcess({ pid: 21, ppid: 20, sid: 20, comm: "initos-agent" }) // the session's shell
    .addProcess({ pid: 22, ppid: 21, sid: 20, comm: "sleep" })
    .addProcess({ pid: 30, ppid: 1, sid: 30, comm: "unrelated" });
}

describe("stopping processes (bounded, awaited)", () => {
  it("reads /proc/<pid>/stat with spaces and parens in the command name", () => {
    expect(parseStat("42 (a b) c) S 7 42 40 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 1234 0 0")).toEqual({ pid: 42, comm: "a b) c", state: "S", ppid: 7, sid: 40, kthread: false, start: 1234 });
    expect(parseStat("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 1 0 0")?.kthread).toBe(true);
    expect(parseStat("")).toBeNull();
  });

  it("a service's session and every descendant, even in a session of its own, get SIGTERM; done once all are gone", async () => {
    const s = sshdTree(new FakeSys());
    const sent = recordSignals(s);
    const log = silentLog();
    const left = await endProcesses(s, log, "sshd", sessionAndDescendants(10), bounds);
    expect(left).toEqual([]);
    expect(sent.map(([p, sig]) => [p, sig]).sort()).toEqual([[10, TERM], [20, TERM], [21, TERM], [22, TERM]]);
    expect([...s.procs.keys()]).toEqual([1, 2, 3, 30]); // PID 1, the kernel's and the unrelated one stay
    expect(s.clock).toBeLessThan(bounds.termMs); // no SIGKILL was waited for
    expect(log.lines).toContain("info: stop sshd: SIGTERM to 10 (dropbear), 20 (dropbear), 21 (initos-agent), 22 (sleep)");
  });

  it("what ignores SIGTERM gets SIGKILL when the bound has passed, not before", async () => {
    const s = sshdTree(new FakeSys());
    s.addProcess({ pid: 22, ppid: 21, sid: 20, comm: "sleep", ignore: [TERM] });
    const sent = recordSignals(s);
    const log = silentLog();
    expect(await endProcesses(s, log, "sshd", sessionAndDescendants(10), bounds)).toEqual([]);
    const kills = sent.filter(([, sig]) => sig === KILL);
    expect(kills.map(([p]) => p)).toEqual([22]);
    expect(kills[0]![2]).toBeGreaterThanOrEqual(bounds.termMs);
    expect(kills[0]![2]).toBeLessThan(bounds.termMs + 2 * bounds.pollMs);
    expect(log.lines).toContain("warn: stop sshd: SIGKILL to 1 left after 5s: 22 (sleep)");
    expect(s.procs.has(22)).toBe(false);
  });

  it("a process slow to exit is waited for; one that survives SIGKILL (state D) is reported after the bound and the stop goes on", async () => {
    const s = sshdTree(new FakeSys());
    s.addProcess({ pid: 21, ppid: 20, sid: 20, comm: "initos-agent", exitAfterMs: 1200 });
    s.addProcess({ pid: 22, ppid: 21, sid: 20, comm: "stuck", state: "D", exitAfterMs: 1e9 });
    const log = silentLog();
    const left = await endProcesses(s, log, "sshd", sessionAndDescendants(10), bounds);
    expect(left.map((p) => p.pid)).toEqual([22]);
    expect(s.clock).toBeGreaterThanOrEqual(bounds.termMs + bounds.killMs);
    expect(s.clock).toBeLessThan(bounds.termMs + bounds.killMs + 2 * bounds.pollMs);
    expect(s.procs.has(21)).toBe(false); // waited for, gone well before the bound
    expect(log.lines).toContain("err: stop sshd: 1 still there after SIGKILL: 22 (stuck, state D); going on");
  });

  it("an orphan stays a member after its parent is gone; a child forked meanwhile is caught too", async () => {
    const s = sshdTree(new FakeSys());
    // The connection forks a child as it handles SIGTERM, in yet another session.
    s.addProcess({ pid: 20, ppid: 10, sid: 20, comm: "dropbear", ignore: [TERM], onSignal: (sig, f) => sig === TERM && f.addProcess({ pid: 40, ppid: 20, sid: 40, comm: "late" }) });
    const sent = recordSignals(s);
    expect(await endProcesses(s, silentLog(), "sshd", sessionAndDescendants(10), bounds)).toEqual([]);
    expect(sent.filter(([p]) => p === 40).map(([, sig]) => sig)).toEqual([TERM]);
    expect(s.procs.has(40)).toBe(false);
  });

  it("never signals a pid reused by another process, nor a zombie (it is waited for until reaped)", async () => {
    const s = new FakeSys()
      .addProcess({ pid: 1, ppid: 0, sid: 0 })
      .addProcess({ pid: 10, ppid: 1, comm: "svc", start: 500 })
      .addProcess({ pid: 11, ppid: 10, sid: 10, comm: "zombie", state: "Z" });
    const sent = recordSignals(s);
    const sleep = s.sleep.bind(s);
    s.sleep = async (ms) => {
      await sleep(ms);
      // 10 is gone; its pid comes back as someone else's process, in another session
      if (s.clock === 100) s.addProcess({ pid: 10, ppid: 1, sid: 10_000, comm: "newcomer", start: 900 });
      if (s.clock === 300) s.endProcess(11); // PID 1's reaper got to the zombie
    };
    expect(await endProcesses(s, silentLog(), "svc", sessionAndDescendants(10), bounds)).toEqual([]);
    expect(sent).toEqual([[10, TERM, 0]]);
    expect(s.procs.get(10)?.comm).toBe("newcomer");
    expect(s.clock).toBeGreaterThanOrEqual(300);
  });

  it("before switch_root: the services, then everything left but PID 1 and the kernel's threads", async () => {
    const s = sshdTree(new FakeSys());
    s.addProcess({ pid: 50, ppid: 1, sid: 50, comm: "escaped", ignore: [TERM] }); // left its session, orphaned
    s.addProcess({ pid: 51, ppid: 2, sid: 0, comm: "modprobe" }); // the kernel's usermode helper
    const order: string[] = [];
    const svc = (name: string): Supervised => ({ name, state: () => ({ running: false, since: 0, restarts: 0 }), stop: async (sys: Sys) => void order.push(`${name} ${sys.pid()}`) });
    const sent = recordSignals(s);
    const log = silentLog();
    await stopServices(s, log, [svc("sshd"), svc("other")], bounds);
    expect(order).toEqual(["sshd 1", "other 1"]);
    expect([...s.procs.keys()].sort((a, b) => a - b)).toEqual([1, 2, 3, 51]);
    expect(sent.filter(([p]) => [1, 2, 3, 51].includes(p))).toEqual([]);
    expect(sent.filter(([p, sig]) => p === 50 && sig === KILL)).toHaveLength(1);
    expect(log.lines).toContain("warn: stop leftovers: SIGKILL to 1 left after 5s: 50 (escaped)");
  });

  it("everythingBut spares the caller too (the sidecar's own process when it is not PID 1)", () => {
    const s = sshdTree(new FakeSys());
    const all = [...s.procs.keys()].map((pid) => parseStat(s.readFile(`/proc/${pid}/stat`)!)!);
    expect(everythingBut(21)(all, new Map()).map((p) => p.pid)).toEqual([10, 20, 22, 30]);
  });
});

describe("restart backoff", () => {
  it("doubles from 1s to 30s, and starts afresh after a healthy run", () => {
    expect(nextBackoff(500, 10)).toBe(1000);
    expect(nextBackoff(16_000, 10)).toBe(30_000);
    expect(nextBackoff(30_000, 60_000)).toBe(1000);
  });
});
