// OCI image layouts: index → manifest selection, digest checks, gzip and zstd layers. The tar
// reader and the layer rules have their own tests (tar.test.ts, layer.test.ts); streaming is
// proven in decompress.test.ts; the VM image builder (a real btrfs image, read back through a
// loop mount as root) is test/system/vmimage.test.ts.
import { scratchDirs } from "../scratch.ts";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import * as zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { bufferSource } from "../../agent/oci/bytes.ts";
import { DirTree, MemTree } from "../../agent/oci/fstree.ts";
import { extractImage, imageArgv, type ImageIndex, layoutFromTar, resolveImage, selectManifest } from "../../agent/oci/oci.ts";
import { readTar } from "../../agent/oci/tar.ts";
import { type LayerEntry, layerTar, LOWER, ociImageTar, OciLayoutWriter, SCENARIO_RESULT, UPPER } from "../oci-fixture.ts";

const fresh = scratchDirs("initos-oci");

const layoutOf = (tar: Buffer) => layoutFromTar(readTar(bufferSource(tar), "image.tar"), "image.tar");

describe("OCI layout", () => {
  it("applies the layers of an image in order, on disk, and returns its config", async () => {
    const tar = ociImageTar({ layers: [LOWER, UPPER], gzip: true, config: { Entrypoint: ["/bin/app"], Cmd: ["a1"], Env: ["PATH=/bin"], WorkingDir: "/srv" } });
    const root = fresh("extract");
    const tree = new DirTree(root);
    const image = await extractImage(layoutOf(tar), tree);
    tree.finish();
    const found = execFileSync("find", [".", "-mindepth", "1"], { cwd: root, encoding: "utf8" }).trim().split("\n").map((p) => p.slice(2)).sort();
    expect(found).toEqual(SCENARIO_RESULT.map((p) => p.replace(/\/$/, "")));
    expect(image.config).toEqual({ os: "linux", architecture: "amd64", entrypoint: ["/bin/app"], cmd: ["a1"], env: ["PATH=/bin"], workingDir: "/srv", user: "" });
    expect(imageArgv(image.config)).toEqual(["/bin/app", "a1"]);
  });

  it("refuses a blob whose content does not match its digest, naming the blob", async () => {
    const w = new OciLayoutWriter();
    const m = w.image({ layers: [LOWER] });
    const layer = [...w.blobs.entries()].find(([, b]) => b.length > 1000)!;
    const bad = Buffer.from(layer[1]);
    bad[600] = bad[600]! ^ 1;
    w.replace(layer[0], bad);
    await expect(extractImage(layoutOf(w.tar([m])), new MemTree())).rejects.toThrow(
      new RegExp(`^image\\.tar: blob ${layer[0]} does not match its digest \\(content is sha256:[0-9a-f]{64}\\)$`),
    );
  });

  it("follows index.json to a nested index and picks the linux/amd64 manifest", async () => {
    const w = new OciLayoutWriter();
    const arm = w.image({ layers: [[{ path: "which", type: "file", data: "arm64" }]], platform: { os: "linux", architecture: "arm64" } });
    const amd = w.image({ layers: [[{ path: "which", type: "file", data: "amd64" }]] });
    const nested = w.index([arm, amd]);
    const t = new MemTree();
    const image = await extractImage(layoutOf(w.tar([nested])), t);
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

  it("applies zstd layers (through the zstd command, in Node as in Bun), and names the layer when one is corrupt", async () => {
    const w = new OciLayoutWriter();
    const zstd = (b: Buffer) => execFileSync("zstd", ["-q", "-c"], { input: b });
    const layer = w.blob(zstd(layerTar(LOWER)), "application/vnd.oci.image.layer.v1.tar+zstd");
    const config = w.blob({ os: "linux", architecture: "amd64" }, "application/vnd.oci.image.config.v1+json");
    const m = w.blob({ schemaVersion: 2, config, layers: [layer] }, "application/vnd.oci.image.manifest.v1+json");
    const t = new MemTree();
    await extractImage(layoutOf(w.tar([m])), t);
    expect(t.text("etc/keep")).toBe("keep\n");
    // Not zstd at all, with a descriptor that matches it: the error is zstd's, on one line, naming the layer.
    const bad = w.blob(Buffer.from("not really zstd"), "application/vnd.oci.image.layer.v1.tar+zstd");
    const m2 = w.blob({ schemaVersion: 2, config, layers: [layer, bad] }, "application/vnd.oci.image.manifest.v1+json");
    await expect(extractImage(layoutOf(w.tar([m2])), new MemTree())).rejects.toThrow(new RegExp(`^image\\.tar: layer 2 \\(${bad.digest.slice(0, 19)}\\): zstd -d failed: [^\\n]+$`));
  });

  it("prefers the digest mismatch over what a corrupt gzip stream breaks first, and changes nothing then", async () => {
    const w = new OciLayoutWriter();
    // Incompressible data makes the blob several stream chunks long, so that a break near its
    // start is found long before the last byte, and so before the digest is known.
    const noise = randomBytes(300_000);
    const upperLayer: LayerEntry[] = [...UPPER, { path: "noise", type: "file", data: noise }];
    const m = w.image({ layers: [LOWER, upperLayer], gzip: true });
    const upper = [...w.blobs.entries()].find(([, b]) => b.equals(zlib.gzipSync(layerTar(upperLayer))))!;
    const bad = Buffer.from(upper[1]);
    bad[20] = bad[20]! ^ 0xff; // inside the deflate data
    w.replace(upper[0], bad);
    const t = new MemTree();
    await expect(extractImage(layoutOf(w.tar([m])), t)).rejects.toThrow(new RegExp(`^image\\.tar: blob ${upper[0]} does not match its digest \\(content is sha256:[0-9a-f]{64}\\)$`));
    expect(t.listing()).toEqual(["a/", "a/x", "a/y", "b/", "b/z", "etc/", "etc/keep"]); // layer 1 only: layer 2 never touched it
  });

  it("checks the manifest against the image's config platform and schema", () => {
    const w = new OciLayoutWriter();
    const config = w.blob({ os: "linux" }, "application/vnd.oci.image.config.v1+json");
    const m = w.blob({ schemaVersion: 2, config, layers: [] }, "application/vnd.oci.image.manifest.v1+json");
    expect(() => resolveImage(layoutOf(w.tar([m])))).toThrow(new RegExp(`^image\\.tar: config ${config.digest}: architecture: `));
  });
});
