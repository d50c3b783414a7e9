// Helpers for scenarios on an installed machine's disk: other UKIs on its ESP (signed with the
// same db key, with or without a PCR signature), and host-side looks at and edits of its LUKS2
// header (through a loop device at the partition's offset: no device-mapper needed).
import { execFile, execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { promisify } from "node:util";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";

export const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const TEST_SB_KEY = "/usr/share/ovmf/PkKek-1-snakeoil.key";
export const TEST_SB_CERT = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
export const PCR_KEY = "build/keys/pcr-test.key";
export const PCR_PUB = "build/keys/pcr.pub.pem";

function partitionStart(disk: string, name: string): number {
  const t = JSON.parse(execFileSync("sfdisk", ["--json", disk], { encoding: "utf8" })) as { partitiontable: { partitions: { start: number; name?: string }[] } };
  const p = t.partitiontable.partitions.find((x) => x.name === name);
  if (!p) throw new Error(`${disk}: no partition named ${name}`);
  return p.start * 512;
}

/** Writes `file` as the firmware's removable-media boot path on the disk's ESP `slot` (a or b). */
export function putUki(disk: string, file: string, slot = "a"): void {
  execFileSync("mcopy", ["-o", "-i", `${disk}@@${partitionStart(disk, `initos-${slot}`)}`, file, "::/EFI/BOOT/BOOTX64.EFI"]);
}

const execFileAsync = promisify(execFile);

/**
 * Every file on the ESP `slot`, by path, with its sha256 (read from the host with mtools): to
 * show an update that was refused left the slot as it was, byte for byte. Asynchronous: it reads
 * ~100 MB while the machine runs, and the test's event loop has ssh and timers to serve.
 */
export async function espContents(disk: string, slot: string): Promise<Map<string, string>> {
  const img = `${disk}@@${partitionStart(disk, `initos-${slot}`)}`;
  const names = (await execFileAsync("mdir", ["-/", "-b", "-i", img, "::/"], { encoding: "utf8" })).stdout.split("\n").filter((n) => n && !n.endsWith("/"));
  const out = new Map<string, string>();
  for (const n of names) {
    const { stdout } = await execFileAsync("mcopy", ["-n", "-i", img, n, "-"], { encoding: "buffer", maxBuffer: 1 << 30 });
    out.set(n, createHash("sha256").update(stdout).digest("hex"));
  }
  return out;
}

/** The names on an ESP directory (mdir -b), e.g. to show nothing secret is there. */
export function espFiles(disk: string, dir: string, slot = "a"): string[] {
  const r = spawnSync("mdir", ["-b", "-i", `${disk}@@${partitionStart(disk, `initos-${slot}`)}`, `::/${dir}`], { encoding: "utf8" });
  return r.status === 0 ? r.stdout.split("\n").filter(Boolean) : [];
}

/** Runs `fn` with the disk's LUKS2 partition on a loop device (read-only unless `rw`). */
export function withLuks<T>(disk: string, fn: (dev: string) => T, rw = false): T {
  const off = partitionStart(disk, "initos-luks");
  const dev = execFileSync("losetup", ["-f", "--show", ...(rw ? [] : ["-r"]), "-o", String(off), disk], { encoding: "utf8" }).trim();
  try {
    return fn(dev);
  } finally {
    execFileSync("losetup", ["-d", dev]);
  }
}

/** Every token in the header, by id. */
export function tokens(disk: string): Map<number, Record<string, unknown>> {
  return withLuks(disk, (dev) => {
    const meta = JSON.parse(execFileSync("cryptsetup", ["luksDump", "--dump-json-metadata", dev], { encoding: "utf8" })) as { tokens: Record<string, Record<string, unknown>> };
    return new Map(Object.entries(meta.tokens).map(([id, t]) => [Number(id), t]));
  });
}

/** Replaces token `id` with `json` (a forged token, as anyone with the disk could write). */
export function replaceToken(disk: string, id: number, json: Record<string, unknown>): void {
  withLuks(
    disk,
    (dev) => execFileSync("cryptsetup", ["token", "import", "--token-id", String(id), "--token-replace", dev], { input: JSON.stringify(json) }),
    true,
  );
}

/** Whether `passphrase` opens a keyslot (cryptsetup's own check, no activation). */
export function passphraseOpens(disk: string, passphrase: string): boolean {
  return withLuks(disk, (dev) => spawnSync("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", dev], { input: passphrase }).status === 0);
}

/** The production UKI's .pcrsig section: the PCR key's signature an attacker can copy off the ESP. */
export function pcrSignatureOf(uki: string, out: string): string {
  execFileSync("objcopy", ["-O", "binary", "--only-section=.pcrsig", uki, out]);
  if (readFileSync(out).length === 0) throw new Error(`${uki} has no .pcrsig`);
  return out;
}

export interface UkiVariant {
  cmdline: string;
  /** The initrd (default: the installed machine's). */
  initrd?: string;
  /** Sign PCR 11 with the PCR key, as the build does for production UKIs. */
  pcrSigned: boolean;
}

/**
 * Another UKI from the build's parts, signed with the same (test) db key: `pcrSigned` makes it
 * a production UKI (the PCR key signs its PCR 11), otherwise it is any other UKI of the build.
 */
export function variantUki(dir: string, name: string, v: UkiVariant): string {
  const unsigned = `${dir}/${name}.unsigned.efi`;
  execFileSync(
    BUN,
    [
      "initrd/build.ts", "uki", "--kernel", "build/kernel.json", "--initrd", v.initrd ?? "build/target.initrd", "--cmdline", v.cmdline,
      "--pcrpkey", PCR_PUB, ...(v.pcrSigned ? ["--pcr-key", PCR_KEY] : []), "--out", unsigned,
    ],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  return sbsignWith(TEST_SB_KEY, TEST_SB_CERT, unsigned, `${dir}/${name}.efi`, "snakeoil");
}

/** An initrd made of the installed machine's plus one more segment holding `files`. */
export function initrdWith(dir: string, name: string, files: Record<string, string>): string {
  const adds = Object.entries(files).flatMap(([dest, content], i) => {
    const f = `${dir}/${name}-add${i}`;
    writeFileSync(f, content);
    return ["--add", `${dest}=${f}`];
  });
  execFileSync(BUN, ["initrd/build.ts", "initrd-extra", ...adds, "--out", `${dir}/${name}.cpio`], { stdio: ["ignore", "ignore", "inherit"] });
  execFileSync("sh", ["-c", `zstd -q -3 -f ${dir}/${name}.cpio -o ${dir}/${name}.cpio.zst && cat build/target.initrd ${dir}/${name}.cpio.zst > ${dir}/${name}.initrd`]);
  return `${dir}/${name}.initrd`;
}

/** A machine of a fleet, as hosts/<name>/ describes it (initrd/host.ts). */
export interface TestHost {
  hostname: string;
  address?: { ip: string; gw?: string };
  update?: { healthSeconds?: number; commit?: "auto" | "manual"; trialSeconds?: number; watchdogSeconds?: number };
  /** The public keys that may log in (default: the build's test key). */
  authorizedKeys?: string;
}

/** One build of a host: its signed UKI, the same before Authenticode, and its update bundle. */
export interface HostVersion {
  version: number;
  /** PCR 11 signed and Authenticode-signed (the db key): what a slot boots. */
  uki: string;
  /** PCR 11 signed, not yet Authenticode-signed: to sign with another key. */
  pcrSigned: string;
  bundle: string;
}

/**
 * Version `version` of `host`, built as the fleet flow does (`make host`, `make sign`,
 * `make bundle`), through build.ts's subcommands directly: the host's config segment (version,
 * the snakeoil db certificate as the update signer, the host's update policy and keys) after the
 * build's base and agent segments; its cmdline, build/target.cmdline plus the host's address
 * and `cmdlineWords` (what follows a `--` in them is the root's init's arguments); the unsigned
 * UKI; its PCR 11 signature (the test PCR key) and Authenticode signature (snakeoil); the bundle
 * with build/images. Everything goes to `dir`/v<version>/.
 */
export function buildVersion(dir: string, version: number, cmdlineWords: string[], host: TestHost): HostVersion {
  const d = `${dir}/v${version}`;
  const hostDir = `${d}/${host.hostname}`;
  mkdirSync(hostDir, { recursive: true });
  const { authorizedKeys, ...hostJson } = host;
  writeFileSync(`${hostDir}/host.json`, JSON.stringify({ ...hostJson, cmdline: cmdlineWords }));
  writeFileSync(`${hostDir}/authorized_keys`, authorizedKeys ?? readFileSync("build/test-ssh/id_ed25519.pub", "utf8"));
  const build = (...args: string[]) => execFileSync(BUN, ["initrd/build.ts", ...args], { stdio: ["ignore", "ignore", "inherit"] });
  build(
    "initrd-config", "--config", "initrd/config.json", "--images", "build/images", "--pcr-pub", PCR_PUB, "--signer", TEST_SB_CERT,
    "--version", String(version), "--host", `${hostDir}/host.json`, "--ssh-keys", `${hostDir}/authorized_keys`, "--out", `${d}/config.cpio`,
  );
  execFileSync("zstd", ["-q", "-19", "-f", `${d}/config.cpio`, "-o", `${d}/config.cpio.zst`]);
  writeFileSync(`${d}/initrd`, Buffer.concat(["build/base.cpio.zst", "build/agent.cpio.zst", `${d}/config.cpio.zst`].map((f) => readFileSync(f))));
  build("host-cmdline", "--host", `${hostDir}/host.json`, "--cmdline", readFileSync("build/target.cmdline", "utf8").trim(), "--out", `${d}/cmdline`);
  build("uki", "--kernel", "build/kernel.json", "--initrd", `${d}/initrd`, "--cmdline", readFileSync(`${d}/cmdline`, "utf8").trim(), "--pcrpkey", PCR_PUB, "--out", `${d}/unsigned.efi`);
  build("sign-pcr", "--uki", `${d}/unsigned.efi`, "--pcr-key", PCR_KEY, "--out", `${d}/pcrsigned.efi`);
  const uki = sbsignWith(TEST_SB_KEY, TEST_SB_CERT, `${d}/pcrsigned.efi`, `${d}/${host.hostname}.efi`, "snakeoil");
  const bundle = `${d}/${host.hostname}-${version}.bundle`;
  build("bundle", "--uki", uki, "--images", "build/images", "--version", String(version), "--host", host.hostname, "--out", bundle);
  return { version, uki, pcrSigned: `${d}/pcrsigned.efi`, bundle };
}

/**
 * Authenticode-signs `input` with `key` (decrypted with `pass` when given) and `cert`. sbsign's
 * chatter ("gaps between PE/COFF sections?") is shown only when it fails (in the thrown error).
 */
export function sbsignWith(key: string, cert: string, input: string, out: string, pass?: string): string {
  execFileSync("bash", ["-c", `sbsign --key <(openssl pkey -in "$1"${pass ? " -passin env:P" : ""}) --cert "$2" --output "$3" "$4"`, "-", key, cert, out, input], {
    env: { ...process.env, P: pass ?? "" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  return out;
}

/**
 * A copy of bundle `src` with some of its files replaced (`replace`: bundle path -> file) or
 * edited in place (`edit`, given the extracted copy's path), and the manifest's sizes and
 * sha256s recomputed to match: a bundle that is consistent in itself, so only the agent's own
 * checks (signature, root hashes) can refuse it. Written with GNU tar, ustar, in the manifest's order.
 */
export function rebundle(src: string, out: string, o: { replace?: Record<string, string>; edit?: Record<string, (file: string) => void> }): string {
  const work = `${out}.d`;
  mkdirSync(work, { recursive: true });
  execFileSync("tar", ["-xf", src, "-C", work]);
  const manifest = JSON.parse(readFileSync(`${work}/manifest.json`, "utf8")) as { files: { path: string; size: number; sha256: string }[] };
  for (const [path, file] of Object.entries(o.replace ?? {})) writeFileSync(`${work}/${path}`, readFileSync(file));
  for (const [path, edit] of Object.entries(o.edit ?? {})) edit(`${work}/${path}`);
  for (const f of manifest.files) {
    const data = readFileSync(`${work}/${f.path}`);
    f.size = data.length;
    f.sha256 = createHash("sha256").update(data).digest("hex");
  }
  writeFileSync(`${work}/manifest.json`, JSON.stringify(manifest, null, 1) + "\n");
  execFileSync("tar", ["--format=ustar", "--owner=0", "--group=0", "--numeric-owner", "-cf", out, "-C", work, "manifest.json", ...manifest.files.map((f) => f.path)]);
  execFileSync("rm", ["-rf", work]);
  return out;
}
