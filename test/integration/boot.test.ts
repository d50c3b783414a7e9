// End-to-end boots under QEMU (TCG), with the real kernel, OVMF and swtpm. The images come from
// `make all` and are shared: every disk is attached with snapshot=on, so no scenario changes them.
import { existsSync } from "node:fs";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { OVMF, startVm, stopAll } from "../../qemu/harness.ts";

const B = "build";
const need = ["vmlinuz", "initrd.img", "boot.img", "boot-unsigned.img", "testroot.img"].map((f) => `${B}/${f}`);
const BOOT = { file: `${B}/boot.img` };
const TESTROOT = { file: `${B}/testroot.img` };
const BASE_APPEND = "console=ttyS0 initos.reboot_delay=1";

beforeAll(() => {
  const missing = need.filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`missing build artifacts (run make all): ${missing.join(" ")}`);
});
afterEach(stopAll);

/** Direct kernel boot (no firmware); the boot disk with the images is vda, the test root vdb. */
function direct(name: string, append: string, disks = [BOOT, TESTROOT]) {
  return startVm({ name, direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: `${BASE_APPEND} ${append}` }, disks });
}

describe("boot", () => {
  it("direct kernel boot: agent as PID 1 switch_roots into the btrfs subvolume and runs its init with the -- args", async () => {
    const vm = await direct("direct-boot", "root=/dev/vdb rootfstype=btrfs rootflags=subvol=@ -- alpha beta 'g'");
    const m = await vm.waitFor(/INITOS-TEST-ROOT pid=(\d+) root=(\S+) home=\S+ timeline=(\S+) argc=\d+ argv=\[([^\]]*)\] uptime=(\S+) memavailable=(\d+)kB rd_monotonic_us=(\S+)/, 90_000);
    expect(m[1]).toBe("1");
    expect(m[2]).toBe("subvol=@"); // the subvolume, not the top level
    expect(m[3]).toBe("yes"); // /run/initos/boot.json moved into the new root
    expect(m[4]).toBe("alpha beta 'g'");
    // RD_TIMESTAMP (for systemd-analyze): the initrd's start, before the root's init started.
    expect(Number(m[7]) / 1e6).toBeGreaterThan(0);
    expect(Number(m[7]) / 1e6).toBeLessThan(Number(m[5]));
    // The initramfs (agent and all, ~120 MB unpacked) is freed by the switch.
    const before = Number(/initos: handoff: MemAvailable (\d+) kB before switch_root/.exec(vm.output)?.[1]);
    expect(Number(m[6]) - before).toBeGreaterThan(100_000);
    expect(vm.output).toMatch(/initos: initos-agent starting \(pid 1\)/);
    expect(vm.output).toMatch(/initos: timeline: early \d+ms, modules \d+ms, esp \d+ms, images \d+ms, trial \d+ms, tpm \d+ms, root \d+ms, handoff-check \d+ms, os-mounts \d+ms/);
    expect(vm.output).toMatch(/initos: switch_root: freed initramfs \(\d+ entries\)/);
    expect(vm.output).not.toMatch(/Kernel panic/);
    await vm.waitExit(30_000); // the test init powers off
  }, 150_000);

  it("OVMF Secure Boot of the signed UKI with a TPM: agent reports Secure Boot on and switch_roots", async () => {
    const vm = await startVm({ name: "secureboot-uki", firmware: { vars: OVMF.varsSecure }, disks: [BOOT, TESTROOT], tpm: true });
    const m = await vm.waitFor(/INITOS-TEST-ROOT pid=(\d+) root=(\S+)/, 150_000);
    expect(m[1]).toBe("1");
    expect(m[2]).toBe("subvol=@");
    expect(vm.output).toMatch(/initos: secureboot: on/);
    // The TPM is visible to the kernel (used by the unlock stage later).
    expect(vm.output).toMatch(/tpm_tis .*2\.0 TPM/);
    await vm.waitExit(30_000);
  }, 200_000);

  it("the firmware refuses the unsigned UKI: Access Denied, the agent never runs", async () => {
    const vm = await startVm({ name: "unsigned-uki", firmware: { vars: OVMF.varsSecure }, disks: [{ file: `${B}/boot-unsigned.img` }] });
    await vm.waitFor(/BdsDxe: failed to load Boot\d+ [^\n]*: Access Denied/, 120_000);
    await vm.waitFor(/No bootable option or device was found/, 60_000);
    expect(vm.output).not.toMatch(/initos:|Linux version/);
  }, 200_000);

  it("a root device that never appears: bounded wait, one line of cause, failure policy reboots (no panic)", async () => {
    const vm = await direct("root-never-appears", "root=/dev/vdz initos.rootwait=3", [BOOT]);
    const code = await vm.waitExit(90_000); // -no-reboot: the policy's reboot ends QEMU
    expect(code).toBe(0);
    const out = vm.output;
    expect(out).toMatch(/initos: waiting up to 3s for root device \/dev\/vdz/);
    expect(out).toMatch(/initos: boot failed: root device \/dev\/vdz did not appear within 3s/);
    expect(out).toMatch(/initos: diagnostics in \/run\/initos\/failure.txt/);
    expect(out).toMatch(/initos: rebooting in 1s/);
    expect(out).toMatch(/reboot: Restarting system/);
    expect(out).not.toMatch(/Kernel panic|INITOS-TEST-ROOT/);
  }, 120_000);

  it("ctrl-alt-del reaches the agent as SIGINT: it syncs and reboots instead of the kernel rebooting at once", async () => {
    const vm = await direct("ctrl-alt-del", "root=/dev/vdz initos.rootwait=60", [BOOT]);
    await vm.waitFor(/initos: waiting up to 60s for root device \/dev\/vdz/, 60_000);
    await vm.monitor("sendkey ctrl-alt-delete");
    await vm.waitFor(/initos: SIGINT \(ctrl-alt-del\): reboot/, 20_000);
    expect(await vm.waitExit(20_000)).toBe(0);
    expect(vm.output).not.toMatch(/boot failed|Kernel panic/);
  }, 120_000);

  it("a malformed cmdline value: one clear error line, boot still succeeds with the default", async () => {
    const vm = await direct("bad-cmdline", "root=LABEL=initos-testroot rootflags=subvol=@ initos.rootwait=soon initos.mode=bogus");
    await vm.waitFor(/INITOS-TEST-ROOT pid=1 /, 90_000);
    const errs = vm.output.match(/initos: cmdline: [^\r\n]*/g) ?? [];
    expect(errs).toEqual([
      'initos: cmdline: initos.mode="bogus" is invalid (Invalid option: expected one of "host"|"vm"|"sidecar"|"install"); using the default',
      'initos: cmdline: initos.rootwait="soon" is invalid (expected whole seconds 0-3600); using the default',
    ]);
    // LABEL= resolved through libblkid; no rootfstype given, so the type was probed.
    expect(vm.output).toMatch(/initos: root: mounted \/dev\/vdb \(btrfs, subvol=@, ro\) on \/sysroot/);
    await vm.waitExit(30_000);
  }, 150_000);
});
