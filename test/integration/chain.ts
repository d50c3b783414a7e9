// Fail-fast chains: the steps of a scenario file that share one machine (its disk, TPM, VM),
// each starting where the last one left it. After a step failed, the machine is in a state no
// later step expects: each would only wait out its own timeouts (minutes per boot) and fail
// anyway. So a step after a failed one fails at once, naming the step that failed first. It is a
// failure, not a skip: the run stays red and every later step says why it did not run.
import { it } from "vitest";

/** Thrown by a step that did not run because an earlier step of its chain failed. */
export class ChainBroken extends Error {
  constructor(
    readonly step: string,
    readonly brokenAt: string,
  ) {
    super(`not run: the chain broke at "${brokenAt}" (an earlier step that failed; its own error is above)`);
    this.name = "ChainBroken";
  }
}

/** The chain's state, without vitest: which step failed first. */
export class Chain {
  private first: string | undefined;

  /**
   * `needs`: chains whose breaking breaks this one too (its steps need what theirs made).
   * `record: false`: its own failures break nothing (independent scenarios after a common start).
   */
  constructor(
    private readonly needs: readonly Chain[] = [],
    private readonly record = true,
  ) {}

  /** The name of the first step that failed, here or in a chain this one needs. */
  get brokenAt(): string | undefined {
    for (const n of this.needs) if (n.brokenAt !== undefined) return n.brokenAt;
    return this.first;
  }

  /** Throws ChainBroken when an earlier step failed. */
  check(step: string): void {
    const at = this.brokenAt;
    if (at !== undefined) throw new ChainBroken(step, at);
  }

  /** Records that `step` failed (only the first failure is kept). */
  fail(step: string): void {
    if (this.record) this.first ??= step;
  }

  /**
   * Runs `fn` as step `step`: fails at once if the chain is broken, and breaks it if `fn`
   * throws. (A step that times out never throws here: vitest's onTestFailed reports that.)
   */
  async run<T>(step: string, fn: () => T | Promise<T>): Promise<T> {
    this.check(step);
    try {
      return await fn();
    } catch (e) {
      this.fail(step);
      throw e;
    }
  }
}

export type Step = (name: string, fn: () => unknown, timeoutMs?: number) => void;

const chains = new WeakMap<Step, Chain>();

function steps(c: Chain): Step {
  const step: Step = (name, fn, timeoutMs) => {
    it(
      name,
      async ({ onTestFailed }) => {
        c.check(name);
        // Also a timeout: vitest rejects the test while `fn` is still waiting.
        onTestFailed(() => c.fail(name));
        await c.run(name, fn);
      },
      timeoutMs,
    );
  };
  chains.set(step, c);
  return step;
}

const of = (s: Step): Chain => {
  const c = chains.get(s);
  if (!c) throw new Error("not a chain's step function (chain() or after())");
  return c;
};

/**
 * A chain of vitest tests, for a `describe.sequential` whose tests share state:
 *
 *   const step = chain();
 *   describe.sequential("...", () => {
 *     step("installs", async () => { ... }, 480_000);
 *     step("boots", async () => { ... }, 300_000);
 *   });
 *
 * A step fails at once with "not run: the chain broke at <first failed step>" after any earlier
 * step of the same chain failed: by a throw, a failed expect, or its timeout (vitest's
 * onTestFailed). Steps of other chains are not affected, except chains made with this one in
 * `needs` (chain(install): steps that need what the install chain made).
 */
export function chain(...needs: Step[]): Step {
  return steps(new Chain(needs.map(of)));
}

/**
 * Independent scenarios after a common start: each fails at once when a chain in `needs` broke
 * (e.g. the machine was never installed), but a failure of one does not stop the others.
 */
export function after(...needs: Step[]): Step {
  return steps(new Chain(needs.map(of), false));
}
