// The verified images that live on the ESP beside the UKI: squashfs, each with a dm-verity
// hash tree whose root hash goes into the agent config inside the signed UKI.
//
//   modules.sqfs  /modules/<release>/...  every module of the kernel (indexes included)
//                 /firmware/...           firmware (Debian's firmware-linux-free)
//   tools.sqfs    /usr/bin/..., /usr/lib/... the tools recovery needs, with their libraries
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { extractDeb, run } from "./debs.ts";
import type { KernelInfo } from "./kernel.ts";
import { collectLibs } from "./libs.ts";
import type { VerityParams } from "../agent/sys/cryptsetup.ts";

export interface ImageInfo {
  name: string;
  sqfs: string;
  verity: string;
  rootHash: string;
  /** What `veritysetup format` made the hash tree with: pinned in the signed config beside the root hash. */
  params: VerityParams;
}

/**
 * The hash tree's parameters, all given explicitly rather than left to veritysetup's defaults
 * (which a cryptsetup update could change): the signed config pins them, so they must be what
 * the build meant. The salt is per image (see verityFormat).
 */
export const VERITY_FORMAT = { hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096 } as const;

/**
 * Tools in the tools image: the ssh server, an admin shell, TPM, LUKS and btrfs tools, and
 * sbverify, with which the agent checks an update's UKI against the signers in its signed config
 * (issue #15; it needs only libcrypto and libc).
 */
export const TOOLS = [
  "/usr/sbin/dropbear",
  "/usr/bin/dropbearkey",
  "/bin/busybox",
  "/usr/bin/tpm2",
  "/usr/sbin/cryptsetup",
  "/usr/bin/btrfs",
  // install mode: partition, format the ESPs and the pool
  "/usr/sbin/sfdisk",
  "/usr/sbin/mkfs.fat",
  "/sbin/mkfs.btrfs",
  // update: the new UKI's Authenticode signature
  "/usr/bin/sbverify",
  // jails (issue #16): the OCI runtime for container jails. It links libseccomp, libcap, yajl
  // and libsystemd (DT_NEEDED); its dlopen is only for the krun/wasm handlers, never used here.
  "/usr/bin/crun",
];
/** tpm2-tools loads its TPM transport with dlopen. */
const TOOLS_DLOPENED = ["libtss2-tcti-device.so.0"];

/**
 * Reproducible squashfs: fixed owner and times, no appending to an old image. The times are 0,
 * not the commit's time (SOURCE_DATE_EPOCH, which mksquashfs would read itself and which it
 * refuses beside time options, so it is taken out of its environment): an image is rebuilt only
 * when its inputs change, so with the commit's time an incremental build and a fresh clone of
 * the same commit would disagree, and with them the root hashes in the signed config (issue #15:
 * the signing machine rebuilds and compares).
 */
export function mksquashfs(sources: string[], out: string): void {
  rmSync(out, { force: true });
  const env = { ...process.env };
  delete env.SOURCE_DATE_EPOCH;
  execFileSync("mksquashfs", [...sources, out, "-quiet", "-no-progress", "-noappend", "-comp", "zstd", "-all-root", "-mkfs-time", "0", "-all-time", "0"], {
    stdio: ["ignore", "pipe", "inherit"],
    env,
  });
}

/**
 * `veritysetup format` with salt and UUID derived from the image, so the same image always
 * gets the same hash tree and root hash (the defaults are random). Returns the root hash and
 * the parameters as veritysetup reports them, checked against what it was asked for.
 */
export function verityFormat(sqfs: string, verity: string): { rootHash: string; params: VerityParams } {
  const digest = createHash("sha256").update(readFileSync(sqfs)).digest("hex");
  const uuid = `${digest.slice(0, 8)}-${digest.slice(8, 12)}-4${digest.slice(13, 16)}-8${digest.slice(17, 20)}-${digest.slice(20, 32)}`;
  rmSync(verity, { force: true });
  const f = VERITY_FORMAT;
  const out = run("veritysetup", [
    "format", "--format", String(f.hashType), "--hash", f.hashAlgorithm, "--data-block-size", String(f.dataBlockSize),
    "--hash-block-size", String(f.hashBlockSize), "--salt", digest, "--uuid", uuid, sqfs, verity,
  ]);
  const field = (label: string) => {
    const m = new RegExp(`^${label}:\\s+(\\S+)`, "m").exec(out);
    if (!m) throw new Error(`veritysetup format ${sqfs}: no "${label}" in its output`);
    return m[1]!;
  };
  const params: VerityParams = {
    hashType: Number(field("Hash type")),
    hashAlgorithm: field("Hash algorithm"),
    dataBlockSize: Number(field("Data block size")),
    hashBlockSize: Number(field("Hash block size")),
    dataBlocks: Number(field("Data blocks")),
    salt: field("Salt"),
  };
  const asked: VerityParams = { ...f, dataBlocks: Math.ceil(statSync(sqfs).size / f.dataBlockSize), salt: digest };
  for (const k of Object.keys(asked) as (keyof VerityParams)[]) {
    if (params[k] !== asked[k]) throw new Error(`veritysetup format ${sqfs}: made ${k} ${params[k]}, asked for ${asked[k]}`);
  }
  return { rootHash: field("Root hash"), params };
}

/** Firmware for the modules image: Debian's firmware-linux-free, extracted into the cache. */
export function ensureFirmware(cacheDir: string): string {
  return `${extractDeb("firmware-linux-free", cacheDir)}/lib/firmware`;
}

export function buildModulesImage(kernel: KernelInfo, firmwareDir: string, outDir: string): ImageInfo {
  const staging = `${outDir}/.modules-staging`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { recursive: true });
  // Two top-level names in the image; symlinks would be stored as links, so copy the trees.
  run("cp", ["-a", `${kernel.root}/lib/modules`, `${staging}/modules`]);
  run("cp", ["-a", firmwareDir, `${staging}/firmware`]);
  const sqfs = `${outDir}/modules.sqfs`;
  mksquashfs([`${staging}/modules`, `${staging}/firmware`], sqfs);
  rmSync(staging, { recursive: true, force: true });
  return finish("modules", sqfs);
}

export function buildToolsImage(outDir: string): ImageInfo {
  const staging = `${outDir}/.tools-staging`;
  rmSync(staging, { recursive: true, force: true });
  for (const d of ["usr/bin", "usr/lib/x86_64-linux-gnu", "usr/lib64"]) mkdirSync(`${staging}/${d}`, { recursive: true });
  for (const tool of TOOLS) copyFileSync(tool, `${staging}/usr/bin/${tool.replace(/.*\//, "")}`);
  for (const l of collectLibs(TOOLS.filter((t) => t !== "/bin/busybox"), TOOLS_DLOPENED)) {
    copyFileSync(l.source, `${staging}/${l.path}`);
  }
  for (const [link, target] of [["lib", "usr/lib"], ["lib64", "usr/lib64"], ["bin", "usr/bin"], ["sbin", "usr/bin"]]) symlinkSync(target!, `${staging}/${link}`);
  const sqfs = `${outDir}/tools.sqfs`;
  mksquashfs([staging], sqfs);
  rmSync(staging, { recursive: true, force: true });
  return finish("tools", sqfs);
}

/**
 * The VM jails' image (vmhost.sqfs): QEMU with its libraries, the accelerator module it
 * dlopens, the microvm firmware, and the VM kernel + initrd the jails boot. Its own image, not
 * part of tools: the images stage verifies every image it mounts on every boot, and this one is
 * 72 MB against tools' 13 MB (measured: see VM_HOST_IMAGE's comment in agent/jails/vm.ts), so
 * only hosts with a VM jail should pay for it. The layout is QEMU's own relative to its binary
 * (usr/bin/../share/qemu, usr/bin/../lib/x86_64-linux-gnu/qemu), which it finds from
 * /proc/self/exe when run as itself with LD_LIBRARY_PATH (toolExec).
 *
 *   usr/bin/qemu-system-x86_64, usr/lib/x86_64-linux-gnu/{*.so*, qemu/accel-tcg-x86_64.so}
 *   usr/share/qemu/bios-microvm.bin     qboot: what microvm boots with before the kernel
 *   usr/share/qemu/linuxboot_dma.bin    the -kernel loader's option ROM
 *   vm/vmlinuz, vm/initrd.img           the VM kernel + initrd (Makefile: build/vm)
 */
export const QEMU = "/usr/bin/qemu-system-x86_64";
/** Modules QEMU dlopens: TCG is a module in Debian's build (KVM is built in). */
const QEMU_MODULES = ["/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so"];
/**
 * qboot for microvm, and the option ROM QEMU loads for -kernel (it says "Could not open option
 * rom 'linuxboot_dma.bin'" without it, and boots anyway on microvm; 1.5 KB, so it is shipped).
 */
const QEMU_FIRMWARE = ["bios-microvm.bin", "linuxboot_dma.bin"];

export function buildVmHostImage(vmDir: string, outDir: string): ImageInfo {
  const staging = `${outDir}/.vmhost-staging`;
  rmSync(staging, { recursive: true, force: true });
  for (const d of ["usr/bin", "usr/lib/x86_64-linux-gnu/qemu", "usr/lib64", "usr/share/qemu", "vm"]) mkdirSync(`${staging}/${d}`, { recursive: true });
  copyFileSync(QEMU, `${staging}/usr/bin/qemu-system-x86_64`);
  for (const m of QEMU_MODULES) copyFileSync(m, `${staging}/usr/lib/x86_64-linux-gnu/qemu/${m.replace(/.*\//, "")}`);
  for (const l of collectLibs([QEMU, ...QEMU_MODULES])) copyFileSync(l.source, `${staging}/${l.path}`);
  // bios-microvm.bin is a symlink to qboot.rom in Debian's qemu-system-data: copied as the file.
  for (const f of QEMU_FIRMWARE) copyFileSync(`/usr/share/qemu/${f}`, `${staging}/usr/share/qemu/${f}`);
  for (const f of ["vmlinuz", "initrd.img"]) copyFileSync(`${vmDir}/${f}`, `${staging}/vm/${f}`);
  const sqfs = `${outDir}/vmhost.sqfs`;
  mksquashfs([staging], sqfs);
  rmSync(staging, { recursive: true, force: true });
  return finish("vmhost", sqfs);
}

function finish(name: string, sqfs: string): ImageInfo {
  const verity = sqfs.replace(/\.sqfs$/, ".verity");
  const info: ImageInfo = { name, sqfs, verity, ...verityFormat(sqfs, verity) };
  writeFileSync(sqfs.replace(/\.sqfs$/, ".json"), JSON.stringify(info, null, 1) + "\n");
  return info;
}
