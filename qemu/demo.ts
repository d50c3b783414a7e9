// `make demo`: under OVMF with Secure Boot and a TPM, (1) the signed UKI boots the test root
// from verified images, (2) the signed installer installs onto a blank disk (LUKS2 + btrfs,
// key sealed to the TPM), (3) the installed machine boots unattended into its encrypted root;
// then (4) a machine in sidecar mode is managed over ssh: status, switch-root, and the sidecar
// still answering beside the booted OS; (5) a real distribution, Debian 12 with systemd
// (build/debian.img), boots through the agent's root= path: systemd told it came from an
// initrd, the kernel's modules from the verified image; (6) jail mode: the host keeps the
// hardware and runs a container jail from an OCI archive pushed over ssh; (7) a VM jail, nested:
// QEMU from the verified vmhost image inside the TCG guest (qemu/demo-vmjail.ts; minutes). The
// serial console streams by; a summary follows.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { OVMF, startVm, stopAll, type Vm, type VmOptions } from "./harness.ts";
import { ssh, sshWhenUp } from "./ssh.ts";
import { idBase } from "../agent/jailsconfig.ts";
import { diskWithPool } from "../test/integration/pool-disk.ts";
import { buildPoolImage, testRootfs } from "../test/integration/pool-image.ts";
import { writeWebImage } from "../test/jails/web-image.ts";
import { vmJailDemo } from "./demo-vmjail.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-demo-`);
const target = `${dir}/disk.img`;
const tpm = { stateDir: `${dir}/tpm` };
mkdirSync(tpm.stateDir);
execFileSync("truncate", ["-s", "1G", target]);

/** Boots a VM with its console streaming by; `drive` does what the part shows while it runs. */
async function show(title: string, o: VmOptions, drive?: (vm: Vm) => Promise<void>): Promise<string> {
  console.log(`\n==== ${title} ====`);
  const vm = await startVm(o);
  let shown = 0;
  const pump = setInterval(() => {
    process.stdout.write(vm.output.slice(shown));
    shown = vm.output.length;
  }, 100);
  try {
    await drive?.(vm);
    await vm.waitExit(300_000);
  } finally {
    clearInterval(pump);
    process.stdout.write(vm.output.slice(shown));
  }
  return vm.output;
}

/** An ssh command as the operator types it, with its answer, on the demo's output. */
async function operator(port: number, command: string): Promise<string> {
  const r = await sshWhenUp(port, command, { key: "build/test-ssh/id_ed25519", knownHosts: `${dir}/known_hosts` });
  console.log(`\n$ ssh -p 15022 root@machine ${command}\n${r.stdout}${r.stderr}`);
  return r.stdout;
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
  let besideStatus = "";
  const managed = await show(
    "4. sidecar mode managed over ssh: status, switch-root, the sidecar beside the booted OS",
    {
      name: "demo-ssh",
      direct: {
        kernel: "build/vmlinuz",
        initrd: "build/initrd.img",
        append: "console=ttyS0 initos.mode=sidecar initos.sidecar=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 root=LABEL=initos-testroot rootfstype=btrfs rootflags=subvol=@ -- hold=120",
      },
      disks: [{ file: "build/boot.img" }, { file: "build/testroot.img" }],
      net: { forward: [{ guest: 15022 }] },
    },
    async (vm) => {
      const port = vm.hostPort(15022);
      await vm.waitFor(/initos: sidecar: ready/, 180_000);
      await operator(port, "status");
      await operator(port, "switch-root");
      await vm.waitFor(/INITOS-TEST-ROOT/, 180_000);
      besideStatus = await operator(port, "status");
      await ssh(port, "poweroff", { key: "build/test-ssh/id_ed25519", knownHosts: `${dir}/known_hosts` });
    },
  );

  const debian = await show("5. a real distribution: Debian 12 with systemd after switch_root", {
    name: "demo-debian",
    direct: {
      kernel: "build/vmlinuz",
      initrd: "build/initrd.img",
      append: "console=ttyS0 root=LABEL=initos-debian rootfstype=btrfs rootflags=subvol=@ rw",
    },
    // The boot disk first: the agent finds the ESP and the verified modules image there.
    disks: [{ file: "build/boot.img" }, { file: "build/debian.img" }],
  });

  // 6. Jail mode: an encrypted pool whose host config names a container jail and no root.
  const pool = buildPoolImage({
    out: `${dir}/jails-pool.img`,
    passphrase: "demo-jails",
    rootfs: testRootfs(`${dir}/rootfs.tar`),
    subvolumes: ["@spare", "@data"],
    hostConfig: {
      network: { address: "10.77.0.1/24" },
      jails: [{ name: "web", kind: "container", image: "web", memory: "64M", address: "10.77.0.10", shares: [{ subvol: "@data", dir: "web", path: "/data" }], probe: 8080 }],
    },
    dirs: { "@data/web": idBase("web") },
  });
  let jailStatus = "";
  const jailed = await show(
    "6. jail mode: the host keeps the hardware; a container jail from an OCI archive pushed over ssh",
    {
      name: "demo-jails",
      direct: { kernel: "build/vmlinuz", initrd: "build/initrd.img", append: "console=ttyS0 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" },
      disks: [{ file: diskWithPool("build/boot.img", pool, `${dir}/jails-machine.img`) }],
      net: { forward: [{ guest: 15022 }] },
    },
    async (vm) => {
      const port = vm.hostPort(15022);
      await vm.waitFor(/Recovery passphrase \(attempt 1 of 3\): $/, 240_000, true);
      vm.send("demo-jails\n");
      await vm.waitFor(/initos: jails: ready/, 240_000);
      const web = writeWebImage(`${dir}/web.tar`);
      console.log(`\n$ ssh -p 15022 root@machine image import web < web.tar`);
      const r = await ssh(port, "image import web", { key: "build/test-ssh/id_ed25519", knownHosts: `${dir}/known_hosts`, inputFile: web, timeoutMs: 300_000 });
      console.log(r.stdout + r.stderr);
      await operator(port, "jail start web");
      await vm.waitFor(/JAIL-SERVING on 8080/, 240_000);
      jailStatus = await operator(port, "jails");
      await operator(port, "poweroff");
    },
  );

  const vmJail = await vmJailDemo(dir, show, operator);

  console.log("\n==== initos demo ====");
  console.log(`Secure Boot:          ${pick(verified, /initos: secureboot: (\S+)/)}`);
  console.log(`verified images:      ${pick(verified, /initos: (image modules: verified[^\r\n]*)/)}`);
  console.log(`stages (test root):   ${pick(verified, /initos: timeline: ([^\r\n]*)/)}`);
  console.log(`switched-to root:     ${pick(verified, /(INITOS-TEST-ROOT[^\r\n]*)/)}`);
  console.log(`install:              ${pick(installed, /initos: (install: done[^\r\n]*)/)}`);
  console.log(`unlock:               ${pick(unlocked, /initos: (unlock: opened[^\r\n]*)/)}; ${pick(unlocked, /initos: unlock: (latch holds[^\r\n]*)/)}`);
  console.log(`stages (encrypted):   ${pick(unlocked, /initos: timeline: ([^\r\n]*)/)}`);
  console.log(`switched-to root:     ${pick(unlocked, /(INITOS-TEST-ROOT[^\r\n]*)/)}`);
  console.log(`ssh beside the OS:    ${besideStatus.split("\n").slice(0, 2).join("; ") || "(missing)"}`);
  console.log(`switched-to root:     ${pick(managed, /(INITOS-TEST-ROOT[^\r\n]*)/)}`);
  console.log(`Debian's systemd:     ${pick(debian, /INITOS-DEBIAN analyze: ([^\r\n]*)/)}`);
  console.log(`  its PID 1:          ${pick(debian, /INITOS-DEBIAN pid1: ([^\r\n]*)/)} (${pick(debian, /INITOS-DEBIAN state: ([^\r\n]*)/)})`);
  console.log(`  modules, firmware:  modprobe dummy ${pick(debian, /INITOS-DEBIAN modprobe dummy: ([^\r\n]*)/)}; ${pick(debian, /INITOS-DEBIAN firmware: ([^\r\n]*)/)}`);
  console.log(`  shutdown:           ${/Failed unmounting/.test(debian) ? "a mount failed to unmount" : pick(debian, /systemd-shutdown\[1\]: (All filesystems, swaps[^\r\n]*)/)}`);
  console.log(`jail mode:            ${pick(jailed, /initos: (pool: no root[^\r\n]*)/)}`);
  console.log(`  a container jail:   ${pick(jailStatus, /^(web: init pid[^\n]*)/m)}`);
  console.log(`  its limit:          ${pick(jailStatus, /^web: (memory[^\n]*)/m)}; ${pick(jailed, /(Memory cgroup out of memory: Killed process \d+ \(init\))/)}`);
  console.log(`  over the bridge:    ${pick(jailStatus, /^web: (probe[^\n]*)/m)}`);
  console.log(`  stopped first:      ${pick(jailed, /initos: (ctl: stopping the jails[^\r\n]*)/)} ${/JAIL-TERM/.test(jailed) ? "(its init got SIGTERM)" : ""}`);
  console.log(`a VM jail (nested):   ${pick(vmJail.output, /initos: (jail app: TCG[^\r\n]*)/)}`);
  console.log(`  vmhost on demand:   ${pick(vmJail.output, /initos: (image vmhost: verified[^\r\n]*)/)}`);
  console.log(`  its app:            ${pick(vmJail.output, /jail app: (VM-JAIL-APP-UP app)\b/)}; ${pick(vmJail.status, /^(app: [^\n]*)/m)}`);
  console.log(`  timings (wall):     boot to jails ready ${vmJail.bootS.toFixed(0)} s; jail start to the app's marker ${vmJail.startS.toFixed(0)} s; poweroff to exit ${vmJail.poweroffS.toFixed(0)} s`);
  console.log(`  stopped first:      ${pick(vmJail.output, /initos: (ctl: stopping the jails[^\r\n]*)/)} ${/jail app: VM-JAIL-APP-TERM[\r\n]/.test(vmJail.output) ? "(the app got SIGTERM from the power button)" : ""}`);
  console.log(`serial logs:          build/logs/demo*.log`);
} catch (e) {
  console.error(`demo failed: ${(e as Error).message}`);
  await stopAll();
  process.exitCode = 1;
} finally {
  rmSync(dir, { recursive: true, force: true });
}
