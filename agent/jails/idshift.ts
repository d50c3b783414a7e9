// A container jail's rootfs is owned by its id range: uid/gid N of the image becomes
// idBase + N on the disk, so that the jail's root (uid 0 inside, idBase outside) owns its
// files, and no file of it is owned by a host user. Done once per start, on the fresh
// snapshot (the image subvolume keeps its own owners).
import type { Files } from "../sys/index.ts";
import { ID_RANGE } from "./spec.ts";

/** "nobody" inside: where ids beyond the range go (they would not map, the jail would see 65534 anyway). */
const OVERFLOW_ID = 65534;

export interface ShiftResult {
  /** Inodes whose owner was changed. */
  inodes: number;
  /** Owners (uids and gids) ≥ 65536 in the image, given "nobody". */
  overflow: number;
}

/**
 * Shifts every inode below `root` (and root itself) by `base`. Never follows a symlink (lchown)
 * and never crosses into another filesystem (a different st_dev: a mount, or a nested
 * subvolume, which is not part of this snapshot). chown clears setuid/setgid on files, so the
 * mode is put back where it had them: the jail's su and passwd must stay setuid (to its root).
 */
export function shiftOwners(sys: Pick<Files, "lstat" | "readdir" | "lchown" | "chmod">, root: string, base: number): ShiftResult {
  const top = sys.lstat(root);
  if (top.kind !== "dir") throw new Error(`${root}: not a directory`);
  const result: ShiftResult = { inodes: 0, overflow: 0 };
  // A hard-linked file is met once per name: shifted twice it would land beyond the range
  // (Debian's gzip/gunzip, perl/perl5.36.0 did, measured). Same filesystem, so st_ino is enough.
  const linked = new Set<number>();
  const shift = (id: number) => {
    if (id >= 0 && id < ID_RANGE) return base + id;
    result.overflow++;
    return base + OVERFLOW_ID;
  };
  // An explicit stack: image trees can be deeper than a recursion should go.
  const todo = [root];
  for (let dir = todo.pop(); dir !== undefined; dir = todo.pop()) {
    const st = sys.lstat(dir);
    shiftOne(sys, dir, st, shift);
    result.inodes++;
    for (const name of sys.readdir(dir)) {
      const p = `${dir}/${name}`;
      const c = sys.lstat(p);
      if (c.kind === "missing" || c.dev !== top.dev) continue;
      if (c.kind === "dir") {
        todo.push(p);
        continue;
      }
      if (c.nlink > 1) {
        if (linked.has(c.ino)) continue;
        linked.add(c.ino);
      }
      shiftOne(sys, p, c, shift);
      result.inodes++;
    }
  }
  return result;
}

function shiftOne(sys: Pick<Files, "lchown" | "chmod">, path: string, st: { kind: string; mode: number; uid: number; gid: number }, shift: (id: number) => number): void {
  sys.lchown(path, shift(st.uid), shift(st.gid));
  if (st.kind !== "link" && st.mode & 0o6000) sys.chmod(path, st.mode);
}
