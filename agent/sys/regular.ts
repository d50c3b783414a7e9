// Small files someone less trusted wrote (the host config and the sidecar's key on the pool,
// written by the OS's root): read so that no such file can stall PID 1 or fill its memory.
import { closeSync, fstatSync, readSync } from "node:fs";
import type { openBeneath as OpenBeneath } from "./libc.ts";
import { O } from "./consts.ts";

/** A file that is there but is not read: `why` says what it is instead of a small regular file. */
export class RefusedFile extends Error {
  constructor(readonly why: string) {
    super(why);
    this.name = "RefusedFile";
  }
}

const ELOOP = 40;
const ENOENT = 2;
const ENOTDIR = 20;
const EXDEV = 18;

/** What fstat says a file is, for a refusal line. */
function kindOf(st: import("node:fs").Stats): string {
  if (st.isFIFO()) return "a FIFO";
  if (st.isDirectory()) return "a directory";
  if (st.isSocket()) return "a socket";
  if (st.isCharacterDevice() || st.isBlockDevice()) return "a device node";
  return "not a regular file";
}

/**
 * The bytes of `path` below `root` (see Files.readRegular); null when there is no such file.
 *
 * Opened once, with O_NOFOLLOW and no symlink anywhere on the way (openat2), O_NONBLOCK (a FIFO
 * opens at once instead of waiting for a writer that never comes, and the fstat below refuses
 * it), O_NOCTTY and O_CLOEXEC; then the fd is checked, not the path again: fstat must say a
 * regular file of at most `maxBytes`, and the read stops one byte past the cap in case it grew
 * since. A device node cannot even be opened where the pool is mounted nodev.
 */
export function readRegularBeneath(openBeneath: typeof OpenBeneath, root: string, path: string, maxBytes: number): Uint8Array | null {
  let fd: number;
  try {
    fd = openBeneath(root, path, O.NOFOLLOW | O.NONBLOCK | O.NOCTTY | O.CLOEXEC);
  } catch (e) {
    switch ((e as { errno?: number }).errno) {
      case ENOENT:
        return null;
      case ELOOP:
        throw new RefusedFile("a symlink, or a symlink on its path (links there are not followed)");
      case ENOTDIR:
        throw new RefusedFile("something on its path is not a directory");
      case EXDEV:
        throw new RefusedFile("its path leaves the directory it must be in");
      default:
        throw e;
    }
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new RefusedFile(`${kindOf(st)}, not a regular file`);
    if (st.size > maxBytes) throw new RefusedFile(`${st.size} bytes, more than the ${maxBytes} allowed`);
    const buf = Buffer.alloc(maxBytes + 1);
    let got = 0;
    for (;;) {
      const n = readSync(fd, buf, got, buf.length - got, got);
      if (n === 0) break;
      got += n;
      if (got > maxBytes) throw new RefusedFile(`more than the ${maxBytes} bytes allowed (it grew while read)`);
    }
    return buf.subarray(0, got);
  } finally {
    closeSync(fd);
  }
}
