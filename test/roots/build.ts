// The tools test root: a btrfs image (label initos-testroot, the root in subvolume "@", as
// build/testroot.img) that integration tests boot with another UKI signed by the same Secure
// Boot key, next to the installed machine's encrypted disk. Its /sbin/init (test/roots/init.sh)
// plays the evil maid (`-- attack`: tries to unseal every systemd-tpm2 token with tpm2-tools)
// or enrolls a token with Debian's systemd-cryptenroll (`-- enroll-signed`, `-- enroll-pcr7`).
//
//   bun test/roots/build.ts --out FILE.img [--add /path/in/image=hostfile ...]
//
// Contents: static busybox with a link per applet; tpm2 (tpm2-tools), cryptsetup and
// systemd-cryptenroll with every library they need: the DT_NEEDED closure plus what they
// dlopen (systemd 252 opens tpm2-tss's esys, rc and mu itself; tpm2-tss's tctildr opens the
// device TCTI). The binaries are staged once in build/roots/ (rebuilt when a host file or a
// script changes); each image only adds its own files, then mkfs.btrfs.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname, join, normalize, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { readElfDepsFile } from "../../initrd/elf.ts";
import { collectLibs, initrdPathFor, type LibFile } from "../../initrd/libs.ts";

const HERE = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(HERE, "../..");
export const INIT_SH = join(HERE, "init.sh");
export const TPM2_TOKEN_SH = join(REPO, "initrd/reference/tpm2-token.sh");
export const STAGING = join(REPO, "build/roots/tools-staging");
export const LABEL = "initos-testroot";

export const BUSYBOX = "/bin/busybox";
export const TOOLS = ["/usr/bin/tpm2", "/usr/sbin/cryptsetup", "/usr/bin/systemd-cryptenroll"];
/**
 * Opened with dlopen, so DT_NEEDED does not name them: systemd 252 loads tpm2-tss (esys, rc, mu)
 * and libcryptsetup itself; tctildr loads the TCTI for device:/dev/tpmrm0; glibc loads libgcc_s
 * when a thread exits (systemd-cryptenroll aborts without it). cryptsetup's token
 * plugins (libcryptsetup-token-systemd-*) are not needed: export, import, luksDump and
 * --test-passphrase with a key file work without them.
 */
export const DLOPENED = ["libtss2-esys.so.0", "libtss2-rc.so.0", "libtss2-mu.so.0", "libtss2-tcti-device.so.0", "libcryptsetup.so.12", "libgcc_s.so.1"];
/** Not links: busybox itself, and applets that are (or would shadow) the init. */
const SKIP_APPLETS = new Set(["busybox", "init", "linuxrc"]);

const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { stdio: ["ignore", "pipe", "inherit"], encoding: "utf8" });

/**
 * Libraries a tool finds through its RUNPATH (systemd's binaries: libsystemd-shared-252.so in
 * /usr/lib/x86_64-linux-gnu/systemd), kept at the same path in the image: the RUNPATH is absolute.
 */
function runpathLibs(elf: string): { path: string; source: string }[] {
  const dyn = sh("readelf", ["-d", elf]);
  const runpath = /\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[([^\]]*)\]/.exec(dyn)?.[1];
  if (!runpath) return [];
  const out: { path: string; source: string }[] = [];
  for (const soname of readElfDepsFile(elf).needed) {
    for (const dir of runpath.split(":")) {
      const p = `${dir}/${soname}`;
      if (existsSync(p)) {
        out.push({ path: p.replace(/^\//, ""), source: p });
        break;
      }
    }
  }
  return out;
}

interface Plan {
  /** path in the image (no leading slash) → host file */
  files: { path: string; source: string; mode: number }[];
  links: { path: string; target: string }[];
  dirs: string[];
}

function plan(): Plan {
  const privateLibs = TOOLS.flatMap(runpathLibs);
  const privateNames = new Set(privateLibs.map((l) => l.path.replace(/.*\//, "")));
  // The DT_NEEDED closure. collectLibs looks only in the standard library directories, so a tool
  // with private libraries gives its other sonames, and the private ones are walked as files.
  const plain = TOOLS.filter((t) => !readElfDepsFile(t).needed.some((n) => privateNames.has(n)));
  const sonames = TOOLS.filter((t) => !plain.includes(t)).flatMap((t) => readElfDepsFile(t).needed.filter((n) => !privateNames.has(n)));
  const libs: LibFile[] = collectLibs([...plain, ...privateLibs.map((l) => l.source)], [...DLOPENED, ...sonames]);
  const applets = sh(BUSYBOX, ["--list"]).split("\n").filter((a) => /^[\w.[-]+$/.test(a) && !SKIP_APPLETS.has(a));
  const files = [
    { path: "usr/bin/busybox", source: BUSYBOX, mode: 0o755 },
    ...TOOLS.map((t) => ({ path: `usr/bin/${t.replace(/.*\//, "")}`, source: t, mode: 0o755 })),
    ...libs.map((l) => ({ path: l.path, source: l.source, mode: 0o755 })),
    ...privateLibs.map((l) => ({ ...l, mode: 0o755 })),
    { path: "sbin/init", source: INIT_SH, mode: 0o755 },
    { path: "usr/lib/initos-roots/tpm2-token.sh", source: TPM2_TOKEN_SH, mode: 0o644 },
  ];
  // systemd-cryptenroll has no interpreter other than the others', but say so if that changes.
  for (const t of TOOLS) {
    const interp = readElfDepsFile(t).interp;
    if (interp && !files.some((f) => f.path === initrdPathFor(interp))) throw new Error(`${t}: interpreter ${interp} is not in the closure`);
  }
  return {
    files,
    links: [
      ...applets.map((a) => ({ path: `usr/bin/${a}`, target: "busybox" })),
      { path: "bin", target: "usr/bin" },
      { path: "lib", target: "usr/lib" },
      { path: "lib64", target: "usr/lib64" },
    ],
    dirs: ["dev", "proc", "sys", "run", "tmp", "etc", "root", "sbin", "usr/bin", "usr/lib64", "usr/lib/x86_64-linux-gnu"],
  };
}

/** Changes when any staged host file or the plan changes. */
function planStamp(p: Plan): string {
  const h = createHash("sha256");
  h.update(JSON.stringify({ links: p.links, dirs: p.dirs }));
  for (const f of p.files) {
    const st = statSync(f.source);
    h.update(`${f.path} ${f.source} ${f.mode} ${st.size} ${st.mtimeMs}\n`);
    if (f.source === INIT_SH || f.source === TPM2_TOKEN_SH) h.update(readFileSync(f.source));
  }
  return h.digest("hex");
}

/** The staged tree of binaries, libraries and scripts, rebuilt only when something changed. */
export function ensureStaging(dir = STAGING): string {
  const p = plan();
  const stamp = planStamp(p);
  const stampFile = `${dir}.stamp`;
  if (existsSync(dir) && existsSync(stampFile) && readFileSync(stampFile, "utf8") === stamp) return dir;
  rmSync(dir, { recursive: true, force: true });
  rmSync(stampFile, { force: true });
  for (const d of p.dirs) mkdirSync(join(dir, d), { recursive: true });
  for (const f of p.files) {
    mkdirSync(dirname(join(dir, f.path)), { recursive: true });
    copyFileSync(f.source, join(dir, f.path));
    chmodSync(join(dir, f.path), f.mode);
  }
  for (const l of p.links) symlinkSync(l.target, join(dir, l.path));
  writeFileSync(stampFile, stamp);
  return dir;
}

function duBytes(dir: string): number {
  return Number(sh("du", ["-s", "-B1", "--apparent-size", dir]).split("\t")[0]);
}

/** Where a per-image file goes: an absolute path inside the image, nothing outside it. */
function imagePath(p: string): string {
  const n = normalize(`/${p}`);
  if (n.split("/").includes("..") || n === "/") throw new Error(`tools root: bad path in the image: ${p}`);
  return n.slice(1);
}

/**
 * Builds the tools root at `out`: the cached staging tree in subvolume @ plus `files` (path in
 * the image → content). Needs root for the loop mount that creates the subvolume, like
 * build/testroot.img. Synchronous; about a second.
 */
export function buildToolsRoot(out: string, files: Record<string, string | Uint8Array> = {}): void {
  const staging = ensureStaging();
  mkdirSync(dirname(resolve(out)), { recursive: true });
  const tmp = mkdtempSync(`${dirname(resolve(out))}/.toolsroot-`);
  try {
    mkdirSync(`${tmp}/top`);
    writeFileSync(`${tmp}/top/WRONG-SUBVOLUME`, "the root was mounted without subvol=@\n");
    mkdirSync(`${tmp}/extra`);
    for (const [p, content] of Object.entries(files)) {
      const dest = join(tmp, "extra", imagePath(p));
      mkdirSync(dirname(dest), { recursive: true });
      writeFileSync(dest, content, { mode: 0o644 });
    }
    // Room for the files, btrfs' metadata (mixed block groups: no 114 MiB data+metadata minimum).
    const need = duBytes(staging) + duBytes(`${tmp}/extra`);
    const size = Math.ceil((need * 1.3 + 24 * 2 ** 20) / 2 ** 20);
    rmSync(out, { force: true });
    sh("truncate", ["-s", `${size}M`, out]);
    sh("mkfs.btrfs", ["-q", "-f", "--mixed", "-L", LABEL, "--rootdir", `${tmp}/top`, out]);
    mkdirSync(`${tmp}/mnt`);
    sh("unshare", ["-m", "sh", "-ec", 'mount -o loop,compress-force=zstd "$1" "$2"; btrfs -q subvolume create "$2/@"; cp -a "$3/." "$2/@/"; cp -a "$4/." "$2/@/"; umount "$2"', "sh", out, `${tmp}/mnt`, staging, `${tmp}/extra`]);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

if (import.meta.main) {
  const { values } = parseArgs({ args: process.argv.slice(2), options: { out: { type: "string" }, add: { type: "string", multiple: true } } });
  try {
    if (!values.out) throw new Error("missing --out");
    const files: Record<string, Uint8Array> = {};
    for (const a of values.add ?? []) {
      const eq = a.indexOf("=");
      if (eq <= 0) throw new Error(`--add ${a}: expected /path/in/image=hostfile`);
      files[a.slice(0, eq)] = readFileSync(a.slice(eq + 1));
    }
    const t0 = performance.now();
    buildToolsRoot(values.out, files);
    const st = statSync(values.out);
    console.log(`toolsroot: ${values.out} ${(st.size / 2 ** 20).toFixed(0)} MiB (${((st.blocks * 512) / 2 ** 20).toFixed(1)} MiB allocated) in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  } catch (e) {
    console.error(`toolsroot: ${(e as Error).message}`);
    process.exit(1);
  }
}
