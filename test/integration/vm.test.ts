// vm mode: the VM platform as cloud-hypervisor uses it — a plain kernel + initrd booted directly
// (microvm: virtio-mmio found through ACPI; and q35), configured by the cmdline alone. The root
// is a btrfs image the test builds from an OCI layout it writes itself (with a whiteout and an
// opaque directory); the app runs as a pod; the host shares a directory over 9p.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startVm, stopAll, type VmOptions } from "../../qemu/harness.ts";
import { writeOciImageTar } from "../oci-fixture.ts";

const B = "build";
const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
let dir: string;
let root: string;
let disk: string;

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-vmtest-`);
  const bin = (f: string) => readFileSync(f);
  const dirs = ["bin", "sbin", "etc", "z", "x", "proc", "sys", "dev", "run", "tmp"].map((path) => ({ path, type: "dir" as const }));
  writeOciImageTar(`${dir}/image.tar`, {
    layers: [
      [
        ...dirs,
        { path: "bin/app-under-test", type: "file", data: bin(`${B}/app-under-test`), mode: 0o755 },
        { path: "sbin/init", type: "file", data: bin(`${B}/test-init`), mode: 0o755 },
        { path: "etc/initos-test-root", type: "file", data: "subvol=oci-image\n" },
        { path: "etc/removed-by-layer2", type: "file", data: "should be gone\n" },
        { path: "opaque", type: "dir" },
        { path: "opaque/from-layer1", type: "file", data: "should be hidden\n" },
      ],
      [
        { path: "etc/removed-by-layer2", type: "whiteout" },
        { path: "opaque", type: "opaque" },
        { path: "opaque/from-layer2", type: "file", data: "kept\n" },
      ],
    ],
    config: { Cmd: ["/bin/app-under-test"] },
    gzip: true,
  });
  root = `${dir}/root.img`;
  execFileSync(BUN, ["initrd/build.ts", "vmimage", "--from", `${dir}/image.tar`, "--out", root], { stdio: "ignore" });
  mkdirSync(`${dir}/x`);
  writeFileSync(`${dir}/x/marker.txt`, "extra-disk\n");
  disk = `${dir}/x.img`;
  execFileSync(BUN, ["initrd/build.ts", "vmimage", "--from", `${dir}/x`, "--out", disk, "--label", "initos-x"], { stdio: "ignore" });
  mkdirSync(`${dir}/share`);
  writeFileSync(`${dir}/share/hello.txt`, "written-by-host\n");
}, 120_000);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

function bootVm(name: string, append: string, o: Partial<VmOptions> = {}) {
  return startVm({
    name,
    machine: "microvm",
    direct: { kernel: `${B}/vm/vmlinuz`, initrd: `${B}/vm/initrd.img`, append: `console=ttyS0 initos.mode=vm initos.reboot_delay=1 ${append}` },
    disks: [{ file: root }, { file: disk }],
    share: { tag: "z", dir: `${dir}/share` },
    net: { forward: [] },
    ...o,
  });
}

describe.sequential("vm mode", () => {
  it("microvm: the OCI image's app runs as a pod with its args, sees the share, the extra disk, its name and address; exit code 7 logged, VM off", async () => {
    const vm = await bootVm("vm-app", "rw initos.disks=/dev/vdb:/x initos.hostname=podvm initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 -- /bin/app-under-test arg1 arg2");
    const line = await vm.waitFor(/APP-UNDER-TEST pid=\d+ argv=\[[^\]]*\][^\n]*/, 120_000);
    expect(line[0]).toMatch(/^APP-UNDER-TEST pid=\d+ argv=\[arg1 arg2\] share=written-by-host disk=extra-disk whiteouts=ok hostname=podvm eth0=10\.0\.2\.15\r?$/);
    await vm.waitFor(/initos-pod: app exited with 7/, 60_000);
    expect(await vm.waitExit(60_000)).toBe(0);
    expect(vm.output).toMatch(/initos: vm: share z \(9p\) on \/z/);
    expect(vm.output).toMatch(/initos: disk \/x: mounted \/dev\/vdb \(btrfs, rw\) on \/sysroot\/x/);
    expect(vm.output).toMatch(/initos: switch_root: exec \/run\/initos\/pod \/bin\/app-under-test arg1 arg2/);
    expect(vm.output).not.toMatch(/Kernel panic/);
  }, 240_000);

  it("microvm: system_powerdown reaches the app as SIGTERM; its handler runs and the VM powers off", async () => {
    const vm = await bootVm("vm-sigterm", "-- app-under-test wait");
    await vm.waitFor(/APP-UNDER-TEST waiting for SIGTERM/, 120_000);
    await vm.monitor("system_powerdown");
    await vm.waitFor(/APP-UNDER-TEST got SIGTERM/, 60_000);
    await vm.waitFor(/initos-pod: app exited with 0/, 30_000);
    expect(vm.output).toMatch(/initos-pod: power button: sending SIGTERM to the app/);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 240_000);

  it("microvm: the pod blocks while the app sleeps (its CPU time is a small part of the wall time)", async () => {
    const vm = await bootVm("vm-pod-idle", "-- /bin/app-under-test podcpu 6");
    const m = await vm.waitFor(/APP-UNDER-TEST podcpu ticks=(-?\d+) hz=(\d+) elapsed_ms=(\d+)/, 120_000);
    const [ticks, hz, elapsedMs] = [Number(m[1]), Number(m[2]), Number(m[3])];
    expect(ticks).toBeGreaterThanOrEqual(0);
    expect(elapsedMs).toBeGreaterThanOrEqual(5000);
    // A pod that polls with timeout 0 is on its CPU all the time (~100%); one that blocks, ~0.
    // TCG under load slows the guest but does not make an idle PID 1 busy: 20% is a wide margin.
    expect(((ticks / hz) * 1000) / elapsedMs).toBeLessThan(0.2);
    await vm.waitFor(/initos-pod: app exited with 0/, 60_000);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 240_000);

  it("q35 (PCI): without --, the root's /sbin/init runs as PID 1", async () => {
    const vm = await bootVm("vm-init", "", { machine: "q35" });
    await vm.waitFor(/INITOS-TEST-ROOT pid=1 root=subvol=oci-image /, 120_000);
    expect(vm.output).toMatch(/initos: switch_root: exec \/sbin\/init/);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 240_000);

  it("a bad CIDR on the cmdline: one clear line, the failure policy, no app", async () => {
    const vm = await bootVm("vm-bad-cidr", "initos.ip=10.0.2.300/24 -- /bin/app-under-test");
    expect(await vm.waitExit(120_000)).toBe(0);
    expect(vm.output).toMatch(/initos: boot failed: vm: cmdline: initos.ip="10.0.2.300\/24" is invalid \(expected address\/prefix, e.g. 10.0.2.15\/24\)/);
    expect(vm.output).toMatch(/reboot: Restarting system/);
    expect(vm.output).not.toMatch(/APP-UNDER-TEST|Kernel panic/);
  }, 180_000);

  it("a disk that does not exist: one clear line naming it, the failure policy", async () => {
    const vm = await bootVm("vm-no-disk", "initos.rootwait=2 rw initos.disks=/dev/vdz:/x -- /bin/app-under-test");
    expect(await vm.waitExit(120_000)).toBe(0);
    expect(vm.output).toMatch(/initos: boot failed: disk \/x device \/dev\/vdz did not appear within 2s/);
    expect(vm.output).not.toMatch(/APP-UNDER-TEST|Kernel panic/);
  }, 180_000);
});
