// Reads OCI image layouts (a directory, or a tar of one): index.json, through nested indexes, to
// the platform's manifest and config, every blob checked against its digest, and the layers
// applied in order to a tree. The byte sources, the tar reader, the decompressors and the layer
// rules live in bytes.ts, tar.ts, decompress.ts, fstree.ts and layer.ts.
import { createHash, type Hash } from "node:crypto";
import { lstatSync } from "node:fs";
import { z } from "zod";
import { describe, zodIssue } from "../errors.ts";
import { type ByteSource, chunks, FileSource, readAll, streamOf } from "./bytes.ts";
import { type Compression, decompress } from "./decompress.ts";
import type { Tree } from "./fstree.ts";
import { applyLayer, type LayerReader } from "./layer.ts";
import { readTarStream, type TarEntry } from "./tar.ts";

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
    throw new Error(`${what} is not JSON (${describe(e)})`);
  }
  const r = schema.safeParse(json);
  if (r.success) return r.data;
  throw new Error(`${what}: ${zodIssue(r.error)}`);
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

/**
 * A layout directory; close() releases the blobs it opened. A blob is opened once, not once per
 * pass over a layer: a blob renamed over between the passes is still the one first read (one
 * rewritten in place is caught by the digest check at the end of each pass).
 */
export function openLayoutDir(dir: string): Layout & { close(): void } {
  const open = new Map<string, FileSource>();
  return {
    what: dir,
    file: (p) => {
      const f = `${dir}/${p}`;
      if (!open.has(p) && lstatSync(f, { throwIfNoEntry: false })?.isFile()) open.set(p, new FileSource(f));
      return open.get(p);
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

/** The blob a descriptor names, checked for presence and size; its digest is checked as it is read. */
function blobSource(layout: Layout, d: Descriptor): ByteSource {
  const [alg, hex] = d.digest.split(":") as [string, string];
  const src = layout.file(`blobs/${alg}/${hex}`);
  if (!src) throw new Error(`${layout.what}: blob ${d.digest} is missing`);
  if (src.size !== d.size) throw new Error(`${layout.what}: blob ${d.digest} is ${src.size} bytes, its descriptor says ${d.size}`);
  return src;
}

const hasher = (d: Descriptor) => createHash(d.digest.slice(0, d.digest.indexOf(":")));

function checkDigest(layout: Layout, d: Descriptor, h: Hash): void {
  const got = `${d.digest.slice(0, d.digest.indexOf(":"))}:${h.digest("hex")}`;
  if (got !== d.digest) throw new Error(`${layout.what}: blob ${d.digest} does not match its digest (content is ${got})`);
}

/** A blob checked against its descriptor's size and digest. */
export function readBlob(layout: Layout, d: Descriptor): ByteSource {
  const src = blobSource(layout, d);
  const h = hasher(d);
  for (const c of chunks(src)) h.update(c);
  checkDigest(layout, d, h);
  return src;
}

/**
 * A blob read front to back, hashed as it goes. The digest is compared once the last byte has
 * been handed on, so a mismatch is thrown from the end of the stream, after its bytes were used.
 */
async function* verifiedStream(layout: Layout, d: Descriptor): AsyncGenerator<Buffer> {
  const src = blobSource(layout, d);
  const h = hasher(d);
  for await (const c of streamOf(src)) {
    h.update(c);
    yield c;
  }
  checkDigest(layout, d, h);
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

export function layerCompression(mediaType: string): Compression {
  const oci = /^application\/vnd\.oci\.image\.layer\.(?:nondistributable\.)?v1\.tar(\+gzip|\+zstd)?$/.exec(mediaType);
  if (oci) return oci[1] === "+gzip" ? "gzip" : oci[1] === "+zstd" ? "zstd" : "none";
  if (/^application\/vnd\.docker\.image\.rootfs\.(?:foreign\.)?diff\.tar\.gzip$/.test(mediaType)) return "gzip";
  throw new Error(`unsupported layer media type ${mediaType}`);
}

/**
 * A layer as its members, decompressed and checked against its digest as it streams; each call
 * of the reader reads the blob anew. The digest is checked when the stream ends, which the tar
 * stream reader always reads to.
 */
export function layerReader(layout: Layout, d: Descriptor, what: string): LayerReader {
  const how = (() => {
    try {
      return layerCompression(d.mediaType);
    } catch (e) {
      throw new Error(`${what}: ${describe(e)}`);
    }
  })();
  blobSource(layout, d); // missing or the wrong size: said before any reading starts
  return () => readTarStream(decompress(verifiedStream(layout, d), how, what), what);
}

/**
 * Resolves the image and applies its layers in order to `tree`.
 *
 * A layer is never held whole: it streams through the decompressor into the tree. Its digest is
 * known only at the end of the stream, and applyLayer reads each layer twice, the first time
 * without changing the tree: a blob that is not the one the manifest names fails in that pass,
 * before the tree changes. The second pass is checked too (the file could change in between);
 * a mismatch found at its end means part of the layer is already in the tree. So when
 * extractImage rejects, the tree holds a partial image and must be thrown away: vmimage stages
 * into a temporary directory that it removes, with the image it was writing.
 */
export async function extractImage(layout: Layout, tree: Tree, want: Platform = DEFAULT_PLATFORM): Promise<OciImage> {
  const image = resolveImage(layout, want);
  for (const [i, d] of image.layers.entries()) {
    const what = `${layout.what}: layer ${i + 1} (${d.digest.slice(0, 19)})`;
    try {
      await applyLayer(tree, layerReader(layout, d, what), { whiteouts: true, what });
    } catch (e) {
      // A corrupt blob often breaks the decompressor or the tar reader before its digest is
      // complete; the digest mismatch is the cause to report.
      readBlob(layout, d);
      throw e;
    }
  }
  return image;
}
