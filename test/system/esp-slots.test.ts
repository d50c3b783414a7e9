// The partitions the esp stage sees, read for real: sysfs and libblkid on a GPT image attached
// to a loop device (root). The slot decisions are tested with fakes in test/unit/esp-slots.test.ts.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { partitions } from "../../agent/stages/esp.ts";
import { partitionEntry } from "../../agent/sys/blkid.ts";
import type { Sys } from "../../agent/sys/index.ts";

const U = {
  a1: "11111111-0000-4000-8000-0000000000a1",
  b1: "11111111-0000-4000-8000-0000000000b1",
};

describe("partitions from sysfs and libblkid (root: a GPT image on a loop device)", () => {
  const dir = mkdtempSync(`${tmpdir()}/initos-esp-`);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("reads each partition's GPT name and UUID, and its disk from /sys/class/block/<part>/..", () => {
    const img = `${dir}/gpt.img`;
    execFileSync("truncate", ["-s", "8M", img]);
    const esp = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    const table = `label: gpt\nstart=2048, size=4096, type=${esp}, uuid=${U.a1.toUpperCase()}, name="initos-a"\nsize=4096, type=${esp}, uuid=${U.b1}, name="initos-b"\n`;
    execFileSync("sfdisk", ["-q", img], { input: table });
    const loop = execFileSync("losetup", ["-f", "--show", "-P", img], { encoding: "utf8" }).trim();
    try {
      // Some kernels here scan the table only when asked again; partx adds what is missing.
      if (!existsSync(`${loop}p2`)) spawnSync("partx", ["-a", loop]);
      expect(partitionEntry(`${loop}p1`)).toEqual({ uuid: U.a1, name: "initos-a" });
      expect(partitionEntry(`${loop}p2`)).toEqual({ uuid: U.b1, name: "initos-b" });
      expect(partitionEntry(loop)).toBeNull(); // the whole disk is no partition
      expect(partitionEntry("/dev/initos-no-such-device")).toBeNull();
      // What the esp stage sees of it through the Sys seam (the real calls it makes).
      const sys = {
        readdir: (p: string) => readdirSync(p),
        readlink: (p: string) => readlinkSync(p),
        exists: (p: string) => existsSync(p),
        readFile: (p: string) => readFileSync(p, "utf8"),
        partitionEntry,
      } as unknown as Sys;
      expect(partitions(sys).filter((p) => p.disk === loop)).toEqual([
        { device: `${loop}p1`, disk: loop, uuid: U.a1, name: "initos-a" },
        { device: `${loop}p2`, disk: loop, uuid: U.b1, name: "initos-b" },
      ]);
    } finally {
      execFileSync("losetup", ["-d", loop]);
    }
  });
});
