// The jail image store for real (root): a small btrfs, loop-mounted under a temporary directory,
// is the pool; the host's btrfs command stands in for the tools image's. Good archives become
// read-only subvolumes with the image's owners and modes; bad ones are refused with one line
// and leave the pool exactly as it was.
import { scratchDirs } from "../scratch.ts";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { importImage, listImages, readImage, removeImage } from "../../agent/jails/images.ts";
import type { Logger } from "../../agent/log.ts";
import { realSys, type Sys } from "../../agent/sys/index.ts";
import { type LayerEntry, LOWER, OciLayoutWriter, ociImageTar, tarBytes, UPPER } from "../oci-fixture.ts";

const fresh = scratchDirs("initos-images");
const BTRFS = ["btrfs"];
const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";

let sys: Sys;
let pool = "";
const lines: string[] = [];
const log: Logger = { err: (m) => lines.push(`err ${m}`), warn: (m) => lines.push(`warn ${m}`), info: (m) => lines.push(`info ${m}`), debug: () => {} };
const opts = () => ({ pool, btrfs: BTRFS, now: () => new Date("2026-11-30T12:00:00Z") });

async function* bodyOf(b: Buffer, chunk = 100_000): AsyncGenerator<Uint8Array> {
  for (let i = 0; i < b.length; i += chunk) yield b.subarray(i, i + chunk);
}
const importTar = (name: string, tar: Buffer) => importImage(sys, log, name, bodyOf(tar), opts());

/** The pool's top level and the store's directory: what a refused import must leave as it found. */
const state = () => ({ top: readdirSync(pool).sort(), store: readdirSync(`${pool}/initos/images`).sort(), subvols: execFileSync("btrfs", ["subvolume", "list", "-o", pool], { encoding: "utf8" }).trim() });
const stat = (p: string) => execFileSync("stat", ["-c", "%u:%g %a %F", p], { encoding: "utf8" }).trim();

const WEB: LayerEntry[][] = [
  LOWER,
  [
    ...UPPER,
    { path: "home/app", type: "dir", mode: 0o750, uid: 1000, gid: 1000 },
    { path: "home/app/data", type: "file", data: "owned\n", mode: 0o640, uid: 1000, gid: 1001 },
    { path: "bin/su-ish", type: "file", data: "#!/bin/sh\n", mode: 0o4755 },
    { path: "etc/alias", type: "symlink", target: "/etc/keep" },
    { path: "dev/null", type: "char", major: 1, minor: 3 },
    { path: "run/pipe", type: "fifo", mode: 0o620 },
  ],
];

beforeAll(async () => {
  expect(process.getuid?.()).toBe(0);
  sys = await realSys();
  const d = fresh("pool");
  execFileSync("truncate", ["-s", "256M", `${d}/pool.img`]);
  execFileSync("mkfs.btrfs", ["-q", `${d}/pool.img`]);
  pool = `${d}/x`;
  mkdirSync(pool);
  execFileSync("mount", ["-o", "loop", `${d}/pool.img`, pool]);
});

afterAll(() => {
  if (pool && existsSync(pool)) execFileSync("umount", [pool]); // the loop device goes with it (autoclear)
});

describe("image import", () => {
  it("applies a good archive into a read-only subvolume with the image's owners and modes, and writes its metadata", async () => {
    const line = await importTar("web", ociImageTar({ layers: WEB, config: { Entrypoint: ["/bin/app"], Cmd: ["-v"], Env: ["A=1"], WorkingDir: "/srv", User: "1000" }, gzip: true }));
    expect(line).toMatch(/^image web: sha256:[0-9a-f]{12}, 26 B in 2 layers, 1 device node skipped \(archive \d+\.\d KiB\), new, imported in \d+\.\ds$/);
    const img = `${pool}/@img-web`;
    expect(execFileSync("btrfs", ["property", "get", "-ts", img, "ro"], { encoding: "utf8" }).trim()).toBe("ro=true");
    expect(execFileSync("find", [".", "-mindepth", "1"], { cwd: img, encoding: "utf8" }).trim().split("\n").sort()).toEqual(
      ["./a", "./a/y", "./b", "./b/new", "./bin", "./bin/su-ish", "./dev", "./etc", "./etc/alias", "./etc/keep", "./home", "./home/app", "./home/app/data", "./run", "./run/pipe"].sort(),
    );
    expect(readFileSync(`${img}/home/app/data`, "utf8")).toBe("owned\n");
    expect(stat(`${img}/home/app`)).toBe("1000:1000 750 directory");
    expect(stat(`${img}/home/app/data`)).toBe("1000:1001 640 regular file");
    expect(stat(`${img}/bin/su-ish`)).toBe("0:0 4755 regular file"); // chown before chmod keeps set-uid
    expect(stat(`${img}/run/pipe`)).toBe("0:0 620 fifo");
    expect(readlinkSync(`${img}/etc/alias`)).toBe("/etc/keep");
    expect(() => execFileSync("touch", [`${img}/new-file`], { stdio: "pipe" })).toThrow(/Read-only file system/);
    expect(readImage(sys, "web", opts())).toMatchObject({
      name: "web",
      layers: 2,
      size: 26, // what stays: a/x and b/z (1 byte each) were written by layer 1 and deleted by layer 2
      devicesSkipped: 1,
      imported: "2026-11-30T12:00:00.000Z",
      entrypoint: ["/bin/app"],
      cmd: ["-v"],
      env: ["A=1"],
      workingDir: "/srv",
      user: "1000",
    });
    expect(state().top).toEqual(["@img-web", "initos"]);
    expect(state().store).toEqual(["web.json"]);
  });

  it("re-importing a name swaps the new image in and deletes the old one, leaving nothing else", async () => {
    const before = readImage(sys, "web", opts())!;
    const line = await importTar("web", ociImageTar({ layers: [[{ path: "v2", type: "file", data: "two\n" }]] }));
    expect(line).toMatch(/^image web: .* in 1 layer .*, replaced, /);
    expect(readdirSync(`${pool}/@img-web`)).toEqual(["v2"]);
    expect(readImage(sys, "web", opts())?.digest).not.toBe(before.digest);
    const s = state();
    expect(s.top).toEqual(["@img-web", "initos"]);
    expect(s.store).toEqual(["web.json"]);
    expect(s.subvols.split("\n")).toHaveLength(1); // the old subvolume is deleted, not just renamed away
    expect(lines.filter((l) => l.startsWith("err"))).toEqual([]);
  });

  describe("refuses a bad archive with one line and leaves the pool as it was", () => {
    const corruptLayer = () => {
      const w = new OciLayoutWriter();
      const m = w.image({ layers: [[{ path: "ok", type: "file", data: "fine" }], [{ path: "f", type: "file", data: "genuine!" }]] });
      const manifest = JSON.parse(w.blobs.get(m.digest)!.toString()) as { layers: { digest: string }[] };
      const blob = w.blobs.get(manifest.layers[1]!.digest)!;
      w.replace(manifest.layers[1]!.digest, Buffer.from(blob.toString("latin1").replace("genuine!", "tampered"), "latin1"));
      return w.tar([m]);
    };
    const outside = () => `${pool}/outside`;
    const cases: [string, () => Buffer, RegExp][] = [
      ["a truncated archive", () => ociImageTar({ layers: WEB }).subarray(0, 3000), /^image import web: refused: archive: .*(truncated|cut off|not a tar)/],
      ["a layer whose digest does not match", corruptLayer, /^image import web: refused: archive: blob sha256:[0-9a-f]{64} does not match its digest/],
      ["a member path with ..", () => ociImageTar({ layers: [[{ path: "ok", type: "file", data: "x" }, { path: "../escaped", type: "file", data: "x" }]] }), /^image import web: refused: .*refusing path "\.\.\/escaped" with "\.\."$/],
      [
        "a write through a symlink that climbs out of the root",
        () => ociImageTar({ layers: [[{ path: "up", type: "symlink", target: "../../../../.." }, { path: `up${outside()}/evil`, type: "file", data: "x" }]] }),
        /^image import web: refused: .*goes through symlink "up", which points outside the image$/,
      ],
      ["a tar that is not an OCI layout", () => tarBytes([{ name: "etc/passwd", flag: "0", data: Buffer.from("root:x:0:0::/root:/bin/sh\n") }]), /^image import web: refused: archive: not an OCI image layout \(no index\.json\)$/],
      ["bytes that are not a tar", () => randomBytes(10_000), /^image import web: refused: archive: /],
    ];
    for (const [what, tar, why] of cases) {
      it(what, async () => {
        mkdirSync(outside(), { recursive: true });
        const before = state();
        const old = readImage(sys, "web", opts());
        const err = await importTar("web", tar()).then(
          () => undefined,
          (e: unknown) => e as Error,
        );
        expect(err?.message).toMatch(why);
        expect(err?.message).not.toContain("\n");
        expect(state()).toEqual(before);
        expect(readImage(sys, "web", opts())).toEqual(old);
        expect(readdirSync(`${pool}/@img-web`)).toEqual(["v2"]);
        expect(readdirSync(outside())).toEqual([]);
      });
    }

    it("an archive bigger than the pool's free space (ENOSPC while spooling)", async () => {
      const before = state();
      async function* huge(): AsyncGenerator<Uint8Array> {
        const chunk = randomBytes(1 << 20);
        for (let i = 0; i < 400; i++) yield chunk;
      }
      const err = await importImage(sys, log, "big", huge(), opts()).then(
        () => undefined,
        (e: unknown) => e as Error,
      );
      expect(err?.message).toMatch(/^image import big: refused: .*ENOSPC/);
      expect(state()).toEqual(before);
    });

    it("a name that is not an image name, before anything is written", async () => {
      const before = state();
      await expect(importTar("../x", ociImageTar({ layers: [] }))).rejects.toThrow(/^image import "\.\.\/x": bad name: /);
      expect(state()).toEqual(before);
    });
  });

  it("an absolute symlink is the image's own: a write through it stays inside the image", async () => {
    const target = `${pool}/outside`;
    mkdirSync(target, { recursive: true });
    await importTar("abs", ociImageTar({ layers: [[{ path: "lnk", type: "symlink", target }, { path: "lnk/inside", type: "file", data: "x" }]] }));
    expect(readdirSync(target)).toEqual([]);
    expect(readFileSync(`${pool}/@img-abs${target}/inside`, "utf8")).toBe("x");
    expect(lstatSync(`${pool}/@img-abs/lnk`).isSymbolicLink()).toBe(true);
  });
});

describe("under Bun, the agent's runtime", () => {
  it("imports an image with zstd layers through node:zlib's stream, with no zstd command on PATH", () => {
    const d = fresh("bun");
    writeFileSync(`${d}/z.tar`, ociImageTar({ layers: [LOWER, UPPER], zstd: true }));
    const run = (tar: string) =>
      JSON.parse(execFileSync(BUN, ["test/system/helpers/image-import.ts", pool, "zst", tar, "/usr/bin/btrfs"], { encoding: "utf8", env: { PATH: "" } })) as { line?: string; error?: string };
    expect(run(`${d}/z.tar`).line).toMatch(/^image zst: sha256:[0-9a-f]{12}, 10 B in 2 layers \(archive .*\), new, /);
    expect(execFileSync("find", [".", "-mindepth", "1"], { cwd: `${pool}/@img-zst`, encoding: "utf8" }).trim().split("\n").sort()).toEqual(["./a", "./a/y", "./b", "./b/new", "./etc", "./etc/keep"]);
  });
});

describe("image list and rm", () => {
  it("lists the images with their digests, sizes and import times", () => {
    const rows = listImages(sys, opts());
    expect(rows.map((r) => r.name)).toEqual(["abs", "web", "zst"]);
    expect(rows[1]).toEqual({ name: "web", digest: readImage(sys, "web", opts())!.digest, size: 4, imported: "2026-11-30T12:00:00.000Z" });
  });

  it("refuses to remove an image a running jail uses, and removes one nobody uses", () => {
    expect(() => removeImage(sys, log, "web", (n) => n === "web", opts())).toThrow(/^image rm web: refused: a running jail uses it/);
    expect(existsSync(`${pool}/@img-web`)).toBe(true);
    expect(removeImage(sys, log, "web", () => false, opts())).toBe("image web: removed");
    expect(removeImage(sys, log, "abs", () => false, opts())).toBe("image abs: removed");
    expect(removeImage(sys, log, "zst", () => false, opts())).toBe("image zst: removed");
    expect(() => removeImage(sys, log, "web", () => false, opts())).toThrow(/^image rm web: no such image$/);
    expect(state()).toEqual({ top: ["initos", "outside"], store: [], subvols: "" });
    expect(listImages(sys, opts())).toEqual([]);
  });
});

describe("an archive a real tool wrote", () => {
  it("imports buildah's oci-archive (what skopeo writes too: containers/image): two layers, its whiteouts honoured", async () => {
    const d = fresh("buildah");
    const buildah = (...args: string[]) => execFileSync("buildah", ["--root", `${d}/storage`, "--runroot", `${d}/runroot`, "--storage-driver", "vfs", ...args], { encoding: "utf8" }).trim();
    mkdirSync(`${d}/ctx/etc`, { recursive: true });
    writeFileSync(`${d}/ctx/etc/gone`, "removed by layer 2\n");
    writeFileSync(`${d}/ctx/etc/kept`, "kept\n");
    const c1 = buildah("from", "scratch");
    buildah("copy", c1, `${d}/ctx`, "/");
    buildah("commit", "-q", c1, "initos-store-base");
    const c2 = buildah("from", "--pull=never", "localhost/initos-store-base");
    rmSync(`${buildah("mount", c2)}/etc/gone`);
    writeFileSync(`${d}/new`, "layer 2\n");
    buildah("copy", c2, `${d}/new`, "/etc/new");
    buildah("config", "--cmd", "/bin/app", c2);
    buildah("commit", "-q", c2, `oci-archive:${d}/image.tar`);
    buildah("rm", "--all");

    const line = await importTar("bld", readFileSync(`${d}/image.tar`));
    expect(line).toMatch(/^image bld: sha256:[0-9a-f]{12}, \d+ B in 2 layers \(archive .*\), new, imported in/);
    expect(execFileSync("find", ["etc", "-type", "f"], { cwd: `${pool}/@img-bld`, encoding: "utf8" }).trim().split("\n").sort()).toEqual(["etc/kept", "etc/new"]);
    expect(readImage(sys, "bld", opts())).toMatchObject({ cmd: ["/bin/app"], layers: 2 });
    expect(removeImage(sys, log, "bld", () => false, opts())).toBe("image bld: removed");
  }, 120_000);
});
