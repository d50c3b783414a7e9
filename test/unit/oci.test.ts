// OCI image layouts: the tar reader against GNU tar's formats, layer semantics (whiteouts,
// opaque directories, replacement, path safety), index → manifest selection, digest checks.
// The VM image builder (a real btrfs image, read back through a loop mount as root) is
// test/system/vmimage.test.ts.
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as zlib from "node:zlib";
import { afterAll, describe, expect, it } from "vitest";
import {
  applyLayer,
  bufferSource,
  DirTree,
  extractImage,
  imageArgv,
  type ImageIndex,
  layoutFromTar,
  MemTree,
  readTar,
  resolveImage,
  selectManifest,
  type TarEntry,
} from "../../initrd/oci.ts";
import { type LayerEntry, layerTar, LOWER, ociImageTar, OciLayoutWriter, UPPER } from "../oci-fixture.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-oci-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
const fresh = (name: string) => {
  const d = `${dir}/${name}-${n++}`;
  mkdirSync(d);
  return d;
};

const entries = (layer: LayerEntry[], longNames?: "pax" | "gnu"): TarEntry[] => readTar(bufferSource(layerTar(layer, { longNames })), "test layer");
const layoutOf = (tar: Buffer) => layoutFromTar(readTar(bufferSource(tar), "image.tar"), "image.tar");

const SCENARIO_RESULT = ["a/", "a/y", "b/", "b/new", "etc/", "etc/keep"];

describe("tar reader", () => {
  const long = `${"d".repeat(60)}/${"e".repeat(60)}/${"f".repeat(60)}/file.txt`;
  const longTarget = `../${"t".repeat(120)}`;
  const gnuTar = (format: string) => {
    const src = fresh(`src-${format}`);
    mkdirSync(`${src}/${long.slice(0, long.lastIndexOf("/"))}`, { recursive: true });
    writeFileSync(`${src}/${long}`, "deep");
    symlinkSync(longTarget, `${src}/link`);
    execFileSync("tar", [`--format=${format}`, "-C", src, "-cf", `${src}.tar`, long, "link"]);
    return readTar(bufferSource(readFileSync(`${src}.tar`)), `${format}.tar`);
  };

  it("reads GNU long names and long link targets ('L'/'K' headers) from GNU tar", () => {
    const es = gnuTar("gnu");
    const file = es.find((e) => e.path === long)!;
    expect(file.type).toBe("file");
    expect(file.data.read(0, file.data.size).toString()).toBe("deep");
    expect(es.find((e) => e.path === "link")).toMatchObject({ type: "symlink", linkname: longTarget });
  });

  it("reads pax path/linkpath records and ustar name prefixes from GNU tar", () => {
    const pax = gnuTar("pax");
    expect(pax.map((e) => e.path)).toEqual([long, "link"]);
    expect(pax[1]).toMatchObject({ type: "symlink", linkname: longTarget });
    // ustar has no long link targets, so only the prefix-split name is checked there.
    const src = fresh("ustar");
    mkdirSync(`${src}/${long.slice(0, long.lastIndexOf("/"))}`, { recursive: true });
    writeFileSync(`${src}/${long}`, "deep");
    execFileSync("tar", ["--format=ustar", "-C", src, "-cf", `${src}.tar`, long]);
    expect(readTar(bufferSource(readFileSync(`${src}.tar`)), "ustar.tar").map((e) => e.path)).toEqual([long]);
  });

  it("reads the fixture writer's long names in both encodings, with modes and owners", () => {
    for (const enc of ["pax", "gnu"] as const) {
      const es = entries([{ path: long, type: "file", data: "x", mode: 0o4755, uid: 7, gid: 8 }, { path: "l", type: "hardlink", target: long }], enc);
      expect(es.map((e) => [e.path, e.type, e.mode, e.uid, e.gid, e.linkname])).toEqual([
        [long, "file", 0o4755, 7, 8, ""],
        ["l", "hardlink", 0o644, 0, 0, long],
      ]);
    }
  });

  it("refuses a corrupt header with a one-line error", () => {
    const tar = layerTar([{ path: "f", type: "file", data: "x" }]);
    tar[0] = "g".charCodeAt(0);
    expect(() => readTar(bufferSource(tar), "bad.tar")).toThrow(/^bad\.tar: bad tar header checksum at byte 0 \(not a tar file, or corrupt\)$/);
  });
});

describe("layer application", () => {
  it("whiteouts delete lower files; an opaque dir drops lower contents but keeps the layer's own", () => {
    const t = new MemTree();
    applyLayer(t, entries(LOWER), { whiteouts: true, what: "layer 1" });
    applyLayer(t, entries(UPPER), { whiteouts: true, what: "layer 2" });
    expect(t.listing()).toEqual(SCENARIO_RESULT);
    expect(t.text("b/new")).toBe("new\n");
    expect(t.text("etc/keep")).toBe("keep\n");
  });

  it("a whiteout of a directory removes it with everything under it, and a later layer can recreate it", () => {
    const t = new MemTree();
    applyLayer(t, entries([{ path: "d/sub/f", type: "file" }, { path: "d/g", type: "file" }]), { whiteouts: true, what: "l1" });
    applyLayer(t, entries([{ path: "d", type: "whiteout" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual([]);
    applyLayer(t, entries([{ path: "d/h", type: "file" }]), { whiteouts: true, what: "l3" });
    expect(t.listing()).toEqual(["d/", "d/h"]);
  });

  it("without whiteout handling (rootfs tarballs) .wh. names are ordinary files", () => {
    const t = new MemTree();
    applyLayer(t, entries([{ path: "a/x", type: "file" }, { path: "a/x", type: "whiteout" }]), { whiteouts: false, what: "rootfs" });
    expect(t.listing()).toEqual(["a/", "a/.wh.x", "a/x"]);
  });

  it("replaces nodes of another type instead of writing through them", () => {
    const t = new MemTree();
    applyLayer(t, entries([{ path: "d/f", type: "file" }, { path: "s", type: "symlink", target: "d/f" }, { path: "f", type: "file", data: "old" }]), { whiteouts: true, what: "l1" });
    applyLayer(t, entries([{ path: "d", type: "file", data: "now a file" }, { path: "s", type: "file", data: "not a link" }, { path: "f", type: "dir" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual(["d", "f/", "s"]);
    expect(t.text("s")).toBe("not a link");
  });

  it("follows in-image symlinks for parents, scoping absolute targets to the image root", () => {
    const t = new MemTree();
    applyLayer(t, entries([{ path: "usr/lib", type: "dir" }, { path: "lib", type: "symlink", target: "usr/lib" }, { path: "abs", type: "symlink", target: "/etc" }]), { whiteouts: true, what: "l1" });
    applyLayer(t, entries([{ path: "lib/libc.so", type: "file" }, { path: "abs/passwd", type: "file" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual(["abs -> /etc", "etc/", "etc/passwd", "lib -> usr/lib", "usr/", "usr/lib/", "usr/lib/libc.so"]);
  });

  it("refuses .., absolute names, hardlinks out of the tree and symlinks that climb out of it", () => {
    const base = fresh("escape");
    const root = `${base}/root`;
    mkdirSync(root);
    const tree = new DirTree(root);
    const apply = (layer: LayerEntry[]) => () => applyLayer(tree, entries(layer), { whiteouts: true, what: "evil layer" });
    expect(apply([{ path: "../outside", type: "file" }])).toThrow(/^evil layer: refusing path "\.\.\/outside" with "\.\."$/);
    expect(apply([{ path: "/etc/passwd", type: "file" }])).toThrow(/^evil layer: refusing absolute path "\/etc\/passwd"$/);
    expect(apply([{ path: "h", type: "hardlink", target: "../../etc/passwd" }])).toThrow(/refusing path "\.\.\/\.\.\/etc\/passwd" with "\.\."/);
    expect(apply([{ path: "up", type: "symlink", target: "../.." }, { path: "up/pwned", type: "file" }])).toThrow(
      /^evil layer: entry "up\/pwned" goes through symlink "up", which points outside the image$/,
    );
    expect(apply([{ path: "up/x", type: "whiteout" }])).toThrow(/points outside the image/);
    expect(existsSync(`${base}/pwned`)).toBe(false);
    expect(existsSync(`${dir}/pwned`)).toBe(false);
    expect(readlinkSync(`${root}/up`)).toBe("../.."); // the link itself is a legal (dangling) symlink
  });

  it("writes files, modes, symlinks, hardlinks and fifos to a directory", () => {
    const root = fresh("dirtree");
    const tree = new DirTree(root);
    applyLayer(
      tree,
      entries([
        { path: "bin/tool", type: "file", data: "#!/bin/sh\n", mode: 0o4755 },
        { path: "ro", type: "dir", mode: 0o555 },
        { path: "ro/inside", type: "file", data: "i" },
        { path: "bin/alias", type: "hardlink", target: "bin/tool" },
        { path: "sh", type: "symlink", target: "bin/tool" },
        { path: "pipe", type: "fifo", mode: 0o600 },
      ]),
      { whiteouts: true, what: "l1" },
    );
    tree.finish();
    expect(statSync(`${root}/bin/tool`).mode & 0o7777).toBe(0o4755);
    expect(statSync(`${root}/bin/alias`).ino).toBe(statSync(`${root}/bin/tool`).ino);
    expect(readlinkSync(`${root}/sh`)).toBe("bin/tool");
    expect(lstatSync(`${root}/pipe`).isFIFO()).toBe(true);
    expect(statSync(`${root}/ro`).mode & 0o7777).toBe(0o555);
    expect(readFileSync(`${root}/ro/inside`, "utf8")).toBe("i");
    chmodSync(`${root}/ro`, 0o755); // without root, afterAll could not remove ro/inside
  });
});

describe("OCI layout", () => {
  it("applies the layers of an image in order, on disk, and returns its config", () => {
    const tar = ociImageTar({ layers: [LOWER, UPPER], gzip: true, config: { Entrypoint: ["/bin/app"], Cmd: ["a1"], Env: ["PATH=/bin"], WorkingDir: "/srv" } });
    const root = fresh("extract");
    const tree = new DirTree(root);
    const image = extractImage(layoutOf(tar), tree);
    tree.finish();
    const found = execFileSync("find", [".", "-mindepth", "1"], { cwd: root, encoding: "utf8" }).trim().split("\n").map((p) => p.slice(2)).sort();
    expect(found).toEqual(SCENARIO_RESULT.map((p) => p.replace(/\/$/, "")));
    expect(image.config).toEqual({ os: "linux", architecture: "amd64", entrypoint: ["/bin/app"], cmd: ["a1"], env: ["PATH=/bin"], workingDir: "/srv", user: "" });
    expect(imageArgv(image.config)).toEqual(["/bin/app", "a1"]);
  });

  it("refuses a blob whose content does not match its digest, naming the blob", () => {
    const w = new OciLayoutWriter();
    const m = w.image({ layers: [LOWER] });
    const layer = [...w.blobs.entries()].find(([, b]) => b.length > 1000)!;
    const bad = Buffer.from(layer[1]);
    bad[600] = bad[600]! ^ 1;
    w.replace(layer[0], bad);
    expect(() => extractImage(layoutOf(w.tar([m])), new MemTree())).toThrow(
      new RegExp(`^image\\.tar: blob ${layer[0]} does not match its digest \\(content is sha256:[0-9a-f]{64}\\)$`),
    );
  });

  it("follows index.json to a nested index and picks the linux/amd64 manifest", () => {
    const w = new OciLayoutWriter();
    const arm = w.image({ layers: [[{ path: "which", type: "file", data: "arm64" }]], platform: { os: "linux", architecture: "arm64" } });
    const amd = w.image({ layers: [[{ path: "which", type: "file", data: "amd64" }]] });
    const nested = w.index([arm, amd]);
    const t = new MemTree();
    const image = extractImage(layoutOf(w.tar([nested])), t);
    expect(t.text("which")).toBe("amd64");
    expect(image.manifest.digest).toBe(amd.digest);
  });

  it("refuses an index it cannot choose from, listing what it has", () => {
    const d = (digit: string, platform?: { os: string; architecture: string }) => ({
      mediaType: "application/vnd.oci.image.manifest.v1+json",
      digest: `sha256:${digit.repeat(64)}`,
      size: 1,
      ...(platform ? { platform } : {}),
    });
    const want = { os: "linux", architecture: "amd64" };
    const index = (...manifests: ImageIndex["manifests"]): ImageIndex => ({ schemaVersion: 2, manifests });
    expect(() => selectManifest(index(d("1"), d("2")), want, "index.json")).toThrow(
      "index.json lists 2 manifests and none is for linux/amd64: sha256:111111111111 (no platform), sha256:222222222222 (no platform)",
    );
    expect(() => selectManifest(index(d("1", { os: "linux", architecture: "arm64" })), want, "index.json")).toThrow("index.json has only a linux/arm64 image, not linux/amd64");
    expect(() => selectManifest(index(d("1", want), d("2", want)), want, "index.json")).toThrow(/lists 2 manifests for linux\/amd64, cannot choose/);
    expect(() => selectManifest(index(), want, "index.json")).toThrow("index.json lists no image manifests");
    // An unmarked single manifest is taken; attestations (unknown/unknown) do not compete.
    expect(selectManifest(index(d("1")), want, "i").digest).toBe(d("1").digest);
    expect(selectManifest(index(d("1", want), d("2", { os: "unknown", architecture: "unknown" })), want, "i").digest).toBe(d("1").digest);
  });

  it("rejects zstd layers clearly when the runtime has no zstd decoder", () => {
    const w = new OciLayoutWriter();
    const zstd = (zlib as { zstdCompressSync?: (b: Buffer) => Buffer }).zstdCompressSync;
    const layer = w.blob(zstd ? zstd(layerTar(LOWER)) : Buffer.from("not really zstd"), "application/vnd.oci.image.layer.v1.tar+zstd");
    const config = w.blob({ os: "linux", architecture: "amd64" }, "application/vnd.oci.image.config.v1+json");
    const m = w.blob({ schemaVersion: 2, config, layers: [layer] }, "application/vnd.oci.image.manifest.v1+json");
    const t = new MemTree();
    if (zstd) {
      extractImage(layoutOf(w.tar([m])), t);
      expect(t.text("etc/keep")).toBe("keep\n");
    } else {
      expect(() => extractImage(layoutOf(w.tar([m])), t)).toThrow(/layer 1 \(sha256:[0-9a-f]{12}\): zstd layers are not supported by this runtime/);
    }
  });

  it("checks the manifest against the image's config platform and schema", () => {
    const w = new OciLayoutWriter();
    const config = w.blob({ os: "linux" }, "application/vnd.oci.image.config.v1+json");
    const m = w.blob({ schemaVersion: 2, config, layers: [] }, "application/vnd.oci.image.manifest.v1+json");
    expect(() => resolveImage(layoutOf(w.tar([m])))).toThrow(new RegExp(`^image\\.tar: config ${config.digest}: architecture: `));
  });
});
