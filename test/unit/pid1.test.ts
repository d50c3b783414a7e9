import { describe, expect, it } from "vitest";
import { findZombies, reapOrphans } from "../../agent/pid1.ts";
import { ownChildren } from "../../agent/sys/spawn.ts";
import { FakeSys } from "./fakesys.ts";

function procs(s: FakeSys, stats: Record<string, string>): string[] {
  for (const [pid, stat] of Object.entries(stats)) s.add(`/proc/${pid}/stat`, { kind: "file", data: stat });
  return [...Object.keys(stats), "self", "cmdline"];
}

describe("orphan reaping", () => {
  it("finds zombies of PID 1 even when the command name has spaces and parens", () => {
    const s = new FakeSys();
    const pids = procs(s, {
      "10": "10 (sshd) S 1 10 10 0",
      "11": "11 (a) b) Z 1 11 11 0",
      "12": "12 (worker) Z 10 12 12 0", // someone else's zombie
      "13": "13 (x y) Z 1 13 13 0",
    });
    expect(findZombies(s, pids, 1)).toEqual([11, 13]);
  });

  it("reaps orphans but leaves the runtime's own children to it", () => {
    const s = new FakeSys();
    const pids = procs(s, { "20": "20 (orphan) Z 1 0", "21": "21 (spawned) Z 1 0" });
    ownChildren.add(21);
    const reaped: number[] = [];
    const n = reapOrphans(s, { listPids: () => pids, reap: (p) => (reaped.push(p), true), onFatal: () => {} });
    ownChildren.delete(21);
    expect(n).toBe(1);
    expect(reaped).toEqual([20]);
  });
});
