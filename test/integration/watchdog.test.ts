// The watchdog and EFI variables on a real kernel (QEMU TCG, the UKI's cloud kernel 6.1). The
// guest's PID 1 is watchdog-guest.ts, compiled, on the initrd's base (preinit, libraries,
// modules with softdog added). Measured:
// - softdog (the only watchdog this kernel has for QEMU: no i6300esb, no iTCO_wdt) resets the
//   machine when not petted, `timeout` seconds after the last pet;
// - after the magic 'V' and a close it is stopped; after a close without 'V' it resets the
//   machine like an unpetted one (WDIOF_MAGICCLOSE, the kernel is not built nowayout);
// - under OVMF: efivarfs variables of our vendor GUID are immutable once created and are
//   rewritten and deleted through the flag; Boot####, BootNext on the firmware's store.
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OVMF, qemuArgs, startVm, stopAll, type Vm } from "../../qemu/harness.ts";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const B = "build";
const dir = mkdtempSync(`${tmpdir()}/initos-watchdog-`);
const initrd = `${dir}/initrd.img`;
const PART_B = "aaaaaaaa-bbbb-4ccc-8dee-ff0011223344";

beforeAll(() => {
  execFileSync(BUN, ["build", "--compile", "test/integration/watchdog-guest.ts", "--outfile", `${dir}/guest`], { stdio: "ignore" });
  writeFileSync(`${dir}/config.json`, JSON.stringify({ modules: ["softdog"] }));
  execFileSync(BUN, ["initrd/build.ts", "initrd-base", "--kernel", `${B}/kernel.json`, "--preinit", `${B}/preinit`, "--config", `${dir}/config.json`, "--out", `${dir}/base.cpio`], { stdio: "ignore" });
  execFileSync(BUN, ["initrd/build.ts", "initrd-agent", "--agent", `${dir}/guest`, "--sigrelay", `${B}/sigrelay.so`, "--out", `${dir}/agent.cpio`], { stdio: "ignore" });
  execFileSync("sh", ["-c", `cat ${dir}/base.cpio ${dir}/agent.cpio > ${initrd}`]);
}, 300_000);
afterEach(stopAll);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function boot(name: string, scenario: string, extra: Partial<Parameters<typeof startVm>[0]> = {}): Promise<Vm> {
  return startVm({ name, direct: { kernel: `${B}/vmlinuz`, initrd, append: `console=ttyS0 initos.wdtest=${scenario}` }, ...extra });
}

/** The guest's uptime on a WDTEST line, and the kernel's timestamp on a kernel line. */
const at = (vm: Vm, re: RegExp) => Number(new RegExp(`${re.source}.*@([\\d.]+)`).exec(vm.output)?.[1] ?? NaN);
const kernelAt = (vm: Vm, text: string) => Number(new RegExp(`\\[\\s*([\\d.]+)\\] ${text}`).exec(vm.output)?.[1] ?? NaN);

describe("watchdog on a real kernel (QEMU)", () => {
  it("softdog: petted it holds, after 'V' and close it is stopped, unpetted it resets the machine after its timeout", async () => {
    const vm = await boot("watchdog-magic", "magic-then-hang");
    await vm.waitFor(/WDTEST armed softdog \/dev\/watchdog0 identity="Software Watchdog" timeout=5 options=0x8180 cloexec=true/, 120_000);
    await vm.waitFor(/WDTEST survived magic close/, 60_000);
    await vm.waitFor(/WDTEST last pet after [\d.]+ @/, 10_000);
    const t0 = Date.now();
    await vm.waitExit(60_000);
    const wall = (Date.now() - t0) / 1000;
    // The pet happened between these two uptimes (the guest can stall between them).
    const beforePet = Number(/WDTEST last pet after ([\d.]+)/.exec(vm.output)?.[1] ?? NaN);
    const lastPet = at(vm, /WDTEST last pet after [\d.]+/);
    const reset = kernelAt(vm, "softdog: Initiating system reboot");
    console.log(`softdog: unpetted reset ${(reset - lastPet).toFixed(2)} s after the last pet (guest clock), ${wall.toFixed(1)} s wall; nowayout ${/nowayout=(\d)/.exec(vm.output)?.[1]}`);
    expect(vm.output).toMatch(/initos: watchdog: softdog on \/dev\/watchdog0, 5s: catches hangs of the agent and of userspace, not of the kernel/);
    expect(vm.output.indexOf("Initiating system reboot")).toBeGreaterThan(vm.output.indexOf("WDTEST survived magic close"));
    // softdog fires `timeout` (5 s) after the pet, never before: measured from the uptime before
    // the pet, the interval is >= 5 s whatever the host's load; 0.1 s for the kernel's printk
    // clock against /proc/uptime's (two clocks) and uptime's 10 ms steps. Measured 5.05 s from
    // after the pet (session 8), so a stall between pet and reading could have failed the old
    // ">= 4.9 from after the pet". The upper bound is the load-dependent side (a timer that fires
    // late under TCG on a busy host): measured 0.05 s late, allowed 2 s.
    expect(beforePet).toBeLessThanOrEqual(lastPet);
    expect(reset - beforePet).toBeGreaterThanOrEqual(4.9);
    expect(reset - lastPet).toBeLessThan(7);
  }, 240_000);

  it("softdog: closed without 'V' (release) it stays armed and resets the machine", async () => {
    const vm = await boot("watchdog-release", "release");
    await vm.waitFor(/WDTEST released/, 120_000);
    await vm.waitExit(60_000);
    const released = at(vm, /WDTEST released/);
    const reset = kernelAt(vm, "softdog: Initiating system reboot");
    console.log(`softdog: released (closed without 'V') reset ${(reset - released).toFixed(2)} s after the close (guest clock)`);
    expect(vm.output).toMatch(/watchdog did not stop!/);
    expect(reset - released).toBeGreaterThan(3);
    expect(reset - released).toBeLessThan(7);
  }, 240_000);
});

describe("EFI variables under OVMF (direct kernel boot through the firmware)", () => {
  it("our vendor variable is immutable once created and is rewritten and deleted; a Boot#### entry is created once; BootNext set and cleared", async () => {
    const img = `${dir}/disk.img`;
    execFileSync("truncate", ["-s", "64M", img]);
    const esp = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    execFileSync("sfdisk", ["-q", img], { input: `label: gpt\nstart=2048, size=32768, type=${esp}\nstart=34816, size=32768, type=${esp}, uuid=${PART_B}\n` });
    copyFileSync(OVMF.varsPlain, `${dir}/vars-template.fd`);
    const vm = await boot("efivars", "efi", { firmware: { vars: `${dir}/vars-template.fd` }, disks: [{ file: img }] });
    await vm.waitFor(/WDTEST done|WDTEST failed.*/, 240_000);
    await vm.waitExit(30_000);
    const lines = vm.output.split("\n").filter((l) => l.startsWith("WDTEST"));
    console.log(lines.join("\n"));
    expect(vm.output).not.toMatch(/WDTEST failed/);
    expect(vm.output).toMatch(/WDTEST created immutable=true/);
    expect(vm.output).toMatch(/WDTEST rewritten value=two immutable-after=true/);
    expect(vm.output).toMatch(/WDTEST deleted=true gone=true/);
    expect(vm.output).toMatch(/WDTEST ensured again true/);
    const created = /WDTEST ensured (Boot[0-9A-F]{4})/.exec(vm.output)![1]!;
    expect(vm.output).toContain(`initos: efi: ${created} created: "initos test" HD(2,GPT,${PART_B},0x8800,0x8000)/File(\\EFI\\BOOT\\BOOTX64.EFI)`);
    expect(vm.output).toMatch(new RegExp(`WDTEST BootNext=${parseInt(created.slice(4), 16)} `));
    expect(vm.output).toMatch(/WDTEST BootNext after clear=null/);
  }, 300_000);
});

describe("the firmware boots what we wrote (OVMF, three boots, one NVRAM)", () => {
  it("BootNext to the entry ensureBootEntry made boots slot B's UKI (BootCurrent is it, BootNext consumed); committed first in BootOrder, it boots again and stays first", async () => {
    // Slot B's FAT holds a UKI (this kernel and initrd, cmdline scenario "booted") at a path only
    // our entry names: nothing else in the firmware's order could find it.
    const img = `${dir}/next.img`;
    execFileSync("truncate", ["-s", "256M", img]);
    const esp = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
    execFileSync("sfdisk", ["-q", img], { input: `label: gpt\nstart=2048, size=65536, type=${esp}\nstart=67584, size=393216, type=${esp}, uuid=${PART_B}\n` });
    execFileSync("zstd", ["-q", "-f", "-T0", "-3", initrd, "-o", `${dir}/initrd.zst`]);
    execFileSync(BUN, ["initrd/build.ts", "uki", "--kernel", `${B}/kernel.json`, "--initrd", `${dir}/initrd.zst`, "--cmdline", "console=ttyS0 initos.wdtest=booted", "--out", `${dir}/b.efi`], { stdio: "ignore" });
    execFileSync("mkfs.vfat", ["-C", `${dir}/b.fat`, String(393216 / 2)], { stdio: "ignore" });
    execFileSync("mmd", ["-i", `${dir}/b.fat`, "::/EFI", "::/EFI/initos"]);
    execFileSync("mcopy", ["-i", `${dir}/b.fat`, `${dir}/b.efi`, "::/EFI/initos/b.efi"]);
    execFileSync("dd", [`if=${dir}/b.fat`, `of=${img}`, "bs=512", "seek=67584", "conv=notrunc", "status=none"]);

    // Boot 1: the kernel through the firmware (-kernel), the trial's setup; QEMU run here so that
    // its NVRAM file stays for boot 2.
    const nv = `${dir}/nv1`;
    mkdirSync(nv);
    const args = qemuArgs({ name: "efi-next-1", firmware: { vars: OVMF.varsPlain }, direct: { kernel: `${B}/vmlinuz`, initrd, append: "console=ttyS0 initos.wdtest=efi-next" }, disks: [{ file: img }] }, nv);
    const out1 = execFileSync("qemu-system-x86_64", args, { encoding: "utf8", timeout: 240_000, maxBuffer: 64 << 20 });
    writeFileSync(`${B}/logs/efi-next-1.log`, out1);
    const next = /WDTEST next (\d+) order=(\S+)/.exec(out1);
    expect(next, out1.slice(-2000)).not.toBeNull();
    expect(out1).toContain(`initos: efi: Boot${Number(next![1]).toString(16).toUpperCase().padStart(4, "0")} created: "initos B" HD(2,GPT,${PART_B},0x10800,0x60000)/File(\\EFI\\initos\\b.efi)`);

    // Boot 2: firmware only, with boot 1's NVRAM: BootNext. The guest then commits (its entry
    // first in BootOrder).
    const nv2 = `${dir}/nv2`;
    mkdirSync(nv2);
    const out2 = execFileSync("qemu-system-x86_64", qemuArgs({ name: "efi-next-2", firmware: { vars: `${nv}/vars.fd` }, disks: [{ file: img }] }, nv2), {
      encoding: "utf8",
      timeout: 240_000,
      maxBuffer: 64 << 20,
    });
    writeFileSync(`${B}/logs/efi-next-2.log`, out2);
    const booted = /WDTEST booted current=(\S+) next=(\S+) order=\[(\S*)\]/.exec(out2);
    expect(booted, out2.slice(-2000)).not.toBeNull();
    expect(booted![1]).toBe(next![1]); // the firmware booted our entry
    expect(booted![2]).toBe("null"); // and consumed BootNext
    // BootOrder: what boot 1 left, without our entry; OVMF appends the options it makes for the
    // devices it finds (DVD, the disk, its shell) on a boot without -kernel.
    const order2 = booted![3]!.split(",").map(Number);
    expect(order2.slice(0, JSON.parse(next![2]!).length)).toEqual(JSON.parse(next![2]!));
    expect(order2).not.toContain(Number(next![1]));
    expect(out2).toMatch(new RegExp(`WDTEST committed order=\\[${next![1]},${order2.join(",")}\\]`));

    // Boot 3: the committed entry boots from BootOrder, and OVMF keeps it first.
    const vm = await startVm({ name: "efi-next-3", firmware: { vars: `${nv2}/vars.fd` }, disks: [{ file: img }] });
    await vm.waitFor(/WDTEST done/, 240_000);
    await vm.waitExit(30_000);
    const third = /WDTEST booted current=(\S+) next=(\S+) order=(\S+)/.exec(vm.output);
    console.log(`boot 1: ${next![0]}\nboot 2: ${booted![0]}\nboot 3: ${third?.[0]}`);
    expect(third![1]).toBe(next![1]);
    expect(third![2]).toBe("null");
    expect(third![3]).toBe(`[${next![1]},${order2.join(",")}]`);
    expect(vm.output).not.toMatch(/WDTEST committed/);
  }, 600_000);
});
