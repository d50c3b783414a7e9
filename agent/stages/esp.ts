// Stage "esp": find the EFI system partition this boot came from and mount it read-only. Two
// ESPs (A/B slots) are told apart by their GPT partition names; the firmware's choice comes
// from LoaderDevicePartUUID, which systemd-stub sets to the partition it was loaded from.
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS } from "../sys/consts.ts";
import type { Sys } from "../sys/index.ts";
import { type Coldplug, waitUntil } from "./devices.ts";

export const LOADER_PART_UUID = "/sys/firmware/efi/efivars/LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

export interface Slot {
  name: string;
  partLabel: string;
}

export interface EspSlot extends Slot {
  device: string;
  /** Where it is mounted once used (mounted lazily for the fallback slot). */
  mountPoint: string;
  booted: boolean;
}

export interface EspResult {
  /** Slots found, the booted one first: the order images are tried in. */
  slots: EspSlot[];
}

/** The efivar is 4 attribute bytes then a UTF-16LE GUID string (NUL-terminated). */
export function bootedPartUuid(sys: Sys): string | null {
  const v = sys.readBytes(LOADER_PART_UUID);
  if (!v || v.length < 6) return null;
  const s = Buffer.from(v.subarray(4)).toString("utf16le").replace(/\0.*$/s, "").trim().toLowerCase();
  return /^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$/.test(s) ? s : null;
}

export async function findEsps(sys: Sys, log: Logger, cold: Coldplug, slots: readonly Slot[], waitSeconds: number): Promise<EspResult> {
  const booted = bootedPartUuid(sys);
  const bootedDev = booted ? `PARTUUID=${booted}` : null;
  const labels = slots.map((s) => `PARTLABEL=${s.partLabel}`).join(" or ");
  // Wait for the partition we booted from when we know it, else for any slot.
  const want = bootedDev ?? labels;
  await waitUntil(sys, log, cold, `boot partition ${want}`, waitSeconds, () => {
    if (bootedDev) return sys.resolveDevice(bootedDev);
    return slots.map((s) => sys.resolveDevice(`PARTLABEL=${s.partLabel}`)).find((d) => d) ?? null;
  });
  const bootedPath = bootedDev ? sys.resolveDevice(bootedDev) : null;
  const found: EspSlot[] = [];
  for (const s of slots) {
    const device = sys.resolveDevice(`PARTLABEL=${s.partLabel}`);
    if (!device) continue;
    found.push({ ...s, device, mountPoint: `/run/initos/esp-${s.name}`, booted: device === bootedPath });
  }
  if (bootedPath && !found.some((s) => s.booted)) {
    throw new BootError(`booted from ${bootedPath} (${booted}), which is none of the slots ${labels}`);
  }
  found.sort((a, b) => Number(b.booted) - Number(a.booted));
  log.info(`esp: ${found.map((s) => `slot ${s.name} ${s.device}${s.booted ? " (booted)" : ""}`).join(", ")}`);
  return { slots: found };
}

/** Mounts a slot's ESP read-only (once); the agent never writes to it while booting. */
export function mountEsp(sys: Sys, slot: EspSlot): string {
  if (!sys.mountPoints().includes(slot.mountPoint)) {
    sys.mkdirp(slot.mountPoint, 0o700);
    sys.mount(slot.device, slot.mountPoint, "vfat", MS.RDONLY | MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
  }
  return slot.mountPoint;
}
