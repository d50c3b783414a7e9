// The image store's decisions, on the fake machine: which swap, what a refusal leaves, what
// list shows, when rm says no. The store working on a real btrfs is test/system/image-store.test.ts.
import { describe, expect, it } from "vitest";
import { humanSize, importImage, listImages, removeImage, storePaths, swapIn } from "../../agent/jails/images.ts";
import type { Logger } from "../../agent/log.ts";
import { FakeSys } from "./fakesys.ts";

const lines: string[] = [];
const log: Logger = { err: (m) => lines.push(m), warn: (m) => lines.push(m), info: (m) => lines.push(m), debug: () => {} };
const opts = { pool: "/x", btrfs: ["btrfs"] };
async function* body(...chunks: string[]): AsyncGenerator<Uint8Array> {
  for (const c of chunks) yield Buffer.from(c);
}
const meta = (name: string, digest: string) =>
  JSON.stringify({ name, digest, layers: 1, size: 2048, devicesSkipped: 0, imported: "2026-11-30T12:00:00.000Z", entrypoint: [], cmd: ["/init"], env: [], workingDir: "", user: "" });

function pool(): FakeSys {
  return new FakeSys().add("/x", { kind: "dir" }).add("/x/initos", { kind: "dir" }).add("/x/initos/images", { kind: "dir" });
}

describe("swapIn", () => {
  it("exchanges the two names when the image exists, so its name never goes missing", () => {
    const sys = pool().add("/x/@img-web", { kind: "dir" }).add("/x/@img-web/old", { kind: "file" }).add("/x/@img-web.new", { kind: "dir" }).add("/x/@img-web.new/new", { kind: "file" });
    expect(swapIn(sys, storePaths("web", "/x"))).toBe(true);
    expect(sys.calls).toEqual(["exchange /x/@img-web.new /x/@img-web"]);
    expect(sys.files.has("/x/@img-web/new") && sys.files.has("/x/@img-web.new/old")).toBe(true);
  });

  it("renames when there is no image of that name yet (RENAME_EXCHANGE needs both names)", () => {
    const sys = pool().add("/x/@img-web.new", { kind: "dir" });
    expect(swapIn(sys, storePaths("web", "/x"))).toBe(false);
    expect(sys.calls).toEqual(["rename /x/@img-web.new /x/@img-web"]);
  });
});

describe("importImage refusals", () => {
  it("refuses a bad name before touching anything", async () => {
    const sys = pool();
    for (const name of ["../x", "Web", "a.b", "", "x".repeat(12)]) {
      await expect(importImage(sys, log, name, body("x"), opts)).rejects.toThrow(/^image import ".*": bad name: name: /);
    }
    expect(sys.calls).toEqual([]);
  });

  it("removes an interrupted import's leftovers, and on ENOSPC leaves no spool file behind", async () => {
    const sys = pool().add("/x/@img-web.new", { kind: "dir" }).add("/x/initos/images/.import-web.tar", { kind: "file" }).add("/x/@img-web", { kind: "dir" });
    sys.spaceLeft = 3;
    await expect(importImage(sys, log, "web", body("ab", "cd"), opts)).rejects.toThrow(/^image import web: refused: write \/x\/initos\/images\/\.import-web\.tar: ENOSPC$/);
    expect(sys.calls.filter((c) => !c.startsWith("mkdirp"))).toEqual([
      "run btrfs subvolume delete /x/@img-web.new",
      "unlink /x/initos/images/.import-web.tar",
      "writeStream /x/initos/images/.import-web.tar",
    ]);
    expect(sys.readdir("/x/initos/images")).toEqual([]);
    expect(sys.files.has("/x/@img-web")).toBe(true); // the image itself is never touched
  });

  it("refuses a store directory that is a symlink (a jail sharing the pool's top could plant one)", async () => {
    const sys = new FakeSys().add("/x", { kind: "dir" }).add("/x/initos", { kind: "link", target: "/etc" });
    await expect(importImage(sys, log, "web", body("x"), opts)).rejects.toThrow(/^image import web: refused: \/x\/initos is not a directory \(link\)$/);
    expect(sys.calls).toEqual([]);
  });
});

describe("listImages", () => {
  it("lists @img- subvolumes with valid names, with '?' where the metadata is missing or bad", () => {
    const sys = pool()
      .add("/x/@img-web", { kind: "dir" })
      .add("/x/@img-db", { kind: "dir" })
      .add("/x/@img-old", { kind: "dir" })
      .add("/x/@img-web.new", { kind: "dir" }) // an import under way
      .add("/x/@root", { kind: "dir" })
      .add("/x/initos/images/web.json", { kind: "file", data: meta("web", "sha256:aaaa") })
      .add("/x/initos/images/db.json", { kind: "file", data: meta("other", "sha256:bbbb") }) // names another image
      .add("/x/initos/images/old.json", { kind: "file", data: "{not json" });
    expect(listImages(sys, opts)).toEqual([
      { name: "db", digest: "?", size: 0, imported: "?" },
      { name: "old", digest: "?", size: 0, imported: "?" },
      { name: "web", digest: "sha256:aaaa", size: 2048, imported: "2026-11-30T12:00:00.000Z" },
    ]);
  });
});

describe("removeImage", () => {
  const withWeb = () => pool().add("/x/@img-web", { kind: "dir" }).add("/x/initos/images/web.json", { kind: "file", data: meta("web", "sha256:aaaa") });

  it("refuses an image a running jail uses, deleting nothing", () => {
    const sys = withWeb();
    expect(() => removeImage(sys, log, "web", (n) => n === "web", opts)).toThrow(/^image rm web: refused: a running jail uses it \(stop the jail first\)$/);
    expect(sys.calls).toEqual([]);
  });

  it("deletes the subvolume, then the metadata (a failed delete keeps both)", () => {
    const sys = withWeb();
    expect(removeImage(sys, log, "web", () => false, opts)).toBe("image web: removed");
    expect(sys.calls).toEqual(["run btrfs subvolume delete /x/@img-web", "unlink /x/initos/images/web.json"]);

    const failing = withWeb();
    failing.failOn.set("run btrfs subvolume delete", new Error("ERROR: Could not destroy subvolume/snapshot: Device or resource busy"));
    expect(() => removeImage(failing, log, "web", () => false, opts)).toThrow(/^image rm web: ERROR: Could not destroy .*busy$/);
    expect(failing.files.has("/x/initos/images/web.json")).toBe(true);
  });

  it("says so for an image that does not exist, and for a bad name", () => {
    expect(() => removeImage(pool(), log, "web", () => false, opts)).toThrow(/^image rm web: no such image$/);
    expect(() => removeImage(pool(), log, "../@root", () => false, opts)).toThrow(/^image rm "\.\.\/@root": bad name: /);
  });
});

it("humanSize", () => {
  expect([0, 26, 1024, 12_800, 3.25 * 2 ** 20, 1.5 * 2 ** 30].map(humanSize)).toEqual(["0 B", "26 B", "1.0 KiB", "12.5 KiB", "3.3 MiB", "1.5 GiB"]);
});
