// A newc ("070701") cpio writer, the format the kernel unpacks into the initramfs. Output is
// deterministic: entries sorted by path, inode numbers assigned in order, one fixed mtime.
import { closeSync, openSync, readFileSync, writeSync } from "node:fs";

export type CpioEntry =
  | { path: string; type: "dir"; mode: number }
  | { path: string; type: "file"; mode: number; data: Uint8Array | (() => Uint8Array) }
  | { path: string; type: "symlink"; target: string }
  | { path: string; type: "char" | "block"; mode: number; major: number; minor: number };

const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;
const S_IFBLK = 0o060000;

const hex8 = (n: number) => (n >>> 0).toString(16).padStart(8, "0");
const pad4 = (n: number) => (4 - (n % 4)) % 4;

function header(ino: number, mode: number, nlink: number, mtime: number, size: number, rmaj: number, rmin: number, name: string): Buffer {
  const nameBytes = Buffer.from(name + "\0", "utf8");
  const fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rmaj, rmin, nameBytes.length, 0];
  const h = Buffer.from("070701" + fields.map(hex8).join(""), "latin1");
  return Buffer.concat([h, nameBytes, Buffer.alloc(pad4(h.length + nameBytes.length))]);
}

/** Adds the parent directories every entry needs, so the archive unpacks on its own. */
export function withParents(entries: readonly CpioEntry[]): CpioEntry[] {
  const byPath = new Map(entries.map((e) => [normalize(e.path), e]));
  for (const e of entries) {
    const parts = normalize(e.path).split("/");
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join("/");
      if (!byPath.has(dir)) byPath.set(dir, { path: dir, type: "dir", mode: 0o755 });
    }
  }
  return [...byPath.values()];
}

function normalize(p: string): string {
  return p.replace(/^\/+/, "").replace(/\/+$/, "");
}

/** Writes the archive to `out`; returns its size in bytes. */
export function writeCpio(out: string, entries: readonly CpioEntry[], mtime: number): number {
  const sorted = withParents(entries).sort((a, b) => (normalize(a.path) < normalize(b.path) ? -1 : 1));
  const fd = openSync(out, "w");
  let size = 0;
  const put = (b: Uint8Array) => {
    writeSync(fd, b);
    size += b.length;
  };
  try {
    let ino = 1;
    for (const e of sorted) {
      const name = normalize(e.path);
      if (!name) continue;
      switch (e.type) {
        case "dir":
          put(header(ino++, S_IFDIR | e.mode, 2, mtime, 0, 0, 0, name));
          break;
        case "file": {
          const data = typeof e.data === "function" ? e.data() : e.data;
          put(header(ino++, S_IFREG | e.mode, 1, mtime, data.length, 0, 0, name));
          put(data);
          put(Buffer.alloc(pad4(data.length)));
          break;
        }
        case "symlink": {
          const t = Buffer.from(e.target, "utf8");
          put(header(ino++, S_IFLNK | 0o777, 1, mtime, t.length, 0, 0, name));
          put(t);
          put(Buffer.alloc(pad4(t.length)));
          break;
        }
        case "char":
        case "block":
          put(header(ino++, (e.type === "char" ? S_IFCHR : S_IFBLK) | e.mode, 1, mtime, 0, e.major, e.minor, name));
          break;
      }
    }
    put(header(0, 0, 1, 0, 0, 0, 0, "TRAILER!!!"));
    // The kernel reads the archive in 512-byte blocks; pad like GNU cpio does.
    put(Buffer.alloc((512 - (size % 512)) % 512));
  } finally {
    closeSync(fd);
  }
  return size;
}

/** A file entry whose content is read only when written (keeps memory flat for 100 MB files). */
export function fileFrom(path: string, source: string, mode: number): CpioEntry {
  return { path, type: "file", mode, data: () => readFileSync(source) };
}
