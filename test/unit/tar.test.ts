// The tar reader against GNU tar's formats and the fixture writer's, in both of its forms: by
// offset (readTar) and front to back (readTarStream), which must agree on every archive.
import { scratchDirs } from "../scratch.ts";
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { bufferSource, chunks } from "../../agent/oci/bytes.ts";
import { readTar, readTarStream, type TarStreamEntry } from "../../agent/oci/tar.ts";
import { type LayerEntry, layerTar } from "../oci-fixture.ts";

const fresh = scratchDirs("initos-tar");

const entries = (layer: LayerEntry[], longNames?: "pax" | "gnu") => readTar(bufferSource(layerTar(layer, { longNames })), "test layer");

/** A tar as a stream of `chunk`-byte pieces, the way a decompressor hands it on. */
async function* pieces(tar: Buffer, chunk: number): AsyncGenerator<Buffer> {
  yield* chunks(bufferSource(tar), chunk);
}

/** Every entry of a streamed tar, with its data read (or, for `skipData`, left for the reader to skip). */
async function streamed(tar: Buffer, chunk = 7, skipData = false, what = "stream.tar") {
  const out: (Omit<TarStreamEntry, "data"> & { data: string })[] = [];
  for await (const e of readTarStream(pieces(tar, chunk), what)) {
    const parts: Buffer[] = [];
    if (!skipData) for await (const c of e.data) parts.push(c);
    out.push({ ...e, data: Buffer.concat(parts).toString("latin1") });
  }
  return out;
}

const byOffset = (tar: Buffer) => readTar(bufferSource(tar), "offset.tar").map((e) => ({ ...e, data: e.data.read(0, e.data.size).toString("latin1") }));

describe("tar reader", () => {
  const long = `${"d".repeat(60)}/${"e".repeat(60)}/${"f".repeat(60)}/file.txt`;
  const longTarget = `../${"t".repeat(120)}`;
  const gnuTarBytes = (format: string) => {
    const src = fresh(`src-${format}`);
    mkdirSync(`${src}/${long.slice(0, long.lastIndexOf("/"))}`, { recursive: true });
    writeFileSync(`${src}/${long}`, "deep");
    symlinkSync(longTarget, `${src}/link`);
    execFileSync("tar", [`--format=${format}`, "-C", src, "-cf", `${src}.tar`, long, "link"]);
    return readFileSync(`${src}.tar`);
  };
  const gnuTar = (format: string) => readTar(bufferSource(gnuTarBytes(format)), `${format}.tar`);

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

  it("reads a stream exactly as it reads by offset, in chunks that split headers and records anywhere", async () => {
    const fixture = (enc: "pax" | "gnu") =>
      layerTar(
        [
          { path: long, type: "file", data: "x".repeat(1500), mode: 0o4755 },
          { path: "l", type: "hardlink", target: long },
          { path: "s", type: "symlink", target: longTarget },
          { path: "d", type: "dir" },
          { path: "empty", type: "file" },
          { path: "p", type: "fifo" },
        ],
        { longNames: enc },
      );
    for (const tar of [gnuTarBytes("gnu"), gnuTarBytes("pax"), fixture("pax"), fixture("gnu")]) {
      for (const chunk of [1, 7, 512, 1 << 16]) expect(await streamed(tar, chunk)).toEqual(byOffset(tar));
    }
  });

  it("skips the data a stream reader leaves unread, and reads the stream to its end after the end-of-archive blocks", async () => {
    const tar = Buffer.concat([layerTar([{ path: "a", type: "file", data: "A".repeat(3000) }, { path: "b", type: "file", data: "B" }]), Buffer.alloc(4096)]);
    expect((await streamed(tar, 100, true)).map((e) => e.path)).toEqual(["a", "b"]);
    let pulled = 0;
    async function* counting() {
      for await (const c of pieces(tar, 100)) {
        pulled += c.length;
        yield c;
      }
    }
    for await (const e of readTarStream(counting(), "t")) void e;
    expect(pulled).toBe(tar.length);
  });

  it("says a streamed archive is cut off or not a tar, as the offset reader does", async () => {
    const tar = layerTar([{ path: "f", type: "file", data: "x".repeat(2000) }]);
    const cut = tar.subarray(0, 1024);
    expect(() => readTar(bufferSource(cut), "cut.tar")).toThrow('cut.tar: tar member "f" is truncated');
    await expect(streamed(cut, 100, false, "cut.tar")).rejects.toThrow('cut.tar: tar member "f" is truncated');
    await expect(streamed(cut, 100, true, "cut.tar")).rejects.toThrow('cut.tar: tar member "f" is truncated');
    const tail = Buffer.concat([layerTar([{ path: "g", type: "file", data: "y" }]).subarray(0, 1024), Buffer.from("junk")]);
    expect(() => readTar(bufferSource(tail), "tail.tar")).toThrow("tail.tar: not a tar file, or truncated at byte 1024");
    await expect(streamed(tail, 100, false, "tail.tar")).rejects.toThrow("tail.tar: not a tar file, or truncated at byte 1024");
    const bad = Buffer.from(tar);
    bad[0] = "g".charCodeAt(0);
    await expect(streamed(bad, 100, false, "bad.tar")).rejects.toThrow(/^bad\.tar: bad tar header checksum at byte 0 \(not a tar file, or corrupt\)$/);
  });
});
