// What `make all` put in the signed config and on its disks (the rules are in
// test/unit/build-pins.test.ts): each image's verity parameters as its superblock says them,
// and partition UUIDs that the boot disk and the installer stick do not share.
import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { AgentConfigSchema } from "../../agent/config.ts";
import { veritySuperblock } from "../../agent/sys/cryptsetup.ts";
import { diskGuids } from "../../initrd/build.ts";

describe("the signed config pins each image's verity parameters", () => {
  it("the built initrd's config holds exactly what each image's superblock says", () => {
    const text = execFileSync("sh", ["-c", "zstd -dc build/config.cpio.zst | cpio -i --quiet --to-stdout etc/initos/config.json"], { encoding: "utf8" });
    const config = AgentConfigSchema.parse(JSON.parse(text));
    expect(config.images.map((i) => i.name)).toEqual(["modules", "tools"]);
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

  it("boot.img and installer.img share none (the installer stick next to an installed disk)", () => {
    const boot = uuids("build/boot.img");
    const installer = uuids("build/installer.img");
    expect(boot).toHaveLength(3);
    expect(boot.filter((u) => installer.includes(u))).toEqual([]);
    expect(boot).toEqual([diskGuids("boot.img").disk, ...diskGuids("boot.img").slots]);
  });
});
