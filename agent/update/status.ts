// `status`'s update fields, the same in the initrd and beside the OS: this boot's version and
// slot, what each slot holds (read from its UKI's signed config), and the update record.
import type { StatusField } from "../admin.ts";
import type { AgentConfig } from "../config.ts";
import { describe } from "../errors.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import type { Files, Mounts } from "../sys/index.ts";
import type { EspResult, EspSlot } from "../stages/esp.ts";
import type { UpdateFirmware } from "./apply.ts";
import { UKI_PATH } from "./manifest.ts";
import { describeUpdate } from "./trial.ts";
import { readUkiConfig } from "./uki.ts";

/** The version in a slot's UKI ("?" and why when it cannot be read). */
export function slotVersion(sys: Files & Mounts, slot: EspSlot): string {
  const mounted = sys.mountPoints().includes(slot.mountPoint);
  const mnt = mounted ? slot.mountPoint : `/run/initos/status-${slot.name}`;
  try {
    if (!mounted) {
      sys.mkdirp(mnt, 0o700);
      sys.mount(slot.device, mnt, "vfat", MS.RDONLY | MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
    }
    try {
      return `v${readUkiConfig(sys, `${mnt}/${UKI_PATH}`, `slot ${slot.name}'s UKI`).config.version}`;
    } finally {
      if (!mounted) sys.umount(mnt, MNT_DETACH);
    }
  } catch (e) {
    return `? (${describe(e)})`;
  }
}

export function updateStatus(sys: Files & Mounts, config: AgentConfig | undefined, esp: EspResult | undefined, firmware: UpdateFirmware | null | undefined): StatusField[] {
  const out: StatusField[] = [];
  if (config) out.push(["version", config.version]);
  if (esp) out.push(["slots", esp.slots.map((s) => `${s.name} ${slotVersion(sys, s)}${s.booted ? " (booted)" : ""}`).join(", ")]);
  if (firmware) {
    let update: string;
    try {
      update = describeUpdate(firmware.loadState());
    } catch (e) {
      update = `? (${describe(e)})`;
    }
    out.push(["update", update]);
  }
  return out;
}
