// The evil maid's header edit, as a tool: sets every data segment of a LUKS2 header to
// cipher_null-ecb (or, with --keyslots, every keyslot area too), in both header copies, and
// makes their checksums right again: the header is a plain sha256, not a signature.
//   bun luks-null.ts DEVICE_OR_FILE [--keyslots]
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { createHash } from "node:crypto";

const [file, flag] = process.argv.slice(2) as [string, string | undefined];
const fd = openSync(file, "r+");
const read = (off: number, len: number) => {
  const b = Buffer.alloc(len);
  readSync(fd, b, 0, len, off);
  return b;
};
const hdrSize = Number(read(0, 4096).readBigUInt64BE(8));
for (const off of [0, hdrSize]) {
  const hdr = read(off, hdrSize);
  if (hdr.subarray(0, 4).toString("latin1") !== "LUKS" && hdr.subarray(0, 4).toString("latin1") !== "SKUL") throw new Error(`${file}: no LUKS2 header at ${off}`);
  const end = hdr.indexOf(0, 4096);
  const meta = JSON.parse(hdr.subarray(4096, end).toString("utf8"));
  for (const s of Object.values(meta.segments) as { encryption: string }[]) s.encryption = "cipher_null-ecb";
  if (flag === "--keyslots") for (const k of Object.values(meta.keyslots) as { area: { encryption: string } }[]) k.area.encryption = "cipher_null-ecb";
  const text = Buffer.from(JSON.stringify(meta), "utf8");
  hdr.fill(0, 4096);
  text.copy(hdr, 4096);
  hdr.fill(0, 448, 448 + 64); // the checksum is taken with its own field zeroed
  createHash("sha256").update(hdr).digest().copy(hdr, 448);
  writeSync(fd, hdr, 0, hdrSize, off);
}
closeSync(fd);
