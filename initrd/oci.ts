// Reads OCI image layouts (a directory, or a tar of one) and applies their layers to a tree.
//
// Pure node: APIs, so it runs under Bun (the build) and Node (vitest). The layering decisions
// (whiteouts, opaque directories, type changes, symlink scoping) are made against the small
// `Tree` interface; `MemTree` lets tests check them without touching the disk, `DirTree` writes
// them to a directory as an ordinary user. The tar reader is our own so no dependency decides
// how paths, links and long names are interpreted.
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  fchmodSync,
  fchownSync,
  futimesSync,
  lchownSync,
  linkSync,
  lstatSync,
  lutimesSync,
  mkdirSync,
  openSync,
  readdirSync,
  readlinkSync,
  readSync,
  rmSync,
  chmodSync,
  symlinkSync,
  utimesSync,
  writeSync,
} from "node:fs";
import { execFileSync } from "node:child_process";
import * as zlib from "node:zlib";
import { z } from "zod";

// ---------------------------------------------------------------------------------------------
// Byte sources: layers can be hundreds of MB, so the outer tar and uncompressed layers are read
// by offset from the file instead of being loaded whole.

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

const CHUNK = 4 << 20;

function* chunks(src: ByteSource): Generator<Buffer> {
  for (let off = 0; off < src.size; off += CHUNK) yield src.read(off, Math.min(CHUNK, src.size - off));
}

function readAll(src: ByteSource): Buffer {
  return src.read(0, src.size);
}

// ---------------------------------------------------------------------------------------------
// Tar reader: ustar, GNU long names ('L'/'K') and base-256 numbers, pax ('x') path/linkpath/size.

export type TarEntryType = "file" | "dir" | "symlink" | "hardlink" | "char" | "block" | "fifo";

export interface TarEntry {
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
  data: ByteSource;
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
  for (let i = 0; i < 512; i++) {
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

/** Reads every member header of a tar; member contents stay in `src` until read. */
export function readTar(src: ByteSource, what = "tar"): TarEntry[] {
  const out: TarEntry[] = [];
  let off = 0;
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax = new Map<string, string>();
  while (off + 512 <= src.size) {
    const h = src.read(off, 512);
    if (h.every((b) => b === 0)) break; // end-of-archive marker
    const stored = /^[0-7 \0]{8}$/.test(h.toString("latin1", 148, 156)) ? number(h, 148, 8, "checksum", what) : -1;
    if (!checksumOk(h, stored)) throw new Error(`${what}: bad tar header checksum at byte ${off} (not a tar file, or corrupt)`);
    const flag = String.fromCharCode(h[156]!);
    const magic = h.subarray(257, 263).toString("latin1");
    let name = cstring(h, 0, 100);
    // Only POSIX ustar has a prefix field; in old GNU headers those bytes hold times.
    if (magic === "ustar\0") {
      const prefix = cstring(h, 345, 155);
      if (prefix) name = `${prefix}/${name}`;
    }
    // A pending pax size describes the next real member, not a long-name or pax header.
    const paxSize = "LKxg".includes(flag) ? undefined : pax.get("size");
    const size = paxSize !== undefined ? Number(paxSize) : number(h, 124, 12, "size", what);
    if (!Number.isSafeInteger(size) || size < 0) throw new Error(`${what}: bad size for tar member ${JSON.stringify(name)}`);
    const dataStart = off + 512;
    if (dataStart + size > src.size) throw new Error(`${what}: tar member ${JSON.stringify(name)} is truncated`);
    const data = sliceSource(src, dataStart, size);
    off = dataStart + Math.ceil(size / 512) * 512;

    if (flag === "L") {
      longName = cstring(readAll(data), 0, size);
      continue;
    }
    if (flag === "K") {
      longLink = cstring(readAll(data), 0, size);
      continue;
    }
    if (flag === "x") {
      pax = parsePax(readAll(data), what);
      continue;
    }
    if (flag === "g") continue; // global defaults: nothing in them changes how we lay files out
    const type = TYPES[flag];
    if (!type) throw new Error(`${what}: tar member ${JSON.stringify(longName ?? pax.get("path") ?? name)} has unsupported type '${flag}'`);
    const num = (key: string, start: number, len: number, field: string) => {
      const v = pax.get(key);
      return v !== undefined ? Math.floor(Number(v)) : number(h, start, len, field, what);
    };
    out.push({
      path: pax.get("path") ?? longName ?? name,
      type,
      mode: number(h, 100, 8, "mode", what) & 0o7777,
      uid: num("uid", 108, 8, "uid"),
      gid: num("gid", 116, 8, "gid"),
      mtime: num("mtime", 136, 12, "mtime"),
      linkname: type === "symlink" || type === "hardlink" ? (pax.get("linkpath") ?? longLink ?? cstring(h, 157, 100)) : "",
      devmajor: number(h, 329, 8, "devmajor", what),
      devminor: number(h, 337, 8, "devminor", what),
      data: type === "file" ? data : sliceSource(src, dataStart, 0),
    });
    longName = longLink = undefined;
    pax = new Map();
  }
  // A short tail that is not zero padding means a cut-off archive or not a tar at all.
  if (off < src.size && off + 512 > src.size && !src.read(off, src.size - off).every((b) => b === 0)) {
    throw new Error(`${what}: not a tar file, or truncated at byte ${off}`);
  }
  return out;
}

/**
 * A member name as path components inside the tree ([] is the root). Absolute names and `..`
 * are refused rather than cleaned: an archive that has them was not made for unpacking here.
 */
export function entryParts(name: string, what: string): string[] {
  if (name.startsWith("/")) throw new Error(`${what}: refusing absolute path ${JSON.stringify(name)}`);
  const parts = name.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) throw new Error(`${what}: refusing path ${JSON.stringify(name)} with ".."`);
  return parts;
}

// ---------------------------------------------------------------------------------------------
// Trees and layer application.

export type NodeKind = "file" | "dir" | "symlink" | "other";

export interface Meta {
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
}

/**
 * What layering needs from a filesystem. Paths are "/"-joined components relative to the root
 * ("" is the root) whose parents are real directories: applyLayer resolves symlinks first, so an
 * implementation never follows a link.
 */
export interface Tree {
  kind(path: string): NodeKind | undefined;
  readlink(path: string): string;
  list(dir: string): string[];
  /** Removes a node, recursively for directories. */
  remove(path: string): void;
  mkdir(path: string, meta: Meta): void;
  /** Sets the metadata of an existing directory (a layer re-listing it). */
  setMeta(path: string, meta: Meta): void;
  writeFile(path: string, data: ByteSource, meta: Meta): void;
  symlink(path: string, target: string, meta: Meta): void;
  link(path: string, existing: string): void;
  mknod(path: string, type: "char" | "block" | "fifo", major: number, minor: number, meta: Meta): void;
}

const join = (dir: string, name: string) => (dir ? `${dir}/${name}` : name);
const IMPLIED_DIR: Meta = { mode: 0o755, uid: 0, gid: 0, mtime: 0 };
const MAX_LINK_HOPS = 40; // what the kernel allows in one path walk

/**
 * Resolves directory components the way the image itself would see them: symlinks are followed
 * with absolute targets taken relative to the image root, and a relative target that climbs
 * above the root is an error instead of a write on the build host. Missing directories are
 * created when `create`, else the result is undefined.
 */
function resolveDir(tree: Tree, parts: readonly string[], create: boolean, entry: string, what: string): string | undefined {
  let resolved: string[] = [];
  const queue = [...parts];
  let hops = 0;
  let via = "";
  while (queue.length) {
    const c = queue.shift()!;
    if (c === "" || c === ".") continue;
    if (c === "..") {
      if (!resolved.length) throw new Error(`${what}: entry ${JSON.stringify(entry)} goes through symlink ${JSON.stringify(via)}, which points outside the image`);
      resolved.pop();
      continue;
    }
    const p = join(resolved.join("/"), c);
    const k = tree.kind(p);
    if (k === "symlink") {
      if (++hops > MAX_LINK_HOPS) throw new Error(`${what}: entry ${JSON.stringify(entry)}: too many levels of symlinks at ${JSON.stringify(p)}`);
      const target = tree.readlink(p);
      via = p;
      if (target.startsWith("/")) resolved = [];
      queue.unshift(...target.split("/"));
      continue;
    }
    if (k === undefined) {
      if (!create) return undefined;
      tree.mkdir(p, IMPLIED_DIR);
    } else if (k !== "dir") {
      if (!create) return undefined;
      throw new Error(`${what}: entry ${JSON.stringify(entry)}: ${JSON.stringify(p)} is not a directory`);
    }
    resolved.push(c);
  }
  return resolved.join("/");
}

export const WHITEOUT = ".wh.";
export const OPAQUE = ".wh..wh..opq";

export interface ApplyOptions {
  /** Interpret `.wh.` members (OCI layers); a plain rootfs tarball keeps them as files. */
  whiteouts: boolean;
  /** Names the layer in errors. */
  what: string;
}

/**
 * Applies one layer. Whiteouts and opaque markers describe the layers below, so all deletions
 * happen before any of this layer's own entries are added, wherever they appear in the tar.
 */
export function applyLayer(tree: Tree, entries: readonly TarEntry[], opts: ApplyOptions): void {
  const { what } = opts;
  const deletes: { dir: string[]; name: string; entry: string }[] = [];
  const opaques: { dir: string[]; entry: string }[] = [];
  const adds: { parts: string[]; e: TarEntry }[] = [];
  for (const e of entries) {
    const parts = entryParts(e.path, what);
    const base = parts[parts.length - 1];
    if (opts.whiteouts && base !== undefined && base.startsWith(WHITEOUT)) {
      const dir = parts.slice(0, -1);
      if (base === OPAQUE) opaques.push({ dir, entry: e.path });
      else if (base.startsWith(`${WHITEOUT}${WHITEOUT}`)) continue; // aufs bookkeeping (.wh..wh.plnk etc.)
      else if (base === WHITEOUT) throw new Error(`${what}: whiteout ${JSON.stringify(e.path)} names no file`);
      else deletes.push({ dir, name: base.slice(WHITEOUT.length), entry: e.path });
      continue;
    }
    adds.push({ parts, e });
  }

  for (const d of deletes) {
    if (d.name === "." || d.name === "..") throw new Error(`${what}: refusing whiteout ${JSON.stringify(d.entry)}`);
    const dir = resolveDir(tree, d.dir, false, d.entry, what);
    if (dir === undefined) continue;
    const p = join(dir, d.name);
    if (tree.kind(p) !== undefined) tree.remove(p);
  }
  for (const o of opaques) {
    const dir = resolveDir(tree, o.dir, false, o.entry, what);
    if (dir === undefined) continue;
    for (const child of tree.list(dir)) tree.remove(join(dir, child));
  }

  for (const { parts, e } of adds) {
    const meta: Meta = { mode: e.mode, uid: e.uid, gid: e.gid, mtime: e.mtime };
    if (parts.length === 0) {
      if (e.type !== "dir") throw new Error(`${what}: the root entry ${JSON.stringify(e.path)} is a ${e.type}, not a directory`);
      tree.setMeta("", meta);
      continue;
    }
    const dir = resolveDir(tree, parts.slice(0, -1), true, e.path, what)!;
    const p = join(dir, parts[parts.length - 1]!);
    const existing = tree.kind(p);
    if (e.type === "dir" && existing === "dir") {
      tree.setMeta(p, meta);
      continue;
    }
    if (e.type === "hardlink") {
      const src = linkSource(tree, e, what);
      if (src === p) continue;
      if (existing !== undefined) tree.remove(p);
      tree.link(p, src);
      continue;
    }
    // Replace, never write through: the old node may be a symlink or another name of a hardlink.
    if (existing !== undefined) tree.remove(p);
    switch (e.type) {
      case "dir":
        tree.mkdir(p, meta);
        break;
      case "file":
        tree.writeFile(p, e.data, meta);
        break;
      case "symlink":
        tree.symlink(p, e.linkname, meta);
        break;
      case "char":
      case "block":
      case "fifo":
        tree.mknod(p, e.type, e.devmajor, e.devminor, meta);
        break;
    }
  }
}

/** The node a hardlink entry names: inside the tree, existing, not a directory. */
function linkSource(tree: Tree, e: TarEntry, what: string): string {
  const parts = entryParts(e.linkname, `${what}: hardlink ${JSON.stringify(e.path)}`);
  if (!parts.length) throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at the root`);
  const dir = resolveDir(tree, parts.slice(0, -1), false, e.path, what);
  const src = dir === undefined ? undefined : join(dir, parts[parts.length - 1]!);
  const k = src === undefined ? undefined : tree.kind(src);
  if (src === undefined || k === undefined) throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at ${JSON.stringify(e.linkname)}, which does not exist`);
  if (k === "dir") throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at directory ${JSON.stringify(e.linkname)}`);
  return src;
}

type MemNode =
  | { kind: "dir"; meta: Meta }
  | { kind: "file"; meta: Meta; data: Buffer }
  | { kind: "symlink"; meta: Meta; target: string }
  | { kind: "other"; meta: Meta; dev: string };

/** An in-memory tree: for tests, and for inspecting what a set of layers produces. */
export class MemTree implements Tree {
  readonly nodes = new Map<string, MemNode>([["", { kind: "dir", meta: IMPLIED_DIR }]]);
  kind(path: string): NodeKind | undefined {
    return this.nodes.get(path)?.kind;
  }
  readlink(path: string): string {
    const n = this.nodes.get(path);
    if (n?.kind !== "symlink") throw new Error(`${path} is not a symlink`);
    return n.target;
  }
  list(dir: string): string[] {
    const prefix = dir ? `${dir}/` : "";
    return [...this.nodes.keys()].filter((k) => k && k.startsWith(prefix) && !k.slice(prefix.length).includes("/")).map((k) => k.slice(prefix.length));
  }
  remove(path: string): void {
    for (const k of [...this.nodes.keys()]) if (k === path || k.startsWith(`${path}/`)) this.nodes.delete(k);
  }
  mkdir(path: string, meta: Meta): void {
    this.nodes.set(path, { kind: "dir", meta });
  }
  setMeta(path: string, meta: Meta): void {
    const n = this.nodes.get(path);
    if (n) n.meta = meta;
  }
  writeFile(path: string, data: ByteSource, meta: Meta): void {
    this.nodes.set(path, { kind: "file", meta, data: Buffer.from(readAll(data)) });
  }
  symlink(path: string, target: string, meta: Meta): void {
    this.nodes.set(path, { kind: "symlink", meta, target });
  }
  link(path: string, existing: string): void {
    // Same object: a hardlink shares content and metadata with its source.
    this.nodes.set(path, this.nodes.get(existing)!);
  }
  mknod(path: string, type: "char" | "block" | "fifo", major: number, minor: number, meta: Meta): void {
    this.nodes.set(path, { kind: "other", meta, dev: `${type} ${major}:${minor}` });
  }
  /** Every path, sorted, directories with a trailing "/" and symlinks as "name -> target". */
  listing(): string[] {
    return [...this.nodes.entries()]
      .filter(([k]) => k)
      .map(([k, n]) => (n.kind === "dir" ? `${k}/` : n.kind === "symlink" ? `${k} -> ${n.target}` : k))
      .sort();
  }
  text(path: string): string {
    const n = this.nodes.get(path);
    if (n?.kind !== "file") throw new Error(`${path} is not a file`);
    return n.data.toString("utf8");
  }
}

/**
 * A tree in a real directory, writable without root. Directory modes and times are applied in
 * finish(): a read-only directory must stay writable while later entries land in it, and adding
 * children would bump its mtime anyway. Owners are set only when running as root (otherwise
 * every file belongs to the builder); device nodes need root and are listed in `skipped`.
 */
export class DirTree implements Tree {
  readonly skipped: string[] = [];
  private readonly dirMeta = new Map<string, Meta>();
  private readonly owners: boolean;
  constructor(
    readonly root: string,
    opts: { owners?: boolean } = {},
  ) {
    this.owners = opts.owners ?? process.getuid?.() === 0;
  }
  private abs(path: string): string {
    return path ? `${this.root}/${path}` : this.root;
  }
  kind(path: string): NodeKind | undefined {
    const st = lstatSync(this.abs(path), { throwIfNoEntry: false });
    if (!st) return undefined;
    return st.isDirectory() ? "dir" : st.isFile() ? "file" : st.isSymbolicLink() ? "symlink" : "other";
  }
  readlink(path: string): string {
    return readlinkSync(this.abs(path), "utf8");
  }
  list(dir: string): string[] {
    return readdirSync(this.abs(dir));
  }
  remove(path: string): void {
    rmSync(this.abs(path), { recursive: true, force: true });
    for (const k of [...this.dirMeta.keys()]) if (k === path || k.startsWith(`${path}/`)) this.dirMeta.delete(k);
  }
  mkdir(path: string, meta: Meta): void {
    mkdirSync(this.abs(path), 0o700);
    this.setMeta(path, meta);
  }
  setMeta(path: string, meta: Meta): void {
    this.dirMeta.set(path, meta);
    if (this.owners) lchownSync(this.abs(path), meta.uid, meta.gid);
  }
  writeFile(path: string, data: ByteSource, meta: Meta): void {
    // "wx": O_EXCL, so a symlink planted at this name can never redirect the write.
    const fd = openSync(this.abs(path), "wx", 0o600);
    try {
      for (const c of chunks(data)) writeSync(fd, c);
      // chown before chmod: chown clears set-id bits.
      if (this.owners) fchownSync(fd, meta.uid, meta.gid);
      fchmodSync(fd, meta.mode & 0o7777);
      futimesSync(fd, meta.mtime, meta.mtime);
    } finally {
      closeSync(fd);
    }
  }
  symlink(path: string, target: string, meta: Meta): void {
    symlinkSync(target, this.abs(path));
    if (this.owners) lchownSync(this.abs(path), meta.uid, meta.gid);
    lutimesSync(this.abs(path), meta.mtime, meta.mtime);
  }
  link(path: string, existing: string): void {
    linkSync(this.abs(existing), this.abs(path));
  }
  mknod(path: string, type: "char" | "block" | "fifo", major: number, minor: number, meta: Meta): void {
    if (type !== "fifo" && !this.owners) {
      this.skipped.push(`${path} (${type} ${major}:${minor})`);
      return;
    }
    const args = type === "fifo" ? ["p"] : [type === "char" ? "c" : "b", String(major), String(minor)];
    execFileSync("mknod", [this.abs(path), ...args], { stdio: ["ignore", "ignore", "pipe"] });
    if (this.owners) lchownSync(this.abs(path), meta.uid, meta.gid);
    chmodSync(this.abs(path), meta.mode & 0o7777);
    utimesSync(this.abs(path), meta.mtime, meta.mtime);
  }
  /** Applies directory modes and times, deepest first so a parent's time is set last. */
  finish(): void {
    const dirs = [...this.dirMeta.entries()].sort(([a], [b]) => b.split("/").length - a.split("/").length);
    for (const [p, meta] of dirs) {
      if (!existsSync(this.abs(p))) continue;
      chmodSync(this.abs(p), meta.mode & 0o7777);
      utimesSync(this.abs(p), meta.mtime, meta.mtime);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// OCI image layout.

export const MEDIA = {
  ociIndex: "application/vnd.oci.image.index.v1+json",
  dockerList: "application/vnd.docker.distribution.manifest.list.v2+json",
  ociManifest: "application/vnd.oci.image.manifest.v1+json",
  dockerManifest: "application/vnd.docker.distribution.manifest.v2+json",
  ociConfig: "application/vnd.oci.image.config.v1+json",
  layerTar: "application/vnd.oci.image.layer.v1.tar",
  layerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  layerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
} as const;

const isIndex = (t: string | undefined) => t === MEDIA.ociIndex || t === MEDIA.dockerList;
const isManifest = (t: string | undefined) => t === MEDIA.ociManifest || t === MEDIA.dockerManifest;

const PlatformSchema = z.object({ architecture: z.string(), os: z.string(), variant: z.string().optional() });
export type Platform = z.infer<typeof PlatformSchema>;

const DescriptorSchema = z.object({
  mediaType: z.string(),
  digest: z.string().regex(/^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$/, "not a sha256/sha512 digest"),
  size: z.number().int().nonnegative(),
  platform: PlatformSchema.optional(),
  annotations: z.record(z.string(), z.string()).optional(),
});
export type Descriptor = z.infer<typeof DescriptorSchema>;

const IndexSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  manifests: z.array(DescriptorSchema),
});
export type ImageIndex = z.infer<typeof IndexSchema>;

const ManifestSchema = z.object({
  schemaVersion: z.literal(2),
  mediaType: z.string().optional(),
  config: DescriptorSchema,
  layers: z.array(DescriptorSchema),
});
export type ImageManifest = z.infer<typeof ManifestSchema>;

const strings = z.array(z.string()).nullish();
const ConfigSchema = z.object({
  architecture: z.string(),
  os: z.string(),
  config: z
    .object({ Entrypoint: strings, Cmd: strings, Env: strings, WorkingDir: z.string().nullish(), User: z.string().nullish() })
    .nullish(),
});

/** What the image says to run, with the spec's defaults filled in. */
export interface ImageConfig {
  os: string;
  architecture: string;
  entrypoint: string[];
  cmd: string[];
  env: string[];
  /** "" means the root. */
  workingDir: string;
  user: string;
}

/** The command line the image runs when no arguments are given: Entrypoint followed by Cmd. */
export const imageArgv = (c: ImageConfig): string[] => [...c.entrypoint, ...c.cmd];

export const DEFAULT_PLATFORM: Platform = { os: "linux", architecture: "amd64" };

function parseJson<T>(schema: z.ZodType<T>, buf: Buffer, what: string): T {
  let json: unknown;
  try {
    json = JSON.parse(buf.toString("utf8"));
  } catch (e) {
    throw new Error(`${what} is not JSON (${(e as Error).message})`);
  }
  const r = schema.safeParse(json);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  throw new Error(`${what}: ${issue.path.length ? issue.path.join(".") : "(top level)"}: ${issue.message}`);
}

const platformName = (p: Platform | undefined) => (p ? `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}` : "no platform");

/**
 * Picks the manifest to use from an index: the only one, or the only one for `want` when there
 * are several. Entries that are neither manifests nor indexes (signatures, artifacts) and
 * entries for other platforms (buildx attestations are "unknown/unknown") do not count.
 */
export function selectManifest(index: ImageIndex, want: Platform, what: string): Descriptor {
  const usable = index.manifests.filter((d) => isManifest(d.mediaType) || isIndex(d.mediaType));
  const matches = (d: Descriptor) => d.platform?.os === want.os && d.platform.architecture === want.architecture;
  if (usable.length === 0) throw new Error(`${what} lists no image manifests`);
  if (usable.length === 1) {
    const only = usable[0]!;
    if (only.platform && !matches(only)) throw new Error(`${what} has only a ${platformName(only.platform)} image, not ${platformName(want)}`);
    return only;
  }
  const found = usable.filter(matches);
  if (found.length === 1) return found[0]!;
  const listed = usable.map((d) => `${d.digest.slice(0, 19)} (${platformName(d.platform)})`).join(", ");
  if (found.length > 1) throw new Error(`${what} lists ${found.length} manifests for ${platformName(want)}, cannot choose: ${listed}`);
  throw new Error(`${what} lists ${usable.length} manifests and none is for ${platformName(want)}: ${listed}`);
}

/** Files of an image layout by relative path ("index.json", "blobs/sha256/<hex>"). */
export interface Layout {
  readonly what: string;
  file(path: string): ByteSource | undefined;
}

/** A layout from the members of a tar of it (as `readTar` returned them). */
export function layoutFromTar(entries: readonly TarEntry[], what: string): Layout {
  const files = new Map<string, ByteSource>();
  for (const e of entries) {
    const name = e.path.split("/").filter((p) => p && p !== ".").join("/");
    if (e.type === "file") files.set(name, e.data);
    else if (e.type === "hardlink") {
      const src = files.get(e.linkname.split("/").filter((p) => p && p !== ".").join("/"));
      if (src) files.set(name, src);
    }
  }
  return { what, file: (p) => files.get(p) };
}

/** A layout directory; close() releases the blobs it opened. */
export function openLayoutDir(dir: string): Layout & { close(): void } {
  const open: FileSource[] = [];
  return {
    what: dir,
    file: (p) => {
      const f = `${dir}/${p}`;
      if (!lstatSync(f, { throwIfNoEntry: false })?.isFile()) return undefined;
      const s = new FileSource(f);
      open.push(s);
      return s;
    },
    close: () => open.forEach((s) => s.close()),
  };
}

/** True when tar members look like an OCI image layout rather than a root filesystem. */
export function isOciLayoutTar(entries: readonly TarEntry[]): boolean {
  return entries.some((e) => {
    const name = e.path.replace(/^(\.\/)+/, "");
    return e.type === "file" && (name === "oci-layout" || name === "index.json");
  });
}

/** A blob checked against its descriptor's size and digest. */
export function readBlob(layout: Layout, d: Descriptor): ByteSource {
  const [alg, hex] = d.digest.split(":") as [string, string];
  const src = layout.file(`blobs/${alg}/${hex}`);
  if (!src) throw new Error(`${layout.what}: blob ${d.digest} is missing`);
  if (src.size !== d.size) throw new Error(`${layout.what}: blob ${d.digest} is ${src.size} bytes, its descriptor says ${d.size}`);
  const h = createHash(alg);
  for (const c of chunks(src)) h.update(c);
  const got = `${alg}:${h.digest("hex")}`;
  if (got !== d.digest) throw new Error(`${layout.what}: blob ${d.digest} does not match its digest (content is ${got})`);
  return src;
}

export interface OciImage {
  manifest: Descriptor;
  layers: Descriptor[];
  config: ImageConfig;
}

/** index.json → (nested indexes) → the platform's manifest → its config, all verified. */
export function resolveImage(layout: Layout, want: Platform = DEFAULT_PLATFORM): OciImage {
  const marker = layout.file("oci-layout");
  if (marker) {
    const v = parseJson(z.object({ imageLayoutVersion: z.string() }), readAll(marker), `${layout.what}: oci-layout`);
    if (!v.imageLayoutVersion.startsWith("1.")) throw new Error(`${layout.what}: unsupported imageLayoutVersion ${v.imageLayoutVersion}`);
  }
  const indexFile = layout.file("index.json");
  if (!indexFile) throw new Error(`${layout.what}: not an OCI image layout (no index.json)`);
  let what = `${layout.what}: index.json`;
  let d = selectManifest(parseJson(IndexSchema, readAll(indexFile), what), want, what);
  for (let depth = 0; isIndex(d.mediaType); depth++) {
    if (depth >= 8) throw new Error(`${layout.what}: image indexes nested more than 8 deep at ${d.digest}`);
    what = `${layout.what}: index ${d.digest}`;
    d = selectManifest(parseJson(IndexSchema, readAll(readBlob(layout, d)), what), want, what);
  }
  if (!isManifest(d.mediaType)) throw new Error(`${layout.what}: ${d.digest} has media type ${d.mediaType}, not an image manifest`);
  const manifest = parseJson(ManifestSchema, readAll(readBlob(layout, d)), `${layout.what}: manifest ${d.digest}`);
  const cfgWhat = `${layout.what}: config ${manifest.config.digest}`;
  const cfg = parseJson(ConfigSchema, readAll(readBlob(layout, manifest.config)), cfgWhat);
  if (cfg.os !== want.os || cfg.architecture !== want.architecture) {
    throw new Error(`${cfgWhat}: the image is for ${cfg.os}/${cfg.architecture}, not ${platformName(want)}`);
  }
  const c = cfg.config ?? {};
  return {
    manifest: d,
    layers: manifest.layers,
    config: {
      os: cfg.os,
      architecture: cfg.architecture,
      entrypoint: c.Entrypoint ?? [],
      cmd: c.Cmd ?? [],
      env: c.Env ?? [],
      workingDir: c.WorkingDir ?? "",
      user: c.User ?? "",
    },
  };
}

export type Compression = "none" | "gzip" | "zstd";

export function layerCompression(mediaType: string): Compression {
  const oci = /^application\/vnd\.oci\.image\.layer\.(?:nondistributable\.)?v1\.tar(\+gzip|\+zstd)?$/.exec(mediaType);
  if (oci) return oci[1] === "+gzip" ? "gzip" : oci[1] === "+zstd" ? "zstd" : "none";
  if (/^application\/vnd\.docker\.image\.rootfs\.(?:foreign\.)?diff\.tar\.gzip$/.test(mediaType)) return "gzip";
  throw new Error(`unsupported layer media type ${mediaType}`);
}

/** Decompressed contents; uncompressed data stays where it is. */
export function decompress(src: ByteSource, how: Compression, what: string): ByteSource {
  if (how === "none") return src;
  try {
    if (how === "gzip") return bufferSource(zlib.gunzipSync(readAll(src)));
    // zstd is in node:zlib from Node 22.15 and in Bun; older Node has no decoder without a dependency.
    const zstd = (zlib as { zstdDecompressSync?: (b: Buffer) => Buffer }).zstdDecompressSync;
    if (!zstd) throw new Error(`zstd layers are not supported by this runtime (${process.versions.bun ? "Bun" : `Node ${process.version}`}, no zlib.zstdDecompressSync)`);
    return bufferSource(zstd(readAll(src)));
  } catch (e) {
    throw new Error(`${what}: ${(e as Error).message}`);
  }
}

/** The entries of one layer, after checking its digest. */
export function layerEntries(layout: Layout, d: Descriptor, what: string): TarEntry[] {
  const how = (() => {
    try {
      return layerCompression(d.mediaType);
    } catch (e) {
      throw new Error(`${what}: ${(e as Error).message}`);
    }
  })();
  return readTar(decompress(readBlob(layout, d), how, what), what);
}

/** Resolves the image and applies its layers in order to `tree`. */
export function extractImage(layout: Layout, tree: Tree, want: Platform = DEFAULT_PLATFORM): OciImage {
  const image = resolveImage(layout, want);
  image.layers.forEach((d, i) => {
    const what = `${layout.what}: layer ${i + 1} (${d.digest.slice(0, 19)})`;
    applyLayer(tree, layerEntries(layout, d, what), { whiteouts: true, what });
  });
  return image;
}

const GZIP_MAGIC = [0x1f, 0x8b];
const ZSTD_MAGIC = [0x28, 0xb5, 0x2f, 0xfd];

/** A tar file, decompressed when its first bytes say gzip or zstd. Close it when done. */
export function openTarFile(path: string): { src: ByteSource; close(): void } {
  const f = new FileSource(path);
  const head = f.read(0, Math.min(4, f.size));
  const starts = (m: number[]) => m.every((b, i) => head[i] === b);
  if (starts(GZIP_MAGIC) || starts(ZSTD_MAGIC)) {
    try {
      return { src: decompress(f, starts(GZIP_MAGIC) ? "gzip" : "zstd", path), close: () => {} };
    } finally {
      f.close();
    }
  }
  return { src: f, close: () => f.close() };
}
