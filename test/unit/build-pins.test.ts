// What the build puts in the signed config and on its disks for the boot to tell disks and
// images apart: the verity parameters beside each root hash, and partition UUIDs no two of its
// disks share. The last two tests read what `make all` built.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { AgentConfigSchema } from "../../agent/config.ts";
import { diskGuids, withRootHashes } from "../../initrd/build.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-build-pins-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const PARAMS = { hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks: 812, salt: "5a".repeat(32) };

describe("the signed config pins each image's verity parameters", () => {
  it("fills root hash and parameters from build/images/<name>.json; what the template pins stays", () => {
    writeFileSync(`${dir}/modules.json`, JSON.stringify({ name: "modules", rootHash: "ab".repeat(32), params: PARAMS }));
    const filled = withRootHashes({ images: [{ name: "modules" }] }, dir);
    expect(AgentConfigSchema.parse(filled).images[0]).toMatchObject({ rootHash: "ab".repeat(32), verity: PARAMS });
    // A template that pins its own root hash (a test's wrong one) still gets the parameters.
    const pinned = withRootHashes({ images: [{ name: "modules", rootHash: "cd".repeat(32) }] }, dir);
    expect(AgentConfigSchema.parse(pinned).images[0]).toMatchObject({ rootHash: "cd".repeat(32), verity: PARAMS });
  });

  it("refuses image metadata from a build that did not record the parameters", () => {
    writeFileSync(`${dir}/old.json`, JSON.stringify({ name: "old", rootHash: "ab".repeat(32) }));
    expect(() => withRootHashes({ images: [{ name: "old" }] }, dir)).toThrow(`${dir}/old.json has no verity parameters (made by an older build): rebuild the images`);
  });

  it("the built initrd's config holds exactly what each image's superblock says", async () => {
    const { veritySuperblock } = await import("../../agent/sys/cryptsetup.ts");
    const text = execFileSync("sh", ["-c", "zstd -dc build/base.cpio.zst | cpio -i --quiet --to-stdout etc/initos/config.json"], { encoding: "utf8" });
    const config = AgentConfigSchema.parse(JSON.parse(text));
    expect(config.images.map((i) => i.name)).toEqual(["modules", "sidecar"]);
    for (const image of config.images) {
      expect(image.verity).toEqual(veritySuperblock(`build/images/${image.name}.sqfs`, `build/images/${image.name}.verity`));
      expect(image.verity).toMatchObject({ hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096 });
    }
  });
});

describe("partition UUIDs of the build's disks", () => {
  const uuids = (disk: string) => {
    const t = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as { partitiontable: { id: string; partitions: { uuid: string }[] } };
    return [t.partitiontable.id, ...t.partitiontable.partitions.map((p) => p.uuid)].map((u) => u.toLowerCase());
  };

  it("are reproducible per disk name and differ between disks", () => {
    expect(diskGuids("build/boot.img")).toEqual(diskGuids("/elsewhere/boot.img"));
    const all = ["boot.img", "installer.img", "boot-unsigned.img"].flatMap((n) => [diskGuids(n).disk, ...diskGuids(n).slots]);
    expect(new Set(all).size).toBe(all.length);
  });

  it("boot.img and installer.img share none (the installer stick next to an installed disk)", () => {
    const boot = uuids("build/boot.img");
    const installer = uuids("build/installer.img");
    expect(boot).toHaveLength(3);
    expect(boot.filter((u) => installer.includes(u))).toEqual([]);
    expect(boot).toEqual([diskGuids("boot.img").disk, ...diskGuids("boot.img").slots]);
  });
});
