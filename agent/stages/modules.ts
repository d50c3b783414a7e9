// Stage "modules": the drivers the initrd carries to reach the ESP: the config's list (things
// no device asks for: vfat, squashfs, dm-verity) plus coldplug for the devices present.
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
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
