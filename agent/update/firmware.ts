// The update's firmware side on a real machine: boot entries per slot, BootOrder, BootNext (the
// EFI global variables), and the update record in a variable of initos's own vendor GUID.
import type { Logger } from "../log.ts";
import { bootNext, bootOrder, type EfiSys, ensureBootEntry, setBootNext, setBootOrder } from "../efi/bootentries.ts";
import { INITOS_GUID, readVar, writeVar } from "../efi/vars.ts";
import type { Devices, Files } from "../sys/index.ts";
import type { FirmwareWithNext } from "./session.ts";
import { UKI_PATH } from "./manifest.ts";
import { parseUpdateState, serializeUpdateState } from "./trial.ts";

/** The update record's variable: InitosUpdate-<INITOS_GUID>, JSON (trial.ts's UpdateState). */
export const UPDATE_VAR = "InitosUpdate";

export function efiFirmware(sys: EfiSys & Files & Devices, log: Logger): FirmwareWithNext {
  return {
    // The description names the slot; the device path (partition UUID + file) is what counts.
    // UKI_PATH is relative to the slot (a bundle path); the load option's file path is absolute.
    entryFor: (slot) => ensureBootEntry(sys, log, { description: `initos ${slot.name}`, partition: slot.device, path: `/${UKI_PATH}` }),
    bootOrder: () => bootOrder(sys) ?? [],
    setBootOrder: (order) => setBootOrder(sys, order),
    setBootNext: (entry) => setBootNext(sys, entry),
    bootNext: () => bootNext(sys),
    loadState: () => {
      const { state, error } = parseUpdateState(readVar(sys, UPDATE_VAR, INITOS_GUID)?.data ?? null);
      if (error) log.warn(error);
      return state;
    },
    saveState: (s) => writeVar(sys, UPDATE_VAR, INITOS_GUID, serializeUpdateState(s)),
  };
}
