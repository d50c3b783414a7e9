// Applying a layer (or a root filesystem archive) to a tree: whiteouts, opaque directories,
// replacement of one node type by another, hard links, and every path resolved inside the tree
// the way the image itself would see it, so a hostile archive cannot write outside it.
import { type FileSink, IMPLIED_DIR, type Meta, type Tree } from "./fstree.ts";
import type { TarHeader, TarStreamEntry } from "./tar.ts";

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

const join = (dir: string, name: string) => (dir ? `${dir}/${name}` : name);
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

/** Opens a new pass over a layer's members, from its first one. */
export type LayerReader = () => AsyncIterable<TarStreamEntry>;

/** A member that changes the layers below instead of adding itself; `entry` names it in errors. */
type Marker = { kind: "whiteout"; dir: string[]; name: string; entry: string } | { kind: "opaque"; dir: string[]; entry: string } | { kind: "aufs" };

function markerOf(parts: readonly string[], entry: string, opts: ApplyOptions): Marker | undefined {
  const base = parts[parts.length - 1];
  if (!opts.whiteouts || base === undefined || !base.startsWith(WHITEOUT)) return undefined;
  const dir = parts.slice(0, -1);
  if (base === OPAQUE) return { kind: "opaque", dir, entry };
  if (base.startsWith(`${WHITEOUT}${WHITEOUT}`)) return { kind: "aufs" }; // aufs bookkeeping (.wh..wh.plnk etc.)
  const name = base.slice(WHITEOUT.length);
  if (name === "") throw new Error(`${opts.what}: whiteout ${JSON.stringify(entry)} names no file`);
  if (name === "." || name === "..") throw new Error(`${opts.what}: refusing whiteout ${JSON.stringify(entry)}`);
  return { kind: "whiteout", dir, name, entry };
}

/**
 * Applies one layer. Whiteouts and opaque markers describe the layers below, so all deletions
 * happen before any of this layer's own entries are added, wherever they appear in the tar.
 *
 * A streamed layer cannot be held back until its end, so it is read twice: the first pass reads
 * headers only (file data goes by unread) to collect the deletions and check every name before
 * the tree changes; the second adds the entries as their data streams past. Whatever the stream
 * checks at its end (a layer's digest) has therefore passed once before the tree changes.
 */
export async function applyLayer(tree: Tree, read: LayerReader, opts: ApplyOptions): Promise<void> {
  const markers: Marker[] = [];
  for await (const e of read()) {
    const m = markerOf(entryParts(e.path, opts.what), e.path, opts);
    if (m) markers.push(m);
  }
  for (const m of markers) {
    if (m.kind !== "whiteout") continue;
    const dir = resolveDir(tree, m.dir, false, m.entry, opts.what);
    if (dir !== undefined && tree.kind(join(dir, m.name)) !== undefined) tree.remove(join(dir, m.name));
  }
  for (const m of markers) {
    if (m.kind !== "opaque") continue;
    const dir = resolveDir(tree, m.dir, false, m.entry, opts.what);
    if (dir !== undefined) for (const child of tree.list(dir)) tree.remove(join(dir, child));
  }
  for await (const e of read()) {
    const parts = entryParts(e.path, opts.what);
    if (!markerOf(parts, e.path, opts)) await addEntry(tree, parts, e, opts.what);
  }
}

/** Adds one member, replacing what was at its name. */
async function addEntry(tree: Tree, parts: readonly string[], e: TarStreamEntry, what: string): Promise<void> {
  const meta: Meta = { mode: e.mode, uid: e.uid, gid: e.gid, mtime: e.mtime };
  if (parts.length === 0) {
    if (e.type !== "dir") throw new Error(`${what}: the root entry ${JSON.stringify(e.path)} is a ${e.type}, not a directory`);
    tree.setMeta("", meta);
    return;
  }
  const dir = resolveDir(tree, parts.slice(0, -1), true, e.path, what)!;
  const p = join(dir, parts[parts.length - 1]!);
  const existing = tree.kind(p);
  if (e.type === "dir" && existing === "dir") return tree.setMeta(p, meta);
  if (e.type === "hardlink") {
    const src = linkSource(tree, e, what);
    if (src === p) return;
    if (existing !== undefined) tree.remove(p);
    return tree.link(p, src);
  }
  // Replace, never write through: the old node may be a symlink or another name of a hardlink.
  if (existing !== undefined) tree.remove(p);
  switch (e.type) {
    case "dir":
      return tree.mkdir(p, meta);
    case "file":
      return fill(tree.createFile(p, meta), e.data);
    case "symlink":
      return tree.symlink(p, e.linkname, meta);
    case "char":
    case "block":
    case "fifo":
      return tree.mknod(p, e.type, e.devmajor, e.devminor, meta);
  }
}

async function fill(sink: FileSink, data: AsyncIterable<Buffer>): Promise<void> {
  try {
    for await (const c of data) sink.write(c);
  } catch (e) {
    sink.abort();
    throw e;
  }
  sink.close();
}

/** The node a hardlink entry names: inside the tree, existing, not a directory. */
function linkSource(tree: Tree, e: TarHeader, what: string): string {
  const parts = entryParts(e.linkname, `${what}: hardlink ${JSON.stringify(e.path)}`);
  if (!parts.length) throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at the root`);
  const dir = resolveDir(tree, parts.slice(0, -1), false, e.path, what);
  const src = dir === undefined ? undefined : join(dir, parts[parts.length - 1]!);
  const k = src === undefined ? undefined : tree.kind(src);
  if (src === undefined || k === undefined) throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at ${JSON.stringify(e.linkname)}, which does not exist`);
  if (k === "dir") throw new Error(`${what}: hardlink ${JSON.stringify(e.path)} points at directory ${JSON.stringify(e.linkname)}`);
  return src;
}
