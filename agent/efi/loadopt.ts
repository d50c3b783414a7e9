// EFI load options and device paths, encoded and decoded in pure code (UEFI 2.x §3.1.3
// EFI_LOAD_OPTION, §10.3 device path nodes). What firmware or another OS wrote into Boot####
// is data: decoding bounds every length against the bytes it has and fails with one line that
// names the variable and the offset.
//
//   EFI_LOAD_OPTION: u32 Attributes | u16 FilePathListLength | UCS-2 Description, NUL-terminated
//                    | FilePathList (FilePathListLength bytes: device paths, each ending in an
//                    End Entire node) | OptionalData (the rest)
//   device path node: u8 Type | u8 SubType | u16 Length (header included) | data
import { BootError } from "../errors.ts";

export const LOAD_OPTION_ACTIVE = 0x00000001;
export const LOAD_OPTION_FORCE_RECONNECT = 0x00000002;
export const LOAD_OPTION_HIDDEN = 0x00000008;

const MEDIA = 4;
const HARD_DRIVE = 1;
const FILE_PATH = 4;
const END = 0x7f;
const END_ENTIRE = 0xff;
/** Hard Drive node: 4 header + u32 partition + u64 start + u64 size + 16 signature + u8 MBR type + u8 signature type. */
const HD_LENGTH = 42;
const MBR_TYPE_GPT = 2;
const SIGNATURE_GUID = 2;

/** A GPT partition (Hard Drive media node with a GUID signature): LBAs in the disk's logical blocks. */
export interface HardDriveNode {
  type: "hd";
  /** The partition's number in its table, from 1. */
  partition: number;
  /** First LBA and size in LBAs, in the disk's logical block size. */
  start: number;
  size: number;
  /** The GPT partition's unique GUID, lower case (UniquePartitionGUID, what libblkid calls PART_ENTRY_UUID). */
  partUuid: string;
}

/** A file on the partition named before it: a path with backslashes, e.g. \EFI\BOOT\BOOTX64.EFI. */
export interface FilePathNode {
  type: "file";
  path: string;
}

/** Any other node (hardware paths, MBR partitions, End Instance...), kept as its bytes. */
export interface OtherNode {
  type: "other";
  nodeType: number;
  subType: number;
  data: Uint8Array;
}

export type DevicePathNode = HardDriveNode | FilePathNode | OtherNode;

export interface LoadOption {
  attributes: number;
  description: string;
  /** FilePathList: one or more device paths, each a list of nodes (the End Entire node not included). */
  filePaths: DevicePathNode[][];
  optionalData: Uint8Array;
}

const GUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A GUID as EFI stores it: the first three fields little-endian, the last eight bytes in order. */
export function guidToBytes(guid: string): Uint8Array {
  if (!GUID_RE.test(guid)) throw new BootError(`${JSON.stringify(guid)} is not a GUID`);
  const hex = guid.replace(/-/g, "");
  const b = Buffer.from(hex, "hex");
  const out = Buffer.alloc(16);
  out.writeUInt32LE(b.readUInt32BE(0), 0);
  out.writeUInt16LE(b.readUInt16BE(4), 4);
  out.writeUInt16LE(b.readUInt16BE(6), 6);
  b.copy(out, 8, 8, 16);
  return out;
}

export function guidFromBytes(bytes: Uint8Array): string {
  if (bytes.length !== 16) throw new BootError(`a GUID is 16 bytes, not ${bytes.length}`);
  const b = Buffer.from(bytes);
  const h = (n: number, w: number) => n.toString(16).padStart(w, "0");
  const tail = b.subarray(8).toString("hex");
  return `${h(b.readUInt32LE(0), 8)}-${h(b.readUInt16LE(4), 4)}-${h(b.readUInt16LE(6), 4)}-${tail.slice(0, 4)}-${tail.slice(4)}`;
}

/** UCS-2 little-endian with a NUL: only the Basic Multilingual Plane, no NUL inside. */
function ucs2z(text: string, what: string): Buffer {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0) throw new BootError(`${what}: contains a NUL character`);
    if (c >= 0xd800 && c <= 0xdfff) throw new BootError(`${what}: ${JSON.stringify(text)} has a character outside UCS-2`);
  }
  return Buffer.from(`${text}\0`, "utf16le");
}

/** Reads a NUL-terminated UCS-2 string at `at`, not past `end`; its text and the offset after the NUL. */
function readUcs2z(b: Buffer, at: number, end: number, what: string): { text: string; next: number } {
  for (let i = at; i + 1 < end; i += 2) {
    if (b.readUInt16LE(i) === 0) return { text: b.subarray(at, i).toString("utf16le"), next: i + 2 };
  }
  throw new BootError(`${what}: string at offset ${at} has no NUL terminator before offset ${end}`);
}

function checkU32(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0 || n > 0xffffffff) throw new BootError(`${what}: ${n} is not a 32-bit unsigned number`);
}

function checkLba(n: number, what: string): void {
  if (!Number.isSafeInteger(n) || n < 0) throw new BootError(`${what}: ${n} is not a block number`);
}

function node(type: number, subType: number, data: Uint8Array): Buffer {
  const len = 4 + data.length;
  if (len > 0xffff) throw new BootError(`device path node ${type}/${subType}: ${len} bytes is longer than 65535`);
  const h = Buffer.alloc(4);
  h.writeUInt8(type, 0);
  h.writeUInt8(subType, 1);
  h.writeUInt16LE(len, 2);
  return Buffer.concat([h, data]);
}

/** A file path as EFI wants it: backslashes, absolute. */
export function efiPath(path: string): string {
  const p = path.replace(/\//g, "\\");
  if (!p.startsWith("\\")) throw new BootError(`file path ${JSON.stringify(path)} is not absolute`);
  return p;
}

export function encodeNode(n: DevicePathNode): Buffer {
  switch (n.type) {
    case "hd": {
      checkU32(n.partition, "partition number");
      checkLba(n.start, "partition start");
      checkLba(n.size, "partition size");
      const d = Buffer.alloc(HD_LENGTH - 4);
      d.writeUInt32LE(n.partition, 0);
      d.writeBigUInt64LE(BigInt(n.start), 4);
      d.writeBigUInt64LE(BigInt(n.size), 12);
      Buffer.from(guidToBytes(n.partUuid)).copy(d, 20);
      d.writeUInt8(MBR_TYPE_GPT, 36);
      d.writeUInt8(SIGNATURE_GUID, 37);
      return node(MEDIA, HARD_DRIVE, d);
    }
    case "file":
      return node(MEDIA, FILE_PATH, ucs2z(efiPath(n.path), "file path"));
    case "other":
      if (n.nodeType === END && n.subType === END_ENTIRE) throw new BootError("an End Entire node ends a device path; it is not one of its nodes");
      return node(n.nodeType, n.subType, n.data);
  }
}

/** One device path: its nodes, then the End Entire node. */
export function encodeDevicePath(nodes: readonly DevicePathNode[]): Buffer {
  return Buffer.concat([...nodes.map(encodeNode), node(END, END_ENTIRE, new Uint8Array(0))]);
}

function decodeNode(type: number, subType: number, data: Buffer, at: number, what: string): DevicePathNode {
  if (type === MEDIA && subType === HARD_DRIVE) {
    if (data.length !== HD_LENGTH - 4) throw new BootError(`${what}: Hard Drive node at offset ${at} is ${data.length + 4} bytes, not ${HD_LENGTH}`);
    const mbrType = data.readUInt8(36);
    const sigType = data.readUInt8(37);
    // MBR partitions (signature type 1) and signature-less ones are not ours: kept as bytes.
    if (mbrType === MBR_TYPE_GPT && sigType === SIGNATURE_GUID) {
      const start = data.readBigUInt64LE(4);
      const size = data.readBigUInt64LE(12);
      if (start > BigInt(Number.MAX_SAFE_INTEGER) || size > BigInt(Number.MAX_SAFE_INTEGER)) {
        throw new BootError(`${what}: Hard Drive node at offset ${at} has a start or size past 2^53 blocks`);
      }
      return { type: "hd", partition: data.readUInt32LE(0), start: Number(start), size: Number(size), partUuid: guidFromBytes(data.subarray(20, 36)) };
    }
  } else if (type === MEDIA && subType === FILE_PATH) {
    if (data.length % 2 !== 0) throw new BootError(`${what}: File Path node at offset ${at} has an odd length`);
    const { text, next } = readUcs2z(data, 0, data.length, `${what}: File Path node at offset ${at}`);
    if (next !== data.length) throw new BootError(`${what}: File Path node at offset ${at} has bytes after its NUL`);
    return { type: "file", path: text };
  }
  return { type: "other", nodeType: type, subType, data: Uint8Array.from(data) };
}

/**
 * Device paths packed back to back in `bytes` (a FilePathList), each up to its End Entire
 * node. `base` is where `bytes` starts in the variable, for the messages.
 */
export function decodeDevicePaths(bytes: Uint8Array, what: string, base = 0): DevicePathNode[][] {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const paths: DevicePathNode[][] = [];
  let current: DevicePathNode[] = [];
  let at = 0;
  let ended = true;
  while (at < b.length) {
    ended = false;
    if (at + 4 > b.length) throw new BootError(`${what}: device path node at offset ${base + at} is cut off (${b.length - at} bytes left, a header is 4)`);
    const type = b.readUInt8(at);
    const subType = b.readUInt8(at + 1);
    const len = b.readUInt16LE(at + 2);
    if (len < 4) throw new BootError(`${what}: device path node at offset ${base + at} has length ${len} (less than its 4-byte header)`);
    if (at + len > b.length) throw new BootError(`${what}: device path node at offset ${base + at} has length ${len}, past the end of the path list (${b.length - at} bytes left)`);
    if (type === END && subType === END_ENTIRE) {
      if (len !== 4) throw new BootError(`${what}: End node at offset ${base + at} has length ${len}, not 4`);
      paths.push(current);
      current = [];
      ended = true;
    } else {
      current.push(decodeNode(type, subType, b.subarray(at + 4, at + len), base + at, what));
    }
    at += len;
  }
  if (!ended) throw new BootError(`${what}: device path has no End node`);
  if (paths.length === 0) throw new BootError(`${what}: empty device path list`);
  return paths;
}

export function encodeLoadOption(o: LoadOption): Buffer {
  checkU32(o.attributes, "load option attributes");
  if (o.filePaths.length === 0) throw new BootError("a load option needs a device path");
  const fpl = Buffer.concat(o.filePaths.map(encodeDevicePath));
  if (fpl.length > 0xffff) throw new BootError(`device path list of ${fpl.length} bytes is longer than 65535`);
  const head = Buffer.alloc(6);
  head.writeUInt32LE(o.attributes, 0);
  head.writeUInt16LE(fpl.length, 4);
  return Buffer.concat([head, ucs2z(o.description, "description"), fpl, o.optionalData]);
}

/** Decodes a Boot#### value (without the 4 attribute bytes efivarfs puts first). `what` names it. */
export function decodeLoadOption(bytes: Uint8Array, what: string): LoadOption {
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (b.length < 6) throw new BootError(`${what}: ${b.length} bytes is too short for a load option (at least 6)`);
  const attributes = b.readUInt32LE(0);
  const fplLength = b.readUInt16LE(4);
  const { text: description, next } = readUcs2z(b, 6, b.length, `${what}: description`);
  if (next + fplLength > b.length) {
    throw new BootError(`${what}: device path list length ${fplLength} at offset ${next} runs past the end (${b.length - next} bytes left)`);
  }
  const filePaths = decodeDevicePaths(b.subarray(next, next + fplLength), what, next);
  return { attributes, description, filePaths, optionalData: Uint8Array.from(b.subarray(next + fplLength)) };
}

/** A device path as efibootmgr -v prints it, e.g. HD(1,GPT,<uuid>,0x800,0x8000)/File(\EFI\BOOT\BOOTX64.EFI). */
export function formatDevicePath(nodes: readonly DevicePathNode[]): string {
  return nodes
    .map((n) => {
      switch (n.type) {
        case "hd":
          return `HD(${n.partition},GPT,${n.partUuid},0x${n.start.toString(16)},0x${n.size.toString(16)})`;
        case "file":
          return `File(${n.path})`;
        case "other":
          return `Path(${n.nodeType},${n.subType},${Buffer.from(n.data).toString("hex")})`;
      }
    })
    .join("/");
}

// BootOrder, BootNext, BootCurrent and Boot#### names (UEFI §3.3).

/** Boot#### with four upper-case hex digits: what the firmware looks up. */
export function bootVarName(num: number): string {
  checkBootNumber(num);
  return `Boot${num.toString(16).toUpperCase().padStart(4, "0")}`;
}

/** The number of a Boot#### name, or null when the name is not one (lower-case hex is not: the firmware would not find it). */
export function parseBootVarName(name: string): number | null {
  const m = /^Boot([0-9A-F]{4})$/.exec(name);
  return m ? parseInt(m[1]!, 16) : null;
}

export function checkBootNumber(num: number): void {
  if (!Number.isInteger(num) || num < 0 || num > 0xffff) throw new BootError(`boot entry number ${num} is not between 0 and 0xFFFF`);
}

/** BootOrder's value: u16 little-endian numbers. */
export function encodeBootOrder(nums: readonly number[]): Buffer {
  const b = Buffer.alloc(nums.length * 2);
  const seen = new Set<number>();
  nums.forEach((n, i) => {
    checkBootNumber(n);
    if (seen.has(n)) throw new BootError(`boot order lists ${bootVarName(n)} twice`);
    seen.add(n);
    b.writeUInt16LE(n, i * 2);
  });
  return b;
}

export function decodeBootOrder(bytes: Uint8Array, what = "BootOrder"): number[] {
  if (bytes.length % 2 !== 0) throw new BootError(`${what}: ${bytes.length} bytes is not a list of 16-bit numbers`);
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: number[] = [];
  for (let i = 0; i < b.length; i += 2) out.push(b.readUInt16LE(i));
  return out;
}

/** BootNext and BootCurrent: one u16 little-endian. */
export function encodeBootNumber(num: number): Buffer {
  checkBootNumber(num);
  const b = Buffer.alloc(2);
  b.writeUInt16LE(num, 0);
  return b;
}

export function decodeBootNumber(bytes: Uint8Array, what: string): number {
  if (bytes.length !== 2) throw new BootError(`${what}: ${bytes.length} bytes, not one 16-bit number`);
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).readUInt16LE(0);
}
