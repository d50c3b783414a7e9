// A minimal ELF64 little-endian reader: just enough to collect the shared libraries a binary
// needs (PT_INTERP and DT_NEEDED), so the initrd carries exactly those and no hand lists.
import { readFileSync } from "node:fs";

export interface ElfDeps {
  /** The program interpreter (ld-linux) for executables; undefined for shared objects. */
  interp?: string;
  /** DT_NEEDED sonames, in file order. */
  needed: string[];
  soname?: string;
}

const PT_INTERP = 3;
const PT_DYNAMIC = 2;
const PT_LOAD = 1;
const DT_NULL = 0n;
const DT_NEEDED = 1n;
const DT_STRTAB = 5n;
const DT_SONAME = 14n;

export class ElfError extends Error {}

function cstr(buf: Uint8Array, off: number): string {
  let end = off;
  while (end < buf.length && buf[end] !== 0) end++;
  return Buffer.from(buf.subarray(off, end)).toString("latin1");
}

export function readElfDeps(data: Uint8Array, name = "input"): ElfDeps {
  if (data.length < 64 || data[0] !== 0x7f || data[1] !== 0x45 || data[2] !== 0x4c || data[3] !== 0x46) {
    throw new ElfError(`${name}: not an ELF file`);
  }
  if (data[4] !== 2 || data[5] !== 1) throw new ElfError(`${name}: only ELF64 little-endian is supported`);
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const phoff = Number(v.getBigUint64(0x20, true));
  const phentsize = v.getUint16(0x36, true);
  const phnum = v.getUint16(0x38, true);

  const loads: { vaddr: bigint; offset: bigint; filesz: bigint }[] = [];
  let interp: string | undefined;
  let dyn: { offset: number; size: number } | undefined;
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * phentsize;
    if (p + 56 > data.length) throw new ElfError(`${name}: program header ${i} out of bounds`);
    const type = v.getUint32(p, true);
    const offset = v.getBigUint64(p + 8, true);
    const vaddr = v.getBigUint64(p + 16, true);
    const filesz = v.getBigUint64(p + 32, true);
    if (type === PT_LOAD) loads.push({ vaddr, offset, filesz });
    if (type === PT_INTERP) interp = cstr(data, Number(offset));
    if (type === PT_DYNAMIC) dyn = { offset: Number(offset), size: Number(filesz) };
  }
  if (!dyn) return { interp, needed: [] }; // static binary

  // Dynamic entries hold virtual addresses; map DT_STRTAB back to a file offset via PT_LOAD.
  const toOffset = (addr: bigint): number => {
    for (const l of loads) if (addr >= l.vaddr && addr < l.vaddr + l.filesz) return Number(addr - l.vaddr + l.offset);
    throw new ElfError(`${name}: address 0x${addr.toString(16)} is in no PT_LOAD segment`);
  };
  const neededOffs: bigint[] = [];
  let sonameOff: bigint | undefined;
  let strtab: bigint | undefined;
  for (let p = dyn.offset; p + 16 <= dyn.offset + dyn.size; p += 16) {
    const tag = v.getBigInt64(p, true);
    const val = v.getBigUint64(p + 8, true);
    if (tag === DT_NULL) break;
    if (tag === DT_NEEDED) neededOffs.push(val);
    else if (tag === DT_STRTAB) strtab = val;
    else if (tag === DT_SONAME) sonameOff = val;
  }
  if (strtab === undefined) throw new ElfError(`${name}: dynamic section without DT_STRTAB`);
  const str = toOffset(strtab);
  return {
    interp,
    needed: neededOffs.map((o) => cstr(data, str + Number(o))),
    soname: sonameOff !== undefined ? cstr(data, str + Number(sonameOff)) : undefined,
  };
}

export function readElfDepsFile(path: string): ElfDeps {
  return readElfDeps(readFileSync(path), path);
}
