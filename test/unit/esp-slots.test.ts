// Which ESP slots a boot uses when several disks carry initos partitions: the booted partition
// (LoaderDevicePartUUID) and its sibling slot on the same disk, never a partition of another
// disk with the same name. Fakes for the decisions; reading real partitions through libblkid on
// a loop device is test/system/esp-slots.test.ts.
import { describe, expect, it } from "vitest";
import { AgentConfigSchema } from "../../agent/config.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { findEsps, LOADER_PART_UUID } from "../../agent/stages/esp.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const SLOTS = AgentConfigSchema.parse({}).esp.slots;
const U = {
  a1: "11111111-0000-4000-8000-0000000000a1",
  b1: "11111111-0000-4000-8000-0000000000b1",
  a2: "22222222-0000-4000-8000-0000000000a2",
  b2: "22222222-0000-4000-8000-0000000000b2",
};

/** LoaderDevicePartUUID as systemd-stub writes it: attributes, then UTF-16LE upper-case GUID. */
function bootedFrom(s: FakeSys, uuid: string): FakeSys {
  const v = Buffer.concat([Buffer.from([7, 0, 0, 0]), Buffer.from(`${uuid.toUpperCase()}\0`, "utf16le")]);
  return s.add(LOADER_PART_UUID, { kind: "file", data: v.toString("latin1") });
}

/** Two disks that both carry initos ESPs (vda: an install, vdb: an installer stick), and a LUKS partition. */
function twoDisks(): FakeSys {
  return new FakeSys()
    .addPartition("vda", "vda1", { uuid: U.a1, name: "initos-a" })
    .addPartition("vda", "vda2", { uuid: U.b1, name: "initos-b" })
    .addPartition("vda", "vda3", { uuid: "11111111-0000-4000-8000-00000000111c", name: "initos-luks" })
    .addPartition("vdb", "vdb1", { uuid: U.a2, name: "initos-a" })
    .addPartition("vdb", "vdb2", { uuid: U.b2, name: "initos-b" });
}

async function slots(s: FakeSys, log = silentLog()) {
  const r = await findEsps(s, log, new Coldplug(s, log), SLOTS, 1);
  return r.slots.map((x) => `${x.name} ${x.device}${x.booted ? " booted" : ""}`);
}

describe("ESP slots: the booted partition and its sibling on the same disk", () => {
  it("takes the slots of the disk the firmware booted from, whichever disk that is", async () => {
    expect(await slots(bootedFrom(twoDisks(), U.a1))).toEqual(["a /dev/vda1 booted", "b /dev/vda2"]);
    expect(await slots(bootedFrom(twoDisks(), U.b1))).toEqual(["b /dev/vda2 booted", "a /dev/vda1"]);
    expect(await slots(bootedFrom(twoDisks(), U.a2))).toEqual(["a /dev/vdb1 booted", "b /dev/vdb2"]);
    const log = silentLog();
    expect(await slots(bootedFrom(twoDisks(), U.b2), log)).toEqual(["b /dev/vdb2 booted", "a /dev/vdb1"]);
    expect(log.lines).toContain("info: esp: slot b /dev/vdb2 (booted), slot a /dev/vdb1");
  });

  it("a booted disk with only the booted slot: that one, never the other disk's sibling", async () => {
    const s = new FakeSys()
      .addPartition("vda", "vda1", { uuid: U.a1, name: "initos-a" })
      .addPartition("vdb", "vdb1", { uuid: U.a2, name: "initos-a" })
      .addPartition("vdb", "vdb2", { uuid: U.b2, name: "initos-b" });
    expect(await slots(bootedFrom(s, U.a1))).toEqual(["a /dev/vda1 booted"]);
  });

  it("NVMe partition names (nvme0n1p1): the disk comes from sysfs, not from the name", async () => {
    const s = new FakeSys()
      .addPartition("nvme0n1", "nvme0n1p1", { uuid: U.a1, name: "initos-a" })
      .addPartition("nvme0n1", "nvme0n1p2", { uuid: U.b1, name: "initos-b" })
      .addPartition("nvme1n1", "nvme1n1p2", { uuid: U.b2, name: "initos-b" });
    expect(await slots(bootedFrom(s, U.a1))).toEqual(["a /dev/nvme0n1p1 booted", "b /dev/nvme0n1p2"]);
  });

  it("refuses a booted partition UUID found on two partitions (a cloned disk): it cannot tell which one booted", async () => {
    const s = twoDisks();
    s.partEntries.set("/dev/vdb1", { uuid: U.a1, name: "initos-a" });
    await expect(slots(bootedFrom(s, U.a1))).rejects.toThrow(`esp: booted partition ${U.a1} is on several partitions: /dev/vda1, /dev/vdb1`);
  });

  it("refuses a booted partition that is none of the slots, naming it", async () => {
    const s = twoDisks().addPartition("vdc", "vdc1", { uuid: "33333333-0000-4000-8000-000000000001", name: "EFI system" });
    await expect(slots(bootedFrom(s, "33333333-0000-4000-8000-000000000001"))).rejects.toThrow(
      'esp: booted from /dev/vdc1 (33333333-0000-4000-8000-000000000001, named "EFI system"), which is none of the slots initos-a, initos-b',
    );
  });

  it("refuses two partitions with the sibling's name on the booted disk", async () => {
    const s = twoDisks().addPartition("vda", "vda4", { uuid: "11111111-0000-4000-8000-0000000000b4", name: "initos-b" });
    await expect(slots(bootedFrom(s, U.a1))).rejects.toThrow("esp: /dev/vda has several partitions named initos-b: /dev/vda2, /dev/vda4");
  });

  it("waits for the booted partition, bounded, naming its UUID", async () => {
    const s = bootedFrom(new FakeSys().addPartition("vdb", "vdb1", { uuid: U.a2, name: "initos-a" }), U.a1);
    await expect(slots(s)).rejects.toThrow(`boot partition PARTUUID=${U.a1} did not appear within 1s`);
  });
});

describe("ESP slots without LoaderDevicePartUUID (direct kernel boot)", () => {
  it("one disk with slots: slot a, then b", async () => {
    const s = new FakeSys()
      .addPartition("vda", "vda1", { uuid: U.a1, name: "initos-a" })
      .addPartition("vda", "vda2", { uuid: U.b1, name: "initos-b" })
      .addPartition("vdc", "vdc1", { uuid: null, name: null }); // the test root's disk: MBR, no names
    expect(await slots(s)).toEqual(["a /dev/vda1", "b /dev/vda2"]);
  });

  it("slots on two disks: refused in one line naming the disks (nothing says which one booted)", async () => {
    await expect(slots(twoDisks())).rejects.toThrow("esp: slots on several disks (/dev/vda, /dev/vdb) and no LoaderDevicePartUUID to tell which one booted");
  });

  it("waits for a slot, bounded, naming the partition names", async () => {
    await expect(slots(new FakeSys())).rejects.toThrow("boot partition named initos-a or initos-b did not appear within 1s");
  });
});
