// Streamed decompression of layers and archives. Real images have GB layers: bytes go through
// the decompressor a chunk at a time and memory stays at a few chunks, whatever the size.
//
// gzip: node:zlib's stream, in Node and Bun alike.
// zstd: node:zlib's zstd stream when the runtime has one, else the zstd command fed through
// pipes. Bun (the agent, and the build) has the stream (Bun 1.4.5: zlib.createZstdDecompress);
// Node 20, which runs the unit tests, has not, so they take the command. The agent must use the
// stream: the initrd and the tools image have no zstd command. Bun's stream does not notice a
// truncated input (see ZstdFrames), so the frame boundaries are checked beside it. Under Node the
// stream's wiring is tested through gzip, which shares it (zlibStream), and ZstdFrames directly.
import { spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { Readable, type Transform } from "node:stream";
import * as zlib from "node:zlib";
import { describe } from "../errors.ts";
import { FileSource, STREAM_CHUNK, streamOf, writeFully } from "./bytes.ts";

export type Compression = "none" | "gzip" | "zstd";

/**
 * The decompressed bytes of `input`, as they come. The decompressor's errors are prefixed with
 * `what`. An error of `input` itself (a digest mismatch found at its end, say) passes through as
 * it is, and wins over the decompressor's complaint that its input stopped short.
 */
export function decompress(input: AsyncIterable<Buffer>, how: Compression, what: string): AsyncIterable<Buffer> {
  if (how === "none") return input;
  if (how === "gzip") return zlibStream(new Watched(input), zlib.createGunzip({ chunkSize: STREAM_CHUNK }), what);
  const zstd = zstdStream();
  if (!zstd) return unzstd(new Watched(input), what);
  const frames = new ZstdFrames();
  return zlibStream(new Watched(input, (c) => frames.feed(c)), zstd, what, () => {
    if (!frames.complete()) throw new Error(`${what}: zstd data is truncated (it ends inside a frame)`);
  });
}

/** node:zlib's zstd decompressor where the runtime has one (Bun, Node >= 22.15), else undefined. */
function zstdStream(): Transform | undefined {
  const make = (zlib as { createZstdDecompress?: (o: { chunkSize: number }) => Transform }).createZstdDecompress;
  return typeof make === "function" ? make({ chunkSize: STREAM_CHUNK }) : undefined;
}

/** An input whose own error is remembered, so that it can be told from the decompressor's. */
class Watched {
  error: unknown;
  constructor(
    private readonly input: AsyncIterable<Buffer>,
    private readonly tap?: (chunk: Buffer) => void,
  ) {}
  async *chunks(): AsyncGenerator<Buffer> {
    try {
      for await (const c of this.input) {
        this.tap?.(c);
        yield c;
      }
    } catch (e) {
      this.error = e;
      throw e;
    }
  }
}

/** A node:zlib decompressor over `input`; `ended` checks what the stream's own end cannot. */
async function* zlibStream(input: Watched, z: Transform, what: string, ended?: () => void): AsyncGenerator<Buffer> {
  // Byte mode: an object-mode Readable would buffer 16 chunks ahead instead of 16 KiB.
  const src = Readable.from(input.chunks(), { objectMode: false });
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
  ended?.();
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

const ZSTD_MAGIC = 0xfd2fb528;
/** Skippable frames: magic 0x184D2A50..5F, a 4-byte size, then that many bytes. */
const isSkippable = (m: number) => (m & 0xfffffff0) >>> 0 === 0x184d2a50;

/**
 * Where the zstd frames in a compressed stream begin and end, read from the frame and block
 * headers only (RFC 8878 section 3.1): whether the stream stopped on a frame boundary.
 *
 * Bun's zlib zstd stream (1.4.5) ends without an error when its input stops inside a frame,
 * measured: an 8 MiB frame cut by 1, 10 or half its bytes gave 8257536, 8257536 and 4063232
 * bytes and a clean 'end', where gzip says "unexpected end of file" every time. A layer's digest
 * would catch it, but openTarFile's archives have none. Anything that is not a frame is left to
 * the decompressor to refuse; this only tells whether the last frame was whole.
 */
export class ZstdFrames {
  private step: "magic" | "skippable" | "fhd" | "block" = "magic";
  private need = 4;
  private head: number[] = [];
  private skip = 0;
  private checksum = false;
  private frames = 0;
  private bad = false;

  feed(chunk: Uint8Array): void {
    let i = 0;
    while (i < chunk.length && !this.bad) {
      if (this.skip > 0) {
        const n = Math.min(this.skip, chunk.length - i);
        this.skip -= n;
        i += n;
        continue;
      }
      this.head.push(chunk[i++]!);
      if (this.head.length === this.need) this.header(this.head.splice(0));
    }
  }

  /** True when the bytes fed were one or more whole frames. */
  complete(): boolean {
    return !this.bad && this.frames > 0 && this.step === "magic" && this.head.length === 0 && this.skip === 0;
  }

  private header(h: number[]): void {
    const le = h.reduce((v, b, k) => v + b * 2 ** (8 * k), 0);
    switch (this.step) {
      case "magic":
        if (le === ZSTD_MAGIC) [this.step, this.need] = ["fhd", 1];
        else if (isSkippable(le)) [this.step, this.need] = ["skippable", 4];
        else this.bad = true;
        return;
      case "skippable":
        this.skip = le;
        return this.frameEnd();
      case "fhd": {
        // Frame header descriptor: content size flag (2 bits), single segment, unused,
        // reserved, checksum flag, dictionary id flag (2 bits); the rest of the header follows.
        const single = (le >> 5) & 1;
        this.checksum = ((le >> 2) & 1) === 1;
        this.skip = (single ? 0 : 1) + [0, 1, 2, 4][le & 3]! + [single, 2, 4, 8][le >> 6]!;
        [this.step, this.need] = ["block", 3];
        return;
      }
      case "block": {
        // Block header: last-block bit, type (raw, RLE, compressed, reserved), size.
        const type = (le >> 1) & 3;
        if (type === 3) this.bad = true;
        this.skip = type === 1 ? 1 : le >>> 3;
        if (le & 1) {
          if (this.checksum) this.skip += 4;
          this.frameEnd();
        }
        return;
      }
    }
  }

  private frameEnd(): void {
    this.frames++;
    [this.step, this.need] = ["magic", 4];
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
