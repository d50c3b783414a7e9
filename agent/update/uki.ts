// What an update's UKI carries, read without trusting it and without unpacking it: the PE
// section table, the .cmdline, and the signed config at the end of the .initrd (issue #15).
//
// The .initrd section is the concatenation base.cpio.zst + agent.cpio.zst + config.cpio.zst:
// zstd frames, each a newc cpio (initrd/build.ts). The config segment, a few KB, is the last
// frame. Decompressing the whole initrd (120 MB of cpio, most of it the agent) to find one file
// takes 0.6 s on the host and far longer under TCG; instead the frames are walked by their
// headers (a 3-byte header per block of at most 128 KiB of content: ~3000 small reads for the
// 47 MB agent segment) and only the last frame is decompressed.
//
// Measured (host, 2 cores, Bun 1.4.5, page cache warm): readUkiConfig on build/target.efi
// (62.6 MB; .initrd 48.3 MB in 3 frames) takes 5.6 ms (median of 20; 21 ms for the first call,
// JIT and zod included): 3032 reads, 11 KB in all, one per block header. Decompressing the
// whole .initrd instead takes 580 ms with the zstd tool (test/system/update-check.test.ts).
// Under TCG, which the boot's own timings show running this machine's code 15-20x slower (see
// verify.ts), expect ~0.1-0.4 s: negligible beside the signature and verity checks.
//
// Everything here runs on a file that is NOT yet known to be signed (the cheap checks come
// before sbverify), so every offset and size is checked against the file before it is used,
// nothing is decompressed beyond a bound, and each refusal is one line naming the file. The
// checks also keep sbverify away from malformed files: sbverify 0.9.4 segfaults on a truncated
// UKI (measured), where this parser says which section runs past the end.
import * as zlib from "node:zlib";
import { type AgentConfig, parseConfig } from "../config.ts";
import { describe } from "../errors.ts";
import type { FileReader, Files } from "../sys/index.ts";

/** A refused update: the message is the one line to show (it names the part and why). */
export class UpdateRefused extends Error {
  constructor(message: string) {
    // One line, whatever a tool or library put in its part of the message.
    super(message.replace(/\s*\n\s*/g, " ").trim());
    this.name = "UpdateRefused";
  }
}

/** A byte range of the file: where a PE section's data is. */
export interface PeSection {
  name: string;
  virtualSize: number;
  virtualAddress: number;
  rawSize: number;
  rawOffset: number;
}

/** The path of the config inside the initrd, as the cpio names it (no leading slash). */
export const CONFIG_IN_INITRD = "etc/initos/config.json";
/**
 * The largest last segment decompressed: the config segment is ~3 KB of cpio; anything far
 * bigger is not a config segment, and an unsigned file must not make the agent allocate much.
 */
export const CONFIG_SEGMENT_MAX = 1 << 20;
/** The PE/COFF limit on the number of sections. */
const MAX_SECTIONS = 96;
/** zstd's Block_Maximum_Size (RFC 8878 3.1.1.2.3): no block holds or makes more. */
const ZSTD_BLOCK_MAX = 128 * 1024;
const ZSTD_MAGIC = 0xfd2fb528;
/** Skippable frames: 0x184D2A50..0x184D2A5F, then a 4-byte size, then that many bytes. */
const SKIPPABLE_MASK = 0xfffffff0;
const SKIPPABLE_MAGIC = 0x184d2a50;

/** Decompresses one zstd frame, to at most `maxOutput` bytes (throws beyond). */
export type FrameDecompressor = (frame: Uint8Array, maxOutput: number) => Uint8Array;

/**
 * The runtime's zstd: the agent runs under Bun, whose node:zlib has zstdDecompressSync. Node 20
 * (the unit tests) has none: tests pass the zstd tool instead. Measured in Bun 1.4.5: a frame
 * cut short decompresses quietly to a prefix, which is why the frame's blocks are walked (and
 * its content size compared) before this is called.
 */
export const runtimeZstdFrame: FrameDecompressor = (frame, maxOutput) => {
  const z = zlib as unknown as { zstdDecompressSync?: (b: Uint8Array, o: { maxOutputLength: number }) => Buffer };
  if (typeof z.zstdDecompressSync !== "function") throw new Error("this runtime has no zstd (node:zlib zstdDecompressSync)");
  return z.zstdDecompressSync(frame, { maxOutputLength: maxOutput });
};

/** Bounds-checked reads of one open file; every failure is an UpdateRefused naming it. */
class Bytes {
  constructor(
    private readonly r: FileReader,
    readonly name: string,
  ) {}
  get size(): number {
    return this.r.size;
  }
  refuse(why: string): never {
    throw new UpdateRefused(`update: ${this.name}: ${why}`);
  }
  /** Exactly `length` bytes at `offset`, or a refusal saying the file ends first. */
  at(offset: number, length: number, what: string): Uint8Array {
    if (offset < 0 || length < 0 || offset + length > this.r.size) this.refuse(`truncated: ${what} (offset ${offset}, ${length} bytes) runs past the end of the file (${this.r.size} bytes)`);
    const b = this.r.read(offset, length);
    if (b.length !== length) this.refuse(`changed while being read (${what}: ${b.length} of ${length} bytes at offset ${offset})`);
    return b;
  }
  view(offset: number, length: number, what: string): DataView {
    const b = this.at(offset, length, what);
    return new DataView(b.buffer, b.byteOffset, b.byteLength);
  }
}

/**
 * The PE/COFF section table, every section's raw data checked to lie inside the file. Only
 * PE32+ (x86-64 and the like) is accepted: that is what systemd's stub is.
 */
function readSections(f: Bytes): PeSection[] {
  if (f.size < 64) f.refuse(`not a PE image (${f.size} bytes, less than a DOS header)`);
  const dos = f.view(0, 64, "the DOS header");
  if (dos.getUint16(0, true) !== 0x5a4d) f.refuse("not a PE image (no MZ header)");
  const pe = dos.getUint32(0x3c, true);
  const coff = f.view(pe, 24, "the PE header");
  if (coff.getUint32(0, true) !== 0x00004550) f.refuse(`not a PE image (no PE signature at offset ${pe})`);
  const count = coff.getUint16(6, true);
  const optSize = coff.getUint16(20, true);
  if (count === 0 || count > MAX_SECTIONS) f.refuse(`not a UKI (${count} PE sections)`);
  if (optSize < 2) f.refuse("not a PE image (no optional header)");
  const magic = f.view(pe + 24, 2, "the optional header").getUint16(0, true);
  if (magic !== 0x20b) f.refuse(`not a PE32+ image (optional header magic 0x${magic.toString(16)})`);
  const table = f.view(pe + 24 + optSize, count * 40, `the section table (${count} sections)`);
  const sections: PeSection[] = [];
  for (let i = 0; i < count; i++) {
    const s = i * 40;
    const raw = new Uint8Array(table.buffer, table.byteOffset + s, 8);
    const end = raw.indexOf(0);
    const name = Buffer.from(raw.subarray(0, end < 0 ? 8 : end)).toString("latin1");
    const sec: PeSection = {
      name,
      virtualSize: table.getUint32(s + 8, true),
      virtualAddress: table.getUint32(s + 12, true),
      rawSize: table.getUint32(s + 16, true),
      rawOffset: table.getUint32(s + 20, true),
    };
    if (sec.rawSize > 0 && sec.rawOffset + sec.rawSize > f.size) {
      f.refuse(`truncated: section ${JSON.stringify(name)} (offset ${sec.rawOffset}, ${sec.rawSize} bytes) runs past the end of the file (${f.size} bytes)`);
    }
    sections.push(sec);
  }
  return sections;
}

/** The file's PE sections (name, sizes, offsets), each checked to lie inside the file. */
export function ukiSections(sys: Pick<Files, "openReader">, path: string, name = path): PeSection[] {
  return withFile(sys, path, name, readSections);
}

function withFile<T>(sys: Pick<Files, "openReader">, path: string, name: string, fn: (f: Bytes) => T): T {
  let r: FileReader;
  try {
    r = sys.openReader(path);
  } catch (e) {
    throw new UpdateRefused(`update: ${name}: cannot be read (${describe(e)})`);
  }
  try {
    return fn(new Bytes(r, name));
  } finally {
    r.close();
  }
}

/**
 * The one section named `name`: its data is the first virtualSize bytes (the loader zero-fills
 * a section past its raw data; systemd-stub hands over virtualSize bytes), which must be raw
 * data in the file. Two sections of that name are refused: which one a loader takes is not
 * something to guess.
 */
function section(f: Bytes, sections: readonly PeSection[], name: string): { offset: number; size: number } | null {
  const found = sections.filter((s) => s.name === name);
  if (found.length === 0) return null;
  if (found.length > 1) f.refuse(`not a UKI (${found.length} ${name} sections)`);
  const s = found[0]!;
  if (s.virtualSize > s.rawSize) f.refuse(`section ${name} is ${s.virtualSize} bytes but has only ${s.rawSize} in the file`);
  return { offset: s.rawOffset, size: s.virtualSize };
}

/** A zstd or skippable frame inside the .initrd: where it is, and what a zstd frame says of its content. */
export interface ZstdFrame {
  offset: number;
  length: number;
  skippable: boolean;
  /** Frame_Content_Size when the header has it. */
  contentSize: number | null;
  /** The most the frame can decompress to: its content size, or its blocks times their maximum. */
  contentBound: number;
}

/**
 * Walks the frames in [start, end) of the file by their headers alone (RFC 8878): every
 * frame's blocks are followed to the last one, every size checked against the range. Zero
 * bytes between and after frames are skipped, as the kernel's initramfs unpacker skips them
 * (the section's alignment padding); anything else that is not a frame is refused, since the
 * kernel would unpack it too (an uncompressed cpio after the last frame would override the
 * config this reads).
 */
function walkFrames(f: Bytes, start: number, end: number): ZstdFrame[] {
  const frames: ZstdFrame[] = [];
  const fits = (at: number, len: number, what: string) => {
    if (at + len > end) f.refuse(`truncated .initrd: ${what} at offset ${at} runs past the end of the section`);
  };
  const inSection = (at: number, len: number, what: string) => (fits(at, len, what), f.view(at, len, what));
  let pos = start;
  while (pos < end) {
    // Zero padding: skipped in chunks (it is at most an alignment's worth in a real UKI).
    const first = inSection(pos, 1, "a frame").getUint8(0);
    if (first === 0) {
      const chunk = f.at(pos, Math.min(end - pos, 64 * 1024), "padding");
      const nz = chunk.findIndex((b) => b !== 0);
      pos += nz < 0 ? chunk.length : nz;
      continue;
    }
    const magic = inSection(pos, 4, "a frame's magic number").getUint32(0, true);
    if ((magic & SKIPPABLE_MASK) >>> 0 === SKIPPABLE_MAGIC) {
      const size = inSection(pos + 4, 4, "a skippable frame's size").getUint32(0, true);
      fits(pos + 8, size, "a skippable frame"); // its content is not read
      frames.push({ offset: pos, length: 8 + size, skippable: true, contentSize: null, contentBound: 0 });
      pos += 8 + size;
      continue;
    }
    if (magic !== ZSTD_MAGIC) f.refuse(`the .initrd is not zstd frames (0x${magic.toString(16).padStart(8, "0")} at offset ${pos})`);
    frames.push(zstdFrame(f, pos, end, inSection));
    pos += frames.at(-1)!.length;
  }
  return frames;
}

function zstdFrame(f: Bytes, at: number, end: number, inSection: (at: number, len: number, what: string) => DataView): ZstdFrame {
  const fhd = inSection(at + 4, 1, "a zstd frame header").getUint8(0);
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  if (fhd & 0x08) f.refuse(`zstd frame at offset ${at}: reserved header bit set`);
  const checksum = (fhd >> 2) & 1;
  const didSize = [0, 1, 2, 4][fhd & 3]!;
  const fcsSize = fcsFlag === 0 ? single : [0, 2, 4, 8][fcsFlag]!;
  let p = at + 5;
  let window = 0;
  if (!single) {
    const wd = inSection(p, 1, "a zstd window descriptor").getUint8(0);
    const base = 2 ** (10 + (wd >> 3));
    window = base + (base / 8) * (wd & 7);
    p += 1;
  }
  p += didSize;
  let contentSize: number | null = null;
  if (fcsSize) {
    const v = inSection(p, fcsSize, "a zstd frame content size");
    const n = fcsSize === 1 ? v.getUint8(0) : fcsSize === 2 ? v.getUint16(0, true) + 256 : fcsSize === 4 ? v.getUint32(0, true) : Number(v.getBigUint64(0, true));
    contentSize = n;
    p += fcsSize;
  }
  // Single segment: the window is the content (RFC 8878 3.1.1.1.2).
  const blockMax = Math.min(single ? (contentSize ?? 0) : window, ZSTD_BLOCK_MAX);
  let bound = 0;
  for (;;) {
    const h = inSection(p, 3, "a zstd block header");
    const v = h.getUint8(0) | (h.getUint8(1) << 8) | (h.getUint8(2) << 16);
    const last = v & 1;
    const type = (v >> 1) & 3;
    const size = v >>> 3;
    if (type === 3) f.refuse(`zstd frame at offset ${at}: reserved block type at offset ${p}`);
    // Raw and compressed blocks carry `size` bytes; an RLE block one byte repeated `size` times.
    if (size > blockMax) f.refuse(`zstd frame at offset ${at}: a ${size}-byte block at offset ${p}, more than the frame's ${blockMax}-byte maximum`);
    const stored = type === 1 ? 1 : size;
    if (p + 3 + stored > end) f.refuse(`truncated .initrd: a zstd block at offset ${p} runs past the end of the section`);
    bound += type === 2 ? blockMax : size;
    p += 3 + stored;
    if (last) break;
  }
  if (checksum) {
    inSection(p, 4, "a zstd frame checksum");
    p += 4;
  }
  if (contentSize !== null && contentSize > bound) f.refuse(`zstd frame at offset ${at} says ${contentSize} bytes of content, more than its blocks can hold`);
  return { offset: at, length: p - at, skippable: false, contentSize, contentBound: contentSize ?? bound };
}

/** The .initrd's frames, read from the file by their headers (nothing decompressed). */
export function initrdFrames(sys: Pick<Files, "openReader">, path: string, name = path): ZstdFrame[] {
  return withFile(sys, path, name, (f: Bytes) => {
    const initrd = section(f, readSections(f), ".initrd");
    if (!initrd) f.refuse("not a UKI (no .initrd section)");
    return walkFrames(f, initrd.offset, initrd.offset + initrd.size);
  });
}

/** One newc cpio entry. */
export interface CpioFile {
  name: string;
  mode: number;
  nlink: number;
  data: Uint8Array;
}

/**
 * The entries of newc ("070701"/"070702") cpio archives, one after another (the kernel goes on
 * after a TRAILER!!!, past zero padding, to the next archive). Names are normalized the way
 * the kernel resolves them from "/": no leading "/" or "./". Throws a plain Error saying what
 * is wrong; the caller names the file.
 */
export function parseNewc(data: Uint8Array): CpioFile[] {
  const out: CpioFile[] = [];
  const text = (at: number, len: number) => Buffer.from(data.subarray(at, at + len)).toString("latin1");
  const pad4 = (n: number) => (n + 3) & ~3;
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) {
      pos++;
      continue;
    }
    if (pos + 110 > data.length) throw new Error(`cpio: a header at offset ${pos} runs past the end`);
    const magic = text(pos, 6);
    if (magic !== "070701" && magic !== "070702") throw new Error(`cpio: not a newc header at offset ${pos}`);
    const field = (i: number) => {
      const s = text(pos + 6 + i * 8, 8);
      if (!/^[0-9a-fA-F]{8}$/.test(s)) throw new Error(`cpio: a header at offset ${pos} has a field that is not hex`);
      return Number.parseInt(s, 16);
    };
    const mode = field(1);
    const nlink = field(4);
    const size = field(6);
    const nameSize = field(11);
    if (nameSize < 1) throw new Error(`cpio: an entry at offset ${pos} has no name`);
    const nameEnd = pos + 110 + nameSize;
    if (nameEnd > data.length) throw new Error(`cpio: a name at offset ${pos} runs past the end`);
    const rawName = text(pos + 110, nameSize - 1);
    const dataAt = pad4(nameEnd);
    if (dataAt + size > data.length) throw new Error(`cpio: ${JSON.stringify(rawName)}'s ${size} bytes run past the end`);
    pos = pad4(dataAt + size);
    if (rawName === "TRAILER!!!") continue;
    const name = rawName.replace(/^(\.?\/)+/, "");
    out.push({ name, mode, nlink, data: data.subarray(dataAt, dataAt + size) });
  }
  return out;
}

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;

/** What an update's UKI says about itself. */
export interface UkiInfo {
  config: AgentConfig;
  /** The embedded kernel command line (NUL and surrounding space trimmed); null if it has none. */
  cmdline: string | null;
  /** The .initrd's frames, in order (the last data frame is the config segment). */
  frames: ZstdFrame[];
}

/**
 * Reads the signed config (and the .cmdline) of the UKI at `path`, shown as `name` in
 * refusals: the PE section table, the .initrd's zstd frames walked by their headers, the last
 * data frame decompressed (at most CONFIG_SEGMENT_MAX bytes), its cpio's etc/initos/config.json
 * (its last entry of that name, which is the one the kernel leaves) parsed strictly: a config
 * parseConfig finds an error in is refused (an update must carry a valid config; the boot's
 * "defaults on error" is for a machine already booting, not for choosing what to install).
 */
export function readUkiConfig(sys: Pick<Files, "openReader">, path: string, name = path, unzstd: FrameDecompressor = runtimeZstdFrame): UkiInfo {
  return withFile(sys, path, name, (f: Bytes) => {
    const sections = readSections(f);
    const initrd = section(f, sections, ".initrd");
    if (!initrd) f.refuse("not a UKI (no .initrd section)");
    if (initrd.size === 0) f.refuse("not a UKI (an empty .initrd section)");
    const frames = walkFrames(f, initrd.offset, initrd.offset + initrd.size);
    const last = frames.filter((fr) => !fr.skippable).at(-1);
    if (!last) f.refuse("the .initrd holds no zstd frame");
    if (last.contentBound > CONFIG_SEGMENT_MAX || last.length > CONFIG_SEGMENT_MAX) {
      f.refuse(`the .initrd's last segment (up to ${last.contentBound} bytes) is not a config segment (at most ${CONFIG_SEGMENT_MAX})`);
    }
    let cpio: Uint8Array;
    try {
      cpio = unzstd(f.at(last.offset, last.length, "the .initrd's last segment"), CONFIG_SEGMENT_MAX);
    } catch (e) {
      f.refuse(`the .initrd's last segment does not decompress (${describe(e)})`);
    }
    if (last.contentSize !== null && cpio.length !== last.contentSize) f.refuse(`the .initrd's last segment decompressed to ${cpio.length} bytes, its frame says ${last.contentSize}`);
    let entries: CpioFile[];
    try {
      entries = parseNewc(cpio);
    } catch (e) {
      f.refuse(`the .initrd's last segment: ${describe(e)}`);
    }
    const entry = entries.filter((e) => e.name === CONFIG_IN_INITRD).at(-1);
    if (!entry) f.refuse(`no ${CONFIG_IN_INITRD} in the .initrd's last segment`);
    if ((entry.mode & S_IFMT) !== S_IFREG || entry.nlink !== 1) f.refuse(`${CONFIG_IN_INITRD} in the .initrd is not a plain file`);
    const text = Buffer.from(entry.data).toString("utf8");
    const parsed = parseConfig(text, `/${CONFIG_IN_INITRD}`);
    // parseConfig's error says "...; using defaults": for an update nothing is defaulted.
    if (parsed.error) f.refuse(parsed.error.replace(/; using defaults$/, ""));
    const cmd = section(f, sections, ".cmdline");
    const cmdline = cmd ? Buffer.from(f.at(cmd.offset, Math.min(cmd.size, 64 * 1024), "the .cmdline section")).toString("utf8").replace(/\0[\s\S]*$/, "").trim() : null;
    return { config: parsed.config, cmdline, frames };
  });
}
