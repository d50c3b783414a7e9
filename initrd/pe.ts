// Reads the section table of a PE/COFF image: of the systemd EFI stub, to place the UKI's
// sections right after the stub's own without overlapping them; of a built UKI, to take its
// sections back out (build.ts sign-pcr, bundle).

export interface PeSection {
  name: string;
  virtualAddress: number;
  virtualSize: number;
  /** Where the section's bytes are in the file, and how many (padded to the file alignment). */
  pointerToRawData: number;
  sizeOfRawData: number;
}

export interface PeInfo {
  imageBase: bigint;
  sectionAlignment: number;
  fileAlignment: number;
  sections: PeSection[];
  /** The Authenticode signatures (certificate table data directory): size 0 when unsigned. */
  certificateTable: { offset: number; size: number };
}

export function readPe(data: Uint8Array): PeInfo {
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (v.getUint16(0, true) !== 0x5a4d) throw new Error("not a PE image (no MZ)");
  const pe = v.getUint32(0x3c, true);
  if (v.getUint32(pe, true) !== 0x00004550) throw new Error("not a PE image (no PE signature)");
  const coff = pe + 4;
  const numSections = v.getUint16(coff + 2, true);
  const optSize = v.getUint16(coff + 16, true);
  const opt = coff + 20;
  if (v.getUint16(opt, true) !== 0x20b) throw new Error("only PE32+ images are supported");
  const imageBase = v.getBigUint64(opt + 24, true);
  const sectionAlignment = v.getUint32(opt + 32, true);
  const fileAlignment = v.getUint32(opt + 36, true);
  // PE32+: the data directories start at 112 in the optional header; entry 4 is the certificate table.
  const numDirs = v.getUint32(opt + 108, true);
  const certificateTable = numDirs > 4 ? { offset: v.getUint32(opt + 112 + 4 * 8, true), size: v.getUint32(opt + 112 + 4 * 8 + 4, true) } : { offset: 0, size: 0 };
  const sections: PeSection[] = [];
  for (let i = 0, s = opt + optSize; i < numSections; i++, s += 40) {
    const raw = data.subarray(s, s + 8);
    const end = raw.indexOf(0);
    sections.push({
      name: Buffer.from(raw.subarray(0, end < 0 ? 8 : end)).toString("latin1"),
      virtualSize: v.getUint32(s + 8, true),
      virtualAddress: v.getUint32(s + 12, true),
      sizeOfRawData: v.getUint32(s + 16, true),
      pointerToRawData: v.getUint32(s + 20, true),
    });
  }
  return { imageBase, sectionAlignment, fileAlignment, sections, certificateTable };
}

/**
 * A section's bytes exactly as they were added: the virtual size is the size objcopy was given
 * (the raw data is padded up to the file alignment). Undefined when there is no such section.
 */
export function peSection(data: Uint8Array, name: string, pe = readPe(data)): Uint8Array | undefined {
  const s = pe.sections.find((x) => x.name === name);
  if (!s) return undefined;
  const size = Math.min(s.virtualSize, s.sizeOfRawData);
  if (s.pointerToRawData + size > data.length) throw new Error(`PE section ${name} runs past the end of the file (truncated?)`);
  return data.subarray(s.pointerToRawData, s.pointerToRawData + size);
}

/** Where a PE image's COFF TimeDateStamp and optional-header CheckSum fields are. */
export function peHeaderOffsets(data: Uint8Array): { timeDateStamp: number; checkSum: number } {
  const pe = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(0x3c, true);
  return { timeDateStamp: pe + 4 + 4, checkSum: pe + 4 + 20 + 64 };
}

/**
 * The PE checksum (as imagehlp's CheckSumMappedFile and objcopy compute it): 16-bit one's
 * complement style sum of the file with the CheckSum field read as zero, plus the file's length.
 */
export function peChecksum(data: Uint8Array, checkSumOffset = peHeaderOffsets(data).checkSum): number {
  let sum = 0;
  const n = data.length & ~1;
  for (let i = 0; i < n; i += 2) {
    if (i === checkSumOffset || i === checkSumOffset + 2) continue;
    sum += data[i]! | (data[i + 1]! << 8);
    sum = (sum & 0xffff) + (sum >>> 16);
  }
  if (data.length & 1) {
    sum += data[data.length - 1]!;
    sum = (sum & 0xffff) + (sum >>> 16);
  }
  sum = (sum & 0xffff) + (sum >>> 16);
  return (sum + data.length) >>> 0;
}
