// Byte sources: where the bytes of an archive, a blob or a layer come from. An OCI archive can
// hold GB of layers, so files are read by offset (a member is a slice of its file, never a
// copy), and a layer is read front to back as a stream of small chunks.
import { closeSync, lstatSync, openSync, readSync, writeSync } from "node:fs";

/** Bytes that can be read at any offset, any number of times. */
export interface ByteSource {
  readonly size: number;
  read(offset: number, length: number): Buffer;
}

export function bufferSource(buf: Uint8Array): ByteSource {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  return {
    size: b.length,
    read: (offset, length) => {
      if (offset + length > b.length) throw new Error(`read past the end (${offset + length} > ${b.length} bytes)`);
      return b.subarray(offset, offset + length);
    },
  };
}

export class FileSource implements ByteSource {
  readonly size: number;
  private fd: number;
  constructor(readonly path: string) {
    this.fd = openSync(path, "r");
    this.size = lstatSync(path).size;
  }
  read(offset: number, length: number): Buffer {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const n = readSync(this.fd, buf, done, length - done, offset + done);
      if (n === 0) throw new Error(`${this.path} is truncated (wanted ${length} bytes at offset ${offset})`);
      done += n;
    }
    return buf;
  }
  close(): void {
    if (this.fd >= 0) closeSync(this.fd);
    this.fd = -1;
  }
}

export function sliceSource(src: ByteSource, start: number, size: number): ByteSource {
  return {
    size,
    read: (offset, length) => {
      if (offset + length > size) throw new Error(`read past the end (${offset + length} > ${size} bytes)`);
      return src.read(start + offset, length);
    },
  };
}

/**
 * Chunk size for reading a source front to back. Big enough that per-chunk overhead (a read(2),
 * a hash update, a decompressor call) does not matter, small enough that the chunks in flight
 * between the file, the decompressor and the tree stay a few hundred KiB whatever the layer size.
 */
export const STREAM_CHUNK = 64 << 10;

/** The whole source in order, `chunk` bytes at a time (the last chunk may be shorter). */
export function* chunks(src: ByteSource, chunk = STREAM_CHUNK): Generator<Buffer> {
  for (let off = 0; off < src.size; off += chunk) yield src.read(off, Math.min(chunk, src.size - off));
}

/** The same, as a stream: what the decompressors and the tar stream reader consume. */
export async function* streamOf(src: ByteSource, chunk = STREAM_CHUNK): AsyncGenerator<Buffer> {
  yield* chunks(src, chunk);
}

/** The whole source in one buffer: for small things only (JSON blobs, tar long-name records). */
export function readAll(src: ByteSource): Buffer {
  return src.read(0, src.size);
}

/** Writes all of `buf` at the file's current position (write(2) may take less than asked). */
export function writeFully(fd: number, buf: Uint8Array): void {
  for (let done = 0; done < buf.length; ) done += writeSync(fd, buf, done, buf.length - done);
}
