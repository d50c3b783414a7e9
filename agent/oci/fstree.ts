// The trees layers are applied to. Layering decisions (layer.ts) are made against the small
// `Tree` interface: `MemTree` lets tests check them without touching the disk, `DirTree` writes
// them to a directory: as an ordinary user for the build's VM images, as root (owners kept) for
// the agent's jail images.
import { execFileSync } from "node:child_process";
import {
  chmodSync,
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
  rmSync,
  symlinkSync,
  utimesSync,
} from "node:fs";
import { writeFully } from "./bytes.ts";

export type NodeKind = "file" | "dir" | "symlink" | "other";

export interface Meta {
  mode: number;
  uid: number;
  gid: number;
  mtime: number;
}

/** What a directory gets when an entry needs it and no entry describes it. */
export const IMPLIED_DIR: Meta = { mode: 0o755, uid: 0, gid: 0, mtime: 0 };

/**
 * A new regular file being written: its bytes in order, then close() to give it its metadata.
 * After an error, abort() only lets go of it: the partial file stays, and the tree with it is
 * thrown away by whoever was building it.
 */
export interface FileSink {
  write(chunk: Uint8Array): void;
  close(): void;
  abort(): void;
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
  /** Creates a regular file where there is nothing; its contents are written through the sink. */
  createFile(path: string, meta: Meta): FileSink;
  symlink(path: string, target: string, meta: Meta): void;
  link(path: string, existing: string): void;
  mknod(path: string, type: "char" | "block" | "fifo", major: number, minor: number, meta: Meta): void;
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
  createFile(path: string, meta: Meta): FileSink {
    const node = { kind: "file" as const, meta, data: Buffer.alloc(0) };
    this.nodes.set(path, node);
    const parts: Buffer[] = [];
    return {
      write: (c) => parts.push(Buffer.from(c)), // a copy: the stream may reuse its chunk
      close: () => (node.data = Buffer.concat(parts)),
      abort: () => {},
    };
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
 * every file belongs to the builder): files are chowned before their chmod, since chown clears
 * set-id bits. Device nodes need root, and are made only when `devices` (default: as root);
 * the others are listed in `skipped`. The agent's image store passes devices: false (a node in
 * an unprivileged jail's image is of no use to it) and its own mkfifo (the initrd has no mknod).
 */
export class DirTree implements Tree {
  readonly skipped: string[] = [];
  /**
   * Bytes of the regular files in the tree, kept as they are written: the image's size without
   * a walk over it afterwards. What a later layer deletes or replaces is taken off (a walk of
   * just that subtree); a hard-linked file's data goes only with its last name.
   */
  fileBytes = 0;
  private readonly dirMeta = new Map<string, Meta>();
  private readonly owners: boolean;
  private readonly devices: boolean;
  private readonly mkfifo: (path: string, mode: number) => void;
  constructor(
    readonly root: string,
    opts: { owners?: boolean; devices?: boolean; mkfifo?: (path: string, mode: number) => void } = {},
  ) {
    this.owners = opts.owners ?? process.getuid?.() === 0;
    this.devices = opts.devices ?? this.owners;
    this.mkfifo = opts.mkfifo ?? ((path) => execFileSync("mknod", [path, "p"], { stdio: ["ignore", "ignore", "pipe"] }));
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
    this.fileBytes -= bytesBelow(this.abs(path));
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
  createFile(path: string, meta: Meta): FileSink {
    // "wx": O_EXCL, so a symlink planted at this name can never redirect the write.
    const fd = openSync(this.abs(path), "wx", 0o600);
    return {
      write: (c) => {
        writeFully(fd, c);
        this.fileBytes += c.length;
      },
      close: () => {
        try {
          // chown before chmod: chown clears set-id bits.
          if (this.owners) fchownSync(fd, meta.uid, meta.gid);
          fchmodSync(fd, meta.mode & 0o7777);
          futimesSync(fd, meta.mtime, meta.mtime);
        } finally {
          closeSync(fd);
        }
      },
      abort: () => closeSync(fd),
    };
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
    if (type !== "fifo" && !this.devices) {
      this.skipped.push(`${path} (${type} ${major}:${minor})`);
      return;
    }
    if (type === "fifo") this.mkfifo(this.abs(path), 0o600);
    else execFileSync("mknod", [this.abs(path), type === "char" ? "c" : "b", String(major), String(minor)], { stdio: ["ignore", "ignore", "pipe"] });
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

/** The bytes of the regular files at or below `p` whose data goes with them (one link left). */
function bytesBelow(p: string): number {
  const st = lstatSync(p, { throwIfNoEntry: false });
  if (!st) return 0;
  if (st.isDirectory()) return readdirSync(p).reduce((n, e) => n + bytesBelow(`${p}/${e}`), 0);
  return st.isFile() && st.nlink === 1 ? st.size : 0;
}
