// A forged verity superblock under QEMU: slot A's hash tree says it covers fewer data blocks
// than the image has. Its top hash block is unchanged, so the root hash in the signed config
// still matches; only the pinned parameters tell the copy apart. Private disk copy.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startVm, stopAll } from "../../qemu/harness.ts";
import { copyDisk, slotOffset } from "./images.ts";

const B = "build";
let dir: string;

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-verity-pinned-`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

/** Rewrites the data block count (struct verity_sb, u64 LE at 72) of a .verity file on slot `slot`'s ESP; returns [old, new]. */
function fewerDataBlocks(disk: string, slot: string, file: string, fewer: number): [number, number] {
  const img = `${disk}@@${slotOffset(disk, slot)}`;
  const local = `${dir}/sb.verity`;
  execFileSync("mcopy", ["-n", "-i", img, `::/${file}`, local]);
  const b = readFileSync(local);
  const was = Number(b.readBigUInt64LE(72));
  b.writeBigUInt64LE(BigInt(was - fewer), 72);
  writeFileSync(local, b);
  execFileSync("mcopy", ["-o", "-i", img, local, `::/${file}`]);
  return [was, was - fewer];
}

describe("verity parameters pinned in the signed config", () => {
  it("slot A's superblock claims fewer data blocks (root hash unchanged): refused naming the field, slot B's copy boots", async () => {
    const disk = copyDisk(`${B}/boot.img`, dir, "fewer-blocks");
    const [was, now] = fewerDataBlocks(disk, "a", "initos/modules.verity", 100);
    const vm = await startVm({
      name: "verity-fewer-blocks",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.reboot_delay=1 root=LABEL=initos-testroot rootflags=subvol=@" },
      disks: [{ file: disk, snapshot: false }, { file: `${B}/testroot.img` }],
    });
    await vm.waitFor(/INITOS-TEST-ROOT pid=1 root=subvol=@/, 120_000);
    expect(vm.output).toContain(`initos: image modules: slot a copy rejected: verity superblock: dataBlocks is ${now}, the signed config pins ${was}`);
    expect(vm.output).toMatch(/initos: image modules: verified from slot b \(after 1 bad copy\)/);
    expect(vm.output).toMatch(/initos: image tools: verified from slot a/);
  }, 150_000);
});
