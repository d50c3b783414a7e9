// Module selection against the real Debian cloud kernel in the project cache (make all fetches it).
import { existsSync, readFileSync } from "node:fs";
import { beforeAll, describe, expect, it } from "vitest";
import type { KernelInfo } from "../../initrd/kernel.ts";
import { moduleClosure, modName, readModuleIndex, type ModuleIndex } from "../../initrd/kmods.ts";

let index: ModuleIndex;
beforeAll(() => {
  if (!existsSync("build/kernel.json")) throw new Error("build/kernel.json missing: run make all");
  const k = JSON.parse(readFileSync("build/kernel.json", "utf8")) as KernelInfo;
  index = readModuleIndex(`${k.root}/lib/modules/${k.release}`);
});

describe("module closure", () => {
  it("includes btrfs with its dependencies, in no particular order but complete", () => {
    const names = moduleClosure(index, ["btrfs"]).map(modName);
    expect(names).toContain("btrfs");
    for (const dep of ["libcrc32c", "raid6_pq", "xor", "zstd_compress"]) expect(names).toContain(dep);
    // closed: every dependency of every member is a member
    for (const n of names) for (const d of index.deps.get(n) ?? []) expect(names).toContain(d);
  });

  it("accepts dashes for underscores, and needs nothing for built-ins", () => {
    expect(moduleClosure(index, ["virtio-blk"]).map(modName)).toContain("virtio_blk");
    expect(moduleClosure(index, ["nvme"])).toEqual([]); // =y in the cloud kernel
  });

  it("names a module that does not exist", () => {
    expect(() => moduleClosure(index, ["no_such_module"])).toThrow("kernel module no_such_module is neither a module nor built in");
  });
});

describe("libkmod against the cache kernel", () => {
  it("resolves the same dependency closure for btrfs and dm-verity as the build does", async () => {
    const { dependencyClosure } = await import("../../agent/sys/kmod.ts");
    const k = JSON.parse(readFileSync("build/kernel.json", "utf8")) as KernelInfo;
    const dir = `${k.root}/lib/modules/${k.release}`;
    for (const m of ["btrfs", "dm_verity", "virtio_blk"]) {
      const viaLibkmod = dependencyClosure(m, dir);
      expect(viaLibkmod).toContain(m);
      expect(viaLibkmod).toEqual(moduleClosure(index, [m]).map(modName).sort());
    }
  });

  it("resolves a device alias to its driver", async () => {
    const { dependencyClosure } = await import("../../agent/sys/kmod.ts");
    const k = JSON.parse(readFileSync("build/kernel.json", "utf8")) as KernelInfo;
    expect(dependencyClosure("virtio:d00000002v00001AF4", `${k.root}/lib/modules/${k.release}`)).toContain("virtio_blk");
  });
});
