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
import { closeSync, existsSync, fsyncSync, openSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import type { AgentConfig } from "../agent/config.ts";
import { describe, zodIssue } from "../agent/errors.ts";
import { openReader } from "../agent/sys/index.ts";
import { type Manifest, MANIFEST_NAME, ManifestSchema, UKI_PATH } from "../agent/update/manifest.ts";
import { type FrameDecompressor, readUkiConfig, runtimeZstdFrame } from "../agent/update/uki.ts";

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
 * The signed config inside a UKI, read by the agent's own reader (agent/update/uki.ts: the
 * .initrd's zstd frames walked by their headers, only the last one, the config segment,
 * decompressed): the build checks a bundle as the agent will. Under Bun (the build) node:zlib
 * has zstd; Node 20 (the tests) passes the zstd tool.
 */
export function ukiConfig(uki: string, unzstd: FrameDecompressor = runtimeZstdFrame): AgentConfig {
  try {
    return readUkiConfig({ openReader }, uki, uki, unzstd).config;
  } catch (e) {
    throw new Error(describe(e).replace(/^update: /, ""));
  }
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
