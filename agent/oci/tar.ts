// The tar reader: ustar, GNU long names ('L'/'K') and base-256 numbers, pax ('x') path/linkpath/size.
//
// Our own, so that no dependency decides how paths, links and long names are interpreted. Two
// readers share one header decoder: readTar lists a random-access source by seeking from header
// to header (listing an OCI archive never reads its GB of blobs), and readTarStream reads a stream
// front to back (a compressed layer can be read no other way).
import { type ByteSource, readAll, sliceSource, streamOf } from "./bytes.ts";

export type TarEntryType = "file" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo";

export interface TarHeader {
  /** The member name exactly as archived (after long-name and pax records); see entryParts. */
  path: string;
  type: TarEntryType;
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
  /** Symlink target or hardlink source; "" for other types. */
  linkname: string;
  devmajor: number;
  devminor: number;
}

/** A member of a random-access tar: its data stays in the source until read. */
export interface TarEntry extends TarHeader {
  data: ByteSource;
}

/** A member of a streamed tar. */
export interface TarStreamEntry extends TarHeader {
  /**
   * The member's bytes (none unless it is a file), readable once and only before the next
   * entry is asked for; what is not read is skipped.
   */
  data: AsyncIterable<Buffer>;
}

const TYPES: Record<string, TarEntryType> = {
  "0": "file",
  "\0": "file",
  "7": "file", // contiguous file: a plain file everywhere that matters
  "1": "hardlink",
  "2": "symlink",
  "3": "char",
  "4": "block",
  "5": "dir",
  "6": "fifo",
};

const BLOCK = 512;
const padded = (size: number) => Math.ceil(size / BLOCK) * BLOCK;
const EMPTY = Buffer.alloc(0);
async function* nothing(): AsyncGenerator<Buffer> {}

/**
 * Long-name and pax records are read whole to apply them to the next member. They are names
 * and a few attributes; a bound keeps a hostile archive from making one the size of a layer.
 */
const MAX_RECORD = 1 << 20;

function cstring(b: Buffer, start: number, len: number): string {
  const field = b.subarray(start, start + len);
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? len : nul).toString("utf8");
}

function number(b: Buffer, start: number, len: number, field: string, what: string): number {
  const f = b.subarray(start, start + len);
  // GNU base-256: large sizes and ids that do not fit the octal field.
  if (f[0]! & 0x80) {
    if (f[0] === 0xff) throw new Error(`${what}: negative ${field} in tar header`);
    let v = f[0]! & 0x7f;
    for (let i = 1; i < len; i++) v = v * 256 + f[i]!;
    if (!Number.isSafeInteger(v)) throw new Error(`${what}: ${field} in tar header is too large`);
    return v;
  }
  const s = f.toString("latin1").replace(/[\0 ]+$/, "").replace(/^ +/, "").replace(/\0.*$/, "");
  if (!/^[0-7]*$/.test(s)) throw new Error(`${what}: ${field} field ${JSON.stringify(s)} in tar header is not octal`);
  return s === "" ? 0 : parseInt(s, 8);
}

function checksumOk(h: Buffer, stored: number): boolean {
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : h[i]!;
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  // Some old tars summed signed chars; both are accepted by GNU tar.
  return stored === unsigned || stored === signed;
}

/** Pax extended header records: "<len> <key>=<value>\n", len counting the whole record in bytes. */
export function parsePax(data: Buffer, what: string): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break; // padding some writers leave
    const sp = data.indexOf(0x20, pos);
    const len = sp < 0 ? NaN : Number(data.subarray(pos, sp).toString("latin1"));
    if (!Number.isInteger(len) || len <= 0 || pos + len > data.length || data[pos + len - 1] !== 0x0a) {
      throw new Error(`${what}: malformed pax record at byte ${pos}`);
    }
    const rec = data.subarray(sp + 1, pos + len - 1).toString("utf8");
    const eq = rec.indexOf("=");
    if (eq <= 0) throw new Error(`${what}: malformed pax record ${JSON.stringify(rec.slice(0, 40))}`);
    out.set(rec.slice(0, eq), rec.slice(eq + 1));
    pos += len;
  }
  return out;
}

/** A header block as first read: enough to find its data and the next header. */
interface Block {
  h: Buffer;
  flag: string;
  /** The name in the header itself, for errors about the block. */
  name: string;
  size: number;
}

/** Long-name, pax and global pax records: data for the decoder, not members. */
const isRecord = (flag: string) => "LKxg".includes(flag);

const truncated = (what: string, b: Block) => new Error(`${what}: tar member ${JSON.stringify(b.name)} is truncated`);
const notTar = (what: string, off: number) => new Error(`${what}: not a tar file, or truncated at byte ${off}`);

/**
 * Decodes header blocks in archive order, carrying long-name and pax records over to the member
 * they describe. Both readers drive it the same way: begin() on each header block, then record()
 * with the data of a record, or member() for anything else.
 */
class HeaderDecoder {
  private longName: string | undefined;
  private longLink: string | undefined;
  private pax = new Map<string, string>();
  constructor(private readonly what: string) {}

  /** The block at byte `off`; undefined for the end-of-archive block. */
  begin(h: Buffer, off: number): Block | undefined {
    const what = this.what;
    if (h.every((b) => b === 0)) return undefined;
    const stored = /^[0-7 \0]{8}$/.test(h.toString("latin1", 148, 156)) ? number(h, 148, 8, "checksum", what) : -1;
    if (!checksumOk(h, stored)) throw new Error(`${what}: bad tar header checksum at byte ${off} (not a tar file, or corrupt)`);
    const flag = String.fromCharCode(h[156]!);
    let name = cstring(h, 0, 100);
    // Only POSIX ustar has a prefix field; in old GNU headers those bytes hold times.
    if (h.subarray(257, 263).toString("latin1") === "ustar\0") {
      const prefix = cstring(h, 345, 155);
      if (prefix) name = `${prefix}/${name}`;
    }
    // A pending pax size describes the next real member, not a long-name or pax header.
    const paxSize = isRecord(flag) ? undefined : this.pax.get("size");
    const size = paxSize !== undefined ? Number(paxSize) : number(h, 124, 12, "size", what);
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`${what}: bad size for tar member ${JSON.stringify(name)}`);
    const b = { h, flag, name, size };
    if (isRecord(flag) && flag !== "g" && size > MAX_RECORD) throw new Error(`${what}: tar record '${flag}' for ${JSON.stringify(name)} is ${size} bytes, over the ${MAX_RECORD} allowed`);
    return b;
  }

  /** Takes a record's data; a global pax record ("g") needs none: nothing in it changes how we lay files out. */
  record(b: Block, data: Buffer): void {
    if (b.flag === "L") this.longName = cstring(data, 0, b.size);
    else if (b.flag === "K") this.longLink = cstring(data, 0, b.size);
    else if (b.flag === "x") this.pax = parsePax(data, this.what);
  }

  /** The member a non-record block describes, with the records before it applied. */
  member(b: Block): TarHeader {
    const { h, flag } = b;
    const { what, pax } = this;
    const type = TYPES[flag];
    if (!type) throw new Error(`${what}: tar member ${JSON.stringify(this.longName ?? pax.get("path") ?? b.name)} has unsupported type '${flag}'`);
    const num = (key: string, start: number, len: number, field: string) => {
      const v = pax.get(key);
      return v !== undefined ? Math.floor(Number(v)) : number(h, start, len, field, what);
    };
    const header: TarHeader = {
      path: pax.get("path") ?? this.longName ?? b.name,
      type,
      mode: number(h, 100, 8, "mode", what) & 0o7777,
      uid: num("uid", 108, 8, "uid"),
      gid: num("gid", 116, 8, "gid"),
      mtime: num("mtime", 136, 12, "mtime"),
      linkname: type === "symlink" || type === "hardlink" ? (pax.get("linkpath") ?? this.longLink ?? cstring(h, 157, 100)) : "",
      devmajor: number(h, 329, 8, "devmajor", what),
      devminor: number(h, 337, 8, "devminor", what),
    };
    this.longName = this.longLink = undefined;
    this.pax = new Map();
    return header;
  }
}

/** Reads every member header of a tar; member contents stay in `src` until read. */
export function readTar(src: ByteSource, what = "tar"): TarEntry[] {
  const dec = new HeaderDecoder(what);
  const out: TarEntry[] = [];
  let off = 0;
  while (off + BLOCK <= src.size) {
    const b = dec.begin(src.read(off, BLOCK), off);
    if (!b) break;
    const dataStart = off + BLOCK;
    if (dataStart + b.size > src.size) throw truncated(what, b);
    const data = sliceSource(src, dataStart, b.size);
    off = dataStart + padded(b.size);
    if (!isRecord(b.flag)) {
      const header = dec.member(b);
      out.push({ ...header, data: header.type === "file" ? data : sliceSource(src, dataStart, 0) });
    } else dec.record(b, b.flag === "g" ? EMPTY : readAll(data));
  }
  // A short tail that is not zero padding means a cut-off archive or not a tar at all.
  if (off < src.size && off + BLOCK > src.size && !src.read(off, src.size - off).every((b) => b === 0)) throw notTar(what, off);
  return out;
}

/** Random-access entries as a stream of entries, for what takes streamed layers. */
export async function* streamEntries(entries: readonly TarEntry[]): AsyncGenerator<TarStreamEntry> {
  for (const e of entries) yield { ...e, data: streamOf(e.data) };
}

/**
 * Reads a chunked stream by byte counts, holding on to nothing but the chunk it is in. Member
 * data is handed on in the pieces the stream brought, never gathered.
 */
class StreamReader {
  /** Bytes consumed so far, for error messages. */
  pos = 0;
  private cur: Buffer = EMPTY;
  private ended = false;
  private readonly it: AsyncIterator<Uint8Array>;
  constructor(src: AsyncIterable<Uint8Array>) {
    this.it = src[Symbol.asyncIterator]();
  }

  /** Up to `max` bytes of what the stream has brought (waiting for a chunk if none); empty only at its end. */
  async some(max: number): Promise<Buffer> {
    while (this.cur.length === 0) {
      const r = this.ended ? undefined : await this.it.next();
      if (!r || r.done) {
        this.ended = true;
        return EMPTY;
      }
      this.cur = Buffer.from(r.value.buffer, r.value.byteOffset, r.value.byteLength);
    }
    const c = this.cur.subarray(0, max);
    this.cur = this.cur.subarray(c.length);
    this.pos += c.length;
    return c;
  }

  /** Exactly `n` bytes in one buffer, or fewer at the end: for headers and records only. */
  async read(n: number): Promise<Buffer> {
    const parts: Buffer[] = [];
    let got = 0;
    while (got < n) {
      const c = await this.some(n - got);
      if (!c.length) break;
      parts.push(c);
      got += c.length;
    }
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  /** Skips up to `n` bytes; returns how many there were. */
  async skip(n: number): Promise<number> {
    let done = 0;
    while (done < n) {
      const c = await this.some(n - done);
      if (!c.length) break;
      done += c.length;
    }
    return done;
  }

  async close(): Promise<void> {
    await this.it.return?.();
  }
}

/**
 * Reads a tar front to back. After the end-of-archive block the rest of the stream is read and
 * dropped: whatever checks the stream makes at its end (a digest, the decompressor's own) then
 * always run.
 */
export async function* readTarStream(input: AsyncIterable<Uint8Array>, what = "tar"): AsyncGenerator<TarStreamEntry> {
  const dec = new HeaderDecoder(what);
  const r = new StreamReader(input);
  try {
    for (;;) {
      const off = r.pos;
      const h = await r.read(BLOCK);
      if (h.length < BLOCK) {
        // The end without an end-of-archive block is accepted, as readTar does.
        if (!h.every((b) => b === 0)) throw notTar(what, off);
        return;
      }
      const b = dec.begin(h, off);
      if (!b) break;
      if (!isRecord(b.flag)) {
        const header = dec.member(b);
        let left = b.size;
        const data = async function* (): AsyncGenerator<Buffer> {
          while (left > 0) {
            const c = await r.some(left);
            if (!c.length) throw truncated(what, b);
            left -= c.length; // before the yield: a reader that stops here has had these bytes
            yield c;
          }
        };
        yield { ...header, data: header.type === "file" ? data() : nothing() };
        if ((await r.skip(left)) < left) throw truncated(what, b);
      } else if (b.flag === "g") {
        if ((await r.skip(b.size)) < b.size) throw truncated(what, b);
      } else {
        const data = await r.read(b.size);
        if (data.length < b.size) throw truncated(what, b);
        dec.record(b, data);
      }
      await r.skip(padded(b.size) - b.size); // a cut-off padding after the last member is accepted, as readTar does
    }
    while ((await r.some(Infinity)).length);
  } finally {
    await r.close();
  }
}
