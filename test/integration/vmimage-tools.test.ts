// VM images made by a real tool (issue 13): buildah, from Debian, builds an OCI archive the way
// users do (FROM scratch plus busybox, a second layer with whiteouts), daemonless, as root,
// offline, in its own storage. Such layers have no /dev, /proc, /sys or /run: a container
// runtime would make them. `vmimage` must add them to the image it writes, and vm mode must
// cope with a root that lacks them (created on a writable root; a read-only root without a
// home for the pod is refused before the switch, never found out by an execve after it).
import { execFileSync } from "node:child_process";
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { FileSource } from "../../agent/oci/bytes.ts";
import { layerReader, layoutFromTar, resolveImage } from "../../agent/oci/oci.ts";
import { readTar } from "../../agent/oci/tar.ts";
import { startVm, stopAll } from "../../qemu/harness.ts";

const B = "build";
const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const BUSYBOX = "/bin/busybox"; // busybox-static: one static binary, no libraries to carry
let dir: string;
/** vmimage of buildah's archive; and the same tree as a plain directory (no mount points added). */
let fromArchive: string;
let bare: string;
/** What each step of the image build took, for the CI time report. */
const took: Record<string, number> = {};

function timed<T>(name: string, f: () => T): T {
  const t0 = performance.now();
  try {
    return f();
  } finally {
    took[name] = Math.round(performance.now() - t0);
  }
}

/** buildah with its storage in the test's directory (vfs: no overlayfs, no fuse, no daemon). */
function buildah(...args: string[]): string {
  return execFileSync("buildah", ["--root", `${dir}/storage`, "--runroot", `${dir}/runroot`, "--storage-driver", "vfs", ...args], { encoding: "utf8" }).trim();
}

/** Runs `script` with the image loop-mounted read-only on $M in a private mount namespace. */
const inImage = (img: string, script: string) =>
  execFileSync("unshare", ["-m", "sh", "-ec", `M=$(mktemp -d); mount -o loop,ro "$1" "$M"; trap 'umount "$M"; rmdir "$M"' EXIT; (cd "$M"; ${script})`, "sh", img], { encoding: "utf8" });

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-vmtools-`);
  const ctx = `${dir}/layer1`;
  for (const d of ["bin", "etc", "opaque"]) mkdirSync(`${ctx}/${d}`, { recursive: true });
  copyFileSync(BUSYBOX, `${ctx}/bin/busybox`);
  chmodSync(`${ctx}/bin/busybox`, 0o755);
  symlinkSync("busybox", `${ctx}/bin/sh`);
  writeFileSync(`${ctx}/etc/removed-by-layer2`, "should be gone\n");
  writeFileSync(`${ctx}/opaque/from-layer1`, "should be hidden\n");
  mkdirSync(`${dir}/layer2`);
  copyFileSync(`${B}/app-under-test`, `${dir}/layer2/app-under-test`);
  chmodSync(`${dir}/layer2/app-under-test`, 0o755);
  writeFileSync(`${dir}/layer2/from-layer2`, "kept\n");

  timed("buildah", () => {
    // Layer 1: FROM scratch plus busybox, committed to the local storage.
    const c1 = buildah("from", "scratch");
    buildah("copy", c1, ctx, "/");
    buildah("commit", "-q", c1, "initos-test-base");
    // Layer 2: deletions (whiteouts in the layer buildah computes) and the app.
    const c2 = buildah("from", "--pull=never", "localhost/initos-test-base");
    const mnt = buildah("mount", c2);
    rmSync(`${mnt}/etc/removed-by-layer2`);
    rmSync(`${mnt}/opaque/from-layer1`);
    buildah("copy", c2, `${dir}/layer2/app-under-test`, "/bin/app-under-test");
    buildah("copy", c2, `${dir}/layer2/from-layer2`, "/opaque/from-layer2");
    buildah("config", "--cmd", "/bin/app-under-test", c2);
    buildah("commit", "-q", c2, `oci-archive:${dir}/image.tar`);
    // The same tree as a directory, for a root that has no mount points at all.
    execFileSync("cp", ["-a", `${mnt}/.`, `${dir}/tree`]);
  });

  timed("vmimage", () => {
    fromArchive = `${dir}/root.img`;
    execFileSync(BUN, ["initrd/build.ts", "vmimage", "--from", `${dir}/image.tar`, "--out", fromArchive], { stdio: "ignore" });
    bare = `${dir}/bare.img`;
    execFileSync(BUN, ["initrd/build.ts", "vmimage", "--from", `${dir}/tree`, "--out", bare], { stdio: "ignore" });
  });
}, 300_000);
afterAll(() => {
  console.log(`vmimage-tools: image build ${JSON.stringify(took)} ms`);
  rmSync(dir, { recursive: true, force: true });
});
afterEach(stopAll);

function bootVm(name: string, disk: string, append: string) {
  const t0 = performance.now();
  const vm = startVm({
    name,
    machine: "microvm",
    direct: { kernel: `${B}/vm/vmlinuz`, initrd: `${B}/vm/initrd.img`, append: `console=ttyS0 initos.mode=vm initos.reboot_delay=1 ${append}` },
    disks: [{ file: disk }],
    net: { forward: [] },
  });
  void vm.then((v) => v.exited.then(() => (took[`boot ${name}`] = Math.round(performance.now() - t0))));
  return vm;
}

describe.sequential("VM images made by buildah", () => {
  it("buildah's archive is what the issue describes: two layers, none with /dev /proc /sys /run, a whiteout in the second", async () => {
    const tar = new FileSource(`${dir}/image.tar`);
    try {
      const layout = layoutFromTar(readTar(tar, "image.tar"), "image.tar");
      const layers: string[][] = [];
      for (const [i, d] of resolveImage(layout).layers.entries()) {
        const names: string[] = [];
        for await (const e of layerReader(layout, d, `layer ${i}`)()) names.push(e.path.replace(/^\.?\/+|\/+$/g, ""));
        layers.push(names);
      }
      expect(layers).toHaveLength(2);
      for (const names of layers) expect(names.filter((n) => /^(dev|proc|sys|run)(\/|$)/.test(n))).toEqual([]);
      expect(layers[1]).toEqual(expect.arrayContaining(["etc/.wh.removed-by-layer2", "opaque/.wh.from-layer1"]));
    } finally {
      tar.close();
    }
  });

  it("vmimage adds the mount points with their usual modes; the plain directory stays as it is", () => {
    expect(inImage(fromArchive, 'stat -c "%a %U %n" dev proc sys run tmp')).toBe("755 root dev\n555 root proc\n555 root sys\n755 root run\n1777 root tmp\n");
    expect(inImage(bare, "ls -A")).toBe("bin\netc\nopaque\n");
  });

  it("microvm, read-only root from buildah's archive: the app runs as a pod with its args; its exit code 7 powers the VM off", async () => {
    const vm = await bootVm("vmtools-app", fromArchive, "-- /bin/app-under-test arg1 arg2");
    const line = await vm.waitFor(/APP-UNDER-TEST pid=\d+ argv=\[[^\]]*\][^\n]*/, 180_000);
    expect(line[0]).toMatch(/^APP-UNDER-TEST pid=\d+ argv=\[arg1 arg2\] share=none disk=none whiteouts=ok /);
    await vm.waitFor(/initos-pod: app exited with 7/, 60_000);
    expect(await vm.waitExit(60_000)).toBe(0);
    expect(vm.output).toMatch(/initos: root: mounted \/dev\/vda \(btrfs, ro\) on \/sysroot/);
    expect(vm.output).toMatch(/initos: switch_root: exec \/run\/initos\/pod \/bin\/app-under-test arg1 arg2/);
    expect(vm.output).not.toMatch(/missing, detaching|boot failed|Kernel panic/);
  }, 300_000);

  it("microvm, rw root with no mount points at all: vm mode creates them, /proc is there for the app", async () => {
    const vm = await bootVm("vmtools-bare-rw", bare, "rw -- /bin/app-under-test podcpu 1");
    const m = await vm.waitFor(/APP-UNDER-TEST podcpu ticks=(-?\d+) /, 180_000);
    expect(Number(m[1])).toBeGreaterThanOrEqual(0); // -1: /proc/1/stat unreadable
    await vm.waitFor(/initos-pod: app exited with 0/, 60_000);
    expect(await vm.waitExit(60_000)).toBe(0);
    expect(vm.output).toMatch(/initos: vm: created \/dev \/proc \/sys \/run in the root \(the image has none\)/);
    expect(vm.output).not.toMatch(/missing, detaching|boot failed|Kernel panic/);
  }, 300_000);

  it("microvm, read-only root with no mount points: refused before the switch with one line, the failure policy reboots", async () => {
    const vm = await bootVm("vmtools-bare-ro", bare, "-- /bin/app-under-test");
    expect(await vm.waitExit(180_000)).toBe(0);
    expect(vm.output).toMatch(/initos: vm: \/dev \/proc \/sys \/run missing from the read-only root: not mounted there/);
    expect(vm.output).toMatch(/initos: boot failed: vm: the root has (no \/run|neither \/run nor \/dev) for the pod reaper \(boot with rw, or add/);
    expect(vm.output).toMatch(/reboot: Restarting system/);
    expect(vm.output).not.toMatch(/APP-UNDER-TEST|switch_root: exec|past switch_root|Kernel panic/);
  }, 300_000);
});
