// Writes OCI image layouts for tests: layers given as entry lists (whiteouts and opaque markers
// included) become a tar of an OCI layout. Our own tar writer keeps the output byte-identical
// across runs and hosts (fixed times, owners and order), and lets a test choose how long names
// are encoded so the reader is exercised on both GNU and pax archives.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

export type LayerEntry =
  | { path: string; type: "file"; data?: string | Uint8Array; mode?: number; uid?: number; gid?: number }
  | { path: string; type: "dir"; mode?: number; uid?: number; gid?: number }
  | { path: string; type: "symlink"; target: string }
  | { path: string; type: "hardlink"; target: string }
  | { path: string; type: "fifo"; mode?: number }
  /** A character device node (what an image's /dev may carry). */
  | { path: string; type: "char"; major: number; minor: number }
  /** Deletes `path` from the layers below: written as `<dir>/.wh.<name>`. */
  | { path: string; type: "whiteout" }
  /** Makes directory `path` opaque: written as `<path>/.wh..wh..opq`. */
  | { path: string; type: "opaque" };

export interface TarOptions {
  /** How names and link targets over 100 bytes are stored. */
  longNames?: "pax" | "gnu";
  mtime?: number;
}

const BLOCK = 512;

function octal(n: number, len: number): string {
  return n.toString(8).padStart(len - 1, "0") + "\0";
}

function header(
  name: string,
  flag: string,
  size: number,
  o: { mode?: number; uid?: number; gid?: number; mtime?: number; linkname?: string; gnu?: boolean; devmajor?: number; devminor?: number },
): Buffer {
  const h = Buffer.alloc(BLOCK);
  h.write(name, 0, 100, "utf8");
  h.write(octal(o.mode ?? 0o644, 8), 100, "latin1");
  h.write(octal(o.uid ?? 0, 8), 108, "latin1");
  h.write(octal(o.gid ?? 0, 8), 116, "latin1");
  h.write(octal(size, 12), 124, "latin1");
  h.write(octal(o.mtime ?? 0, 12), 136, "latin1");
  h.write(flag, 156, "latin1");
  h.write(o.linkname ?? "", 157, 100, "utf8");
  h.write(o.gnu ? "ustar  \0" : "ustar\u000000", 257, "latin1");
  h.write("root", 265, "latin1");
  h.write("root", 297, "latin1");
  if (o.devmajor !== undefined) h.write(octal(o.devmajor, 8), 329, "latin1");
  if (o.devminor !== undefined) h.write(octal(o.devminor, 8), 337, "latin1");
  h.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(octal(sum, 7) + " ", 148, "latin1");
  return h;
}

const pad = (n: number) => Buffer.alloc((BLOCK - (n % BLOCK)) % BLOCK);

function paxRecord(key: string, value: string): string {
  const body = ` ${key}=${value}\n`;
  let len = Buffer.byteLength(body) + 1;
  while (String(len).length + Buffer.byteLength(body) !== len) len = String(len).length + Buffer.byteLength(body);
  return `${len}${body}`;
}

export interface TarMember {
  name: string;
  flag: "0" | "1" | "2" | "3" | "5" | "6";
  data?: Uint8Array;
  mode?: number;
  uid?: number;
  gid?: number;
  linkname?: string;
  devmajor?: number;
  devminor?: number;
}

/** A tar of `members` in the given order, ending with the two zero blocks. */
export function tarBytes(members: readonly TarMember[], opts: TarOptions = {}): Buffer {
  const gnu = opts.longNames === "gnu";
  const out: Buffer[] = [];
  for (const m of members) {
    const nameLong = Buffer.byteLength(m.name) > 100;
    const linkLong = Buffer.byteLength(m.linkname ?? "") > 100;
    const common = { mtime: opts.mtime ?? 0, gnu };
    if (gnu) {
      for (const [flag, value, long] of [["L", m.name, nameLong], ["K", m.linkname ?? "", linkLong]] as const) {
        if (!long) continue;
        const d = Buffer.from(`${value}\0`);
        out.push(header("././@LongLink", flag, d.length, common), d, pad(d.length));
      }
    } else if (nameLong || linkLong) {
      const d = Buffer.from((nameLong ? paxRecord("path", m.name) : "") + (linkLong ? paxRecord("linkpath", m.linkname!) : ""));
      out.push(header(`PaxHeaders/${m.name.slice(-80)}`, "x", d.length, common), d, pad(d.length));
    }
    const data = m.data ? Buffer.from(m.data) : Buffer.alloc(0);
    const mode = m.mode ?? (m.flag === "5" ? 0o755 : m.flag === "2" ? 0o777 : 0o644);
    out.push(header(m.name, m.flag, data.length, { ...common, mode, uid: m.uid, gid: m.gid, linkname: m.linkname, devmajor: m.devmajor, devminor: m.devminor }), data, pad(data.length));
  }
  out.push(Buffer.alloc(2 * BLOCK));
  return Buffer.concat(out);
}

function split(path: string): [string, string] {
  const p = path.replace(/^\/+|\/+$/g, "");
  const i = p.lastIndexOf("/");
  return i < 0 ? ["", p] : [p.slice(0, i + 1), p.slice(i + 1)];
}

/** A layer's tar: entries in the order given, whiteouts turned into their marker files. */
export function layerTar(entries: readonly LayerEntry[], opts: TarOptions = {}): Buffer {
  const members = entries.map((e): TarMember => {
    switch (e.type) {
      case "file":
        return { name: e.path, flag: "0", data: typeof e.data === "string" ? Buffer.from(e.data) : e.data, mode: e.mode, uid: e.uid, gid: e.gid };
      case "dir":
        return { name: `${e.path.replace(/\/+$/, "")}/`, flag: "5", mode: e.mode, uid: e.uid, gid: e.gid };
      case "symlink":
        return { name: e.path, flag: "2", linkname: e.target };
      case "hardlink":
        return { name: e.path, flag: "1", linkname: e.target };
      case "fifo":
        return { name: e.path, flag: "6", mode: e.mode };
      case "char":
        return { name: e.path, flag: "3", mode: 0o666, devmajor: e.major, devminor: e.minor };
      case "whiteout": {
        const [dir, base] = split(e.path);
        return { name: `${dir}.wh.${base}`, flag: "0" };
      }
      case "opaque":
        return { name: `${e.path.replace(/\/+$/, "")}/.wh..wh..opq`, flag: "0" };
    }
  });
  return tarBytes(members, opts);
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: { os: string; architecture: string; variant?: string };
}

export interface ImageSpec {
  layers: LayerEntry[][];
  config?: { Entrypoint?: string[]; Cmd?: string[]; Env?: string[]; WorkingDir?: string; User?: string };
  platform?: { os: string; architecture: string };
  gzip?: boolean;
  /** zstd layers (made with the zstd command). */
  zstd?: boolean;
  longNames?: "pax" | "gnu";
}

/**
 * Blobs of a layout being assembled. `image` adds a whole image and returns its manifest's
 * descriptor; `index` an image index over descriptors; `tar` writes the layout with the given
 * descriptors in index.json. `replace` swaps a blob's content after the fact (for corruption tests).
 */
export class OciLayoutWriter {
  readonly blobs = new Map<string, Buffer>();

  blob(content: Uint8Array | object, mediaType: string): Descriptor {
    const data = content instanceof Uint8Array ? Buffer.from(content) : Buffer.from(JSON.stringify(content));
    const digest = `sha256:${createHash("sha256").update(data).digest("hex")}`;
    this.blobs.set(digest, data);
    return { mediaType, digest, size: data.length };
  }

  image(spec: ImageSpec): Descriptor {
    const platform = spec.platform ?? { os: "linux", architecture: "amd64" };
    const diffIds: string[] = [];
    const layers = spec.layers.map((entries) => {
      const tar = layerTar(entries, { longNames: spec.longNames });
      diffIds.push(`sha256:${createHash("sha256").update(tar).digest("hex")}`);
      if (spec.zstd) return this.blob(execFileSync("zstd", ["-q", "-c"], { input: tar }), "application/vnd.oci.image.layer.v1.tar+zstd");
      return spec.gzip
        ? this.blob(gzipSync(tar), "application/vnd.oci.image.layer.v1.tar+gzip")
        : this.blob(tar, "application/vnd.oci.image.layer.v1.tar");
    });
    const config = this.blob(
      { ...platform, config: spec.config ?? {}, rootfs: { type: "layers", diff_ids: diffIds } },
      "application/vnd.oci.image.config.v1+json",
    );
    const manifest = this.blob(
      { schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json", config, layers },
      "application/vnd.oci.image.manifest.v1+json",
    );
    return { ...manifest, platform };
  }

  index(manifests: Descriptor[]): Descriptor {
    return this.blob({ schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests }, "application/vnd.oci.image.index.v1+json");
  }

  replace(digest: string, content: Uint8Array): void {
    this.blobs.set(digest, Buffer.from(content));
  }

  tar(manifests: Descriptor[]): Buffer {
    const index = { schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json", manifests };
    const members: TarMember[] = [
      { name: "oci-layout", flag: "0", data: Buffer.from(JSON.stringify({ imageLayoutVersion: "1.0.0" })) },
      { name: "index.json", flag: "0", data: Buffer.from(JSON.stringify(index)) },
      { name: "blobs/", flag: "5" },
      { name: "blobs/sha256/", flag: "5" },
      ...[...this.blobs.keys()].sort().map((d): TarMember => ({ name: `blobs/sha256/${d.slice(7)}`, flag: "0", data: this.blobs.get(d)! })),
    ];
    return tarBytes(members);
  }
}

/** A tar of an OCI layout holding one image. */
export function ociImageTar(spec: ImageSpec): Buffer {
  const w = new OciLayoutWriter();
  return w.tar([w.image(spec)]);
}

export function writeOciImageTar(path: string, spec: ImageSpec): void {
  writeFileSync(path, ociImageTar(spec));
}

/** The layers of the scenario in issue 6: layer 2 deletes a/x, and makes b opaque while adding b/new. */
export const LOWER: LayerEntry[] = [
  { path: "a/x", type: "file", data: "x" },
  { path: "a/y", type: "file", data: "y" },
  { path: "b/z", type: "file", data: "z" },
  { path: "etc/keep", type: "file", data: "keep\n" },
];
export const UPPER: LayerEntry[] = [
  { path: "a/x", type: "whiteout" },
  // b/new before the opaque marker: the marker still only hides what lower layers put in b.
  { path: "b/new", type: "file", data: "new\n" },
  { path: "b", type: "opaque" },
];
export const SCENARIO_RESULT = ["a/", "a/y", "b/", "b/new", "etc/", "etc/keep"];

