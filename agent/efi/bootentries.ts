// EFI boot entries for the A/B update: one Boot#### per slot's UKI (a short-form device path,
// HD(partition)/File(path), as efibootmgr writes by default), BootNext for the trial and
// BootOrder for the commit. Everything read back from the firmware's variables is data: each
// entry is decoded with bounds checks, and one that does not decode is reported and left alone.
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Devices, Files } from "../sys/index.ts";
import {
  bootVarName,
  decodeBootNumber,
  decodeBootOrder,
  decodeLoadOption,
  efiPath,
  encodeBootNumber,
  encodeBootOrder,
  encodeLoadOption,
  formatDevicePath,
  type HardDriveNode,
  LOAD_OPTION_ACTIVE,
  type LoadOption,
  parseBootVarName,
} from "./loadopt.ts";
import { deleteVar, EFI_GLOBAL_GUID, EFIVARS_DIR, listVars, readVar, type VarFiles, writeVar } from "./vars.ts";

export type EfiSys = VarFiles;

/**
 * Whether EFI variables can be read and written at `dir`: false on a direct kernel boot (no
 * firmware: cloud-hypervisor, QEMU -kernel without OVMF) or before efivarfs is mounted. A
 * mounted efivarfs always lists some variables (at least the firmware's Boot#### and BootOrder).
 */
export function efiVarsAvailable(sys: Pick<Files, "readdir">, dir = EFIVARS_DIR): boolean {
  return sys.readdir(dir).length > 0;
}

export interface BootEntry {
  num: number;
  /** Boot#### */
  name: string;
  /** The decoded option; null when the variable did not decode (`error` says why). */
  option: LoadOption | null;
  error?: string;
}

/** Every Boot#### variable, decoded, in number order. */
export function listBootEntries(sys: EfiSys, dir = EFIVARS_DIR): BootEntry[] {
  const out: BootEntry[] = [];
  for (const name of listVars(sys, EFI_GLOBAL_GUID, dir)) {
    const num = parseBootVarName(name);
    if (num === null) continue;
    try {
      const v = readVar(sys, name, EFI_GLOBAL_GUID, dir);
      if (v === null) continue; // deleted meanwhile
      out.push({ num, name, option: decodeLoadOption(v.data, name) });
    } catch (e) {
      out.push({ num, name, option: null, error: describe(e) });
    }
  }
  return out.sort((a, b) => a.num - b.num);
}

function readNumber(sys: EfiSys, name: string, dir: string): number | null {
  const v = readVar(sys, name, EFI_GLOBAL_GUID, dir);
  return v === null ? null : decodeBootNumber(v.data, name);
}

/** BootOrder; null when the firmware has none. */
export function bootOrder(sys: EfiSys, dir = EFIVARS_DIR): number[] | null {
  const v = readVar(sys, "BootOrder", EFI_GLOBAL_GUID, dir);
  return v === null ? null : decodeBootOrder(v.data);
}

export function setBootOrder(sys: EfiSys, nums: readonly number[], dir = EFIVARS_DIR): void {
  writeVar(sys, "BootOrder", EFI_GLOBAL_GUID, encodeBootOrder(nums), undefined, dir);
}

/** BootNext: the entry the firmware boots once, at the next boot only; null when unset. */
export function bootNext(sys: EfiSys, dir = EFIVARS_DIR): number | null {
  return readNumber(sys, "BootNext", dir);
}

export function setBootNext(sys: EfiSys, num: number, dir = EFIVARS_DIR): void {
  writeVar(sys, "BootNext", EFI_GLOBAL_GUID, encodeBootNumber(num), undefined, dir);
}

/** Deletes BootNext; false when it was not set. */
export function clearBootNext(sys: EfiSys, dir = EFIVARS_DIR): boolean {
  return deleteVar(sys, "BootNext", EFI_GLOBAL_GUID, dir);
}

/** BootCurrent: the entry this boot came from (set by the firmware); null without one (direct kernel boot). */
export function bootCurrent(sys: EfiSys, dir = EFIVARS_DIR): number | null {
  return readNumber(sys, "BootCurrent", dir);
}

/** Where a partition is, as the Hard Drive node needs it: in the disk's logical blocks. */
export interface PartitionFacts {
  partition: number;
  start: number;
  size: number;
  partUuid: string;
}

const GUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function sysfsNumber(sys: Files, path: string): number {
  const text = sys.readFile(path)?.trim();
  if (text === undefined || !/^\d{1,16}$/.test(text) || !Number.isSafeInteger(Number(text))) {
    throw new BootError(`${path}: ${text === undefined ? "cannot be read" : `${JSON.stringify(text)} is not a number`}`);
  }
  return Number(text);
}

/**
 * A partition's number, start and size from sysfs (/sys/class/block/<part>/{partition,start,size},
 * always in 512-byte sectors, converted to the disk's logical block size) and its GPT unique
 * GUID from the partition table (libblkid). `device` is /dev/<part>.
 */
export function partitionFacts(sys: Files & Devices, device: string): PartitionFacts {
  const part = device.replace(/^\/dev\//, "");
  if (!/^[A-Za-z0-9._-]+$/.test(part)) throw new BootError(`${device}: not a /dev/<partition> name`);
  const cls = `/sys/class/block/${part}`;
  if (!sys.exists(`${cls}/partition`)) throw new BootError(`${device}: not a partition (no ${cls}/partition)`);
  // /sys/class/block/<part> links to .../block/<disk>/<part>: the disk is the parent directory.
  const disk = sys.readlink(cls).split("/").slice(-2, -1)[0];
  if (!disk) throw new BootError(`${device}: ${cls} does not name its disk`);
  const lbs = sysfsNumber(sys, `/sys/class/block/${disk}/queue/logical_block_size`);
  if (lbs < 512 || lbs % 512 !== 0) throw new BootError(`/dev/${disk}: logical block size ${lbs} is not a multiple of 512`);
  const perBlock = lbs / 512;
  const partition = sysfsNumber(sys, `${cls}/partition`);
  const start512 = sysfsNumber(sys, `${cls}/start`);
  const size512 = sysfsNumber(sys, `${cls}/size`);
  if (start512 % perBlock !== 0 || size512 % perBlock !== 0) throw new BootError(`${device}: start ${start512} or size ${size512} (512-byte sectors) is not whole ${lbs}-byte blocks`);
  const uuid = sys.partitionEntry(device)?.uuid?.toLowerCase();
  if (!uuid) throw new BootError(`${device}: no partition UUID in its partition table`);
  if (!GUID_RE.test(uuid)) throw new BootError(`${device}: partition UUID ${JSON.stringify(uuid)} is not a GPT GUID (an MBR disk?)`);
  return { partition, start: start512 / perBlock, size: size512 / perBlock, partUuid: uuid };
}

export interface WantedEntry {
  description: string;
  /** The ESP partition: /dev/<part> (read from sysfs and libblkid) or its facts. */
  partition: string | PartitionFacts;
  /** The loader on it, e.g. \EFI\BOOT\BOOTX64.EFI (slashes are turned into backslashes). */
  path: string;
}

const samePath = (a: string, b: string) => a.replace(/\//g, "\\").toLowerCase() === b.replace(/\//g, "\\").toLowerCase();

/** The HD and File nodes of an entry's first device path (short form or behind a hardware path). */
function target(o: LoadOption): { hd: HardDriveNode; file: string } | null {
  const nodes = o.filePaths[0] ?? [];
  for (let i = 0; i + 1 < nodes.length; i++) {
    const hd = nodes[i]!;
    const file = nodes[i + 1]!;
    if (hd.type === "hd" && file.type === "file") return { hd, file: file.path };
  }
  return null;
}

/**
 * The Boot#### number of an entry that boots `want.path` from `want.partition`: an existing
 * entry whose device path names the same partition UUID and file (FAT compares names without
 * case; the description does not matter) is reused, rewritten only when it is inactive or its
 * partition's place moved; else a new one is created at the lowest free number. BootOrder is
 * not touched.
 */
export function ensureBootEntry(sys: EfiSys & Files & Devices, log: Logger, want: WantedEntry, dir = EFIVARS_DIR): number {
  if (!efiVarsAvailable(sys, dir)) throw new BootError(`efi: no EFI variables at ${dir} (not booted through UEFI, or efivarfs not mounted)`);
  const facts = typeof want.partition === "string" ? partitionFacts(sys, want.partition) : want.partition;
  const path = efiPath(want.path);
  const hd: HardDriveNode = { type: "hd", ...facts };
  const option: LoadOption = { attributes: LOAD_OPTION_ACTIVE, description: want.description, filePaths: [[hd, { type: "file", path }]], optionalData: new Uint8Array(0) };
  const shown = formatDevicePath(option.filePaths[0]!);
  const entries = listBootEntries(sys, dir);
  for (const e of entries) if (e.error) log.warn(`efi: ${e.error} (left alone)`);
  const found = entries.find((e) => {
    const t = e.option && target(e.option);
    return t && t.hd.partUuid === facts.partUuid && samePath(t.file, path);
  });
  if (found) {
    const t = target(found.option!)!;
    const samePlace = t.hd.partition === facts.partition && t.hd.start === facts.start && t.hd.size === facts.size;
    const active = (found.option!.attributes & LOAD_OPTION_ACTIVE) !== 0;
    if (samePlace && active) {
      log.info(`efi: ${found.name} "${found.option!.description}" already boots ${shown}`);
      return found.num;
    }
    writeVar(sys, found.name, EFI_GLOBAL_GUID, encodeLoadOption(option), undefined, dir);
    log.info(`efi: ${found.name} rewritten as "${want.description}" ${shown} (it was ${active ? "" : "inactive, "}${formatDevicePath(found.option!.filePaths[0]!)})`);
    return found.num;
  }
  const used = new Set(listVars(sys, EFI_GLOBAL_GUID, dir).map(parseBootVarName).filter((n): n is number => n !== null));
  let num = 0;
  while (used.has(num)) num++;
  if (num > 0xffff) throw new BootError("efi: no free Boot#### number");
  const name = bootVarName(num);
  writeVar(sys, name, EFI_GLOBAL_GUID, encodeLoadOption(option), undefined, dir);
  log.info(`efi: ${name} created: "${want.description}" ${shown}`);
  return num;
}
