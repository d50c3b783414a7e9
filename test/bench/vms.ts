// The benchmark's VMs, one at a time (2 cores, TCG: a second VM only slows both):
//   install     the installer onto a blank disk under OVMF Secure Boot + swtpm, once
//   boot        the installed disk with the agent's UKI or the reference UKI, each boot from a
//               fresh copy of the post-install TPM state and a snapshot of the disk
//   sidecar     the agent in sidecar mode for a minute, then `ssh ... status` for its RSS
//   unpack      direct kernel boots of one initrd, for the kernel's own unpack time
import { execFileSync, spawnSync } from "node:child_process";
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { loadavg } from "node:os";
import { OVMF, startVm, stopAll, type Vm } from "../../qemu/harness.ts";
import { slotOffset } from "../integration/images.ts";
import { sshWhenUp } from "../../qemu/ssh.ts";
import { type BootSample, parseBoot, ROOT_MARKER, stampedLines, type Variant } from "./parse.ts";

export const LOG_DIR = "build/bench/logs";
const MEMORY_MIB = 2048; // as the encrypted-root tests: the agent's 120 MB initramfs plus the pool

export interface Installed {
  disk: string;
  /** swtpm state right after the install: the storage seed the key was sealed under. */
  tpm: string;
}

/** `inputs`: the directory holding this run's snapshot of the build outputs (see inputs.ts). */
export async function install(inputs: string, dir: string): Promise<Installed> {
  const disk = `${dir}/installed.img`;
  const tpm = `${dir}/tpm-installed`;
  mkdirSync(tpm);
  execFileSync("truncate", ["-s", "1G", disk]);
  const vm = await startVm({
    name: "bench-install",
    logDir: LOG_DIR,
    firmware: { vars: OVMF.varsSecure },
    disks: [{ file: `${inputs}/installer.img` }, { file: disk, snapshot: false }],
    tpm: { stateDir: tpm },
    memoryMiB: MEMORY_MIB,
  });
  const code = await vm.waitExit(400_000);
  if (code !== 0 || !/initos: install: done/.test(vm.output)) throw new Error(`install failed (exit ${code}); log ${vm.logPath}`);
  return { disk, tpm };
}

/**
 * One unmeasured boot of the installed disk with the agent, writes kept: what a machine does
 * once (the agent saves its ssh host key on the pool at its first boot) is then done, and the
 * measured boots see the steady state. The TPM state is not kept (each boot copies it anyway).
 */
export async function warmUp(installed: Installed, dir: string): Promise<void> {
  const tpm = `${dir}/tpm-warmup`;
  cpSync(installed.tpm, tpm, { recursive: true });
  try {
    const vm = await startVm({
      name: "bench-warmup",
      logDir: LOG_DIR,
      firmware: { vars: OVMF.varsSecure },
      disks: [{ file: installed.disk, snapshot: false }],
      tpm: { stateDir: tpm },
      memoryMiB: MEMORY_MIB,
    });
    await vm.waitFor(ROOT_MARKER, 240_000);
    await vm.waitExit(60_000);
  } finally {
    await stopAll();
    rmSync(tpm, { recursive: true, force: true });
  }
}

/** QEMUs running now that are not ours (we run one at a time, and none when this is called). */
function otherQemus(): number {
  const r = spawnSync("pgrep", ["-c", "-f", "^qemu-system"], { encoding: "utf8" });
  return Number(r.stdout.trim()) || 0;
}

/** A copy of the installed disk whose ESPs boot another UKI (the reference's, a baseline's) instead of the agent's. */
export function referenceDisk(installed: string, dir: string, uki: string, name: string): string {
  const out = `${dir}/${name}.img`;
  execFileSync("cp", ["--sparse=always", installed, out]);
  for (const slot of ["a", "b"]) execFileSync("mcopy", ["-o", "-i", `${out}@@${slotOffset(out, slot)}`, uki, "::/EFI/BOOT/BOOTX64.EFI"]);
  return out;
}

/** One boot of `disk` through the firmware into the test root; never throws. */
export async function boot(variant: Variant, run: number, disk: string, installedTpm: string, dir: string): Promise<BootSample> {
  const tpm = `${dir}/tpm-${variant}-${run}`;
  cpSync(installedTpm, tpm, { recursive: true });
  const name = `bench-${variant}-${run}`;
  const host = { hostLoad: loadavg()[0], otherVms: otherQemus() };
  const t0 = performance.now();
  let vm: Vm | undefined;
  const wall: { firmware?: number; toRoot?: number } = {};
  try {
    vm = await startVm({ name, logDir: LOG_DIR, firmware: { vars: OVMF.varsSecure }, disks: [{ file: disk }], tpm: { stateDir: tpm }, memoryMiB: MEMORY_MIB });
    await vm.waitFor(/Linux version/, 180_000);
    wall.firmware = (performance.now() - t0) / 1000;
    await vm.waitFor(ROOT_MARKER, 240_000);
    wall.toRoot = (performance.now() - t0) / 1000;
    await vm.waitExit(60_000);
    return { ...parseBoot(variant, run, vm.output, vm.logPath, wall), ...host };
  } catch (e) {
    await stopAll();
    const s = parseBoot(variant, run, vm?.output ?? "", vm?.logPath ?? "", wall);
    return { ...s, ...host, ok: false, error: s.error && s.error !== "no root marker" ? s.error : (e as Error).message };
  } finally {
    rmSync(tpm, { recursive: true, force: true });
  }
}

export interface SidecarResult {
  ok: boolean;
  error?: string;
  /** From `agent rss: N kB` in `ssh ... status`, when the agent prints it. */
  rssKb?: number;
  status?: string;
  /** Seconds between "sidecar: ready" and the status query. */
  afterSeconds: number;
}

/** The agent as sidecar (direct kernel boot of the test initrd with the boot disk), RSS after a wait. */
export async function sidecarRss(inputs: string, sshKey: string, waitSeconds = 60): Promise<SidecarResult> {
  try {
    const vm = await startVm({
      name: "bench-sidecar",
      logDir: LOG_DIR,
      direct: { kernel: `${inputs}/vmlinuz`, initrd: `${inputs}/initrd.img`, append: "console=ttyS0 initos.mode=sidecar initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" },
      disks: [{ file: `${inputs}/boot.img` }],
      net: { forward: [{ guest: 15022 }] },
    });
    const port = vm.hostPort(15022);
    await vm.waitFor(/initos: sidecar: ready/, 180_000);
    await new Promise((r) => setTimeout(r, waitSeconds * 1000));
    const r = await sshWhenUp(port, "status", { key: sshKey });
    if (r.status !== 0) return { ok: false, error: `ssh status exited ${r.status}: ${r.stderr.trim()}`, afterSeconds: waitSeconds };
    const m = /agent rss: (\d+) kB/.exec(r.stdout);
    return { ok: true, status: r.stdout.trim(), rssKb: m ? Number(m[1]) : undefined, afterSeconds: waitSeconds };
  } catch (e) {
    return { ok: false, error: (e as Error).message, afterSeconds: waitSeconds };
  } finally {
    await stopAll();
  }
}

/**
 * The kernel's own unpack time for one initrd: a direct kernel boot that is stopped as soon as
 * the kernel frees the initrd. The time covers decompression and writing the files to the
 * initramfs, on the kernel clock, under TCG.
 */
export async function kernelUnpack(kernel: string, name: string, initrd: string): Promise<number | undefined> {
  try {
    const vm = await startVm({ name: `bench-unpack-${name}`, logDir: LOG_DIR, direct: { kernel, initrd, append: "console=ttyS0 panic=-1 rdinit=/none" } });
    await vm.waitFor(/Freeing initrd memory|Initramfs unpacking failed|junk in compressed archive/, 180_000);
    const lines = stampedLines(vm.output);
    if (lines.some((l) => /Initramfs unpacking failed|junk in compressed/.test(l.text))) return undefined;
    const start = lines.find((l) => /Trying to unpack rootfs image/.test(l.text))?.t;
    const end = lines.find((l) => /Freeing initrd memory/.test(l.text))?.t;
    return start !== undefined && end !== undefined ? end - start : undefined;
  } catch {
    return undefined;
  } finally {
    await stopAll();
  }
}
