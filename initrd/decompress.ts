// Streamed decompression of layers and archives. Real images have GB layers: bytes go through
// the decompressor a chunk at a time and memory stays at a few chunks, whatever the size.
//
// gzip: node:zlib's stream, in Node and Bun alike.
// zstd: the zstd command, as a child process fed through pipes. node:zlib has a zstd stream in
// Bun (which runs the build) but not in Node 20 (which runs the unit tests); the command works in
// both, so the tests exercise the very path the build takes, and zstd is already a build tool
// (the Makefile installs it to compress the initrd).
import { spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { Readable } from "node:stream";
import * as zlib from "node:zlib";
import { describe } from "../agent/errors.ts";
import { FileSource, STREAM_CHUNK, streamOf, writeFully } from "./bytes.ts";

export type Compression = "none" | "gzip" | "zstd";

/**
 * The decompressed bytes of `input`, as they come. The decompressor's errors are prefixed with
 * `what`. An error of `input` itself (a digest mismatch found at its end, say) passes through as
 * it is, and wins over the decompressor's complaint that its input stopped short.
 */
export function decompress(input: AsyncIterable<Buffer>, how: Compression, what: string): AsyncIterable<Buffer> {
  if (how === "none") return input;
  return how === "gzip" ? gunzip(new Watched(input), what) : unzstd(new Watched(input), what);
}

/** An input whose own error is remembered, so that it can be told from the decompressor's. */
class Watched {
  error: unknown;
  constructor(private readonly input: AsyncIterable<Buffer>) {}
  async *chunks(): AsyncGenerator<Buffer> {
    try {
      yield* this.input;
    } catch (e) {
      this.error = e;
      throw e;
    }
  }
}

async function* gunzip(input: Watched, what: string): AsyncGenerator<Buffer> {
  // Byte mode: an object-mode Readable would buffer 16 chunks ahead instead of 16 KiB.
  const src = Readable.from(input.chunks(), { objectMode: false });
  const z = zlib.createGunzip({ chunkSize: STREAM_CHUNK });
  src.on("error", (e) => z.destroy(e)); // pipe() does not pass errors on
  src.pipe(z);
  try {
    for await (const c of z) yield c as Buffer;
  } catch (e) {
    throw input.error ?? new Error(`${what}: ${describe(e)}`);
  } finally {
    src.destroy();
    z.destroy();
  }
}

async function* unzstd(input: Watched, what: string): AsyncGenerator<Buffer> {
  const child = spawn("zstd", ["-d", "-c", "-q"], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (s: string) => (stderr = (stderr + s).slice(-4096)));
  const exited = new Promise<{ code: number | null; signal: string | null; error?: Error }>((resolve) => {
    child.on("error", (error) => resolve({ code: null, signal: null, error }));
    child.on("close", (code, signal) => resolve({ code, signal }));
  });
  const src = Readable.from(input.chunks(), { objectMode: false });
  // Closing zstd's stdin early makes it fail on a short frame; the input's own error is thrown below.
  src.on("error", () => child.stdin.destroy());
  // EPIPE when zstd gives up on bad data before reading everything: its exit status says why.
  child.stdin.on("error", () => {});
  src.pipe(child.stdin);
  try {
    for await (const c of child.stdout) yield c as Buffer;
    const r = await exited;
    if (input.error) throw input.error;
    if (r.error) throw new Error(`${what}: cannot run zstd to decompress it (${r.error.message})`);
    if (r.code !== 0) {
      const last = stderr.trim().split("\n").pop()?.trim();
      throw new Error(`${what}: zstd -d failed: ${last || `exit ${r.code ?? r.signal}`}`);
    }
  } finally {
    src.destroy();
    if (child.exitCode === null && child.signalCode === null) child.kill();
  }
}

const MAGIC: [Compression, number[]][] = [
  ["gzip", [0x1f, 0x8b]],
  ["zstd", [0x28, 0xb5, 0x2f, 0xfd]],
];

/** What a file's first bytes say it is compressed with. */
export function sniffCompression(head: Uint8Array): Compression {
  return MAGIC.find(([, m]) => m.every((b, i) => head[i] === b))?.[0] ?? "none";
}

/**
 * A tar file as a random-access source; close it when done. A compressed one is decompressed,
 * streamed, into `spool` (a new file the caller removes): a tar of an OCI layout is read by offset,
 * its blobs in whatever order index.json names them, and which of the two (a layout or a root
 * filesystem) the archive is shows only once all of it has been read.
 */
export async function openTarFile(path: string, spool: string): Promise<FileSource> {
  const f = new FileSource(path);
  const how = sniffCompression(f.read(0, Math.min(4, f.size)));
  if (how === "none") return f;
  try {
    const fd = openSync(spool, "wx", 0o600);
    try {
      for await (const c of decompress(streamOf(f), how, path)) writeFully(fd, c);
    } finally {
      closeSync(fd);
    }
  } finally {
    f.close();
  }
  return new FileSource(spool);
}
