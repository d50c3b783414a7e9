// Bounded polling, one way for every wait of the boot: a device, the TPM, a process's signal.
import type { Clock } from "./sys/index.ts";

/**
 * Calls `probe` until it returns a value (not null), sleeping `everyMs` in between and calling
 * `between` (e.g. loading drivers for hotplugged devices) before each new try. Gives up once
 * `boundMs` have passed on the clock: null. The first try is at once, so a bound of 0 tries once.
 */
export async function pollUntil<T>(sys: Clock, boundMs: number, everyMs: number, probe: () => T | null, between?: () => void): Promise<T | null> {
  const start = sys.now();
  for (;;) {
    const found = probe();
    if (found !== null) return found;
    if (sys.now() - start >= boundMs) return null;
    await sys.sleep(everyMs);
    between?.();
  }
}
