// Jail mode's host side: what the machine needs before any jail starts (placeholder, completed below).
import type { Logger } from "../log.ts";
import type { Sys } from "../sys/index.ts";
import type { Coldplug } from "../stages/devices.ts";
import type { JailsConfig } from "./config.ts";
import type { Jails } from "./run.ts";

export async function startJailMode(_sys: Sys, _log: Logger, _cold: Coldplug, _jc: JailsConfig): Promise<Jails> {
  throw new Error("jail mode: not built yet");
}
