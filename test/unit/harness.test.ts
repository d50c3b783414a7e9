// The QEMU harness's own parts that need no QEMU: the arguments it builds for a machine that
// keeps its firmware variables and reboots in place, and the console waits that look at one
// boot's part of a log that accumulates across boots (on a real child process's output).
import { spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { qemuArgs, Vm } from "../../qemu/harness.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-harness-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const pflash = (args: string[]) => args.filter((a) => a.startsWith("if=pflash"));

describe("qemuArgs", () => {
  const template = `${dir}/template.fd`;
  writeFileSync(template, "pristine vars");

  it("firmware.file: made from the template when missing, then used in place, never overwritten", () => {
    const file = `${dir}/machine-vars.fd`;
    const tmp = mkdtempSync(`${dir}/vm-`);
    const args = qemuArgs({ name: "t", firmware: { vars: template, file } }, tmp);
    expect(pflash(args)[1]).toBe(`if=pflash,format=raw,unit=1,file=${file}`);
    expect(readFileSync(file, "utf8")).toBe("pristine vars");
    expect(existsSync(`${tmp}/vars.fd`)).toBe(false);
    // What the guest wrote (BootOrder, BootNext, Boot####) is what the next start uses.
    writeFileSync(file, "written by the guest");
    const ino = statSync(file).ino;
    qemuArgs({ name: "t", firmware: { vars: template, file } }, mkdtempSync(`${dir}/vm-`));
    expect(readFileSync(file, "utf8")).toBe("written by the guest");
    expect(statSync(file).ino).toBe(ino);
    expect(readFileSync(template, "utf8")).toBe("pristine vars");
  });

  it("without firmware.file: a fresh copy of the template in the VM's temp dir, as before", () => {
    const tmp = mkdtempSync(`${dir}/vm-`);
    const args = qemuArgs({ name: "t", firmware: { vars: template } }, tmp);
    expect(pflash(args)[1]).toBe(`if=pflash,format=raw,unit=1,file=${tmp}/vars.fd`);
    expect(readFileSync(`${tmp}/vars.fd`, "utf8")).toBe("pristine vars");
  });

  it("reboot: no -no-reboot, so a reset continues in the same process; the default keeps it", () => {
    expect(qemuArgs({ name: "t", firmware: { vars: template } }, mkdtempSync(`${dir}/vm-`))).toContain("-no-reboot");
    expect(qemuArgs({ name: "t", firmware: { vars: template }, reboot: true }, mkdtempSync(`${dir}/vm-`))).not.toContain("-no-reboot");
  });

  it("i6300esb only when asked, and never on microvm", () => {
    const direct = { kernel: "k", initrd: "i", append: "" };
    expect(qemuArgs({ name: "t", direct }, dir).join(" ")).not.toContain("i6300esb");
    expect(qemuArgs({ name: "t", direct, i6300esb: true }, dir).join(" ")).toContain("-device i6300esb");
    expect(() => qemuArgs({ name: "t", direct, machine: "microvm", i6300esb: true }, dir)).toThrow(/microvm has no PCI/);
  });
});

describe("Vm: waiting on the output after a mark", () => {
  /** A real process printing two "boots", the second after a pause. */
  function twoBoots(): Vm {
    const child = spawn("sh", ["-c", "echo 'boot: slot a'; echo 'INITOS-TEST-ROOT up'; sleep 0.5; echo 'boot: slot b'; echo 'INITOS-TEST-ROOT up'"], { stdio: ["pipe", "pipe", "pipe"] });
    return new Vm("two-boots", `${dir}/two-boots.log`, child, createWriteStream(`${dir}/two-boots.log`), () => {}, `${dir}/none.sock`);
  }

  it("waitFor with `from` matches only what came after the mark, with indexes relative to it", async () => {
    const vm = twoBoots();
    await vm.waitFor(/INITOS-TEST-ROOT up/, 5000);
    const mark = vm.mark();
    expect(mark).toBeGreaterThan(0);
    // The first boot's line is before the mark: the wait goes on until the second boot's.
    const m = await vm.waitFor(/boot: slot (\w)\n(INITOS-TEST-ROOT up)/, 5000, false, mark);
    expect(m[1]).toBe("b");
    expect(vm.since(mark).slice(m.index!)).toMatch(/^boot: slot b\n/);
    expect(vm.since(mark)).not.toMatch(/slot a/);
    await vm.exited;
  });

  it("a pattern only before the mark is not found after it: the wait fails at the exit, naming the offset", async () => {
    const vm = twoBoots();
    await vm.waitFor(/slot b/, 5000);
    const mark = vm.mark();
    await expect(vm.waitFor(/slot a/, 5000, false, mark)).rejects.toThrow(new RegExp(`VM exited \\(code 0\\) before /slot a/ \\(after output offset ${mark}\\)`));
    expect(await vm.waitFor(/slot a/, 5000)).toBeTruthy();
  });
});
