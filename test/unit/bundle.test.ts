// The update bundle writer (initrd/bundle.ts) read back by the project's own tar reader and the
// agent's manifest parser, as the agent will read a bundle from ssh's stdin. (Reading the UKI's
// own config is the agent's reader, tested in update-uki.test.ts.)
import { scratchDirs } from "../scratch.ts";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { MANIFEST_NAME, parseManifest, UKI_PATH } from "../../agent/update/manifest.ts";
import { bufferSource, streamOf } from "../../agent/oci/bytes.ts";
import { type BundlePart, writeBundle } from "../../initrd/bundle.ts";
import { readTarStream } from "../../agent/oci/tar.ts";

const fresh = scratchDirs("initos-bundle");
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Small stand-ins for a UKI and two images (sizes around the 512-byte tar block on purpose). */
function fakeSlot(dir: string): { parts: BundlePart[]; bytes: Map<string, Buffer> } {
  const bytes = new Map<string, Buffer>([
    [UKI_PATH, Buffer.concat([Buffer.from("MZ"), Buffer.alloc(1000, 1)])],
    ["initos/modules.sqfs", Buffer.alloc(512, 2)],
    ["initos/modules.verity", Buffer.alloc(513, 3)],
    ["initos/tools.sqfs", Buffer.alloc(1, 4)],
    ["initos/tools.verity", Buffer.from("hash tree")],
  ]);
  const parts = [...bytes].map(([path, data], i) => {
    const file = `${dir}/part${i}`;
    writeFileSync(file, data);
    return { path, file };
  });
  return { parts, bytes };
}

/** Every member of the bundle, in order, with its header and data. */
async function members(file: string) {
  const out: { path: string; type: string; mode: number; uid: number; gid: number; mtime: number; data: Buffer }[] = [];
  for await (const e of readTarStream(streamOf(bufferSource(readFileSync(file)), 100), file)) {
    const chunks: Buffer[] = [];
    for await (const c of e.data) chunks.push(c);
    out.push({ path: e.path, type: e.type, mode: e.mode, uid: e.uid, gid: e.gid, mtime: e.mtime, data: Buffer.concat(chunks) });
  }
  return out;
}

describe("update bundle", () => {
  it("is manifest.json first, then every file in the manifest's order, with its size and sha256", async () => {
    const dir = fresh("slot");
    const { parts, bytes } = fakeSlot(dir);
    const written = writeBundle(`${dir}/h-7.bundle`, { version: 7, host: "h", parts });
    const got = await members(`${dir}/h-7.bundle`);
    expect(got.map((m) => m.path)).toEqual([MANIFEST_NAME, ...parts.map((p) => p.path)]);
    const manifest = parseManifest(got[0]!.data.toString("utf8"));
    if (typeof manifest === "string") throw new Error(manifest);
    expect(manifest).toEqual(written);
    expect(manifest).toMatchObject({ format: 1, version: 7, host: "h" });
    expect(manifest.files).toEqual([...bytes].map(([path, data]) => ({ path, size: data.length, sha256: sha(data) })));
    for (const m of got.slice(1)) expect(m.data.equals(bytes.get(m.path)!), m.path).toBe(true);
    // Fixed owners, mode and time: nothing of the machine or the moment it was written.
    for (const m of got) expect({ type: m.type, mode: m.mode, uid: m.uid, gid: m.gid, mtime: m.mtime }).toEqual({ type: "file", mode: 0o644, uid: 0, gid: 0, mtime: 0 });
    // GNU tar reads it as the same list (the format is plain ustar).
    expect(execFileSync("tar", ["-tf", `${dir}/h-7.bundle`], { encoding: "utf8" }).trim().split("\n")).toEqual(got.map((m) => m.path));
  });

  it("is reproducible: the same parts give the same bytes, whatever the files' own times", () => {
    const dir = fresh("repro");
    const { parts } = fakeSlot(dir);
    writeBundle(`${dir}/a.bundle`, { version: 3, parts });
    execFileSync("touch", ["-d", "2001-01-01", ...parts.map((p) => p.file)]);
    writeBundle(`${dir}/b.bundle`, { version: 3, parts });
    expect(readFileSync(`${dir}/b.bundle`).equals(readFileSync(`${dir}/a.bundle`))).toBe(true);
  });

  it("refuses what the agent would refuse, in one line, and leaves no file", () => {
    const dir = fresh("bad");
    const { parts } = fakeSlot(dir);
    const fails = (opts: Parameters<typeof writeBundle>[1]) => {
      try {
        writeBundle(`${dir}/x.bundle`, opts);
      } catch (e) {
        expect(() => readFileSync(`${dir}/x.bundle`)).toThrow(/ENOENT/);
        expect(() => readFileSync(`${dir}/x.bundle.tmp`)).toThrow(/ENOENT/);
        return (e as Error).message;
      }
      return "written";
    };
    expect(fails({ version: 0, parts })).toMatch(/^bundle: manifest: version: /);
    expect(fails({ version: 1.5, parts })).toMatch(/^bundle: manifest: version: /);
    expect(fails({ version: 1, host: "Web_1", parts })).toMatch(/^bundle: manifest: host: /);
    expect(fails({ version: 1, parts: parts.slice(1) })).toBe(`bundle: manifest: (top level): files: no ${UKI_PATH}`);
    expect(fails({ version: 1, parts: [...parts, parts[1]!] })).toBe("bundle: manifest: (top level): files: a path is listed twice");
    expect(fails({ version: 1, parts: [...parts, { path: "initos/notes.txt", file: parts[1]!.file }] })).toMatch(/^bundle: manifest: files\.5\.path: expected EFI\/BOOT\/BOOTX64\.EFI or initos\/<image>\.sqfs\|\.verity$/);
    writeFileSync(`${dir}/empty`, "");
    expect(fails({ version: 1, parts: [...parts, { path: "initos/x.sqfs", file: `${dir}/empty` }] })).toMatch(/^bundle: manifest: files\.5\.size: /);
    expect(fails({ version: 1, parts: [...parts, { path: "initos/x.sqfs", file: `${dir}/nothing` }] })).toMatch(/ENOENT.*nothing/);
  });

  it("a file that changes while it is written fails the write (the manifest would lie)", () => {
    const dir = fresh("race");
    const { parts } = fakeSlot(dir);
    // The kernel gives another UUID at every read of this file: the first pass (hashing) and the
    // copy see different bytes, as with a file rewritten in between. (Not a FIFO: a reader that
    // opens one with no writer left blocks the whole test worker.)
    const changing = "/proc/sys/kernel/random/uuid";
    expect(readFileSync(changing, "utf8")).not.toBe(readFileSync(changing, "utf8"));
    expect(() => writeBundle(`${dir}/x.bundle`, { version: 1, parts: [...parts, { path: "initos/f.sqfs", file: changing }] })).toThrow(/^bundle: \/proc\/sys\/kernel\/random\/uuid changed while the bundle was written$/);
    expect(() => readFileSync(`${dir}/x.bundle`)).toThrow(/ENOENT/);
    expect(() => readFileSync(`${dir}/x.bundle.tmp`)).toThrow(/ENOENT/);
  });
});
