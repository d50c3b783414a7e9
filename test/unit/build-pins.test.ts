// What the build puts in the signed config and on its disks for the boot to tell disks and
// images apart: the verity parameters beside each root hash, and partition UUIDs no two of its
// disks share. What `make all` built is checked in test/system/build-pins.test.ts.
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
});

describe("partition UUIDs of the build's disks", () => {
  it("are reproducible per disk name and differ between disks", () => {
    expect(diskGuids("build/boot.img")).toEqual(diskGuids("/elsewhere/boot.img"));
    const all = ["boot.img", "installer.img", "boot-unsigned.img"].flatMap((n) => [diskGuids(n).disk, ...diskGuids(n).slots]);
    expect(new Set(all).size).toBe(all.length);
  });
});
