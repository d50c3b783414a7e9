// The VM disk image: a btrfs filesystem made by mkfs.btrfs --rootdir from a directory, a rootfs
// tarball or an OCI image layout. Staging the tree and mkfs need no privileges; only an
// optional subvolume does, because creating one needs a mounted filesystem.
import { execFileSync } from "node:child_process";
import { chmodSync, closeSync, lstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, statSync, ftruncateSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { openTarFile } from "../agent/oci/decompress.ts";
import { DirTree, type Tree } from "../agent/oci/fstree.ts";
import { applyLayer } from "../agent/oci/layer.ts";
import { extractImage, type ImageConfig, isOciLayoutTar, layoutFromTar, openLayoutDir } from "../agent/oci/oci.ts";
import { readTar, streamEntries } from "../agent/oci/tar.ts";

export interface VmImageOptions {
  /** A directory, a rootfs tarball (.tar, .tar.gz, .tar.zst) or a tar of an OCI image layout. */
  from: string;
  out: string;
  /** Image size; by default computed from the tree with room to spare. */
  sizeMiB?: number;
  /** Filesystem label; default "initos-vm". */
  label?: string;
  /** Put the tree in this subvolume instead of the top level (needs root: it mounts the image). */
  subvolume?: string;
}

export interface VmImageResult {
  out: string;
  sizeMiB: number;
  source: "dir" | "tar" | "oci" | "oci-dir";
  /** The image's run configuration, for OCI sources. */
  config?: ImageConfig;
  /** Entries that could not be created without root (device nodes). */
  skipped: string[];
  /** Mount points the source lacked and the image got (see addMountPoints); none for a directory. */
  mountPoints: string[];
}

/**
 * The API filesystems' mount points, with the modes a distribution gives them (Debian's
 * base-files), and /tmp. Container images usually have none of them, since container runtimes
 * make them; a VM's root needs them for the agent's /dev /proc /sys /run to move onto (vm mode
 * can make them itself only in a writable root), and nothing mounts a /tmp in a VM.
 */
const MOUNT_POINTS = [
  ["dev", 0o755],
  ["proc", 0o555],
  ["sys", 0o555],
  ["run", 0o755],
  ["tmp", 0o1777],
] as const;

/** Adds the mount points `tree` lacks; what it has (a directory, a symlink tmp -> var/tmp) is its choice and stays. */
export function addMountPoints(tree: Tree): string[] {
  const added: string[] = [];
  for (const [name, mode] of MOUNT_POINTS) {
    if (tree.kind(name) !== undefined) continue;
    tree.mkdir(name, { mode, uid: 0, gid: 0, mtime: 0 });
    added.push(name);
  }
  return added;
}

const MiB = 2 ** 20;
/**
 * mkfs.btrfs 6.2 with default options (DUP metadata, 16 KiB nodes) refuses devices under
 * 114294784 bytes = 109 MiB ("minimum size for each btrfs device"); measured on this Debian.
 */
export const MIN_BTRFS_MIB = 109;

/** Bytes the tree will take: data in 4 KiB blocks, hardlinked files once, plus one block per inode for metadata. */
export function treeBytes(dir: string): { bytes: number; inodes: number } {
  const seen = new Set<number>();
  let bytes = 0;
  let inodes = 0;
  const walk = (d: string) => {
    for (const name of readdirSync(d)) {
      const st = lstatSync(`${d}/${name}`);
      if (st.nlink > 1 && !st.isDirectory()) {
        if (seen.has(st.ino)) continue;
        seen.add(st.ino);
      }
      inodes++;
      bytes += Math.ceil(st.size / 4096) * 4096 + 4096;
      if (st.isDirectory()) walk(`${d}/${name}`);
    }
  };
  walk(dir);
  return { bytes, inodes };
}

/**
 * Half again the tree (btrfs keeps metadata twice, and mkfs wants slack to place chunks) plus
 * 96 MiB of free space for the VM to write to, and never under what mkfs accepts.
 */
export function imageSizeMiB(treeSize: number): number {
  return Math.max(MIN_BTRFS_MIB, Math.ceil((treeSize * 1.5) / MiB) + 96);
}

function run(cmd: string, args: string[]): void {
  try {
    execFileSync(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    const detail = err.stderr?.toString().trim().split("\n").filter((l) => l && !/^\s|^NOTE:/.test(l)).pop() ?? err.message;
    throw new Error(`${cmd} failed: ${detail}`);
  }
}

type Staged = Pick<VmImageResult, "source" | "config" | "skipped" | "mountPoints">;

/** Stages `from` into `stage` (a new empty directory), decompressing an archive into `spool`; returns how it was read. */
async function stage(from: string, stageDir: string, spool: string): Promise<Staged> {
  const tree = new DirTree(stageDir);
  // mkdtemp made it 0700; the image root is world-readable unless the source says otherwise.
  tree.setMeta("", { mode: 0o755, uid: 0, gid: 0, mtime: 0 });
  let result: Pick<VmImageResult, "source" | "config">;
  if (statSync(from).isDirectory()) {
    const layout = openLayoutDir(from);
    try {
      result = { source: "oci-dir", config: (await extractImage(layout, tree)).config };
    } finally {
      layout.close();
    }
  } else {
    const tar = await openTarFile(from, spool);
    try {
      const entries = readTar(tar, from);
      if (!entries.length) throw new Error(`${from}: the archive is empty`);
      if (isOciLayoutTar(entries)) {
        result = { source: "oci", config: (await extractImage(layoutFromTar(entries, from), tree)).config };
      } else {
        // A root filesystem archive is one complete tree: ".wh." names in it are ordinary files.
        await applyLayer(tree, () => streamEntries(entries), { whiteouts: false, what: from });
        result = { source: "tar" };
      }
    } finally {
      tar.close();
      rmSync(spool, { force: true }); // a decompressed copy, as big as the tree: not kept through mkfs
    }
  }
  // An image or a rootfs archive is a root by nature; a plain directory (below) may be a data
  // disk, and is used as it is.
  const mountPoints = addMountPoints(tree);
  tree.finish();
  return { ...result, skipped: tree.skipped, mountPoints };
}

const isOciLayoutDir = (dir: string) => lstatSync(`${dir}/index.json`, { throwIfNoEntry: false })?.isFile() === true && lstatSync(`${dir}/blobs`, { throwIfNoEntry: false })?.isDirectory() === true;

/** Builds the btrfs image `out` from `from`. */
export async function buildVmImage(o: VmImageOptions): Promise<VmImageResult> {
  const label = o.label ?? "initos-vm";
  if (label.length > 255) throw new Error(`label ${JSON.stringify(label.slice(0, 20))}… is longer than btrfs allows (255 bytes)`);
  const sub = o.subvolume;
  if (sub !== undefined && (!/^[A-Za-z0-9@._+-]+$/.test(sub) || sub === "." || sub === "..")) {
    throw new Error(`subvolume ${JSON.stringify(o.subvolume)} must be a single name of letters, digits, "@._+-"`);
  }
  if (o.sizeMiB !== undefined && (!Number.isInteger(o.sizeMiB) || o.sizeMiB < MIN_BTRFS_MIB)) {
    throw new Error(`sizeMiB ${o.sizeMiB} is below the btrfs minimum of ${MIN_BTRFS_MIB} MiB`);
  }
  const st = statSync(o.from, { throwIfNoEntry: false });
  if (!st) throw new Error(`${o.from} does not exist`);
  const out = resolve(o.out);
  const tmp = mkdtempSync(`${dirname(out)}/.vmimage-`);
  try {
    let rootdir: string;
    let staged: Staged;
    if (st.isDirectory() && !isOciLayoutDir(o.from)) {
      // A plain directory is already the tree: mkfs reads it in place.
      rootdir = o.from;
      staged = { source: "dir", skipped: [], mountPoints: [] };
    } else {
      rootdir = `${tmp}/root`;
      mkdirSync(rootdir);
      staged = await stage(o.from, rootdir, `${tmp}/spool.tar`);
    }
    const sizeMiB = o.sizeMiB ?? imageSizeMiB(treeBytes(rootdir).bytes);
    rmSync(out, { force: true });
    const fd = openSync(out, "w");
    try {
      ftruncateSync(fd, sizeMiB * MiB);
    } finally {
      closeSync(fd);
    }
    if (o.subvolume === undefined) {
      run("mkfs.btrfs", ["-q", "-f", "-L", label, "--rootdir", rootdir, out]);
    } else {
      // btrfs-progs 6.2 has no mkfs --subvol: make an empty filesystem, then create the
      // subvolume and copy the tree in on a loop mount in a private mount namespace.
      run("mkfs.btrfs", ["-q", "-f", "-L", label, out]);
      const mnt = `${tmp}/mnt`;
      mkdirSync(mnt);
      chmodSync(mnt, 0o700);
      run("unshare", ["-m", "sh", "-ec", 'mount -o loop "$1" "$2"; trap \'umount "$2"\' EXIT; btrfs -q subvolume create "$2/$4"; cp -a "$3/." "$2/$4/"', "sh", out, mnt, rootdir, o.subvolume]);
    }
    // mkfs.btrfs --rootdir grows a file that is too small for the tree instead of failing.
    const actual = statSync(out).size / MiB;
    if (o.sizeMiB !== undefined && actual > o.sizeMiB) throw new Error(`sizeMiB ${o.sizeMiB} is too small for ${o.from}: mkfs.btrfs needed ${Math.ceil(actual)} MiB`);
    return { out, sizeMiB: Math.ceil(actual), ...staged };
  } catch (e) {
    rmSync(out, { force: true });
    throw e;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}
