// A real distribution after switch_root: Debian 12 with systemd (build/debian.img, see
// initrd/debian.ts) booted through the agent's root= path, by a direct kernel boot and through
// OVMF Secure Boot. Its initos-check unit reports on the console (one INITOS-DEBIAN line per
// fact) once the boot is done, then powers the machine off, so the shutdown is checked too.
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { CHECK_FIRMWARE, CHECK_MODULE, DEBIAN_LABEL } from "../../initrd/debian.ts";
import { OVMF, startVm, stopAll, type Vm } from "../../qemu/harness.ts";
import { putUki, variantUki } from "./machine.ts";

const B = "build";
const need = ["vmlinuz", "initrd.img", "boot.img", "debian.img", "kernel.json"].map((f) => `${B}/${f}`);
const ROOT = `root=LABEL=${DEBIAN_LABEL} rootfstype=btrfs rootflags=subvol=@ rw`;
const DEBIAN = { file: `${B}/debian.img` };
const dir = mkdtempSync(`${tmpdir()}/initos-debian-`);

beforeAll(() => {
  const missing = need.filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`missing build artifacts (run make all): ${missing.join(" ")}`);
});
afterEach(stopAll);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The check's lines, by key ("INITOS-DEBIAN state: running" → state: "running"). */
function report(out: string): Map<string, string> {
  const lines = [...out.matchAll(/INITOS-DEBIAN ([a-z0-9 -]+):(?: ([^\r\n]*))?\r?$/gm)];
  return new Map(lines.map((m) => [m[1]!, (m[2] ?? "").trim()]));
}

/** What every boot into the Debian root must show, from the hand-off to the power off. */
async function expectHandoffAndCleanShutdown(vm: Vm): Promise<Map<string, string>> {
  await vm.waitFor(/Reached target [^\r\n]*Multi-User System/, 400_000);
  await vm.waitFor(/INITOS-DEBIAN done/, 200_000);
  expect(await vm.waitExit(120_000)).toBe(0); // the check powers off: shutdown ran to its end
  const out = vm.output;
  const r = report(out);
  // systemd was told it comes from an initrd, with the initrd's start: the (initrd) part.
  expect(out).toMatch(/initos: handoff: init \/sbin\/init is \/usr\/lib\/systemd\/systemd \(systemd: switched root\)/);
  expect(r.get("pid1")).toMatch(/^\/sbin\/init --switched-root --system --deserialize \d+$/);
  expect(r.get("state")).toBe("running");
  expect(r.get("failed")).toBe("none");
  expect(r.get("analyze")).toMatch(/^Startup finished in [^(]+ \(kernel\) \+ [^(]+ \(initrd\) \+ [^(]+ \(userspace\) = /);
  // The kernel's modules and firmware from the verified image, and nothing else of the initrd.
  expect(r.get(`modprobe ${CHECK_MODULE}`)).toBe("ok");
  expect(r.get("firmware")).toBe(`/lib/firmware/${CHECK_FIRMWARE}`);
  expect(r.get("os mounts")).toMatch(/\/usr\/lib\/modules\/\S+ \/dev\/mapper\/initos-modules ro,/);
  expect(r.get("os mounts")).toMatch(/\/usr\/lib\/firmware \/dev\/mapper\/initos-modules ro,/);
  expect(r.get("initrd mounts")).toBe("");
  // Marked as the initrd's (x-initrd.mount): not stopped with the OS, unmounted by systemd-shutdown.
  expect(r.get("left to systemd-shutdown")).toMatch(/^\/usr\/lib\/firmware \/usr\/lib\/modules\/\S+$/);
  expect(out).toMatch(/systemd-shutdown\[1\]: All filesystems, swaps, loop devices, MD devices and DM devices detached/);
  expect(r.get("dm")).toBe("control initos-modules"); // the tools image, unused, was closed
  // A shutdown with nothing of the initrd's left to fail on.
  expect(out).not.toMatch(/Failed unmounting/);
  expect(out).not.toMatch(/FAILED[^\r\n]*initos/);
  expect(out).not.toMatch(/Kernel panic|initos: boot failed/);
  expect(out).toMatch(/reboot: Power down/);
  return r;
}

describe("Debian 12 with systemd after switch_root", () => {
  it("direct kernel boot: systemd told it was switched (initrd time), modules + firmware from the verified image, clean shutdown", async () => {
    const vm = await startVm({
      name: "debian-direct",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: `console=ttyS0 initos.reboot_delay=1 ${ROOT}` },
      // The boot disk first: the agent finds the ESP and the verified modules image on it.
      disks: [{ file: `${B}/boot.img` }, DEBIAN],
    });
    await expectHandoffAndCleanShutdown(vm);
    expect(vm.output).toMatch(/initos: timeline: early \d+ms, .*handoff-check \d+ms, os-mounts \d+ms/);
    expect(vm.output).toMatch(/initos: esp: unmounted \/run\/initos\/esp-a/);
  }, 700_000);

  it("OVMF Secure Boot of a UKI whose signed cmdline names the Debian root: the same hand-off", async () => {
    // The build's initrd (the images' root hashes in its config match boot.img's images), with
    // root= on the signed cmdline, on both slots of a copy of the boot disk.
    const uki = variantUki(dir, "debian", { cmdline: `console=ttyS0 initos.reboot_delay=3 ${ROOT}`, initrd: `${B}/initrd.img`, pcrSigned: false });
    const disk = `${dir}/boot-debian.img`;
    execFileSync("cp", ["--sparse=always", `${B}/boot.img`, disk]);
    putUki(disk, uki, "a");
    putUki(disk, uki, "b");
    const vm = await startVm({ name: "debian-secureboot", firmware: { vars: OVMF.varsSecure }, disks: [{ file: disk }, DEBIAN], tpm: true });
    await expectHandoffAndCleanShutdown(vm);
    expect(vm.output).toMatch(/initos: secureboot: on/);
  }, 900_000);
});
