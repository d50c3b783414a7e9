// Fail-fast chains (test/integration/chain.ts): the state alone, and the real thing, a vitest
// run of a fixture whose chains break by a timeout and by a failed expect.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { Chain, ChainBroken } from "../integration/chain.ts";

describe("Chain", () => {
  it("runs steps while none failed; after a failure every later step throws ChainBroken naming the first failure", async () => {
    const c = new Chain();
    expect(await c.run("one", () => 1)).toBe(1);
    await expect(c.run("two", async () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(c.brokenAt).toBe("two");
    let ran = false;
    const later = c.run("three", () => (ran = true));
    await expect(later).rejects.toBeInstanceOf(ChainBroken);
    await expect(c.run("three", () => (ran = true))).rejects.toThrow('not run: the chain broke at "two"');
    expect(ran).toBe(false);
    // A second failure (a timeout reported later) does not hide the first.
    c.fail("four");
    expect(() => c.check("five")).toThrow('the chain broke at "two"');
  });
});

describe("chain() under vitest", () => {
  const dir = mkdtempSync(`${tmpdir()}/initos-chain-`);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("a step after one that timed out or failed fails at once, naming the first failed step; another chain is not affected", () => {
    const out = `${dir}/results.json`;
    try {
      execFileSync(process.execPath, ["node_modules/vitest/vitest.mjs", "run", "--config", "test/unit/fixtures/chain/vitest.config.ts", "--reporter=json", `--outputFile=${out}`], { stdio: "ignore" });
    } catch {
      // the fixture fails on purpose: vitest exits 1
    }
    const report = JSON.parse(readFileSync(out, "utf8")) as { testResults: { assertionResults: { title: string; status: string; duration: number; failureMessages: string[] }[] }[] };
    const results = new Map(report.testResults.flatMap((f) => f.assertionResults).map((t) => [t.title, t]));
    const status = (t: string) => results.get(t)?.status;
    const message = (t: string) => results.get(t)?.failureMessages.join("\n") ?? "";
    expect([...results.keys()].sort()).toEqual([
      "a1 passes", "a2 times out", "a3 would pass", "a4 would hang", "b1 fails an expect", "b2 would hang", "c1 passes", "c2 passes",
      "d1 installs", "d2 fails", "d3 runs though d2 failed", "d4 boots, fails", "d5 would hang", "d6 would hang",
    ]);
    expect(status("a1 passes")).toBe("passed");
    expect(status("a2 times out")).toBe("failed");
    // (The JSON report keeps no timeout message; the duration is the timeout's.)
    expect(results.get("a2 times out")!.duration).toBeGreaterThanOrEqual(290);
    expect(message("a2 times out")).not.toContain("ChainBroken");
    // Failures, not skips, each naming the step that broke the chain, at once (not after 60 s).
    for (const t of ["a3 would pass", "a4 would hang"]) {
      expect(status(t)).toBe("failed");
      expect(message(t)).toContain('ChainBroken: not run: the chain broke at "a2 times out"');
      expect(results.get(t)!.duration).toBeLessThan(5000);
    }
    expect(status("b1 fails an expect")).toBe("failed");
    expect(status("b2 would hang")).toBe("failed");
    expect(message("b2 would hang")).toContain('the chain broke at "b1 fails an expect"');
    expect(status("c1 passes")).toBe("passed");
    expect(status("c2 passes")).toBe("passed");
    // after(machine): a scenario's failure stops no other; the machine chain's stops them all,
    // and the chains that need it.
    expect(status("d1 installs")).toBe("passed");
    expect(status("d2 fails")).toBe("failed");
    expect(status("d3 runs though d2 failed")).toBe("passed");
    expect(status("d4 boots, fails")).toBe("failed");
    for (const t of ["d5 would hang", "d6 would hang"]) {
      expect(status(t)).toBe("failed");
      expect(message(t)).toContain('the chain broke at "d4 boots, fails"');
      expect(results.get(t)!.duration).toBeLessThan(5000);
    }
  });
});
