// `make demo`: under OVMF with Secure Boot and a TPM, (1) the signed UKI boots the test root
// from verified images, (2) the signed installer installs onto a blank disk (LUKS2 + btrfs,
// key sealed to the TPM), (3) the installed machine boots unattended into its encrypted root.
// The serial console streams by; a summary with the agent's stage timelines follows.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { OVMF, startVm, stopAll, type VmOptions } from "./harness.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-demo-`);
const target = `${dir}/disk.img`;
const tpm = { stateDir: `${dir}/tpm` };
mkdirSync(tpm.stateDir);
execFileSync("truncate", ["-s", "1G", target]);

async function show(title: string, o: VmOptions): Promise<string> {
  console.log(`\n==== ${title} ====`);
  const vm = await startVm(o);
  let shown = 0;
  const pump = setInterval(() => {
    process.stdout.write(vm.output.slice(shown));
    shown = vm.output.length;
  }, 100);
  try {
    await vm.waitExit(300_000);
  } finally {
    clearInterval(pump);
    process.stdout.write(vm.output.slice(shown));
  }
  return vm.output;
}

const pick = (out: string, re: RegExp) => re.exec(out)?.[1] ?? "(missing)";
try {
  const verified = await show("1. signed UKI, verified images, test root", {
    name: "demo",
    firmware: { vars: OVMF.varsSecure },
    disks: [{ file: "build/boot.img" }, { file: "build/testroot.img" }],
    tpm: true,
  });
  const installed = await show("2. installer: blank disk -> LUKS2 + btrfs, key sealed to the TPM", {
    name: "demo-install",
    firmware: { vars: OVMF.varsSecure },
    disks: [{ file: "build/installer.img" }, { file: target, snapshot: false }],
    tpm,
    memoryMiB: 2048,
  });
  const unlocked = await show("3. installed machine: unattended TPM unlock of the encrypted root", {
    name: "demo-unlock",
    firmware: { vars: OVMF.varsSecure },
    disks: [{ file: target, snapshot: false }],
    tpm,
    memoryMiB: 2048,
  });
  console.log("\n==== initos demo ====");
  console.log(`Secure Boot:          ${pick(verified, /initos: secureboot: (\S+)/)}`);
  console.log(`verified images:      ${pick(verified, /initos: (image modules: verified[^\r\n]*)/)}`);
  console.log(`stages (test root):   ${pick(verified, /initos: timeline: ([^\r\n]*)/)}`);
  console.log(`switched-to root:     ${pick(verified, /(INITOS-TEST-ROOT[^\r\n]*)/)}`);
  console.log(`install:              ${pick(installed, /initos: (install: done[^\r\n]*)/)}`);
  console.log(`unlock:               ${pick(unlocked, /initos: (unlock: opened[^\r\n]*)/)}; ${pick(unlocked, /initos: unlock: (latch holds[^\r\n]*)/)}`);
  console.log(`stages (encrypted):   ${pick(unlocked, /initos: timeline: ([^\r\n]*)/)}`);
  console.log(`switched-to root:     ${pick(unlocked, /(INITOS-TEST-ROOT[^\r\n]*)/)}`);
  console.log(`serial logs:          build/logs/demo*.log`);
} catch (e) {
  console.error(`demo failed: ${(e as Error).message}`);
  await stopAll();
  process.exitCode = 1;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
