// The image store of jail mode, on the pool at /x: an image NAME is the read-only subvolume
// @img-NAME, applied from an OCI archive (`skopeo copy … oci-archive:`, a tar of an OCI image
// layout) uploaded by `image import NAME`, and its metadata /x/initos/images/NAME.json (what the
// image says to run, for the container's spec).
//
// An archive is data from outside: every blob is checked against its digest, every member path
// resolved inside the new subvolume (agent/oci/), and whatever goes wrong costs one line and
// leaves the pool as it was: no spool file, no half-written subvolume, the old image untouched.
import { z } from "zod";
import { describe, zodIssue } from "../errors.ts";
import type { Logger } from "../log.ts";
import { FileSource } from "../oci/bytes.ts";
import { DirTree } from "../oci/fstree.ts";
import { extractImage, layoutFromTar, type OciImage, resolveImage } from "../oci/oci.ts";
import { readTar } from "../oci/tar.ts";
import type { Clock, Files, Processes } from "../sys/index.ts";
import { toolArgv } from "../sys/tools.ts";
import { imageName, imageSubvolume, POOL_MOUNT } from "../jailsconfig.ts";

/** Where the store lives and how btrfs is run; the defaults are the agent's, tests pass others. */
export interface StoreOptions {
  /** The pool's top level (subvolid 5). */
  pool?: string;
  /** The btrfs command: the tools image's by default. */
  btrfs?: readonly string[];
  /** The wall clock, for the import time in the metadata. */
  now?: () => Date;
}

const ImageMetaSchema = z
  .object({
    name: z.string(),
    /** The manifest's digest: what `skopeo inspect` and registries call the image's digest. */
    digest: z.string(),
    layers: z.number().int().nonnegative(),
    /** Bytes of regular files in the image (hard links counted once). */
    size: z.number().int().nonnegative(),
    /** Device nodes in the layers that were not made (an unprivileged jail could not use them). */
    devicesSkipped: z.number().int().nonnegative(),
    /** ISO 8601, UTC. */
    imported: z.string(),
    entrypoint: z.array(z.string()),
    cmd: z.array(z.string()),
    env: z.array(z.string()),
    workingDir: z.string(),
    user: z.string(),
  })
  .strict();
export type ImageMeta = z.output<typeof ImageMetaSchema>;

/** One row of `image list`. digest "?" when the metadata is missing or unreadable. */
export interface ImageRow {
  name: string;
  digest: string;
  size: number;
  imported: string;
}

/** The store's paths for one image. Spool and metadata stay out of any jail's reach: /x/initos is the agent's. */
export function storePaths(name: string, pool = POOL_MOUNT) {
  const dir = `${pool}/initos/images`;
  return {
    dir,
    subvol: `${pool}/${imageSubvolume(name)}`,
    /** The subvolume being written; "." cannot be in an image name, so no image is called that. */
    fresh: `${pool}/${imageSubvolume(name)}.new`,
    meta: `${dir}/${name}.json`,
    freshMeta: `${dir}/.${name}.json.new`,
    spool: `${dir}/.import-${name}.tar`,
  };
}

function checkName(name: string, verb: string): void {
  const r = imageName.safeParse(name);
  if (!r.success) throw new Error(`image ${verb} ${JSON.stringify(name).slice(0, 40)}: bad name: ${zodIssue(r.error, "name")}`);
}

/** The store's directory on the pool, refusing a symlink there (a jail's share could be the pool's top). */
function storeDir(sys: Files, pool: string): string {
  for (const p of [`${pool}/initos`, `${pool}/initos/images`]) {
    const k = sys.lstat(p).kind;
    if (k === "missing") sys.mkdirp(p, 0o700);
    else if (k !== "dir") throw new Error(`${p} is not a directory (${k})`);
  }
  return `${pool}/initos/images`;
}

/** 26 B, 12.5 KiB, 3.1 MiB, 1.2 GiB. */
export function humanSize(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) [n, i] = [n / 1024, i + 1];
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

/**
 * Imports the OCI archive `body` as image `name`, replacing one of that name atomically.
 * Resolves with a one-line summary; rejects with one line naming the image and what was wrong,
 * after removing everything it made.
 *
 * The archive is spooled to the pool first: its index.json and blobs come in any order, and the
 * reader needs them by offset (an image is GBs: not in memory). Layers are applied as root, so
 * owners and modes are the image's; an unprivileged jail sees them through its id mapping.
 *
 * Imports of one name must not run concurrently (the caller serialises them): both would use
 * the same spool and .new names. A leftover of an interrupted import (the agent died mid-way)
 * is removed at the start of the next import of that name.
 */
export async function importImage(sys: Files & Processes & Clock, log: Logger, name: string, body: AsyncIterable<Uint8Array>, opts: StoreOptions = {}): Promise<string> {
  checkName(name, "import");
  const pool = opts.pool ?? POOL_MOUNT;
  const btrfs = opts.btrfs ?? toolArgv("btrfs");
  const p = storePaths(name, pool);
  const started = sys.now();
  const made: string[] = [];
  let subvolMade = false;
  try {
    storeDir(sys, pool);
    removeLeftovers(sys, log, btrfs, p);
    made.push(p.spool);
    const archiveBytes = await sys.writeStream(p.spool, body, 0o600);
    const src = new FileSource(p.spool);
    let image: OciImage;
    let tree: DirTree;
    try {
      const layout = layoutFromTar(readTar(src, "archive"), "archive");
      image = resolveImage(layout); // every refusal the index, manifest and config can earn, before a subvolume exists
      sys.run([...btrfs, "subvolume", "create", p.fresh]);
      subvolMade = true;
      tree = new DirTree(p.fresh, { owners: true, devices: false, mkfifo: (path, mode) => sys.mkfifo(path, mode) });
      await extractImage(layout, tree);
      tree.finish();
    } finally {
      src.close();
    }
    sys.unlink(p.spool);
    made.shift();
    const meta: ImageMeta = {
      name,
      digest: image.manifest.digest,
      layers: image.layers.length,
      size: tree.fileBytes,
      devicesSkipped: tree.skipped.length,
      imported: (opts.now ?? (() => new Date()))().toISOString(),
      entrypoint: image.config.entrypoint,
      cmd: image.config.cmd,
      env: image.config.env,
      workingDir: image.config.workingDir,
      user: image.config.user,
    };
    made.push(p.freshMeta);
    sys.writeBytes(p.freshMeta, Buffer.from(`${JSON.stringify(meta, null, 2)}\n`), 0o600);
    sys.run([...btrfs, "property", "set", "-ts", p.fresh, "ro", "true"]);
    // On the disk before the names change: a crash after the swap must not find a new name
    // over half-written data.
    sys.run([...btrfs, "filesystem", "sync", pool]);
    const replaced = swapIn(sys, p);
    // From here the import stands: what is left is the old image's subvolume at .new.
    subvolMade = false;
    made.length = 0;
    try {
      sys.rename(p.freshMeta, p.meta);
      sys.fsyncPath(p.dir);
    } catch (e) {
      log.err(`image ${name}: imported, but its metadata was not renamed into place: ${describe(e)}`);
    }
    if (replaced) deleteSubvolume(sys, log, btrfs, p.fresh, `the replaced image ${name}`);
    const secs = ((sys.now() - started) / 1000).toFixed(1);
    const skipped = tree.skipped.length ? `, ${tree.skipped.length} device node${tree.skipped.length === 1 ? "" : "s"} skipped` : "";
    const line = `image ${name}: ${meta.digest.slice(0, 19)}, ${humanSize(meta.size)} in ${meta.layers} layer${meta.layers === 1 ? "" : "s"}${skipped} (archive ${humanSize(archiveBytes)}), ${replaced ? "replaced" : "new"}, imported in ${secs}s`;
    log.info(line);
    return line;
  } catch (e) {
    const why = describe(e).replace(/\s*\n\s*/g, " ");
    // Undo in reverse: nothing of this import may stay (the old image was never touched).
    if (subvolMade) deleteSubvolume(sys, log, btrfs, p.fresh, `the unfinished import of ${name}`);
    for (const f of made.reverse()) if (sys.lstat(f).kind !== "missing") sys.unlink(f);
    const line = `image import ${name}: refused: ${why}`;
    log.warn(line);
    throw new Error(line);
  }
}

/**
 * Puts the new subvolume in place. With an image there already, the two names are exchanged in
 * one step (renameat2 RENAME_EXCHANGE), so @img-NAME is never missing for a jail starting
 * meanwhile; the old one is left at .new for the caller to delete. The metadata follows with a
 * rename: a crash between the two leaves the new image with the old one's metadata until the
 * next import, never a name without an image. Returns whether an image was replaced.
 */
export function swapIn(sys: Files, p: ReturnType<typeof storePaths>): boolean {
  const replaced = sys.lstat(p.subvol).kind !== "missing";
  if (replaced) sys.exchange(p.fresh, p.subvol);
  else sys.rename(p.fresh, p.subvol);
  return replaced;
}

function removeLeftovers(sys: Files & Processes, log: Logger, btrfs: readonly string[], p: ReturnType<typeof storePaths>): void {
  if (sys.lstat(p.fresh).kind !== "missing") {
    log.warn(`image ${p.subvol}: removing ${p.fresh}, left by an interrupted import`);
    sys.run([...btrfs, "subvolume", "delete", p.fresh]);
  }
  for (const f of [p.spool, p.freshMeta]) if (sys.lstat(f).kind !== "missing") sys.unlink(f);
}

/** Deletes a subvolume; a failure is logged (the import's result stands), never thrown. */
function deleteSubvolume(sys: Processes, log: Logger, btrfs: readonly string[], path: string, what: string): void {
  try {
    sys.run([...btrfs, "subvolume", "delete", path]);
  } catch (e) {
    log.err(`image store: could not delete ${what} at ${path}: ${describe(e)}`);
  }
}

/** An image's metadata; undefined when it has none or it does not parse. */
export function readImage(sys: Files, name: string, opts: StoreOptions = {}): ImageMeta | undefined {
  const text = sys.readFile(storePaths(name, opts.pool).meta);
  if (text === null) return undefined;
  try {
    const r = ImageMetaSchema.safeParse(JSON.parse(text));
    return r.success && r.data.name === name ? r.data : undefined;
  } catch {
    return undefined;
  }
}

/** The images on the pool (every @img-NAME subvolume with a valid name), by name. */
export function listImages(sys: Files, opts: StoreOptions = {}): ImageRow[] {
  const prefix = imageSubvolume("");
  return sys
    .readdir(opts.pool ?? POOL_MOUNT)
    .filter((e) => e.startsWith(prefix) && imageName.safeParse(e.slice(prefix.length)).success)
    .map((e) => e.slice(prefix.length))
    .sort()
    .map((name) => {
      const m = readImage(sys, name, opts);
      return { name, digest: m?.digest ?? "?", size: m?.size ?? 0, imported: m?.imported ?? "?" };
    });
}

/** `image list`: one line per image. */
export function formatImages(rows: readonly ImageRow[]): string {
  if (!rows.length) return "no images";
  return rows.map((r) => `${r.name}  ${r.digest.slice(0, 19)}  ${humanSize(r.size)}  ${r.imported}`).join("\n");
}

/**
 * Deletes an image: its subvolume, then its metadata. Refused while a jail that runs it is
 * running (`inUse`): its rootfs is a snapshot, but a restart would find no image.
 */
export function removeImage(sys: Files & Processes, log: Logger, name: string, inUse: (name: string) => boolean, opts: StoreOptions = {}): string {
  checkName(name, "rm");
  const p = storePaths(name, opts.pool);
  if (sys.lstat(p.subvol).kind === "missing") throw new Error(`image rm ${name}: no such image`);
  if (inUse(name)) throw new Error(`image rm ${name}: refused: a running jail uses it (stop the jail first)`);
  try {
    sys.run([...(opts.btrfs ?? toolArgv("btrfs")), "subvolume", "delete", p.subvol]);
  } catch (e) {
    throw new Error(`image rm ${name}: ${describe(e).replace(/\s*\n\s*/g, " ")}`);
  }
  if (sys.lstat(p.meta).kind !== "missing") sys.unlink(p.meta);
  const line = `image ${name}: removed`;
  log.info(line);
  return line;
}
