// The sidecar beside the OS, under QEMU (TCG), on a machine with an encrypted pool: the pool is
// opened with the recovery passphrase on the console (no TPM), the root switched to, and the
// sidecar, asked over ssh, shows that its mount namespace holds nothing of the initramfs' tree
// (the root, the pool's dm-crypt device, the ESP, the modules image) and that it is not dumpable.
//
// Its own /proc/self/mountinfo cannot show mounts outside its root (the kernel hides what a
// chroot cannot reach, though such mounts still pin their devices), so the status also reports
// what phase 1 saw outside its root with the full view, just before the chroot.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startVm, stopAll } from "../../qemu/harness.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";
import { diskWithPool } from "./pool-disk.ts";
import { buildPoolImage, testRootfs } from "./pool-image.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
const PASS = "beside-the-os-test";
const PROMPT = /Recovery passphrase \(attempt 1 of 3\): $/;
let dir: string;

beforeAll(() => {
  const missing = ["vmlinuz", "initrd.img", "boot.img", "test-init", "test-ssh/id_ed25519"].map((f) => `${B}/${f}`).filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`missing build artifacts (run make all): ${missing.join(" ")}`);
  dir = mkdtempSync(`${tmpdir()}/initos-beside-`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

describe("the sidecar beside the OS", () => {
  it("holds none of the initramfs' mounts (root, pool, ESP, modules image), only its own root and the tools image; not dumpable", async () => {
    const pool = buildPoolImage({
      out: `${dir}/pool.img`,
      passphrase: PASS,
      rootfs: testRootfs(`${dir}/rootfs.tar`),
      subvolumes: ["@root", "@home"],
      hostConfig: { root: "@root" },
    });
    const vm = await startVm({
      name: "beside-mounts",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.sidecar=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 -- hold=600" },
      disks: [{ file: diskWithPool(`${B}/boot.img`, pool, `${dir}/machine.img`) }],
      net: { forward: [{ guest: 15022 }] },
    });
    const port = vm.hostPort(15022);
    await vm.waitFor(PROMPT, 240_000, { prompt: true, failOn: /initos: boot failed:/ });
    vm.send(`${PASS}\n`);
    await vm.waitFor(/INITOS-TEST-ROOT pid=1 root=subvol=@root .*argv=\[hold=600\]/, 240_000);
    await vm.waitFor(/initos: sidecar beside the OS: ready/, 60_000);
    // The initramfs had all of these while PID 1 started the sidecar.
    expect(vm.output).toMatch(/initos: pool: root @root on \/sysroot/);
    expect(vm.output).toMatch(/image tools: verified from slot a/);

    const r = await sshWhenUp(port, "status", { key: KEY });
    expect(r.status).toBe(0);
    const st = r.stdout;
    expect(st).toMatch(/^mode: sidecar beside the OS\nprocess: @initos-sidecar \(pid \d+\)\n/);
    expect(st).toMatch(/\ndumpable: 0\n/);
    // Everything outside its root is gone: nothing left for the chroot to hide.
    expect(st).toMatch(/\nmounts left outside its root: none\n/);
    // A direct kernel boot: no firmware variables, so of the update's fields only the version.
    expect(st).toMatch(/\nversion: \d+\n?$/);
    // And inside: its tmpfs root, fresh API filesystems, the verified tools image, the agent's files.
    const mounts = /\nmounts: (.*)\n/.exec(st)?.[1] ?? "";
    const [listed, files] = mounts.split("; ");
    expect(listed!.split(", ").sort()).toEqual(["/ tmpfs", "/dev devtmpfs", "/dev/pts devpts", "/proc proc", "/run/initos/images/tools squashfs /dev/mapper/initos-tools", "/sys sysfs"]);
    expect(files).toMatch(/^\d+ files of the initrd$/);
    expect(st).not.toMatch(/sysroot|esp-|initos-pool|initos-modules|btrfs|vfat|\/lib\/modules|\/lib\/firmware/);
    // proc, sys, dev, devpts, run, esp-a, two images, /lib/modules, /lib/firmware, /sysroot, its @home
    const detached = /initos: sidecar beside the OS: root ready, (\d+) inherited mounts detached; starting/.exec(vm.output);
    expect(Number(detached?.[1])).toBeGreaterThanOrEqual(12);

    // The OS's init still decides: reboot is a request to it, it stops holding and reboots.
    expect((await ssh(port, "reboot", { key: KEY })).stdout).toBe("reboot requested from the OS's init\n");
    await vm.waitFor(/INITOS-TEST-ROOT done holding: reboot/, 60_000);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 600_000);
});
