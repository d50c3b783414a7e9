// Build steps for the initrd, the UKI and the test images. Each subcommand is one step with
// explicit inputs and one output, so the Makefile can rebuild only what changed (changing the
// agent rebuilds the agent's cpio segment and the UKI, nothing else).
//
//   bun initrd/build.ts kernel      --cache DIR [--meta linux-image-amd64] --out kernel.json
//   bun initrd/build.ts images      --kernel kernel.json --cache DIR --out DIR
//   bun initrd/build.ts vmhost-image --vm DIR --out DIR   (QEMU + build/vm's kernel and initrd, for VM jails)
//   bun initrd/build.ts initrd-base --kernel kernel.json --preinit FILE --config FILE [--add DEST=FILE] --out FILE.cpio
//   bun initrd/build.ts initrd-config --config FILE [--images DIR] [--ssh-keys FILE] [--pcr-pub PUB.pem] [--version N] [--signer CERT.pem]... [--host hosts/NAME/host.json] --out FILE.cpio
//   bun initrd/build.ts initrd-agent --agent FILE --sigrelay FILE --out FILE.cpio
//   bun initrd/build.ts uki         --kernel kernel.json --initrd FILE --cmdline TEXT [--pcrpkey PUB.pem [--pcr-key KEY.pem [--pcr-key-pass-env VAR]]] --out FILE.efi
//   bun initrd/build.ts host-cmdline --host hosts/NAME/host.json --cmdline TEXT --out FILE
//   bun initrd/build.ts sign-pcr    --uki UNSIGNED.efi --pcr-key KEY.pem [--pcr-key-pass-env VAR] --out FILE.efi
//   bun initrd/build.ts bundle      --uki SIGNED.efi --images DIR --version N [--host NAME] --out FILE.bundle
//   bun initrd/build.ts disk        --uki FILE [--images DIR] --out boot.img
//   bun initrd/build.ts testroot    --init FILE --out root.img
//   bun initrd/build.ts rootfs      --init FILE --out rootfs.tar
//   bun initrd/build.ts install-config --rootfs FILE --target DEV [--esp-mib N] --out install.json
//   bun initrd/build.ts initrd-extra --add DEST=FILE --out FILE.cpio
//   bun initrd/build.ts reference-initrd --kernel kernel.json --config FILE --images DIR --init init.sh [--pcr-pub PUB.pem] --out FILE.cpio
//   bun initrd/build.ts vmimage     --from DIR|ROOTFS.tar[.gz]|OCI-LAYOUT.tar --out FILE.img [--label L]
//   bun initrd/build.ts debian      --cache DIR --out debian.img
//   bun initrd/build.ts debian-rootfs --cache DIR --out debian.tar.zst
import { execFileSync } from "node:child_process";
import { X509Certificate, createHash, createPublicKey } from "node:crypto";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { basename, dirname, join, relative } from "node:path";
import { parseArgs } from "node:util";
import { AgentConfigSchema } from "../agent/config.ts";
import { zodIssue } from "../agent/errors.ts";
import { ESP_TYPE } from "../agent/stages/esp.ts";
import { InstallConfigSchema } from "../agent/stages/install.ts";
import { type CpioEntry, fileFrom, writeCpio } from "./cpio.ts";
import { ensureKernel, type KernelInfo } from "./kernel.ts";
import { moduleClosure, readModuleIndex } from "./kmods.ts";
import { collectLibs } from "./libs.ts";
import { buildModulesImage, buildToolsImage, buildVmHostImage, ensureFirmware, type ImageInfo } from "./images.ts";
import { buildUkiFrom, signPcr } from "./uki.ts";
import { bundleParts, ukiConfig, writeBundle } from "./bundle.ts";
import { HOST_NAME, hostCmdline, readHost, withHost } from "./host.ts";
import { referenceEntries } from "./reference/initrd.ts";
import { buildVmImage } from "./vmimage.ts";
import { imageArgv } from "../agent/oci/oci.ts";
import { buildDebianImage, buildDebianRootfs } from "./debian.ts";

/** Libraries the agent opens with dlopen through koffi; DT_NEEDED cannot see them. */
export const DLOPENED = ["libc.so.6", "libkmod.so.2", "libblkid.so.1", "libcryptsetup.so.12", "libtss2-esys.so.0", "libtss2-mu.so.0", "libtss2-rc.so.0", "libtss2-tctildr.so.0", "libtss2-tcti-device.so.0"];
/**
 * Modules in the initrd besides the config's list: efivarfs for the Secure Boot state, and the
 * storage drivers coldplug may need to see the ESP (built-in ones, like NVMe, need nothing).
 * Everything else comes from the verified modules image.
 */
export const EXTRA_MODULES = ["efivarfs", "virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod"];
const KOFFI_NODE = "node_modules/@koromix/koffi-linux-x64/linux_x64/koffi.node";

/**
 * The mtime of the initrd's segments (base, agent, config): fixed, not the commit's time. A
 * segment is rebuilt only when its inputs change, so with the commit's time a build machine's
 * incremental build and the signing machine's fresh clone of the same commit would differ in
 * every header (issue #15: the signing machine rebuilds and compares bytes). No one reads these
 * times.
 */
const SEGMENT_MTIME = 0;

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
  const k = ensureKernel(need(o, "cache"), o.meta);
  writeFileSync(need(o, "out"), JSON.stringify(k, null, 1) + "\n");
  console.log(`kernel: ${k.package} (${k.release})`);
}

function cmdImages(o: Record<string, string | undefined>): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  const out = need(o, "out");
  mkdirSync(out, { recursive: true });
  for (const info of [buildModulesImage(kernel, ensureFirmware(need(o, "cache")), out), buildToolsImage(out)]) {
    console.log(`images: ${info.name} ${(statSync(info.sqfs).size / 1e6).toFixed(1)} MB, root hash ${info.rootHash}`);
  }
}

function cmdVmHostImage(o: Record<string, string | undefined>): void {
  const out = need(o, "out");
  mkdirSync(out, { recursive: true });
  const info = buildVmHostImage(need(o, "vm"), out);
  console.log(`images: ${info.name} ${(statSync(info.sqfs).size / 1e6).toFixed(1)} MB, root hash ${info.rootHash}`);
}

/**
 * The config template with each image's root hash and verity parameters filled in from
 * `<imagesDir>/<name>.json`; what the template pins itself stays (each of the two on its own).
 */
export function withRootHashes(template: Record<string, unknown>, imagesDir: string | undefined): unknown {
  const images = (template.images ?? []) as Record<string, unknown>[];
  return {
    ...template,
    images: images.map((img) => {
      if (img.rootHash && img.verity) return img; // pinned in the template
      if (!imagesDir) throw new Error(`image ${String(img.name)} has no rootHash or verity parameters and no --images was given`);
      const file = `${imagesDir}/${String(img.name)}.json`;
      const info = JSON.parse(readFileSync(file, "utf8")) as Partial<ImageInfo>;
      if (!info.params) throw new Error(`${file} has no verity parameters (made by an older build): rebuild the images`);
      return { rootHash: info.rootHash, verity: info.params, ...img };
    }),
  };
}

/** A PCR signer's public key file as the config carries it: RSA, public, normalized PEM. */
function pcrPublicKeyPem(file: string): string {
  const text = readFileSync(file, "utf8");
  if (text.includes("PRIVATE KEY")) throw new Error(`--pcr-pub ${file} holds a private key: give the public key`);
  const key = createPublicKey(text);
  if (key.asymmetricKeyType !== "rsa") throw new Error(`--pcr-pub ${file}: expected an RSA public key, got ${key.asymmetricKeyType}`);
  return key.export({ type: "spki", format: "pem" }).toString();
}

/** The PCR signer's public key, filled in at build time like the images' root hashes. */
function withPcrPublicKey(template: Record<string, unknown>, file: string | undefined): Record<string, unknown> {
  if (file) template.tpm = { ...((template.tpm ?? {}) as Record<string, unknown>), pcrPublicKey: pcrPublicKeyPem(file) };
  return template;
}

/**
 * The base segment: preinit, the skeleton and the kernel modules the config lists (and their
 * dependencies). Nothing that names a key, an image's root hash or a host: the same sources give
 * the same bytes on every machine and in every checkout (issue #15: the signing machine rebuilds
 * and compares), and many hosts share it. Those parts are the config segment's.
 */
function cmdInitrdBase(o: Record<string, string | undefined>, adds: string[]): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  // Only the module list: the rest of the config (checked whole by initrd-config) is not the base's.
  const template = JSON.parse(readFileSync(need(o, "config"), "utf8")) as { modules?: unknown };
  const modules = AgentConfigSchema.shape.modules.parse(template.modules);
  const out = need(o, "out");
  const entries: CpioEntry[] = [
    ...skeleton(need(o, "preinit")),
    ...stageModules(kernel, [...modules, ...EXTRA_MODULES], `${out}.modules`),
    ...adds.map((a) => fileFrom(a.slice(0, a.indexOf("=")), a.slice(a.indexOf("=") + 1), 0o755)),
  ];
  const size = writeCpio(out, entries, SEGMENT_MTIME);
  console.log(`initrd-base: ${out} ${(size / 1e6).toFixed(1)} MB, ${entries.length} entries`);
}

/** A certificate file as the config carries it (update.signers): one PEM certificate. */
function signerPem(file: string): string {
  const text = readFileSync(file, "utf8");
  if (text.includes("PRIVATE KEY")) throw new Error(`--signer ${file} holds a private key: give the certificate`);
  const pems = text.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  if (pems.length !== 1) throw new Error(`--signer ${file}: expected one PEM certificate, found ${pems.length}`);
  try {
    // Normalized: the same certificate gives the same config bytes however its file is wrapped.
    return new X509Certificate(pems[0]!).toString();
  } catch (e) {
    throw new Error(`--signer ${file}: not a certificate (${(e as Error).message})`);
  }
}

/** --version: the build's version, a whole number (the Makefile's default is the commit's time). */
function parseVersion(v: string): number {
  if (!/^\d{1,15}$/.test(v)) throw new Error(`--version ${JSON.stringify(v)} is not a whole number`);
  return Number(v);
}

/**
 * The config segment: /etc/initos/config.json, the signed config, with the images' root hashes
 * and verity parameters, the keys that may log in, the PCR signer, the version, the update
 * signers and (per host) the host's part filled in. A few KB, last in the initrd.
 */
function cmdInitrdConfig(o: Record<string, string | undefined>, _adds: string[], lists: Lists): void {
  let template = JSON.parse(readFileSync(need(o, "config"), "utf8")) as Record<string, unknown>;
  if (o.host) template = withHost(template, readHost(o.host).host);
  if (o.version !== undefined) template.version = parseVersion(o.version);
  if (lists.signer.length) {
    const update = (template.update ?? {}) as { signers?: string[] };
    template.update = { ...update, signers: [...(update.signers ?? []), ...lists.signer.map(signerPem)] };
  }
  // Keys that may log in to the sidecar: one public key per line of --ssh-keys.
  if (o["ssh-keys"]) {
    const keys = readFileSync(o["ssh-keys"], "utf8").split("\n").map((l) => l.trim()).filter((l) => l && !l.startsWith("#"));
    const ssh = (template.ssh ?? {}) as { authorizedKeys?: string[] };
    template.ssh = { ...ssh, authorizedKeys: [...(ssh.authorizedKeys ?? []), ...keys] };
  }
  withPcrPublicKey(template, o["pcr-pub"]);
  // A bad config fails the build, not the boot.
  const parsed = AgentConfigSchema.safeParse(withRootHashes(template, o.images));
  if (!parsed.success) throw new Error(`the config from ${need(o, "config")}${o.host ? ` and ${o.host}` : ""}: ${zodIssue(parsed.error)}`);
  const config = parsed.data;
  const out = need(o, "out");
  writeCpio(out, [{ path: "etc/initos/config.json", type: "file", mode: 0o644, data: Buffer.from(JSON.stringify(config, null, 1) + "\n") }], SEGMENT_MTIME);
  console.log(`initrd-config: ${out} (version ${config.version}${config.hostname ? `, host ${config.hostname}` : ""}, ${config.update.signers.length} update signer(s))`);
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
  const size = writeCpio(out, entries, SEGMENT_MTIME);
  console.log(`initrd-agent: ${out} ${(size / 1e6).toFixed(1)} MB, ${libs.length} libraries`);
}

function cmdUki(o: Record<string, string | undefined>): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  const out = need(o, "out");
  const tmp = mkdtempSync(`${dirname(out)}/.uki-`);
  try {
    // These files are the sections, byte for byte: what the stub measures is what was signed.
    writeFileSync(`${tmp}/cmdline`, `${need(o, "cmdline").trim()}\0`);
    writeFileSync(`${tmp}/osrel`, `NAME="initos"\nID=initos\nPRETTY_NAME="initos (${kernel.release})"\nVERSION_ID="${kernel.release}"\n`);
    const layout = buildUkiFrom(
      out,
      {
        linux: kernel.vmlinuz,
        initrd: need(o, "initrd"),
        cmdline: `${tmp}/cmdline`,
        osrel: `${tmp}/osrel`,
        pcrpkey: o.pcrpkey,
        // The key's passphrase, when it is encrypted, only ever comes from the environment.
        pcrKey: o["pcr-key"] ? { path: o["pcr-key"], passphraseEnv: o["pcr-key-pass-env"] ?? "PCR_KEY_PASS" } : undefined,
      },
      tmp,
    );
    for (const l of layout) console.log(`uki: ${l.section} at 0x${l.vma.toString(16)} (${l.size} bytes)`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** A host's UKI cmdline (initrd/host.ts): the installed machine's --cmdline plus the host's words. */
function cmdHostCmdline(o: Record<string, string | undefined>): void {
  const file = need(o, "host");
  const text = hostCmdline(need(o, "cmdline"), readHost(file).host, file);
  writeFileSync(need(o, "out"), text + "\n");
  console.log(`host-cmdline: ${text}`);
}

/**
 * `make sign`, step one: the UKI with its PCR 11 enter-initrd signature added (.pcrsig, made
 * with the PCR key; its passphrase only ever from the environment variable named). Written
 * through a temporary file: an output that exists is whole.
 */
function cmdSignPcr(o: Record<string, string | undefined>): void {
  const uki = need(o, "uki");
  const key = need(o, "pcr-key");
  const out = need(o, "out");
  for (const [what, f] of [["--uki", uki], ["--pcr-key", key]]) if (!existsSync(f!)) throw new Error(`${what} ${f} does not exist`);
  const tmp = mkdtempSync(`${dirname(out)}/.sign-pcr-`);
  try {
    signPcr(uki, `${tmp}/out.efi`, { path: key, passphraseEnv: o["pcr-key-pass-env"] ?? "PCR_KEY_PASS" }, tmp);
    renameSync(`${tmp}/out.efi`, out);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  console.log(`sign-pcr: ${out} (its PCR 11 in the enter-initrd phase signed)`);
}

/**
 * An update bundle (initrd/bundle.ts) of a signed UKI and the images its config names. The
 * version must be the one in the UKI's signed config.
 */
function cmdBundle(o: Record<string, string | undefined>): void {
  const start = performance.now();
  const uki = need(o, "uki");
  if (!existsSync(uki)) throw new Error(`--uki ${uki} does not exist`);
  const version = parseVersion(need(o, "version"));
  if (o.host !== undefined && !HOST_NAME.test(o.host)) throw new Error(`--host ${JSON.stringify(o.host)} is not a host name (a-z, 0-9, -)`);
  const config = ukiConfig(uki);
  if (config.version !== version) throw new Error(`${uki} carries version ${config.version} in its signed config, not ${version}`);
  const out = need(o, "out");
  const m = writeBundle(out, { version, host: o.host, parts: bundleParts(uki, config, need(o, "images")) });
  const sec = ((performance.now() - start) / 1000).toFixed(1);
  console.log(`bundle: ${out} version ${m.version}${m.host ? ` for ${m.host}` : ""}, ${m.files.length} files, ${(statSync(out).size / 1e6).toFixed(1)} MB in ${sec}s`);
}

export const DISK_SLOTS = [
  { name: "a", partLabel: "initos-a", fsLabel: "INITOS_A", volumeId: "1a2b3ca1" },
  { name: "b", partLabel: "initos-b", fsLabel: "INITOS_B", volumeId: "1a2b3cb2" },
] as const;

/**
 * GUIDs for a disk the build makes, derived from its file name: reproducible (same inputs, same
 * bytes), yet two disks of one build (boot.img, installer.img) never share a partition UUID.
 * They must not: the agent finds the partition it booted from by its UUID, and refuses one it
 * finds twice (a cloned disk: nothing says which copy the firmware read). Installs get random
 * ones from sfdisk.
 */
export function diskGuids(out: string): { disk: string; slots: string[] } {
  const guid = (what: string) => {
    const h = createHash("sha256").update(`initos disk ${basename(out)} ${what}`).digest("hex");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-4${h.slice(13, 16)}-8${h.slice(17, 20)}-${h.slice(20, 32)}`;
  };
  return { disk: guid("table"), slots: DISK_SLOTS.map((s) => guid(`slot ${s.name}`)) };
}

/**
 * The images a boot disk for `uki` carries, as [file, path on the ESP]: every image its config
 * names (a host with VM jails gets vmhost too), read from the UKI's config segment and each
 * checked against the root hash there (bundleParts, as an update bundle is). An installer's UKI
 * ends with its install segment, not its config, so its config cannot be read that way: it gets
 * the build's modules and tools images (all that initrd/config.json names), as before.
 */
function diskImages(uki: string, imagesDir: string): [string, string][] {
  let config;
  try {
    config = ukiConfig(uki);
  } catch (e) {
    console.log(`disk: ${uki}: its config is not its last segment (${(e as Error).message.slice(0, 120)}): the modules and tools images`);
    return ["modules", "tools"].flatMap((name): [string, string][] => {
      const info = JSON.parse(readFileSync(`${imagesDir}/${name}.json`, "utf8")) as ImageInfo;
      return [[info.sqfs, `initos/${name}.sqfs`], [info.verity, `initos/${name}.verity`]];
    });
  }
  return bundleParts(uki, config, imagesDir)
    .slice(1)
    .map((p): [string, string] => [p.file, p.path]);
}

/**
 * A GPT disk with two ESPs, slots A and B, each holding the UKI at the removable-media path
 * (booted without boot entries) and the images with their hash trees under /initos.
 */
function cmdDisk(o: Record<string, string | undefined>, extra: string[] = []): void {
  const uki = need(o, "uki");
  const out = need(o, "out");
  const files: [string, string][] = [[uki, "EFI/BOOT/BOOTX64.EFI"]];
  // --add DEST=FILE: more files for the ESPs (the installer's payload)
  for (const a of extra) {
    const eq = a.indexOf("=");
    files.push([a.slice(eq + 1), a.slice(0, eq)]);
  }
  if (o.images) files.push(...diskImages(uki, o.images));
  const MiB = 2 ** 20;
  const espMiB = Math.ceil(files.reduce((n, [f]) => n + statSync(f).size, 0) / MiB) + 40;
  const sectorsPerMiB = MiB / 512;
  const starts = DISK_SLOTS.map((_, i) => (1 + i * espMiB) * sectorsPerMiB);
  rmSync(out, { force: true });
  sh("truncate", ["-s", `${(2 + 2 * espMiB) * MiB}`, out]);
  const guids = diskGuids(out);
  const table = [
    "label: gpt",
    `label-id: ${guids.disk}`,
    ...DISK_SLOTS.map((s, i) => `start=${starts[i]}, size=${espMiB * sectorsPerMiB}, type=${ESP_TYPE}, uuid=${guids.slots[i]}, name="${s.partLabel}"`),
  ].join("\n");
  execFileSync("sfdisk", ["-q", out], { input: `${table}\n`, stdio: ["pipe", "ignore", "inherit"] });
  DISK_SLOTS.forEach((s, i) => {
    // One sector per cluster keeps a small FAT32 above its minimum cluster count (mtools and
    // firmware refuse a FAT32 with too few clusters).
    sh("mkfs.vfat", ["-F", "32", "-s", "1", "-n", s.fsLabel, "-i", s.volumeId, "--offset", String(starts[i]), out, String(espMiB * 1024)]);
    const img = `${out}@@${starts[i]! * 512}`;
    const dirs = new Set(files.flatMap(([, d]) => d.split("/").slice(0, -1).map((_, i, parts) => parts.slice(0, i + 1).join("/"))));
    sh("mmd", ["-i", img, ...[...dirs].sort().map((d) => `::/${d}`)]);
    for (const [src, dst] of files) sh("mcopy", ["-i", img, src, `::/${dst}`]);
  });
  console.log(`disk: ${out} (2 ESPs of ${espMiB} MiB: ${files.map(([, d]) => d).join(", ")})`);
}

/** The canary in the test root: it must never be found in plaintext on an installed disk. */
export const PLAINTEXT_CANARY = "INITOS-PLAINTEXT-CANARY-5d41402abc4b2a76";

/** The test root's files, for the btrfs image and for the installer's tarball. */
function stageTestRoot(dir: string, init: string, subvol: string): void {
  for (const d of ["sbin", "etc", "dev", "proc", "sys", "run", "tmp", "home", "var/log", "var/cache"]) mkdirSync(`${dir}/${d}`, { recursive: true });
  copyFileSync(init, `${dir}/sbin/init`);
  sh("chmod", ["0755", `${dir}/sbin/init`]);
  writeFileSync(`${dir}/etc/initos-test-root`, `subvol=${subvol}\n`);
  writeFileSync(`${dir}/etc/initos-canary`, `${PLAINTEXT_CANARY}\n`);
}

/** A reproducible tarball of the test root (the installer's root filesystem). */
function cmdRootfs(o: Record<string, string | undefined>): void {
  const out = need(o, "out");
  const tmp = mkdtempSync(`${dirname(out)}/.rootfs-`);
  try {
    stageTestRoot(tmp, need(o, "init"), "@root");
    sh("tar", ["--sort=name", "--owner=0", "--group=0", "--numeric-owner", `--mtime=@${mtime()}`, "-C", tmp, "-cf", out, "."]);
    console.log(`rootfs: ${out}`);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** The signed install config: the target disk and the root filesystem's checksum. */
function cmdInstallConfig(o: Record<string, string | undefined>): void {
  const rootfs = need(o, "rootfs");
  const sha256 = execFileSync("sha256sum", [rootfs], { encoding: "utf8" }).split(" ")[0]!;
  const espMiB = o["esp-mib"] === undefined ? {} : { espMiB: Number(o["esp-mib"]) };
  const config = InstallConfigSchema.parse({ target: need(o, "target"), rootfs: { file: basename(rootfs), sha256 }, ...espMiB });
  writeFileSync(need(o, "out"), JSON.stringify(config, null, 1) + "\n");
}

/** A cpio segment with extra files, appended to an initrd (the installer's install config). */
function cmdInitrdExtra(o: Record<string, string | undefined>, adds: string[]): void {
  const entries = adds.map((a): CpioEntry => {
    const eq = a.indexOf("=");
    return fileFrom(a.slice(0, eq), a.slice(eq + 1), 0o644);
  });
  writeCpio(need(o, "out"), entries, mtime());
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
    stageTestRoot(`${tmp}/sub`, need(o, "init"), "@");
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

/** A VM's btrfs disk from a directory, a rootfs tarball or an OCI image layout tar. */
async function cmdVmimage(o: Record<string, string | undefined>): Promise<void> {
  const r = await buildVmImage({ from: need(o, "from"), out: need(o, "out"), label: o.label });
  const run = r.config ? `, runs ${JSON.stringify(imageArgv(r.config))}` : "";
  console.log(`vmimage: ${r.out} ${r.sizeMiB} MiB from ${r.source}${run}`);
  for (const s of r.skipped) console.log(`vmimage: skipped ${s} (needs root)`);
}

/** A real distribution root: Debian 12 with systemd, debootstrapped once into --cache (see debian.ts). */
function cmdDebian(o: Record<string, string | undefined>): void {
  const start = performance.now();
  const out = need(o, "out");
  const r = buildDebianImage(need(o, "cache"), out);
  console.log(`debian: ${out} ${r.sizeMiB} MiB (root ${r.usedMiB} MiB) in ${((performance.now() - start) / 1000).toFixed(0)}s`);
}

/** The Debian root with the check as a .tar.zst: the Debian installer's root filesystem. */
function cmdDebianRootfs(o: Record<string, string | undefined>): void {
  const start = performance.now();
  const out = need(o, "out");
  const r = buildDebianRootfs(need(o, "cache"), out, mtime());
  console.log(`debian-rootfs: ${out} ${r.outMiB} MiB (tar ${r.tarMiB} MiB) in ${((performance.now() - start) / 1000).toFixed(1)}s`);
}

/**
 * The reference initrd `make bench` boots beside the agent's: busybox sh running
 * initrd/reference/init.sh as /init, with the same kernel modules as the base initrd and the
 * images' root hashes from the same config.
 */
function cmdReferenceInitrd(o: Record<string, string | undefined>): void {
  const kernel = JSON.parse(readFileSync(need(o, "kernel"), "utf8")) as KernelInfo;
  const template = withPcrPublicKey(JSON.parse(readFileSync(need(o, "config"), "utf8")) as Record<string, unknown>, o["pcr-pub"]);
  const config = AgentConfigSchema.parse(withRootHashes(template, need(o, "images")));
  const out = need(o, "out");
  const modules = [...config.modules, ...EXTRA_MODULES];
  const entries = [...skeleton(need(o, "init")), ...referenceEntries(config, modules), ...stageModules(kernel, modules, `${out}.modules`)];
  const size = writeCpio(out, entries, mtime());
  console.log(`reference-initrd: ${out} ${(size / 1e6).toFixed(1)} MB, ${entries.length} entries`);
}

function need(o: Record<string, string | undefined>, key: string): string {
  const v = o[key];
  if (!v) throw new Error(`missing --${key}`);
  return v;
}

/** The options given more than once. */
interface Lists {
  signer: string[];
}

const commands: Record<string, (o: Record<string, string | undefined>, adds: string[], lists: Lists) => void | Promise<void>> = {
  kernel: cmdKernel,
  "initrd-base": cmdInitrdBase,
  "initrd-config": cmdInitrdConfig,
  "initrd-agent": cmdInitrdAgent,
  uki: cmdUki,
  "host-cmdline": cmdHostCmdline,
  "sign-pcr": cmdSignPcr,
  bundle: cmdBundle,
  images: cmdImages,
  "vmhost-image": cmdVmHostImage,
  disk: cmdDisk,
  testroot: cmdTestroot,
  rootfs: cmdRootfs,
  "install-config": cmdInstallConfig,
  "initrd-extra": cmdInitrdExtra,
  vmimage: cmdVmimage,
  "reference-initrd": cmdReferenceInitrd,
  debian: cmdDebian,
  "debian-rootfs": cmdDebianRootfs,
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
    options: {
      ...Object.fromEntries(["cache", "out", "kernel", "preinit", "config", "images", "ssh-keys", "agent", "sigrelay", "initrd", "cmdline", "uki", "init", "rootfs", "target", "from", "label", "meta", "pcrpkey", "pcr-key", "pcr-key-pass-env", "pcr-pub", "esp-mib", "version", "host", "vm"].map((k) => [k, { type: "string" as const }])),
      add: { type: "string", multiple: true },
      signer: { type: "string", multiple: true },
    },
  });
  try {
    const { add, signer, ...single } = values;
    await run(single as Record<string, string | undefined>, (add as string[] | undefined) ?? [], { signer: (signer as string[] | undefined) ?? [] });
  } catch (e) {
    console.error(`build ${cmd}: ${(e as Error).message}`);
    process.exit(1);
  }
}
