// Writes an update bundle (issue #15; the format is agent/update/manifest.ts): one tar whose
// first entry is manifest.json, then the files it lists, in its order, under their ESP paths.
//
// Reproducible: ustar headers with owner 0/0 ("root"), mode 0644 and one fixed mtime, the
// manifest serialized with a fixed key order; the same UKI and images give the same bytes.
//
// Before writing, the bundle is checked against the UKI's own signed config (the config segment
// of its initrd): the version must be the one the config carries, and each image the config
// names must be in the images directory with the config's root hash, verified with veritysetup.
// The agent checks the same things and refuses otherwise; here they fail the build instead of a
// push to a fleet.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import { type AgentConfig, AgentConfigSchema, CONFIG_PATH } from "../agent/config.ts";
import { zodIssue } from "../agent/errors.ts";
import { type Manifest, MANIFEST_NAME, ManifestSchema, UKI_PATH } from "../agent/update/manifest.ts";
import { peSection } from "./pe.ts";

const BLOCK = 512;
const CHUNK = 1 << 20;

/** One file of the bundle: where it goes on the ESP slot, and where it is read from. */
export interface BundlePart {
  path: string;
  file: string;
}

function octal(n: number, width: number, what: string): string {
  const s = n.toString(8);
  // ustar numeric fields hold width-1 octal digits and a NUL: 11 digits are 8 GiB for sizes.
  if (s.length > width - 1) throw new Error(`${what} (${n}) does not fit a ustar header`);
  return s.padStart(width - 1, "0") + "\0";
}

/** A ustar header for a regular file (every name here is short: no prefix, no pax record). */
export function ustarHeader(path: string, size: number, mtime: number): Buffer {
  const h = Buffer.alloc(BLOCK);
  if (Buffer.byteLength(path) > 100) throw new Error(`bundle: path ${path} is longer than 100 bytes`);
  h.write(path, 0, "utf8");
  h.write(octal(0o644, 8, "mode"), 100, "latin1");
  h.write(octal(0, 8, "uid"), 108, "latin1");
  h.write(octal(0, 8, "gid"), 116, "latin1");
  h.write(octal(size, 12, `size of ${path}`), 124, "latin1");
  h.write(octal(mtime, 12, "mtime"), 136, "latin1");
  h.write("0", 156, "latin1");
  h.write("ustar\0" + "00", 257, "latin1");
  h.write("root", 265, "latin1");
  h.write("root", 297, "latin1");
  // The checksum is summed with its own field as eight spaces.
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, "0") + "\0 ", 148, "latin1");
  return h;
}

/** Reads `file` in chunks, calling `each` with every chunk; returns its size and sha256. */
function hashFile(file: string, each?: (chunk: Buffer) => void): { size: number; sha256: string } {
  const fd = openSync(file, "r");
  const h = createHash("sha256");
  const buf = Buffer.allocUnsafe(CHUNK);
  let size = 0;
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, CHUNK, null);
      if (n === 0) break;
      const chunk = buf.subarray(0, n);
      h.update(chunk);
      each?.(chunk);
      size += n;
    }
  } finally {
    closeSync(fd);
  }
  return { size, sha256: h.digest("hex") };
}

/**
 * Writes the bundle to `out` (through a temporary file, fsynced and renamed: a bundle that
 * exists is whole). Each file is hashed, then copied while hashed again: a file that changed in
 * between fails the write rather than ship bytes that disagree with the manifest.
 */
export function writeBundle(out: string, opts: { version: number; host?: string; parts: readonly BundlePart[]; mtime?: number }): Manifest {
  const mtime = opts.mtime ?? 0;
  const files = opts.parts.map((p) => ({ path: p.path, ...hashFile(p.file) }));
  const parsed = ManifestSchema.safeParse({ format: 1, version: opts.version, ...(opts.host ? { host: opts.host } : {}), files });
  if (!parsed.success) throw new Error(`bundle: manifest: ${zodIssue(parsed.error)}`);
  const manifest = parsed.data;
  // Fixed key order, whatever the schema's output order: the bytes are part of the bundle.
  const text = Buffer.from(
    JSON.stringify({
      format: manifest.format,
      version: manifest.version,
      ...(manifest.host ? { host: manifest.host } : {}),
      files: manifest.files.map((f) => ({ path: f.path, size: f.size, sha256: f.sha256 })),
    }, null, 1) + "\n",
  );
  const tmp = `${out}.tmp`;
  const fd = openSync(tmp, "w", 0o644);
  try {
    const put = (b: Uint8Array) => {
      let done = 0;
      while (done < b.length) done += writeSync(fd, b, done, b.length - done);
    };
    const pad = (n: number) => put(Buffer.alloc((BLOCK - (n % BLOCK)) % BLOCK));
    put(ustarHeader(MANIFEST_NAME, text.length, mtime));
    put(text);
    pad(text.length);
    opts.parts.forEach((p, i) => {
      const want = manifest.files[i]!;
      put(ustarHeader(p.path, want.size, mtime));
      const got = hashFile(p.file, put);
      if (got.size !== want.size || got.sha256 !== want.sha256) throw new Error(`bundle: ${p.file} changed while the bundle was written`);
      pad(got.size);
    });
    put(Buffer.alloc(2 * BLOCK)); // end of archive
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw e;
  }
  closeSync(fd);
  renameSync(tmp, out);
  return manifest;
}

/**
 * The zstd frames an initrd is made of (each segment is one `zstd` output: one frame), found by
 * walking the frame and block headers without decompressing anything (RFC 8878, 3.1.1). Skippable
 * frames are left out.
 */
export function zstdFrames(data: Uint8Array): Uint8Array[] {
  const v = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const frames: Uint8Array[] = [];
  let pos = 0;
  const need = (n: number) => {
    if (pos + n > data.length) throw new Error(`initrd: a zstd frame is truncated at byte ${pos}`);
  };
  while (pos < data.length) {
    need(4);
    const magic = v.getUint32(pos, true);
    if ((magic & 0xfffffff0) === 0x184d2a50) {
      need(8);
      pos += 8 + v.getUint32(pos + 4, true);
      continue;
    }
    if (magic !== 0xfd2fb528) throw new Error(`initrd: byte ${pos} does not start a zstd frame (an uncompressed segment?)`);
    const start = pos;
    need(5);
    const fhd = data[pos + 4]!;
    const fcsFlag = fhd >> 6;
    const single = (fhd >> 5) & 1;
    const checksum = (fhd >> 2) & 1;
    const dictId = [0, 1, 2, 4][fhd & 3]!;
    const fcs = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
    pos += 5 + (single ? 0 : 1) + dictId + fcs;
    for (;;) {
      need(3);
      const bh = data[pos]! | (data[pos + 1]! << 8) | (data[pos + 2]! << 16);
      const last = bh & 1;
      const type = (bh >> 1) & 3;
      const size = bh >>> 3;
      if (type === 3) throw new Error(`initrd: reserved zstd block type at byte ${pos}`);
      pos += 3 + (type === 1 ? 1 : size);
      if (last) break;
    }
    pos += checksum ? 4 : 0;
    need(0);
    frames.push(data.subarray(start, pos));
  }
  return frames;
}

/** A file's data in a newc cpio archive (the last entry with that name wins, as in the kernel). */
export function cpioFile(archive: Buffer, name: string): Buffer | undefined {
  let pos = 0;
  let found: Buffer | undefined;
  const pad4 = (n: number) => (n + 3) & ~3;
  while (pos + 110 <= archive.length) {
    if (archive.toString("latin1", pos, pos + 6) !== "070701") {
      // The zero padding after a trailer, then possibly another archive.
      if (archive[pos] === 0) {
        pos++;
        continue;
      }
      throw new Error(`initrd: no cpio header at byte ${pos}`);
    }
    const field = (i: number) => parseInt(archive.toString("latin1", pos + 6 + i * 8, pos + 14 + i * 8), 16);
    const size = field(6);
    const nameSize = field(11);
    const entry = archive.toString("utf8", pos + 110, pos + 110 + nameSize - 1);
    const dataAt = pad4(pos + 110 + nameSize);
    if (dataAt + size > archive.length) throw new Error(`initrd: cpio entry ${entry} is truncated`);
    if (entry === name) found = archive.subarray(dataAt, dataAt + size);
    pos = pad4(dataAt + size);
  }
  return found;
}

/**
 * The signed config inside a UKI: etc/initos/config.json from its initrd, looked for in the
 * segments from the last (the config segment) backwards; only those are decompressed.
 */
export function ukiConfig(uki: string): AgentConfig {
  const initrd = peSection(readFileSync(uki), ".initrd");
  if (!initrd) throw new Error(`${uki} has no .initrd section`);
  const name = CONFIG_PATH.slice(1);
  for (const frame of zstdFrames(initrd).reverse()) {
    const text = cpioFile(execFileSync("zstd", ["-d", "-c", "-q"], { input: frame, maxBuffer: 1 << 30 }), name);
    if (!text) continue;
    const r = AgentConfigSchema.safeParse(JSON.parse(text.toString("utf8")));
    if (!r.success) throw new Error(`${uki}: its ${CONFIG_PATH}: ${zodIssue(r.error)}`);
    return r.data;
  }
  throw new Error(`${uki}: no ${CONFIG_PATH} in its initrd`);
}

/**
 * The parts of a slot, for `uki` and the images its config names, from `imagesDir`
 * (<name>.sqfs and <name>.verity), each image checked against the config's root hash.
 */
export function bundleParts(uki: string, config: AgentConfig, imagesDir: string, espDir = config.esp.dir): BundlePart[] {
  const parts: BundlePart[] = [{ path: UKI_PATH, file: uki }];
  for (const img of config.images) {
    const sqfs = `${imagesDir}/${img.name}.sqfs`;
    const verity = `${imagesDir}/${img.name}.verity`;
    for (const f of [sqfs, verity]) if (!existsSync(f)) throw new Error(`bundle: ${f} is missing (the UKI's config names image ${img.name})`);
    // Userspace verification (no device-mapper needed): every data block against the hash
    // tree, the tree against the root hash signed into the UKI. ~0.1 s for the 20 MB modules image.
    try {
      execFileSync("veritysetup", ["verify", sqfs, verity, img.rootHash], { stdio: ["ignore", "pipe", "pipe"] });
    } catch {
      throw new Error(`bundle: ${sqfs} does not match the root hash ${img.rootHash} in the UKI's config (images rebuilt since the UKI?)`);
    }
    parts.push({ path: `${espDir}/${img.name}.sqfs`, file: sqfs }, { path: `${espDir}/${img.name}.verity`, file: verity });
  }
  for (const p of parts) if (statSync(p.file).size === 0) throw new Error(`bundle: ${p.file} is empty`);
  return parts;
}
