// Several disks with initos ESPs (a multi-disk machine, an installer stick left plugged in, a
// recovery USB): the agent takes the slots of the disk the firmware booted from, never another
// disk's partitions with the same names. Disk copies are private; build/ is never written.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OVMF, startVm, stopAll } from "../../qemu/harness.ts";
import { copyDisk, flipByteOnEsp } from "./images.ts";

const B = "build";
const TESTROOT = { file: `${B}/testroot.img` };
const MARKER = /INITOS-TEST-ROOT pid=1 root=subvol=@/;
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-multidisk-`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

/** The `esp:` line, whole (so a slot on another disk cannot hide after the expected ones). */
const espLine = (out: string) => /initos: esp: [^\r\n]*/.exec(out)?.[0];

describe("ESP slots on a machine with several initos disks", () => {
  it("boot disk + the installer stick: the slots are the booted disk's, the installer's partitions are left alone", async () => {
    const vm = await startVm({
      name: "multidisk-installer-plugged",
      firmware: { vars: OVMF.varsSecure },
      disks: [{ file: `${B}/boot.img` }, { file: `${B}/installer.img` }, TESTROOT],
    });
    await vm.waitFor(MARKER, 180_000);
    expect(espLine(vm.output)).toBe("initos: esp: slot a /dev/vda1 (booted), slot b /dev/vda2");
    expect(vm.output).toMatch(/initos: image modules: verified from slot a, root hash/);
    expect(vm.output).toMatch(/initos: image tools: verified from slot a, root hash/);
    expect(vm.output).not.toMatch(/copy rejected|\/dev\/vdb[12]/);
    await vm.waitExit(30_000);
  }, 240_000);

  it("the firmware boots the second of two initos disks: the log names its partition, and the images come from it", async () => {
    // The first disk is a recovery stick (the installer) whose modules image is damaged on both
    // slots: had the agent taken its slots, no copy would verify.
    const stick = copyDisk(`${B}/installer.img`, dir, "stick");
    flipByteOnEsp(stick, "a", "initos/modules.sqfs", 3_000_000);
    flipByteOnEsp(stick, "b", "initos/modules.sqfs", 3_000_000);
    const vm = await startVm({
      name: "multidisk-second-booted",
      firmware: { vars: OVMF.varsSecure },
      disks: [{ file: stick, snapshot: false, bootIndex: 1 }, { file: `${B}/boot.img`, bootIndex: 0 }, TESTROOT],
    });
    await vm.waitFor(MARKER, 180_000);
    expect(espLine(vm.output)).toBe("initos: esp: slot a /dev/vdb1 (booted), slot b /dev/vdb2");
    expect(vm.output).toMatch(/initos: image modules: verified from slot a, root hash/);
    expect(vm.output).not.toMatch(/copy rejected|\/dev\/vda[12]/);
    await vm.waitExit(30_000);
  }, 240_000);
});
