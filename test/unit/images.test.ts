import { describe, expect, it } from "vitest";
import { unverifiedAllowed } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { AgentConfigSchema } from "../../agent/config.ts";
import { Coldplug, modaliases } from "../../agent/stages/devices.ts";
import { bootedPartUuid, findEsps, LOADER_PART_UUID } from "../../agent/stages/esp.ts";
import { openImage, setupImages } from "../../agent/stages/images.ts";
import { vmHostOpener } from "../../agent/jails/vm.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const HASH = "ab".repeat(32);
const VERITY = { hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks: 25000, salt: "cd".repeat(32) };
const cfg = AgentConfigSchema.parse({
  images: [{ name: "modules", rootHash: HASH, verity: VERITY, binds: [{ from: "modules", to: "/lib/modules" }] }],
});
const SLOTS = cfg.esp.slots;

/** Two ESPs with intact images; LoaderDevicePartUUID names `booted` when given. */
function machine(booted?: "a" | "b"): FakeSys {
  const s = new FakeSys();
  const uuid = { a: "11111111-2222-3333-4444-55555555aaaa", b: "11111111-2222-3333-4444-55555555bbbb" };
  s.addPartition("vda", "vda1", { uuid: uuid.a, name: "initos-a" }).addPartition("vda", "vda2", { uuid: uuid.b, name: "initos-b" });
  if (booted) {
    const v = Buffer.concat([Buffer.from([7, 0, 0, 0]), Buffer.from(`${uuid[booted].toUpperCase()}\0`, "utf16le")]);
    s.add(LOADER_PART_UUID, { kind: "file", data: v.toString("latin1") });
  }
  for (const slot of ["a", "b"]) {
    for (const f of ["modules.sqfs", "modules.verity"]) s.add(`/run/initos/esp-${slot}/initos/${f}`, { kind: "file" });
  }
  s.add("/run/initos/images/modules/modules", { kind: "dir" });
  return s;
}

async function esps(s: FakeSys) {
  return findEsps(s, silentLog(), new Coldplug(s, silentLog()), SLOTS, 1);
}

describe("ESP slots", () => {
  it("reads the booted partition from LoaderDevicePartUUID and tries it first", async () => {
    const s = machine("b");
    expect(bootedPartUuid(s)).toBe("11111111-2222-3333-4444-55555555bbbb");
    const r = await esps(s);
    expect(r.slots.map((x) => [x.name, x.device, x.booted])).toEqual([
      ["b", "/dev/vda2", true],
      ["a", "/dev/vda1", false],
    ]);
  });

  it("without EFI (direct kernel boot) tries slot a, then b", async () => {
    expect((await esps(machine())).slots.map((x) => x.name)).toEqual(["a", "b"]);
  });

  it("refuses a boot partition that is neither slot", async () => {
    const s = machine("a");
    s.partEntries.set("/dev/vda1", { uuid: "11111111-2222-3333-4444-55555555aaaa", name: "ESP" });
    await expect(esps(s)).rejects.toThrow('esp: booted from /dev/vda1 (11111111-2222-3333-4444-55555555aaaa, named "ESP"), which is none of the slots initos-a, initos-b');
  });

  it("waits for the ESP, bounded, naming the partitions", async () => {
    const s = new FakeSys();
    await expect(esps(s)).rejects.toThrow("boot partition named initos-a or initos-b did not appear within 1s");
  });
});

describe("verified images", () => {
  it("mounts the booted slot's copy when it verifies, read-only, and binds it", async () => {
    const s = machine("a");
    const log = silentLog();
    const [m] = await setupImages(s, log, cfg, await esps(s), false, new Coldplug(s, log));
    expect(m).toMatchObject({ slot: "a", device: "/dev/mapper/initos-modules", verified: true });
    expect(s.calls).toContain("mount /dev/vda1 /run/initos/esp-a vfat 0xf umask=0077");
    expect(s.calls).toContain("mount /dev/mapper/initos-modules /run/initos/images/modules squashfs 0x7");
    expect(s.calls).toContain("mount /run/initos/images/modules/modules /lib/modules null 0x1000");
    expect(s.calls).toContain("reloadModuleIndex"); // a new module tree: re-read its index
    expect(s.calls.some((c) => c.startsWith("mount /dev/vda2"))).toBe(false); // slot b never needed
    // The superblock is held to the signed config's parameters, not only the root hash.
    expect(s.verityPinned.get("/run/initos/esp-a/initos/modules.sqfs")).toEqual(VERITY);
  });

  it("checks every boot image at once; one that fails fails the stage only after the others settled", async () => {
    const s = machine("a");
    for (const slot of ["a", "b"]) for (const f of ["tools.sqfs", "tools.verity"]) s.add(`/run/initos/esp-${slot}/initos/${f}`, { kind: "file" });
    const two = AgentConfigSchema.parse({ images: [...cfg.images, { name: "tools", rootHash: "ef".repeat(32), verity: VERITY }] });
    // Each check finishes only when the test says so.
    const pending: { name: string; data: string; done: (e?: Error) => void }[] = [];
    const open = s.verityOpen.bind(s);
    s.verityOpen = (name, data, hash, root, v) =>
      new Promise((res, rej) => pending.push({ name, data, done: (e) => (e ? rej(e) : res(open(name, data, hash, root, v))) }));
    const log = silentLog();
    const stage = setupImages(s, log, two, await esps(s), false, new Coldplug(s, log));
    let failed: unknown;
    stage.catch((e: unknown) => (failed = e));
    await new Promise((r) => setTimeout(r, 0));
    expect(pending.map((p) => p.name)).toEqual(["initos-modules", "initos-tools"]); // both started, neither done
    pending[0]!.done(new Error("dm-verity refused data block 7")); // modules, slot a
    await new Promise((r) => setTimeout(r, 0));
    pending[2]!.done(new Error("dm-verity refused data block 9")); // modules, slot b
    await new Promise((r) => setTimeout(r, 0));
    expect(failed).toBeUndefined(); // tools is still being checked
    pending[1]!.done();
    await expect(stage).rejects.toThrow(`image modules: no copy matches root hash ${HASH.slice(0, 16)}... (slot a: dm-verity refused data block 7; slot b: dm-verity refused data block 9)`);
    expect(s.calls).toContain("mount /dev/mapper/initos-tools /run/initos/images/tools squashfs 0x7");
  });

  it("an image marked onDemand is not read, verified or mounted at boot; openImage opens it later", async () => {
    const s = machine("a");
    for (const slot of ["a", "b"]) for (const f of ["vmhost.sqfs", "vmhost.verity"]) s.add(`/run/initos/esp-${slot}/initos/${f}`, { kind: "file" });
    const withVm = AgentConfigSchema.parse({ images: [...cfg.images, { name: "vmhost", rootHash: "ef".repeat(32), verity: VERITY, onDemand: true }] });
    const log = silentLog();
    const e = await esps(s);
    expect((await setupImages(s, log, withVm, e, false, new Coldplug(s, log))).map((m) => m.name)).toEqual(["modules"]);
    expect(s.calls.some((c) => c.includes("vmhost"))).toBe(false);
    expect(log.lines).toContain("info: image vmhost: opened on demand, not at boot");
    expect(await openImage(s, log, e, withVm.esp.dir, withVm.images[1]!, false)).toMatchObject({ name: "vmhost", mountPoint: "/run/initos/images/vmhost", verified: true });
  });

  it("vmHostOpener: opens the vmhost image the first time, then reuses its mount; without it in the config, one line", async () => {
    const s = machine("a");
    for (const slot of ["a", "b"]) for (const f of ["vmhost.sqfs", "vmhost.verity"]) s.add(`/run/initos/esp-${slot}/initos/${f}`, { kind: "file" });
    const withVm = AgentConfigSchema.parse({ images: [...cfg.images, { name: "vmhost", rootHash: "ef".repeat(32), verity: VERITY, onDemand: true }] });
    const log = silentLog();
    const e = await esps(s);
    const open = vmHostOpener(s, log, withVm, e, false);
    expect(await open()).toBe("/run/initos/images/vmhost");
    expect(await open()).toBe("/run/initos/images/vmhost");
    expect(s.calls.filter((c) => c.startsWith("verityOpen initos-vmhost"))).toHaveLength(1);
    await expect(vmHostOpener(s, log, cfg, e, false)()).rejects.toThrow("the signed config has no vmhost image (QEMU and the VM kernel): VM jails cannot run on this build");
  });

  it("a superblock that disagrees with the pinned parameters is one slot's reason, and the other slot is tried", async () => {
    const s = machine("a");
    s.verityFailures.set("/run/initos/esp-a/initos/modules.sqfs", new Error("verity superblock: dataBlocks is 24999, the signed config pins 25000"));
    const log = silentLog();
    expect((await openImage(s, log, await esps(s), "initos", cfg.images[0]!, false)).slot).toBe("b");
    expect(log.lines).toContain("err: image modules: slot a copy rejected: verity superblock: dataBlocks is 24999, the signed config pins 25000");
  });

  it("the config refuses an image without pinned verity parameters, or with malformed ones", () => {
    const image = { name: "modules", rootHash: HASH };
    expect(AgentConfigSchema.safeParse({ images: [image] }).success).toBe(false);
    expect(AgentConfigSchema.safeParse({ images: [{ ...image, verity: { ...VERITY, salt: "xyz" } }] }).success).toBe(false);
    expect(AgentConfigSchema.safeParse({ images: [{ ...image, verity: { ...VERITY, dataBlockSize: 4000 } }] }).success).toBe(false);
    expect(AgentConfigSchema.safeParse({ images: [{ ...image, verity: { ...VERITY, fecRoots: 2 } }] }).success).toBe(false);
    expect(AgentConfigSchema.safeParse({ images: [{ ...image, verity: { ...VERITY, salt: "" } }] }).success).toBe(true);
  });

  it("falls back to the other slot's copy when the first does not verify, and says so", async () => {
    const s = machine("a");
    s.verityFailures.set("/run/initos/esp-a/initos/modules.sqfs", new Error("dm-verity refused data block 1 of 25000 (EIO)"));
    const log = silentLog();
    const m = await openImage(s, log, await esps(s), "initos", cfg.images[0]!, false);
    expect(m.slot).toBe("b");
    expect(log.lines).toContain("err: image modules: slot a copy rejected: dm-verity refused data block 1 of 25000 (EIO)");
    expect(log.lines.find((l) => l.includes("verified from slot b"))).toMatch(/after 1 bad copy/);
  });

  it("never mounts an image when no copy verifies: one line with the hash and each slot's reason", async () => {
    const s = machine("a");
    s.verityFailures.set("/run/initos/esp-a/initos/modules.sqfs", new Error("data corrupt"));
    s.verityFailures.set("/run/initos/esp-b/initos/modules.sqfs", new Error("hash tree corrupt"));
    await expect(openImage(s, silentLog(), machineEsps, "initos", cfg.images[0]!, false)).rejects.toThrow(
      `image modules: no copy matches root hash ${HASH.slice(0, 16)}... (slot a: data corrupt; slot b: hash tree corrupt)`,
    );
    expect(s.calls.some((c) => c.includes("squashfs"))).toBe(false);
  });

  it("mounts unverified only when allowed, loudly", async () => {
    const s = machine("a");
    s.verityFailures.set("/run/initos/esp-a/initos/modules.sqfs", new Error("x"));
    s.verityFailures.set("/run/initos/esp-b/initos/modules.sqfs", new Error("y"));
    const log = silentLog();
    const m = await openImage(s, log, machineEsps, "initos", cfg.images[0]!, true);
    expect(m).toMatchObject({ verified: false, device: "/dev/loop7", slot: "a" });
    expect(log.lines).toContain("warn: image modules: NOT VERIFIED, mounted from slot a because initos.insecure=1 and Secure Boot is off");
  });

  it("reports a missing image file as that slot's reason", async () => {
    const s = machine("a");
    s.files.delete("/run/initos/esp-a/initos/modules.verity");
    const log = silentLog();
    expect((await openImage(s, log, machineEsps, "initos", cfg.images[0]!, false)).slot).toBe("b");
  });
});

const machineEsps = {
  disk: "/dev/vda",
  slots: [
    { name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true },
    { name: "b", partLabel: "initos-b", device: "/dev/vda2", mountPoint: "/run/initos/esp-b", booted: false },
  ],
};

describe("initos.insecure", () => {
  it("is honoured only with Secure Boot off", () => {
    const log = silentLog();
    const efivars = Promise.resolve(true);
    const insecure = parseCmdline("initos.insecure=1").cmdline;
    expect(unverifiedAllowed({ secureBoot: "on", efivars }, insecure, log)).toBe(false);
    expect(log.lines).toContain("warn: initos.insecure=1 ignored: Secure Boot is on");
    expect(unverifiedAllowed({ secureBoot: "off", efivars }, insecure, log)).toBe(true);
    expect(unverifiedAllowed({ secureBoot: "no-efi", efivars }, insecure, log)).toBe(true);
    expect(unverifiedAllowed({ secureBoot: "off", efivars }, parseCmdline("").cmdline, log)).toBe(false);
  });
});

describe("coldplug", () => {
  it("loads drivers by modalias until no new device appears, each alias once", () => {
    const s = new FakeSys();
    s.add("/sys/bus/pci/devices/0000:00:02.0/modalias", { kind: "file", data: "pci:v00001AF4d00001001\n" });
    // loading the PCI driver makes a virtio device appear
    s.loadModule = (a: string) => {
      s.calls.push(`loadModule ${a}`);
      if (a.startsWith("pci:")) s.add("/sys/bus/virtio/devices/virtio0/modalias", { kind: "file", data: "virtio:d00000002v00001AF4\n" });
      const m = [a.startsWith("pci:") ? "virtio_pci" : "virtio_blk"];
      return { modules: m, matched: m };
    };
    expect(modaliases(s)).toEqual(["pci:v00001AF4d00001001"]);
    const cold = new Coldplug(s, silentLog());
    expect(cold.scan()).toEqual(["virtio_pci", "virtio_blk"]);
    expect(cold.scan()).toEqual([]);
    expect(s.calls.filter((c) => c.startsWith("loadModule"))).toHaveLength(2);
  });
});
