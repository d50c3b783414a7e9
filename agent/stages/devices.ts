// Device discovery: coldplug (load a driver for every device the kernel already knows, by its
// modalias, as udev would) and bounded waits that keep loading drivers for devices announced
// by uevents while they wait.
import { BootError, describe } from "../errors.ts";
import { pollUntil } from "../wait.ts";
import type { Logger } from "../log.ts";
import type { Clock, Devices, Files, Modules } from "../sys/index.ts";

const POLL_MS = 50;
const MAX_ROUNDS = 8;

/** Modaliases of every device on every bus, from /sys/bus/<bus>/devices/<dev>/modalias. */
export function modaliases(sys: Files): string[] {
  const out = new Set<string>();
  for (const bus of sys.readdir("/sys/bus")) {
    for (const dev of sys.readdir(`/sys/bus/${bus}/devices`)) {
      const alias = sys.readFile(`/sys/bus/${bus}/devices/${dev}/modalias`)?.trim();
      if (alias) out.add(alias);
    }
  }
  return [...out].sort();
}

/** Remembers which aliases were tried, so each is loaded once per module tree. */
export class Coldplug {
  private tried = new Set<string>();
  readonly loaded: string[] = [];

  constructor(
    private readonly sys: Files & Modules & Devices,
    private readonly log: Logger,
  ) {}

  /** Loads drivers for `aliases` not tried yet; returns how many modules were inserted. */
  load(aliases: readonly string[]): number {
    let n = 0;
    for (const a of aliases) {
      if (this.tried.has(a)) continue;
      this.tried.add(a);
      try {
        const mods = this.sys.loadModule(a).modules;
        this.loaded.push(...mods);
        n += mods.length;
      } catch (e) {
        // A driver that refuses a device it matched is not a boot failure; the waits that
        // need a device say so if it never comes.
        this.log.debug(`coldplug ${a}: ${describe(e)}`);
      }
    }
    return n;
  }

  /**
   * Scans /sys until no new driver gets loaded: a bus driver (virtio_pci) makes new devices
   * (virtio disks) appear, whose drivers are loaded in the next round.
   */
  scan(): string[] {
    const before = this.loaded.length;
    for (let round = 0; round < MAX_ROUNDS; round++) {
      if (this.load(modaliases(this.sys)) === 0) break;
    }
    return this.loaded.slice(before);
  }

  /** After a new module tree is mounted, aliases that found nothing before may now. */
  forget(): void {
    this.tried.clear();
  }

  /** Loads drivers for devices announced since the last call. */
  hotplug(): void {
    const aliases = this.sys
      .pollUevents()
      .filter((e) => e.ACTION === "add" && e.MODALIAS)
      .map((e) => e.MODALIAS!);
    if (aliases.length) this.load(aliases);
  }
}

/**
 * Polls `probe` until it returns a value, loading drivers for hotplugged devices in between.
 * Bounded: a device that never appears ends in a BootError naming `what` and the time waited.
 */
export async function waitUntil<T>(sys: Clock, log: Logger, cold: Coldplug, what: string, seconds: number, probe: () => T | null): Promise<T> {
  const first = probe();
  if (first !== null) return first;
  log.info(`waiting up to ${seconds}s for ${what}`);
  const start = sys.now();
  const found = await pollUntil(sys, seconds * 1000, POLL_MS, probe, () => cold.hotplug());
  if (found === null) throw new BootError(`${what} did not appear within ${seconds}s`);
  log.info(`found ${what} after ${((sys.now() - start) / 1000).toFixed(2)}s`);
  return found;
}
