// Stage "modules": the drivers the initrd carries to reach the ESP: the config's list (things
// no device asks for: vfat, squashfs, dm-verity) plus coldplug for the devices present.
import { describe } from "../errors.ts";
import { type Logger, uptime } from "../log.ts";
import type { Modules } from "../sys/index.ts";
import type { Coldplug } from "./devices.ts";

export interface ModulesResult {
  loaded: string[];
  failed: string[];
}

export function loadModules(sys: Modules, log: Logger, wanted: readonly string[], cold: Coldplug): ModulesResult {
  const loaded: string[] = [];
  const failed: string[] = [];
  for (const name of wanted) {
    try {
      const { modules: mods, matched } = sys.loadModule(name);
      if (matched.length === 0) {
        // Not fatal here: it may be built in, and if the root needs it the root wait says so.
        log.warn(`modules: ${name} not found`);
        failed.push(name);
      } else {
        loaded.push(...mods);
      }
    } catch (e) {
      log.warn(`modules: ${describe(e)}`);
      failed.push(name);
    }
  }
  loaded.push(...cold.scan());
  log.info(`modules: loaded ${loaded.length ? loaded.join(" ") : "none"}${failed.length ? `; failed ${failed.join(" ")}` : ""}`);
  return { loaded, failed };
}

/**
 * Loads `name` on a worker thread (see sys.loadModuleInBackground) and says how long it took.
 * Never rejects: a module that does not load is the next step's problem, and that step's own
 * load or mount names what is wrong.
 */
export async function loadInBackground(sys: Modules, log: Logger, name: string): Promise<void> {
  const start = uptime();
  try {
    const { modules } = await sys.loadModuleInBackground(name);
    const ms = ((uptime() - start) * 1000).toFixed(0);
    // The time is until the event loop heard of it: a busy main thread hears late.
    log.info(modules.length ? `modules: ${modules.join(" ")} loaded in the background (done within ${ms}ms)` : `modules: ${name} was already there (built in or loaded)`);
  } catch (e) {
    log.warn(`modules: ${name} not loaded in the background: ${describe(e)}`);
  }
}
