// Verified images under QEMU: the ESP found on virtio and NVMe, images verified against the
// root hashes in the signed config, fallback to the other slot, refusal of damaged copies.
// Damaged disks are private copies; the shared boot.img is never written.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OVMF, startVm, stopAll, type Disk } from "../../qemu/harness.ts";
import { copyDisk, deleteOnEsp, flipByteOnEsp, variantInitrd } from "./images.ts";

const B = "build";
const TESTROOT = { file: `${B}/testroot.img` };
const ROOT = "root=LABEL=initos-testroot rootflags=subvol=@";
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-images-`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

function direct(name: string, disks: Disk[], append = ROOT, initrd = `${B}/initrd.img`) {
  return startVm({ name, direct: { kernel: `${B}/vmlinuz`, initrd, append: `console=ttyS0 initos.reboot_delay=1 ${append}` }, disks });
}

/** A boot disk with the given damage applied. */
function damaged(name: string, flips: [slot: string, file: string, offset: number][]): Disk {
  const disk = copyDisk(`${B}/boot.img`, dir, name);
  for (const [slot, file, offset] of flips) flipByteOnEsp(disk, slot, file, offset);
  return { file: disk, snapshot: false };
}

const MARKER = /INITOS-TEST-ROOT pid=1 root=subvol=@/;
const MODULES_DATA = "initos/modules.sqfs";
const MODULES_TREE = "initos/modules.verity";

describe("verified images", () => {
  it("Secure Boot: ESP found, both images verified and mounted, btrfs loaded from the modules image, switch_root", async () => {
    const vm = await startVm({ name: "images-secureboot", firmware: { vars: OVMF.varsSecure }, disks: [{ file: `${B}/boot.img` }, TESTROOT] });
    await vm.waitFor(MARKER, 150_000);
    const out = vm.output;
    expect(out).toMatch(/initos: secureboot: on/);
    expect(out).toMatch(/initos: esp: slot a \/dev\/vda1 \(booted\), slot b \/dev\/vda2/);
    const modules = out.search(/initos: image modules: verified from slot a, root hash [0-9a-f]{12}\.\.\., mounted/);
    expect(modules).toBeGreaterThan(0);
    expect(out).toMatch(/initos: image tools: verified from slot a/);
    // btrfs is not in the initrd: its driver registers only after the modules image is mounted.
    expect(out.search(/Btrfs loaded/)).toBeGreaterThan(modules);
    // The initrd carries no btrfs module at all.
    const listing = execFileSync("sh", ["-c", `zstd -dc ${B}/base.cpio.zst | cpio -it --quiet`], { encoding: "utf8" });
    expect(listing).not.toMatch(/btrfs\.ko/);
    await vm.waitExit(30_000);
  }, 200_000);

  it("firmware boots slot B (A has no UKI): the agent knows B booted and takes B's images first", async () => {
    const disk = copyDisk(`${B}/boot.img`, dir, "b-booted");
    deleteOnEsp(disk, "a", "EFI/BOOT/BOOTX64.EFI");
    const vm = await startVm({ name: "images-slot-b", firmware: { vars: OVMF.varsSecure }, disks: [{ file: disk, snapshot: false }, TESTROOT] });
    await vm.waitFor(MARKER, 150_000);
    expect(vm.output).toMatch(/initos: esp: slot b \/dev\/vda2 \(booted\), slot a \/dev\/vda1/);
    expect(vm.output).toMatch(/initos: image modules: verified from slot b, /);
  }, 200_000);

  it("the ESP on NVMe is found as well (a built-in driver, no coldplug needed)", async () => {
    const vm = await direct("images-nvme", [{ file: `${B}/boot.img`, bus: "nvme" }, TESTROOT]);
    await vm.waitFor(MARKER, 120_000);
    expect(vm.output).toMatch(/initos: esp: slot a \/dev\/nvme0n1p1, slot b \/dev\/nvme0n1p2/);
    expect(vm.output).toMatch(/initos: image modules: verified from slot a/);
  }, 150_000);

  it("one flipped byte in slot A's modules data: A is rejected, B's copy boots, and the log says so", async () => {
    const vm = await direct("images-a-corrupt", [damaged("a-corrupt", [["a", MODULES_DATA, 3_000_000]]), TESTROOT]);
    await vm.waitFor(MARKER, 120_000);
    // Byte 3,000,000 is in data block 732 (4 KiB blocks): the kernel's dm-verity refuses exactly that one.
    expect(vm.output).toMatch(/initos: image modules: slot a copy rejected: dm-verity refused data block 732 of \d+ \(EIO\): the block or the hash tree above it does not match the root hash/);
    expect(vm.output).toMatch(/initos: image modules: verified from slot b \(after 1 bad copy\)/);
    expect(vm.output).toMatch(/initos: image tools: verified from slot a/);
  }, 150_000);

  it("modules data corrupted on both slots: nothing mounted, one clear line, failure policy", async () => {
    const disk = damaged("both-corrupt", [
      ["a", MODULES_DATA, 3_000_000],
      ["b", MODULES_DATA, 5_000_000],
    ]);
    const vm = await direct("images-both-corrupt", [disk, TESTROOT]);
    expect(await vm.waitExit(120_000)).toBe(0);
    expect(vm.output).toMatch(
      /initos: boot failed: image modules: no copy matches root hash [0-9a-f]{16}\.\.\. \(slot a: dm-verity refused data block 732 of \d+ \(EIO\)[^;]*; slot b: dm-verity refused data block 1220 of \d+ \(EIO\)[^)]*\)/,
    );
    expect(vm.output).not.toMatch(/image modules: verified|Btrfs loaded|INITOS-TEST-ROOT|Kernel panic/);
    expect(vm.output).toMatch(/reboot: Restarting system/);
  }, 150_000);

  it("hash tree corrupted on both slots: refused the same way", async () => {
    const disk = damaged("tree-corrupt", [
      ["a", MODULES_TREE, 4096 + 200],
      ["b", MODULES_TREE, 4096 + 200],
    ]);
    const vm = await direct("images-tree-corrupt", [disk, TESTROOT]);
    expect(await vm.waitExit(120_000)).toBe(0);
    // The top hash block is the damaged one: no data block verifies, the first read is refused.
    expect(vm.output).toMatch(/initos: boot failed: image modules: no copy matches root hash [0-9a-f]{16}\.\.\. \(slot a: dm-verity refused data block 0 of \d+[^;]*; slot b: dm-verity refused data block 0 of /);
    expect(vm.output).not.toMatch(/image modules: verified|INITOS-TEST-ROOT|Kernel panic/);
  }, 150_000);

  it("a root hash in the signed config that differs from the images: refused", async () => {
    // The same initrd with one changed digit in the expected root hash of the modules image.
    const real = JSON.parse(readFileSync(`${B}/images/modules.json`, "utf8")).rootHash as string;
    const wrong = (real[0] === "0" ? "1" : "0") + real.slice(1);
    const initrd = variantInitrd(dir, "wrong-hash", (c) => void (c.images[0]!.rootHash = wrong));
    const vm = await direct("images-wrong-hash", [{ file: `${B}/boot.img` }, TESTROOT], ROOT, initrd);
    expect(await vm.waitExit(120_000)).toBe(0);
    expect(vm.output).toMatch(new RegExp(`initos: boot failed: image modules: no copy matches root hash ${wrong.slice(0, 16)}\\.\\.\\. \\(slot a: dm-verity refused data block 0 of \\d+ \\(EIO\\)[^;]*; slot b: dm-verity refused data block 0 of `));
    expect(vm.output).not.toMatch(/INITOS-TEST-ROOT/);
  }, 150_000);

  it("with Secure Boot off, initos.insecure=1 mounts a copy that fails verification, loudly", async () => {
    const disk = damaged("insecure", [
      ["a", MODULES_DATA, 3_000_000],
      ["b", MODULES_DATA, 3_000_000],
    ]);
    const vm = await direct("images-insecure", [disk, TESTROOT], `${ROOT} initos.insecure=1`);
    await vm.waitFor(MARKER, 120_000);
    expect(vm.output).toMatch(/initos: initos.insecure=1: images that fail verification will be mounted anyway/);
    expect(vm.output).toMatch(/initos: image modules: NOT VERIFIED, mounted from slot a because initos.insecure=1 and Secure Boot is off/);
  }, 150_000);
});
