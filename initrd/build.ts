// Build steps for the initrd, the UKI and the test images. Each subcommand is one step with
// explicit inputs and one output, so the Makefile can rebuild only what changed (changing the
// agent rebuilds the agent's cpio segment and the UKI, nothing else).
//
//   bun initrd/build.ts kernel      --cache DIR --out kernel.json
//   bun initrd/build.ts initrd-base --kernel kernel.json --preinit FILE --config FILE --out FILE.cpio
//   bun initrd/build.ts initrd-agent --agent FILE --sigrelay FILE --out FILE.cpio
//   bun initrd/build.ts uki         --kernel kernel.json --initrd FILE --cmdline TEXT --out FILE.efi
//   bun initrd/build.ts esp         --uki FILE --out esp.img
//   bun initrd/build.ts testroot    --init FILE --out root.img
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { parseArgs } from "node:util";
import { AgentConfigSchema } from "../agent/config.ts";
import { type CpioEntry, fileFrom, writeCpio } from "./cpio.ts";
import { ensureKernel, type KernelInfo } from "./kernel.ts";
import { moduleClosure, readModuleIndex } from "./kmods.ts";
import { collectLibs } from "./libs.ts";
import { buildUki } from "./uki.ts";

/** Libraries the agent opens with dlopen through koffi; DT_NEEDED cannot see them. */
export const DLOPENED = ["libc.so.6", "libkmod.so.2", "libblkid.so.1"];
/** Modules always in the initrd besides the config's list: efivarfs for the Secure Boot state. */
export const EXTRA_MODULES = ["efivarfs"];
const KOFFI_NODE = "node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node";

function mtime(): number {
  const v = process.env.SOURCE_DATE_EPOCH;
  if (v === undefined || v === "") return 0;
  if (!/^\d+$/.test(v)) throw new Error(`SOURCE_DATE_EPOCH=${JSON.stringify(v)} is not a number of seconds`);
  return Number(v);
}

function sh(cmd: string, args: string[], opts: { cwd?: string } = {}): void {
  execFileSync(cmd, args, { stdio: ["ignore", "inherit", "inherit"], ...opts });
}

function walkFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) out.push(...walkFiles(p));
    else out.push(p);
  }
  return out;
}

/** The skeleton every initrd has: merged-/usr symlinks, mount points, /dev/console, /init. */
function skeleton(preinit: string): CpioEntry[] {
  return [
    { path: "init", type: "file", mode: 0o755, data: readFileSync(preinit) },
    { path: "dev", type: "dir", mode: 0o755 },
    // The kernel opens /dev/console for init before devtmpfs exists; without this node init's
    // fds 0-2 start closed and early messages are lost.
    { path: "dev/console", type: "char", mode: 0o600, major: 5, minor: 1 },
    ...["proc", "sys", "run", "sysroot", "etc", "usr/bin", "usr/lib64", "usr/lib/x86_64-linux-gnu"].map(
      (d): CpioEntry => ({ path: d, type: "dir", mode: 0o755 }),
    ),
    { path: "tmp", type: "dir", mode: 0o1777 },
    { path: "root", type: "dir", mode: 0o700 },
    { path: "lib", type: "symlink", target: "usr/lib" },
    { path: "lib64", type: "symlink", target: "usr/lib64" },
    { path: "bin", type: "symlink", target: "usr/bin" },
    { path: "sbin", type: "symlink", target: "usr/bin" },
  ];
}

/** Copies the module closure into a staging tree and lets depmod write the index libkmod reads. */
function stageModules(kernel: KernelInfo, wanted: readonly string[], staging: string): CpioEntry[] {
  const src = `${kernel.root}/lib/modules/${kernel.release}`;
  const dst = `${staging}/lib/modules/${kernel.release}`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(dst, { recursive: true });
  const files = moduleClosure(readModuleIndex(src), wanted);
  for (const f of files) {
    mkdirSync(dirname(`${dst}/${f}`), { recursive: true });
    copyFileSync(`${src}/${f}`, `${dst}/${f}`);
  }
  for (const f of ["modules.order", "modules.builtin", "modules.builtin.modinfo"]) copyFileSync(`${src}/${f}`, `${dst}/${f}`);
  sh("depmod", ["-b", staging, kernel.release]);
  return walkFiles(dst).map((f) => fileFrom(`usr/lib/modules/${kernel.release}/${relative(dst, f)}`, f, 0o644));
}

function cmdKernel(o: Record<string, string | undefined>): void {
  const k = ensureKernel(need(o, "cache"));
  writeFileSync(need(o, "out"), JSON.stringify(k, null, 1) + "\n");
  console.log(`kernel: ${k.package} (${k.release})`);
}

function cmdInitrdBase(o: Record<string, string | undefined>): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  const configText = readFileSync(need(o, "config"), "utf8");
  const config = AgentConfigSchema.parse(JSON.parse(configText)); // a bad config fails the build, not the boot
  const out = need(o, "out");
  const entries: CpioEntry[] = [
    ...skeleton(need(o, "preinit")),
    { path: "etc/initos/config.json", type: "file", mode: 0o644, data: Buffer.from(JSON.stringify(config, null, 1) + "\n") },
    ...stageModules(kernel, [...config.modules, ...EXTRA_MODULES], `${out}.modules`),
  ];
  const size = writeCpio(out, entries, mtime());
  console.log(`initrd-base: ${out} ${(size / 1e6).toFixed(1)} MB, ${entries.length} entries`);
}

function cmdInitrdAgent(o: Record<string, string | undefined>): void {
  const agent = need(o, "agent");
  const out = need(o, "out");
  const sigrelay = need(o, "sigrelay");
  const libs = collectLibs([agent, KOFFI_NODE, sigrelay], DLOPENED);
  const entries: CpioEntry[] = [
    fileFrom("usr/bin/initos-agent", agent, 0o755),
    fileFrom("usr/lib/initos/sigrelay.so", sigrelay, 0o755),
    ...libs.map((l) => fileFrom(l.path, l.source, 0o755)),
  ];
  const size = writeCpio(out, entries, mtime());
  console.log(`initrd-agent: ${out} ${(size / 1e6).toFixed(1)} MB, ${libs.length} libraries`);
}

function cmdUki(o: Record<string, string | undefined>): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  const out = need(o, "out");
  const tmp = mkdtempSync(`${dirname(out)}/.uki-`);
  try {
    writeFileSync(`${tmp}/cmdline`, `${need(o, "cmdline").trim()}\0`);
    writeFileSync(`${tmp}/osrel`, `NAME="initos"\nID=initos\nPRETTY_NAME="initos (${kernel.release})"\nVERSION_ID="${kernel.release}"\n`);
    const layout = buildUki(out, [
      { section: ".osrel", file: `${tmp}/osrel` },
      { section: ".cmdline", file: `${tmp}/cmdline` },
      { section: ".initrd", file: need(o, "initrd") },
      { section: ".linux", file: kernel.vmlinuz },
    ]);
    for (const l of layout) console.log(`uki: ${l.section} at 0x${l.vma.toString(16)} (${l.size} bytes)`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** A FAT ESP with the UKI at the removable-media path the firmware boots without entries. */
function cmdEsp(o: Record<string, string | undefined>): void {
  const uki = need(o, "uki");
  const out = need(o, "out");
  const sizeMiB = Math.ceil(statSync(uki).size / 2 ** 20) + 16;
  rmSync(out, { force: true });
  sh("mkfs.vfat", ["-C", "-F", "32", "-n", "INITOS_ESP", "-i", "1a2b3c4d", out, String(sizeMiB * 1024)]);
  sh("mmd", ["-i", out, "::/EFI", "::/EFI/BOOT"]);
  sh("mcopy", ["-i", out, uki, "::/EFI/BOOT/BOOTX64.EFI"]);
  console.log(`esp: ${out} (${sizeMiB} MiB)`);
}

/**
 * The test root: a btrfs image whose subvolume "@" holds the marker init. The top level has a
 * different marker, so a test can tell that rootflags=subvol=@ was honoured. Creating a
 * subvolume needs a mount; it happens in a private mount namespace on a loop device.
 */
function cmdTestroot(o: Record<string, string | undefined>): void {
  const out = need(o, "out");
  const tmp = mkdtempSync(`${dirname(out)}/.testroot-`);
  try {
    mkdirSync(`${tmp}/top`);
    writeFileSync(`${tmp}/top/WRONG-SUBVOLUME`, "the root was mounted without subvol=@\n");
    mkdirSync(`${tmp}/sub/sbin`, { recursive: true });
    mkdirSync(`${tmp}/sub/etc`);
    for (const d of ["dev", "proc", "sys", "run"]) mkdirSync(`${tmp}/sub/${d}`);
    copyFileSync(need(o, "init"), `${tmp}/sub/sbin/init`);
    sh("chmod", ["0755", `${tmp}/sub/sbin/init`]);
    writeFileSync(`${tmp}/sub/etc/initos-test-root`, "subvol=@\n");
    rmSync(out, { force: true });
    sh("truncate", ["-s", "160M", out]);
    sh("mkfs.btrfs", ["-q", "-f", "-L", "initos-testroot", "--rootdir", `${tmp}/top`, out]);
    mkdirSync(`${tmp}/mnt`);
    sh("unshare", ["-m", "sh", "-ec", 'mount -o loop "$1" "$2"; btrfs -q subvolume create "$2/@"; cp -a "$3/." "$2/@/"; umount "$2"', "sh", out, `${tmp}/mnt`, `${tmp}/sub`]);
    console.log(`testroot: ${out}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

function need(o: Record<string, string | undefined>, key: string): string {
  const v = o[key];
  if (!v) throw new Error(`missing --${key}`);
  return v;
}

const commands: Record<string, (o: Record<string, string | undefined>) => void> = {
  kernel: cmdKernel,
  "initrd-base": cmdInitrdBase,
  "initrd-agent": cmdInitrdAgent,
  uki: cmdUki,
  esp: cmdEsp,
  testroot: cmdTestroot,
};

if (import.meta.main) {
  const [cmd, ...rest] = process.argv.slice(2);
  const run = cmd ? commands[cmd] : undefined;
  if (!run) {
    console.error(`usage: build.ts {${Object.keys(commands).join("|")}} --options`);
    process.exit(2);
  }
  const { values } = parseArgs({
    args: rest,
    options: Object.fromEntries(["cache", "out", "kernel", "preinit", "config", "agent", "sigrelay", "initrd", "cmdline", "uki", "init"].map((k) => [k, { type: "string" as const }])),
  });
  try {
    run(values as Record<string, string | undefined>);
  } catch (e) {
    console.error(`build ${cmd}: ${(e as Error).message}`);
    process.exit(1);
  }
}
