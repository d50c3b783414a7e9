// Streaming: a layer far bigger than anything the extraction may hold goes through gzip and
// zstd into a tree in small pieces. Proven without timing: the tree gets its first bytes before
// the blob has been read to its end, no piece is bigger than a stream chunk, and the memory the
// process holds in buffers and on the heap grows by a fraction of the layer while it streams.
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import * as zlib from "node:zlib";
import { afterAll, describe, expect, it } from "vitest";
import { type ByteSource, bufferSource, STREAM_CHUNK, streamOf } from "../../agent/oci/bytes.ts";
import { decompress, openTarFile, ZstdFrames } from "../../agent/oci/decompress.ts";
import { type FileSink, type Meta, MemTree } from "../../agent/oci/fstree.ts";
import { extractImage, type Layout, layoutFromTar } from "../../agent/oci/oci.ts";
import { readTar } from "../../agent/oci/tar.ts";
import { layerTar, OciLayoutWriter, tarBytes } from "../oci-fixture.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-decompress-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const MiB = 1 << 20;
/** The big file's size: whole, it would not fit under the memory bound below many times over. */
const BIG = 512 * MiB;
const BOUND = 96 * MiB;

// vitest gives no --expose-gc; the flag still takes effect for contexts made after it is set.
setFlagsFromString("--expose-gc");
const collectGarbage = runInNewContext("gc") as () => void;

const zstdc = (b: Buffer) => execFileSync("zstd", ["-q", "-c"], { input: b });

/**
 * A compressed tar holding one BIG-byte file, made without ever holding BIG bytes: gzip members
 * and zstd frames may follow each other in one stream, so the file's data is one compressed MiB
 * repeated. Each MiB starts with 16 KiB of noise so that the blob spans many stream chunks
 * (zeros alone compress to a few bytes, and a blob read in one chunk proves nothing).
 */
function bigLayer(compress: (b: Buffer) => Buffer): Buffer {
  const tar = tarBytes([{ name: "big", flag: "0", data: Buffer.alloc(1) }]);
  const header = Buffer.from(tar.subarray(0, 512));
  // The header says BIG bytes (octal size field, then the checksum recomputed as ustar wants).
  header.write(BIG.toString(8).padStart(11, "0") + "\0", 124, "latin1");
  header.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of header) sum += b;
  header.write(sum.toString(8).padStart(6, "0") + "\0 ", 148, "latin1");
  const unit = Buffer.alloc(MiB);
  randomBytes(16 << 10).copy(unit);
  const mib = compress(unit);
  // BIG is a multiple of 512: no padding; then the two end-of-archive blocks.
  return Buffer.concat([compress(header), ...Array<Buffer>(BIG / MiB).fill(mib), compress(Buffer.alloc(1024))]);
}

/** Counts what a tree is given and how much memory the process holds meanwhile; keeps no data. */
class CountingTree extends MemTree {
  bytes = 0;
  biggestChunk = 0;
  peak = 0;
  /** How far the layer's blob had been read, in the pass that wrote, when the first byte and when half the file had arrived. */
  blobReadAtFirstByte = -1;
  blobReadAtHalf = -1;
  constructor(private readonly blob: { readTo: number }) {
    super();
  }
  override createFile(path: string, meta: Meta): FileSink {
    const sink = super.createFile(path, meta);
    return {
      write: (c) => {
        if (this.bytes === 0) this.blobReadAtFirstByte = this.blob.readTo;
        if (this.bytes < BIG / 2 && this.bytes + c.length >= BIG / 2) this.blobReadAtHalf = this.blob.readTo;
        this.bytes += c.length;
        this.biggestChunk = Math.max(this.biggestChunk, c.length);
        const m = process.memoryUsage();
        this.peak = Math.max(this.peak, m.arrayBuffers + m.heapUsed);
      },
      close: () => sink.close(),
      abort: () => sink.abort(),
    };
  }
}

/** The layout with its layer blob watched: how far the current pass has read into it. */
function watchedLayout(layout: Layout, layerPath: string): { layout: Layout; blob: { readTo: number; size: number } } {
  const blob = { readTo: 0, size: 0 };
  return {
    blob,
    layout: {
      what: layout.what,
      file: (p) => {
        const src = layout.file(p);
        if (!src || p !== layerPath) return src;
        blob.size = src.size;
        const watched: ByteSource = {
          size: src.size,
          read: (offset, length) => {
            blob.readTo = offset + length; // each pass reads from 0, front to back
            return src.read(offset, length);
          },
        };
        return watched;
      },
    },
  };
}

describe("streamed layers", () => {
  for (const [name, mediaType, compress] of [
    ["gzip", "application/vnd.oci.image.layer.v1.tar+gzip", (b: Buffer) => zlib.gzipSync(b)],
    ["zstd", "application/vnd.oci.image.layer.v1.tar+zstd", zstdc],
  ] as const) {
    it(`a ${BIG / MiB} MiB file in a ${name} layer reaches the tree in chunks, with memory bounded far below its size`, async () => {
      const w = new OciLayoutWriter();
      const layer = w.blob(bigLayer(compress), mediaType);
      const config = w.blob({ os: "linux", architecture: "amd64" }, "application/vnd.oci.image.config.v1+json");
      const m = w.blob({ schemaVersion: 2, config, layers: [layer] }, "application/vnd.oci.image.manifest.v1+json");
      const tar = w.tar([m]);
      const { layout, blob } = watchedLayout(layoutFromTar(readTar(bufferSource(tar), "big.tar"), "big.tar"), `blobs/sha256/${layer.digest.slice(7)}`);
      const tree = new CountingTree(blob);
      collectGarbage(); // the baseline without what earlier tests left behind
      const base = process.memoryUsage();
      await extractImage(layout, tree);
      expect(tree.bytes).toBe(BIG);
      expect(tree.blobReadAtFirstByte).toBeGreaterThan(0);
      expect(tree.blobReadAtFirstByte).toBeLessThan(blob.size / 8);
      expect(tree.blobReadAtHalf).toBeLessThan(blob.size);
      expect(tree.biggestChunk).toBeLessThanOrEqual(STREAM_CHUNK);
      expect(tree.peak - (base.arrayBuffers + base.heapUsed)).toBeLessThan(BOUND);
    }, 120_000);
  }
});

describe("decompress and openTarFile", () => {
  it("passes an error of the input through as it is, rather than the decompressor's complaint", async () => {
    for (const [how, compress] of [["gzip", (b: Buffer) => zlib.gzipSync(b)], ["zstd", zstdc]] as const) {
      const whole = compress(randomBytes(300_000));
      async function* failing() {
        yield whole.subarray(0, 100);
        throw new Error("input: digest mismatch");
      }
      const drain = async () => {
        for await (const c of decompress(failing(), how, "layer 1")) void c;
      };
      await expect(drain()).rejects.toThrow(/^input: digest mismatch$/);
      const corrupt = Buffer.from(whole);
      corrupt.fill(0x55, 30, 60);
      const drainCorrupt = async () => {
        for await (const c of decompress(streamOf(bufferSource(corrupt)), how, "layer 1")) void c;
      };
      await expect(drainCorrupt()).rejects.toThrow(/^layer 1: /);
    }
  });

  it("decompresses a compressed archive into the spool file and reads an uncompressed one in place", async () => {
    const tar = layerTar([{ path: "f", type: "file", data: "hello" }]);
    writeFileSync(`${dir}/a.tar.zst`, zstdc(tar));
    const spooled = await openTarFile(`${dir}/a.tar.zst`, `${dir}/spool`);
    expect(readTar(spooled, "a.tar.zst").map((e) => e.path)).toEqual(["f"]);
    spooled.close();
    expect(readFileSync(`${dir}/spool`).equals(tar)).toBe(true);
    writeFileSync(`${dir}/b.tar`, tar);
    const direct = await openTarFile(`${dir}/b.tar`, `${dir}/unused`);
    expect(direct.path).toBe(`${dir}/b.tar`);
    direct.close();
    writeFileSync(`${dir}/c.tar.gz`, Buffer.from([0x1f, 0x8b, 1, 2, 3]));
    await expect(openTarFile(`${dir}/c.tar.gz`, `${dir}/spool2`)).rejects.toThrow(/^\/.*\/c\.tar\.gz: /);
  });

  it("tells a zstd stream that ends on a frame boundary from one cut inside a frame (Bun's zlib stream does not)", () => {
    const framesOf = (b: Buffer, chunk: number) => {
      const f = new ZstdFrames();
      for (let i = 0; i < b.length; i += chunk) f.feed(b.subarray(i, i + chunk));
      return f;
    };
    // Several frames, with and without checksums and content sizes, an RLE-friendly run, and a
    // skippable frame (what pzstd and seekable zstd add) between them.
    const skippable = Buffer.concat([Buffer.from([0x50, 0x2a, 0x4d, 0x18, 5, 0, 0, 0]), Buffer.alloc(5, 9)]);
    const data = Buffer.concat([
      zstdc(randomBytes(200_000)),
      skippable,
      execFileSync("zstd", ["-q", "-c", "--no-check"], { input: Buffer.alloc(300_000, 7) }),
      execFileSync("zstd", ["-q", "-c", "--no-content-size"], { input: randomBytes(1000) }),
    ]);
    for (const chunk of [1, 7, 4096, data.length]) expect(framesOf(data, chunk).complete()).toBe(true);
    for (const cut of [1, 3, 4, 100, 5000, data.length - 1000, data.length - 8]) {
      expect(framesOf(data.subarray(0, data.length - cut), 4096).complete()).toBe(false);
    }
    expect(framesOf(Buffer.alloc(0), 1).complete()).toBe(false);
    expect(framesOf(Buffer.from("not zstd at all"), 4).complete()).toBe(false);
  });
});
