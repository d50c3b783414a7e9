// A real distribution to switch into: Debian 12 with systemd, debootstrapped once into the
// project's cache and packed, with a unit that reports on the console what the tests check, as
// subvolume "@" of a btrfs image labelled initos-debian. It proves what the tiny test root
// cannot: systemd's hand-off (told it comes from an initrd, with the initrd's time), the
// kernel's modules and firmware from the verified image after the switch, a clean shutdown.
//
// Needs root: debootstrap, and the subvolume (made on a loop mount in a private namespace, as
// the test root is). The root has no kernel: the kernel and its modules come from the UKI.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

export const SUITE = "bookworm";
/**
 * What debootstrap adds to minbase: an init (systemd), device manager, module tools, and the
 * TPM2 libraries systemd only suggests: booted from a UKI (systemd-stub sets StubPcrKernelImage)
 * on a machine with a TPM, its PCR 11 phase units run, and fail without them.
 */
export const PACKAGES = ["systemd", "systemd-sysv", "udev", "kmod", "libtss2-esys-3.0.2-0", "libtss2-rc0"] as const;
export const DEBIAN_LABEL = "initos-debian";
/** A module only the modules image has (the root has no kernel): drivers/net/dummy.ko. */
export const CHECK_MODULE = "dummy";
/** A firmware file firmware-linux-free puts in the modules image. */
export const CHECK_FIRMWARE = "carl9170-1.fw";
/**
 * Files of the Debian root under the directories an install binds subvolumes onto, which nothing
 * at boot recreates: debconf's database and apt's log directory.
 */
export const SEEDED = ["/var/cache/debconf/config.dat", "/var/log/apt"] as const;
/** The marker of every line the check prints. */
export const MARKER = "INITOS-DEBIAN";

/**
 * After debootstrap: what an image of a root does not need. Docs (copyright files stay), man
 * pages, translations, apt's downloaded packages and lists (`apt-get update` fetches them
 * again); dpkg is told to leave them out of later installs too.
 */
const TRIM = `set -e
cd "$1"
find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/lintian
rm -rf var/cache/apt/archives/*.deb var/cache/apt/*.bin var/lib/apt/lists/*
rm -f var/log/bootstrap.log var/log/dpkg.log var/log/alternatives.log var/log/apt/*
mkdir -p etc/dpkg/dpkg.cfg.d
printf '%s\\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \\
  'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/info/*' 'path-exclude=/usr/share/locale/*' \\
  > etc/dpkg/dpkg.cfg.d/initos-nodoc
`;

/** What decides the cached root: changing any of it debootstraps again. */
export function rootStamp(): string {
  const inputs = { suite: SUITE, variant: "minbase", packages: [...PACKAGES], trim: TRIM };
  return createHash("sha256").update(JSON.stringify(inputs)).digest("hex");
}

/**
 * The Debian mirror apt already uses on this machine (deb822 .sources or one-line .list), the
 * first that serves the suite; DEBIAN_MIRROR overrides it.
 */
export function aptMirror(files: Record<string, string> = readAptSources(), suite = SUITE): string {
  if (process.env.DEBIAN_MIRROR) return process.env.DEBIAN_MIRROR;
  for (const [name, text] of Object.entries(files)) {
    if (name.endsWith(".sources")) {
      for (const stanza of text.split(/\n\s*\n/)) {
        const field = (k: string) => new RegExp(`^${k}:\\s*(.+)$`, "mi").exec(stanza)?.[1]?.trim().split(/\s+/) ?? [];
        if (/^\s*Enabled:\s*no/im.test(stanza)) continue;
        if (field("Types").includes("deb") && field("Suites").includes(suite) && field("URIs")[0]) return field("URIs")[0]!;
      }
    } else {
      for (const line of text.split("\n")) {
        const m = /^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)/.exec(line);
        if (m && m[2] === suite) return m[1]!;
      }
    }
  }
  throw new Error(`no Debian mirror for ${suite} in /etc/apt/sources.list{,.d/*}; set DEBIAN_MIRROR`);
}

function readAptSources(): Record<string, string> {
  const out: Record<string, string> = {};
  if (existsSync("/etc/apt/sources.list")) out["sources.list"] = readFileSync("/etc/apt/sources.list", "utf8");
  const dir = "/etc/apt/sources.list.d";
  for (const n of existsSync(dir) ? readdirSync(dir).sort() : []) {
    if (n.endsWith(".list") || n.endsWith(".sources")) out[n] = readFileSync(`${dir}/${n}`, "utf8");
  }
  return out;
}

function sh(cmd: string, args: string[]): void {
  execFileSync(cmd, args, { stdio: ["ignore", "inherit", "inherit"] });
}

/**
 * The debootstrapped root in `<cache>/root`, made once and again only when rootStamp() changes
 * (the stamp is written last, so an interrupted run starts over). Returns its path.
 */
export function ensureDebianRoot(cache: string): string {
  const root = `${cache}/root`;
  const stampFile = `${cache}/stamp`;
  const stamp = rootStamp();
  if (existsSync(root) && existsSync(stampFile) && readFileSync(stampFile, "utf8").trim() === stamp) return root;
  mkdirSync(cache, { recursive: true });
  rmSync(stampFile, { force: true });
  const tmp = `${cache}/root.tmp`;
  rmSync(tmp, { recursive: true, force: true });
  const mirror = aptMirror();
  const start = performance.now();
  console.log(`debian: debootstrap ${SUITE} (minbase + ${PACKAGES.join(",")}) from ${mirror}`);
  sh("debootstrap", ["--variant=minbase", `--include=${PACKAGES.join(",")}`, SUITE, tmp, mirror]);
  sh("sh", ["-c", TRIM, "trim", tmp]);
  rmSync(root, { recursive: true, force: true });
  renameSync(tmp, root);
  writeFileSync(stampFile, `${stamp}\n`);
  console.log(`debian: root in ${root} after ${((performance.now() - start) / 1000).toFixed(0)}s`);
  return root;
}

/** The cmdline word that keeps the machine up after the check (see checkScript). */
export const HOLD_WORD = "initos.test.hold";

/**
 * The check's script: one marked line per fact, then power off; with `initos.test.hold` on the
 * kernel's cmdline it stays up instead, for a test that shuts the machine down its own way
 * (over the sidecar's ssh: test/integration/debian-sidecar.test.ts).
 */
export function checkScript(): string {
  return `#!/bin/sh
# initos-check: what test/integration/debian.test.ts reads off the console, one "${MARKER}"
# line each, once the boot is done; then the machine powers off (the shutdown is checked too),
# unless ${HOLD_WORD} is on the cmdline: then whoever booted it decides when it goes down.
say() { echo "${MARKER} $*"; }
say "state: $(systemctl is-system-running --wait 2>&1)"
failed=$(systemctl --failed --no-legend --plain 2>&1 | awk '{print $1}' | tr '\\n' ' ')
say "failed: \${failed:-none}"
# Why, for whoever reads the console of a failed run: each failed unit's last journal lines.
for u in $failed; do say "why: $u: $(journalctl -b -q -u "$u" -o cat --no-pager 2>&1 | tail -n 3 | tr '\\n' ' ')"; done
say "analyze: $(systemd-analyze time 2>&1 | head -n 1)"
say "pid1: $(tr '\\0' ' ' < /proc/1/cmdline)"
if out=$(modprobe ${CHECK_MODULE} 2>&1) && lsmod | grep -q '^${CHECK_MODULE} '; then
  say "modprobe ${CHECK_MODULE}: ok"
else
  say "modprobe ${CHECK_MODULE}: failed: $out"
fi
say "firmware: $(ls /lib/firmware/${CHECK_FIRMWARE} 2>&1)"
say "os mounts: $(awk '$2 ~ "^/usr/lib/(modules|firmware)" {printf "%s %s %s; ", $2, $1, $4}' /proc/self/mounts)"
# Mounts systemd leaves to systemd-shutdown (no Conflicts=umount.target): the initrd's.
left=$(for m in /usr/lib/firmware /usr/lib/modules/$(uname -r); do
  systemctl show -P Conflicts "$(systemd-escape -p --suffix=mount "$m")" | grep -q umount.target || printf '%s ' "$m"
done)
say "left to systemd-shutdown: $left"
say "initrd mounts: $(awk '$2 ~ "^/run/initos" {printf "%s ", $2}' /proc/self/mounts)"
say "dm: $(ls /dev/mapper 2>&1 | tr '\\n' ' ')"
# The pool's subvolumes bound into the OS (an install's @home, @log, @cache; none on a plain
# btrfs root), and content of the root's own there: the install put it into the subvolumes.
say "pool mounts: $(awk '$2 == "/home" || $2 == "/var/log" || $2 == "/var/cache" {printf "%s %s %s; ", $2, $3, $4}' /proc/self/mounts)"
say "root content: $(ls -d ${SEEDED.join(" ")} 2>&1 | tr '\\n' ' ')"
say "done"
if grep -qwF '${HOLD_WORD}' /proc/cmdline; then
  say "hold: staying up (${HOLD_WORD})"
else
  systemctl poweroff --no-block
fi
`;
}

/**
 * Type=exec: the unit's job is done once the script runs, so the boot's transaction can finish
 * while it waits for that (`is-system-running --wait` inside the boot's own job would wait for
 * itself).
 */
const CHECK_UNIT = `[Unit]
Description=initos: report the hand-off on the console
After=multi-user.target

[Service]
Type=exec
ExecStart=/usr/local/sbin/initos-check
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
`;

/** The files the image adds to the cached root (into `dir`, copied over it). */
export function stageCheck(dir: string): void {
  for (const d of ["usr/local/sbin", "etc/systemd/system/multi-user.target.wants"]) mkdirSync(`${dir}/${d}`, { recursive: true, mode: 0o755 });
  writeFileSync(`${dir}/usr/local/sbin/initos-check`, checkScript());
  chmodSync(`${dir}/usr/local/sbin/initos-check`, 0o755);
  writeFileSync(`${dir}/etc/systemd/system/initos-check.service`, CHECK_UNIT);
  symlinkSync("/etc/systemd/system/initos-check.service", `${dir}/etc/systemd/system/multi-user.target.wants/initos-check.service`);
  writeFileSync(`${dir}/etc/hostname`, `${DEBIAN_LABEL}\n`);
}

/**
 * build/debian.tar.zst: the same root with the check, as the installer's root filesystem.
 * Reproducible from a given cache: sorted names, fixed mtime (SOURCE_DATE_EPOCH), numeric
 * owners. The owners are the root's own, not all 0 as in the test root's tarball: Debian's
 * root has files that must keep theirs (/etc/shadow group shadow for unix_chkpwd,
 * /var/log/journal group systemd-journal, /var/lib/tpm user tss), and numbers rather than
 * names, because busybox tar in the installer has no passwd file to map names with.
 * Compressed with zstd -9 (measured on the 125 MB tar, 2 cores: -3 0.4 s 37.0 MB, -9 1.5 s
 * 32.9 MB, -15 9.5 s 32.4 MB, -19 28 s 28.5 MB): -19 saves 4 MB on the stick for 26 s of build.
 * The root is copied once into a temp tree with the check (~1 s) so the tarball has one entry
 * per path; two overlaid -C trees would list /etc, /usr/local/sbin, /etc/hostname twice.
 */
export function buildDebianRootfs(cache: string, out: string, mtime: number): { root: string; tarMiB: number; outMiB: number } {
  const root = ensureDebianRoot(cache);
  const tmp = mkdtempSync(`${dirname(out)}/.debian-rootfs-`);
  try {
    sh("cp", ["-a", `${root}/.`, `${tmp}/tree`]);
    stageCheck(`${tmp}/add`);
    sh("cp", ["-a", `${tmp}/add/.`, `${tmp}/tree/`]);
    const tar = `${tmp}/root.tar`;
    sh("tar", ["--sort=name", "--numeric-owner", `--mtime=@${mtime}`, "-C", `${tmp}/tree`, "-cf", tar, "."]);
    rmSync(`${out}.tmp`, { force: true });
    sh("zstd", ["-q", "-f", "-T0", "-9", tar, "-o", `${out}.tmp`]);
    renameSync(`${out}.tmp`, out);
    const mib = (f: string) => Math.round(statSync(f).size / 2 ** 20);
    return { root, tarMiB: mib(tar), outMiB: mib(out) };
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** Bytes used by a directory tree (du), to size the image. */
function duBytes(dir: string): number {
  return Number(execFileSync("du", ["-sb", dir], { encoding: "utf8" }).split("\t")[0]);
}

/**
 * build/debian.img: btrfs labelled initos-debian, the root with the check in subvolume "@".
 * Sized at twice the root plus room for the journal; the file is sparse.
 */
export function buildDebianImage(cache: string, out: string): { root: string; sizeMiB: number; usedMiB: number } {
  const root = ensureDebianRoot(cache);
  const tmp = mkdtempSync(`${dirname(out)}/.debian-`);
  try {
    mkdirSync(`${tmp}/mnt`);
    stageCheck(`${tmp}/add`);
    const used = duBytes(root);
    const sizeMiB = Math.max(512, Math.ceil((2 * used) / 2 ** 20) + 256);
    rmSync(out, { force: true });
    sh("truncate", ["-s", `${sizeMiB}M`, out]);
    sh("mkfs.btrfs", ["-q", "-f", "-L", DEBIAN_LABEL, out]);
    sh("unshare", [
      "-m", "sh", "-ec",
      'mount -o loop "$1" "$2"; btrfs -q subvolume create "$2/@"; cp -a "$3/." "$2/@/"; cp -a "$4/." "$2/@/"; umount "$2"',
      "sh", out, `${tmp}/mnt`, root, `${tmp}/add`,
    ]);
    return { root, sizeMiB, usedMiB: Math.round(used / 2 ** 20) };
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}
