// Stage "modules": the drivers needed to see the root device. The list comes from the signed
// config; libkmod adds dependencies and resolves aliases.
import type { Logger } from "../log.ts";
import type { Sys } from "../sys/index.ts";

export interface ModulesResult {
  loaded: string[];
  failed: string[];
}

export function loadModules(sys: Sys, log: Logger, wanted: readonly string[]): ModulesResult {
  const loaded: string[] = [];
  const failed: string[] = [];
  for (const name of wanted) {
    try {
      const mods = sys.loadModule(name);
      if (mods.length === 0) {
        // Not fatal here: it may be built in, and if the root needs it the root wait says so.
        log.warn(`modules: ${name} not found`);
        failed.push(name);
      } else {
        loaded.push(...mods);
      }
    } catch (e) {
      log.warn(`modules: ${(e as Error).message}`);
      failed.push(name);
    }
  }
  log.info(`modules: loaded ${loaded.length ? loaded.join(" ") : "none"}${failed.length ? `; failed ${failed.join(" ")}` : ""}`);
  return { loaded, failed };
}
