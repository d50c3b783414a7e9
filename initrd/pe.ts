// Reads the section table of a PE/COFF image (the systemd EFI stub), to place the UKI's
// sections right after the stub's own without overlapping them.

export interface PeSection {
  name: string;
  virtualAddress: number;
  virtualSize: number;
}

export interface PeInfo {
  imageBase: bigint;
  sectionAlignment: number;
  fileAlignment: number;
  sections: PeSection[];
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
  const sections: PeSection[] = [];
  for (let i = 0, s = opt + optSize; i < numSections; i++, s += 40) {
    const raw = data.subarray(s, s + 8);
    const end = raw.indexOf(0);
    sections.push({
      name: Buffer.from(raw.subarray(0, end < 0 ? 8 : end)).toString("latin1"),
      virtualSize: v.getUint32(s + 8, true),
      virtualAddress: v.getUint32(s + 12, true),
    });
  }
  return { imageBase, sectionAlignment, fileAlignment, sections };
}
