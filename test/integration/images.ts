// Helpers for integration tests that need damaged copies of the boot disk.
import { execFileSync } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { DISK_SLOTS } from "../../initrd/build.ts";

/** Byte offset of slot `name`'s FAT filesystem inside the boot disk, from its GPT. */
export function slotOffset(disk: string, name: string): number {
  const slot = DISK_SLOTS.find((s) => s.name === name)!;
  const table = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as {
    partitiontable: { partitions: { start: number; name?: string }[] };
  };
  const p = table.partitiontable.partitions.find((x) => x.name === slot.partLabel);
  if (!p) throw new Error(`${disk}: no partition named ${slot.partLabel}`);
  return p.start * 512;
}

/** Flips one bit of `file` (a path on slot `slot`'s ESP) at `offset`, in place on the disk copy. */
export function flipByteOnEsp(disk: string, slot: string, file: string, offset: number): void {
  const dir = mkdtempSync(`${tmpdir()}/initos-flip-`);
  try {
    const img = `${disk}@@${slotOffset(disk, slot)}`;
    execFileSync("mcopy", ["-n", "-i", img, `::/${file}`, `${dir}/f`]);
    const fd = openSync(`${dir}/f`, "r+");
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0]! ^= 0x01;
    writeSync(fd, b, 0, 1, offset);
    closeSync(fd);
    execFileSync("mcopy", ["-o", "-i", img, `${dir}/f`, `::/${file}`]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** A private copy of the boot disk (sparse), to damage without touching the shared one. */
export function copyDisk(src: string, dir: string, name: string): string {
  const out = `${dir}/${name}.img`;
  execFileSync("cp", ["--sparse=always", src, out]);
  return out;
}

/** Deletes `file` from slot `slot`'s ESP on a disk copy. */
export function deleteOnEsp(disk: string, slot: string, file: string): void {
  execFileSync("mdel", ["-i", `${disk}@@${slotOffset(disk, slot)}`, `::/${file}`]);
}

/**
 * The test initrd with a changed signed config: the build's base and agent segments, then a
 * config segment made from the template in initrd/config.json as changed by `edit`. Returns its path.
 */
export function variantInitrd(dir: string, name: string, edit: (config: Record<string, unknown> & { images: Record<string, unknown>[] }) => void): string {
  const config = JSON.parse(readFileSync("initrd/config.json", "utf8"));
  edit(config);
  writeFileSync(`${dir}/${name}.json`, JSON.stringify(config));
  execFileSync("node_modules/@oven/bun-linux-x64-baseline/bin/bun", [
    "initrd/build.ts", "initrd-config", "--config", `${dir}/${name}.json`,
    "--images", "build/images", "--ssh-keys", "build/test-ssh/id_ed25519.pub", "--out", `${dir}/${name}.cpio`,
  ], { stdio: "ignore" });
  execFileSync("sh", ["-c", `zstd -q -3 -f ${dir}/${name}.cpio -o ${dir}/${name}.cpio.zst && cat build/base.cpio.zst build/agent.cpio.zst ${dir}/${name}.cpio.zst > ${dir}/${name}.img`]);
  return `${dir}/${name}.img`;
}
