// Stage "esp": find the EFI system partitions of the disk this boot came from and mount them
// read-only. The firmware's choice comes from LoaderDevicePartUUID, which systemd-stub sets to
// the partition it was loaded from; the other A/B slot is the partition with the other slot's
// GPT name *on the same disk*. Other disks may carry the same names (a second disk of a
// multi-disk machine, an installer stick left plugged in, a recovery USB, an evil maid's disk):
// their partitions are never taken for this boot's slots.
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import type { Clock, Devices, Files, Mounts } from "../sys/index.ts";
import { type Coldplug, waitUntil } from "./devices.ts";

/** The GPT partition type of an EFI System Partition. */
export const ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

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
  /**
   * The disk the slots are on (the one the firmware booted; on a direct boot, the only disk
   * with slots): where the pool's first volume is, and the only disk whose LUKS2 headers are
   * read while the TPM can still release the key.
   */
  disk: string;
}

/** The efivar is 4 attribute bytes then a UTF-16LE GUID string (NUL-terminated). */
export function bootedPartUuid(sys: Files): string | null {
  const v = sys.readBytes(LOADER_PART_UUID);
  if (!v || v.length < 6) return null;
  const s = Buffer.from(v.subarray(4)).toString("utf16le").replace(/\0.*$/s, "").trim().toLowerCase();
  return /^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$/.test(s) ? s : null;
}

export interface Partition {
  /** /dev/<name> */
  device: string;
  /** The whole disk it is on, /dev/<name>. */
  disk: string;
  /** Partition UUID, lower case. */
  uuid: string | null;
  /** GPT partition name. */
  name: string | null;
}

const CLASS_BLOCK = "/sys/class/block";

/**
 * Every partition the kernel knows now, with its disk and table entry. The disk is the sysfs
 * parent (/sys/class/block/<part> links to .../block/<disk>/<part>), not a guess from the name
 * (vda1, nvme0n1p1, mmcblk0p1 all differ).
 */
export function partitions(sys: Files & Devices): Partition[] {
  const out: Partition[] = [];
  const names = sys.readdir(CLASS_BLOCK).sort((a, b) => a.localeCompare(b, "en", { numeric: true }));
  for (const name of names) {
    if (!sys.exists(`${CLASS_BLOCK}/${name}/partition`)) continue;
    let link: string;
    try {
      link = sys.readlink(`${CLASS_BLOCK}/${name}`);
    } catch {
      continue; // gone since the listing
    }
    const parts = link.split("/");
    const disk = parts.at(-1) === name ? parts.at(-2) : undefined;
    if (!disk) continue;
    const entry = sys.partitionEntry(`/dev/${name}`);
    if (!entry) continue; // no device node yet, or no table entry: not a slot (yet)
    out.push({ device: `/dev/${name}`, disk: `/dev/${disk}`, uuid: entry.uuid?.toLowerCase() ?? null, name: entry.name });
  }
  return out;
}

const devices = (ps: readonly Partition[]) => ps.map((p) => p.device).join(", ");

/** The one partition on `disk` named `label`, if any; two are ambiguous and refused. */
function onDisk(ps: readonly Partition[], disk: string, label: string): Partition | undefined {
  const found = ps.filter((p) => p.disk === disk && p.name === label);
  if (found.length > 1) throw new BootError(`esp: ${disk} has several partitions named ${label}: ${devices(found)}`);
  return found[0];
}

export async function findEsps(sys: Files & Devices & Clock, log: Logger, cold: Coldplug, slots: readonly Slot[], waitSeconds: number): Promise<EspResult> {
  const booted = bootedPartUuid(sys);
  const labels = slots.map((s) => s.partLabel);
  const isSlot = (p: Partition) => p.name !== null && labels.includes(p.name);
  // Wait for the partition we booted from when we know it, else for any slot.
  const want = booted ? `boot partition PARTUUID=${booted}` : `boot partition named ${labels.join(" or ")}`;
  const ps = await waitUntil(sys, log, cold, want, waitSeconds, () => {
    const now = partitions(sys);
    return now.some((p) => (booted ? p.uuid === booted : isSlot(p))) ? now : null;
  });

  const found: EspSlot[] = [];
  let disk: string;
  const slot = (s: Slot, p: Partition, isBooted: boolean) => found.push({ ...s, device: p.device, mountPoint: `/run/initos/esp-${s.name}`, booted: isBooted });
  if (booted) {
    // Partition UUIDs are random per install, so two partitions with the booted one's mean a
    // cloned disk or a forged one: nothing says which of them the firmware read the UKI from.
    const matches = ps.filter((p) => p.uuid === booted);
    if (matches.length > 1) throw new BootError(`esp: booted partition ${booted} is on several partitions: ${devices(matches)}`);
    const part = matches[0]!;
    const own = slots.find((s) => s.partLabel === part.name);
    if (!own) throw new BootError(`esp: booted from ${part.device} (${booted}, named ${JSON.stringify(part.name ?? "")}), which is none of the slots ${labels.join(", ")}`);
    slot(own, part, true);
    disk = part.disk;
    for (const s of slots) {
      if (s === own) continue;
      const sibling = onDisk(ps, part.disk, s.partLabel);
      if (sibling) slot(s, sibling, false);
    }
  } else {
    // A direct kernel boot names no partition. One disk with slots is today's single-disk
    // machine; with several, a pick by probe order would be chosen by whoever plugs in a disk
    // (its images still verify against the root hashes, but install mode would read its
    // payload from it): refuse, and let the operator remove the extra disk or boot the UKI.
    // A disk that appears after the wait is not seen here.
    const disks = [...new Set(ps.filter(isSlot).map((p) => p.disk))];
    if (disks.length > 1) throw new BootError(`esp: slots on several disks (${disks.join(", ")}) and no LoaderDevicePartUUID to tell which one booted`);
    disk = disks[0]!;
    for (const s of slots) {
      const p = onDisk(ps, disks[0]!, s.partLabel);
      if (p) slot(s, p, false);
    }
  }
  log.info(`esp: ${found.map((s) => `slot ${s.name} ${s.device}${s.booted ? " (booted)" : ""}`).join(", ")}`);
  return { slots: found, disk };
}

/** Mounts a slot's ESP read-only (once); the agent never writes to it while booting. */
export function mountEsp(sys: Files & Mounts, slot: EspSlot): string {
  if (!sys.mountPoints().includes(slot.mountPoint)) {
    sys.mkdirp(slot.mountPoint, 0o700);
    sys.mount(slot.device, slot.mountPoint, "vfat", MS.RDONLY | MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
  }
  return slot.mountPoint;
}

/**
 * Lets go of the ESPs before the switch: they are mounted under /run, which moves into the OS,
 * where they would stay busy until shutdown failed to unmount them. Detached lazily: the loop
 * devices under a verified image the OS keeps (the modules) still read its file, and keep the
 * read-only filesystem until that image is closed at shutdown.
 */
export function unmountEsps(sys: Mounts, log: Logger, esp: EspResult): void {
  const mounted = sys.mountPoints();
  const gone = esp.slots.filter((s) => mounted.includes(s.mountPoint));
  for (const s of gone) sys.umount(s.mountPoint, MNT_DETACH);
  if (gone.length) log.info(`esp: unmounted ${gone.map((s) => s.mountPoint).join(", ")}`);
}
