// Disk images for scenarios about what the OS's root can write: an encrypted btrfs pool made on
// the host without a guest install (minutes under TCG), and test roots whose init is a given file.
//
// The pool: mkfs.btrfs with the host config at the top, subvolumes made and filled in a private
// mount namespace on a loop device (as build/testroot.img is), then encrypted in place, offline:
// `cryptsetup reencrypt --encrypt` works on a plain file with no device-mapper (measured: 0.4 s
// for 160 MiB). The btrfs is made 32 MiB smaller than the file, the room the LUKS2 header takes.
import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const sh = (cmd: string, args: string[], input?: string) => execFileSync(cmd, args, { input, stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"], encoding: "utf8" });
const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export interface PoolImage {
  out: string;
  /** LUKS2 passphrase (keyslot 0, PBKDF2 at 1000 iterations: the guest opens it fast under TCG). */
  passphrase: string;
  /** Written as initos.json at the top of the pool (a string is written as it is). */
  hostConfig: unknown;
  /** Subvolumes at the top; the first is filled with the test root's files. */
  subvolumes: string[];
  /** The test root's tarball (initrd/build.ts rootfs: /sbin/init and /etc/initos-test-root). */
  rootfs: string;
  /** Symlinks to make inside the pool, path (from the top) → target, e.g. "@root/escape". */
  symlinks?: Record<string, string>;
  /** Files to write inside the pool, path (from the top) → content. */
  files?: Record<string, string>;
  /** Directories to make inside the pool, path (from the top) → their owner's uid (and gid). */
  dirs?: Record<string, number>;
  /**
   * A LUKS2 token to import as token 0 once the volume is encrypted: e.g. a copy of another
   * volume's systemd-tpm2 token, or one whose tpm2-blob an attacker sealed herself.
   */
  token?: Record<string, unknown>;
  /** The btrfs filesystem's UUID (mkfs.btrfs -U): another pool's, for an FSID collision. */
  fsid?: string;
  /** false: a plain btrfs, not encrypted (default: encrypted). */
  encrypt?: boolean;
  /** Named pipes to make inside the pool (replacing what is there), path from the top. */
  fifos?: readonly string[];
  /** Sparse files to make inside the pool (replacing what is there), path → size for truncate -s (e.g. "1G"). */
  sparse?: Record<string, string>;
}

/** An encrypted btrfs pool as the installer would leave it, but with a host config of our choosing. */
export function buildPoolImage(p: PoolImage): string {
  const tmp = mkdtempSync(`${dirname(p.out)}/.pool-`);
  try {
    mkdirSync(`${tmp}/top`);
    mkdirSync(`${tmp}/mnt`);
    writeFileSync(`${tmp}/top/initos.json`, typeof p.hostConfig === "string" ? p.hostConfig : JSON.stringify(p.hostConfig));
    rmSync(p.out, { force: true });
    sh("truncate", ["-s", "160M", p.out]);
    sh("mkfs.btrfs", ["-q", "-f", "-L", "INITOSROOT", ...(p.fsid ? ["-U", p.fsid] : []), "--rootdir", `${tmp}/top`, p.out]);
    const m = `${tmp}/mnt`;
    const steps = [
      `mount -o loop ${q(p.out)} ${q(m)}`,
      ...p.subvolumes.map((sv) => `btrfs -q subvolume create ${q(`${m}/${sv}`)}`),
      `tar -x -f ${q(p.rootfs)} -C ${q(`${m}/${p.subvolumes[0]!}`)}`,
      ...Object.entries(p.symlinks ?? {}).map(([path, target]) => `ln -s ${q(target)} ${q(`${m}/${path}`)}`),
      ...Object.entries(p.dirs ?? {}).map(([path, id]) => `mkdir -p ${q(`${m}/${path}`)} && chown ${id}:${id} ${q(`${m}/${path}`)}`),
      ...Object.entries(p.files ?? {}).map(([path, content]) => `mkdir -p ${q(dirname(`${m}/${path}`))} && printf '%s' ${q(content)} > ${q(`${m}/${path}`)}`),
      ...(p.fifos ?? []).map((path) => `rm -rf ${q(`${m}/${path}`)} && mkfifo ${q(`${m}/${path}`)}`),
      ...Object.entries(p.sparse ?? {}).map(([path, size]) => `rm -rf ${q(`${m}/${path}`)} && truncate -s ${q(size)} ${q(`${m}/${path}`)}`),
      `umount ${q(m)}`,
    ];
    sh("unshare", ["-m", "sh", "-ec", steps.join("\n")]);
    if (p.encrypt === false) return p.out;
    sh("truncate", ["-s", "+32M", p.out]);
    sh("cryptsetup", ["reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "32M", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", "--batch-mode", p.out], p.passphrase);
    if (p.token) sh("cryptsetup", ["token", "import", "--token-id", "0", p.out], JSON.stringify(p.token));
    return p.out;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

/** The test root's tarball, from the same builder as build/rootfs.tar (initrd/build.ts rootfs). */
export function testRootfs(out: string, init = "build/test-init"): string {
  sh(BUN, ["initrd/build.ts", "rootfs", "--init", init, "--out", out]);
  return out;
}

/**
 * A btrfs test root like build/testroot.img (subvolume "@"), whose /sbin/init has `initContent`.
 * Its init's atime is set a day ahead: relatime then leaves it alone when the kernel reads the
 * file for an exec, so a boot that writes nothing leaves the image byte for byte the same. It
 * has the mount points a distribution has for the kernel's modules and firmware, which the agent
 * would otherwise create (before the switch) to bind the verified image's onto.
 */
export function testRootWithInit(out: string, initContent: string): string {
  const init = `${out}.init`;
  writeFileSync(init, initContent);
  chmodSync(init, 0o755);
  try {
    sh(BUN, ["initrd/build.ts", "testroot", "--init", init, "--out", out]);
  } finally {
    rmSync(init, { force: true });
  }
  const mnt = mkdtempSync(`${dirname(out)}/.atime-`);
  try {
    const release = (JSON.parse(readFileSync("build/kernel.json", "utf8")) as { release: string }).release;
    const dirs = [`${mnt}/lib/modules/${release}`, `${mnt}/lib/firmware`].map(q).join(" ");
    sh("unshare", ["-m", "sh", "-ec", `mount -o loop,subvol=@ ${q(out)} ${q(mnt)}\nmkdir -p ${dirs}\ntouch -a -d tomorrow ${q(`${mnt}/sbin/init`)}\numount ${q(mnt)}`]);
  } finally {
    rmSync(mnt, { recursive: true, force: true });
  }
  return out;
}

/** The paths of a btrfs image's subvolume that exist, read on the host in a private mount namespace. */
export function existingPaths(image: string, subvol: string, paths: string[]): string[] {
  const mnt = mkdtempSync(`${dirname(image)}/.look-`);
  try {
    const checks = paths.map((p) => `[ -e ${q(`${mnt}${p}`)} ] && echo ${q(p)} || true`).join("\n");
    const out = sh("unshare", ["-m", "sh", "-ec", `mount -o loop,ro,subvol=${subvol} ${q(image)} ${q(mnt)}\n${checks}\numount ${q(mnt)}`]);
    return out.split("\n").filter(Boolean);
  } finally {
    rmSync(mnt, { recursive: true, force: true });
  }
}

/**
 * A pool of two LUKS2 volumes with one btrfs across them (data single, metadata raid1), as a
 * multi-volume install would leave it: the same `key` in keyslot 0 of each (PBKDF2 at 1000
 * iterations), the `recovery` passphrase in keyslot 1 of each, `token` (when given) as token 0
 * of the first only. The btrfs is made on two loop devices on the host, filled (the test root
 * in @root, initos.json at the top) in a private mount namespace, then each file encrypted in
 * place. Returns the two images and the btrfs fsid.
 */
export function buildTwoVolumePool(o: { out: [string, string]; key: string; recovery: string; rootfs: string; token?: Record<string, unknown> }): { volumes: [string, string]; fsid: string } {
  const tmp = mkdtempSync(`${dirname(o.out[0])}/.pool2-`);
  const loops: string[] = [];
  try {
    for (const f of o.out) {
      rmSync(f, { force: true });
      sh("truncate", ["-s", "160M", f]);
      loops.push(sh("losetup", ["-f", "--show", f]).trim());
    }
    sh("mkfs.btrfs", ["-q", "-f", "-L", "INITOSROOT", "-d", "single", "-m", "raid1", ...loops]);
    const fsid = sh("blkid", ["-s", "UUID", "-o", "value", loops[0]!]).trim();
    writeFileSync(`${tmp}/initos.json`, JSON.stringify({ root: "@root" }));
    const m = `${tmp}/mnt`;
    mkdirSync(m);
    sh("unshare", ["-m", "sh", "-ec", [
      `mount -o device=${q(loops[1]!)} ${q(loops[0]!)} ${q(m)}`,
      `btrfs -q subvolume create ${q(`${m}/@root`)}`,
      `tar -x -f ${q(o.rootfs)} -C ${q(`${m}/@root`)}`,
      `cp ${q(`${tmp}/initos.json`)} ${q(`${m}/initos.json`)}`,
      `umount ${q(m)}`,
    ].join("\n")]);
    for (const l of loops.splice(0)) sh("losetup", ["-d", l]);
    const recoveryFile = `${tmp}/recovery`;
    writeFileSync(recoveryFile, o.recovery);
    o.out.forEach((f, i) => {
      sh("truncate", ["-s", "+32M", f]);
      sh("cryptsetup", ["reencrypt", "--encrypt", "--type", "luks2", "--reduce-device-size", "32M", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", "--batch-mode", f], o.key);
      sh("cryptsetup", ["luksAddKey", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", "--batch-mode", f, recoveryFile], o.key);
      if (i === 0 && o.token) sh("cryptsetup", ["token", "import", "--token-id", "0", f], JSON.stringify(o.token));
    });
    return { volumes: o.out, fsid };
  } finally {
    for (const l of loops) sh("losetup", ["-d", l]);
    rmSync(tmp, { recursive: true, force: true });
  }
}
