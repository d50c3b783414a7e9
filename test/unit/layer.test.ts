// Layer semantics against a tree: whiteouts, opaque directories, replacement, hard links, and
// paths resolved inside the tree (a hostile layer cannot write outside it). Layers go through
// the streamed tar reader, as every OCI layer does.
import { scratchDirs } from "../scratch.ts";
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { bufferSource, streamOf } from "../../agent/oci/bytes.ts";
import { DirTree, MemTree } from "../../agent/oci/fstree.ts";
import { applyLayer, type LayerReader } from "../../agent/oci/layer.ts";
import { readTarStream } from "../../agent/oci/tar.ts";
import { type LayerEntry, LOWER, layerTar, SCENARIO_RESULT, UPPER } from "../oci-fixture.ts";

const fresh = scratchDirs("initos-layer");

/** A layer as the tar stream reader gives it. */
const layer = (entries: LayerEntry[]): LayerReader => () => readTarStream(streamOf(bufferSource(layerTar(entries))), "test layer");

describe("layer application", () => {
  it("whiteouts delete lower files; an opaque dir drops lower contents but keeps the layer's own", async () => {
    const t = new MemTree();
    await applyLayer(t, layer(LOWER), { whiteouts: true, what: "layer 1" });
    await applyLayer(t, layer(UPPER), { whiteouts: true, what: "layer 2" });
    expect(t.listing()).toEqual(SCENARIO_RESULT);
    expect(t.text("b/new")).toBe("new\n");
    expect(t.text("etc/keep")).toBe("keep\n");
  });

  it("a whiteout of a directory removes it with everything under it, and a later layer can recreate it", async () => {
    const t = new MemTree();
    await applyLayer(t, layer([{ path: "d/sub/f", type: "file" }, { path: "d/g", type: "file" }]), { whiteouts: true, what: "l1" });
    await applyLayer(t, layer([{ path: "d", type: "whiteout" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual([]);
    await applyLayer(t, layer([{ path: "d/h", type: "file" }]), { whiteouts: true, what: "l3" });
    expect(t.listing()).toEqual(["d/", "d/h"]);
  });

  it("without whiteout handling (rootfs tarballs) .wh. names are ordinary files", async () => {
    const t = new MemTree();
    await applyLayer(t, layer([{ path: "a/x", type: "file" }, { path: "a/x", type: "whiteout" }]), { whiteouts: false, what: "rootfs" });
    expect(t.listing()).toEqual(["a/", "a/.wh.x", "a/x"]);
  });

  it("replaces nodes of another type instead of writing through them", async () => {
    const t = new MemTree();
    await applyLayer(t, layer([{ path: "d/f", type: "file" }, { path: "s", type: "symlink", target: "d/f" }, { path: "f", type: "file", data: "old" }]), { whiteouts: true, what: "l1" });
    await applyLayer(t, layer([{ path: "d", type: "file", data: "now a file" }, { path: "s", type: "file", data: "not a link" }, { path: "f", type: "dir" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual(["d", "f/", "s"]);
    expect(t.text("s")).toBe("not a link");
  });

  it("follows in-image symlinks for parents, scoping absolute targets to the image root", async () => {
    const t = new MemTree();
    await applyLayer(t, layer([{ path: "usr/lib", type: "dir" }, { path: "lib", type: "symlink", target: "usr/lib" }, { path: "abs", type: "symlink", target: "/etc" }]), { whiteouts: true, what: "l1" });
    await applyLayer(t, layer([{ path: "lib/libc.so", type: "file" }, { path: "abs/passwd", type: "file" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual(["abs -> /etc", "etc/", "etc/passwd", "lib -> usr/lib", "usr/", "usr/lib/", "usr/lib/libc.so"]);
  });

  it("refuses .., absolute names, hardlinks out of the tree and symlinks that climb out of it", async () => {
    const base = fresh("escape");
    const root = `${base}/root`;
    mkdirSync(root);
    const tree = new DirTree(root);
    const apply = (l: LayerEntry[]) => applyLayer(tree, layer(l), { whiteouts: true, what: "evil layer" });
    await expect(apply([{ path: "../outside", type: "file" }])).rejects.toThrow(/^evil layer: refusing path "\.\.\/outside" with "\.\."$/);
    await expect(apply([{ path: "/etc/passwd", type: "file" }])).rejects.toThrow(/^evil layer: refusing absolute path "\/etc\/passwd"$/);
    await expect(apply([{ path: "h", type: "hardlink", target: "../../etc/passwd" }])).rejects.toThrow(/refusing path "\.\.\/\.\.\/etc\/passwd" with "\.\."/);
    await expect(apply([{ path: "up", type: "symlink", target: "../.." }, { path: "up/pwned", type: "file" }])).rejects.toThrow(
      /^evil layer: entry "up\/pwned" goes through symlink "up", which points outside the image$/,
    );
    await expect(apply([{ path: "up/x", type: "whiteout" }])).rejects.toThrow(/points outside the image/);
    expect(existsSync(`${base}/pwned`)).toBe(false);
    expect(existsSync(`${base}/../pwned`)).toBe(false); // where "up" points: the scratch directory
    expect(readlinkSync(`${root}/up`)).toBe("../.."); // the link itself is a legal (dangling) symlink
  });

  it("writes files, modes, symlinks, hardlinks and fifos to a directory", async () => {
    const root = fresh("dirtree");
    const tree = new DirTree(root);
    await applyLayer(
      tree,
      layer([
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
  });
  it("applies a layer's deletions before its additions, wherever the markers are in the tar", async () => {
    const t = new MemTree();
    await applyLayer(t, layer([{ path: "d/old", type: "file" }, { path: "e/old", type: "file" }]), { whiteouts: true, what: "l1" });
    // The layer re-adds d/new and e/new first, then whiteouts d and makes e opaque: only the lower contents go.
    await applyLayer(t, layer([{ path: "d/new", type: "file" }, { path: "e/new", type: "file" }, { path: "d", type: "whiteout" }, { path: "e", type: "opaque" }]), { whiteouts: true, what: "l2" });
    expect(t.listing()).toEqual(["d/", "d/new", "e/", "e/new"]);
  });

  it("leaves the tree as it was when the first pass fails: a bad name anywhere, or an error at the stream's end", async () => {
    const t = new MemTree();
    await applyLayer(t, layer(LOWER), { whiteouts: true, what: "layer 1" });
    const before = t.listing();
    const bad = layer([{ path: "a/x", type: "whiteout" }, { path: "new", type: "file" }, { path: "../evil", type: "file" }]);
    await expect(applyLayer(t, bad, { whiteouts: true, what: "layer 2" })).rejects.toThrow('layer 2: refusing path "../evil" with ".."');
    expect(t.listing()).toEqual(before);
    // What a digest mismatch looks like to applyLayer: the stream fails after its last member.
    async function* failsAtEnd() {
      yield layerTar(UPPER);
      throw new Error("layer 2: blob sha256:… does not match its digest");
    }
    await expect(applyLayer(t, () => readTarStream(failsAtEnd(), "layer 2"), { whiteouts: true, what: "layer 2" })).rejects.toThrow("does not match its digest");
    expect(t.listing()).toEqual(before);
  });
});
