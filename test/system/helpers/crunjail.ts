// Run by Bun inside `unshare -m --propagation private` as root (test/system/crun.test.ts): a
// container jail for real, with the agent's code and the host's crun — a busybox image in a
// btrfs pool on a loop device, its owners shifted, a share, the spec, crun in the foreground —
// then what the container saw and what the host sees of it, as JSON on stdout.
// argv: <work dir> <netns path>
import { execFileSync } from "node:child_process";
import { chmodSync, copyFileSync, linkSync, lstatSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import type { Jail } from "../../../agent/jailsconfig.ts";
import { containerService, containerSpec, prepareRootfs, removeContainer, resolveShares, writeBundle } from "../../../agent/jails/container.ts";
import type { Logger } from "../../../agent/log.ts";
import { realSys } from "../../../agent/sys/index.ts";

const [dir, netns] = process.argv.slice(2) as [string, string];
const pool = `${dir}/pool`;
const run = `${dir}/run`;
const crunRoot = `${dir}/crun`;
const sh = (cmd: string, args: string[]) => execFileSync(cmd, args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
const lines: string[] = [];
const log: Logger = { err: (m) => lines.push(m), warn: (m) => lines.push(m), info: (m) => lines.push(m), debug: () => undefined };

// This host has cgroup v1 with a cgroup2 beside it at /sys/fs/cgroup/unified (hybrid), which
// crun refuses even with --cgroup-manager=disabled ("cgroups in hybrid mode not supported"):
// this private mount namespace shows it a plain v1 host instead. Jail hosts run cgroup v2 only
// (setupCgroups).
sh("umount", ["/sys/fs/cgroup/unified"]);

// The pool: btrfs on a loop device, an image with busybox, and a share.
mkdirSync(pool, { recursive: true });
sh("truncate", ["-s", "256M", `${dir}/pool.img`]);
sh("mkfs.btrfs", ["-q", `${dir}/pool.img`]);
sh("mount", ["-o", "loop", `${dir}/pool.img`, pool]);
const img = `${pool}/@img-tiny`;
sh("btrfs", ["subvolume", "create", img]);
for (const d of ["bin", "dev", "proc", "sys", "tmp", "data", "etc"]) mkdirSync(`${img}/${d}`);
copyFileSync("/bin/busybox", `${img}/bin/busybox`);
chmodSync(`${img}/bin/busybox`, 0o755);
linkSync(`${img}/bin/busybox`, `${img}/bin/hardlink`); // one inode, two names: shifted once
for (const a of ["sh", "cat", "ls", "id", "unshare", "swapoff", "head", "tr", "echo", "stat", "grep", "cut"]) symlinkSync("busybox", `${img}/bin/${a}`);
copyFileSync("/bin/busybox", `${img}/bin/su`);
chmodSync(`${img}/bin/su`, 0o4755);
writeFileSync(`${img}/etc/owned-by-1000`, "x");
execFileSync("chown", ["1000:1000", `${img}/etc/owned-by-1000`]);
sh("btrfs", ["subvolume", "create", `${pool}/@data`]);
writeFileSync(`${pool}/@data/hello`, "from the share\n");

const jail: Jail = {
  name: "tiny",
  kind: "container",
  image: "tiny",
  cpus: 1,
  memoryMiB: 64,
  address: "10.77.0.2",
  shares: [{ subvol: "@data", path: "/data", readOnly: true }],
  env: {},
  idBase: 0x30000 * 16, // 3145728: a range no host user has
};

const sys = await realSys();
const out: Record<string, unknown> = {};
const t0 = performance.now();
const rootfs = prepareRootfs(sys, log, jail, pool, ["btrfs"]);
out.shiftMs = Math.round(performance.now() - t0);
const owner = (p: string) => {
  const st = lstatSync(`${rootfs}/${p}`);
  return { uid: st.uid, gid: st.gid, mode: st.mode & 0o7777 };
};
out.owners = { root: owner(""), busybox: owner("bin/busybox"), hardlink: owner("bin/hardlink"), su: owner("bin/su"), link: owner("bin/sh"), user1000: owner("etc/owned-by-1000") };
out.imageOwner = lstatSync(`${img}/bin/busybox`).uid;

const mounts = resolveShares(sys, jail, pool, run);
const script = [
  'read -r s < /proc/self/stat; echo "self ${s%% *}"',
  'echo "uid $(id -u)"',
  'echo "dev $(ls /dev | tr "\\n" " ")"',
  'echo "share $(cat /data/hello)"',
  'if echo x > /data/w 2>/dev/null; then echo "shareWrite yes"; else echo "shareWrite no"; fi',
  'echo "ownerInside $(stat -c %u /bin/busybox)"',
  'unshare -U /bin/true 2>&1; echo "unshareU $?"',
  'swapoff /dev/null 2>&1; echo "swapoff $?"',
  'echo "sysfs $(ls /sys/class | head -3 | tr "\\n" " ")"',
  'echo "sysmount $(grep " /sys " /proc/self/mounts)"',
  'echo "sysrw $(grep " /sys" /proc/self/mounts | grep -c " rw,")"',
  'echo "timerlist $(stat -c %t,%T /proc/timer_list)"',
  'echo "procsys $(grep " /proc/sys " /proc/self/mounts | cut -d" " -f4 | cut -d, -f1)"',
  'echo "blockdevs $(ls /dev/vda /dev/loop0 /dev/loop-control 2>&1 | tr "\\n" " ")"',
  "echo READY",
  "read x",
].join("\n");
const spec = containerSpec(jail, { rootfs, netnsPath: netns, process: { args: ["/bin/sh", "-c", script], env: ["PATH=/bin"], cwd: "/" }, mounts, cgroups: false });
const bundle = writeBundle(sys, jail, spec, run);
const svc = containerService(jail, bundle, { crun: { argv: ["crun"], env: {} }, root: crunRoot, cgroupManager: "disabled" });
out.argv = svc.argv;

const child = Bun.spawn(svc.argv, { env: { ...svc.env, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" }, stdin: "pipe", stdout: "pipe", stderr: "pipe" });
const inside: Record<string, string> = {};
const reader = child.stdout.getReader();
let buf = "";
for (;;) {
  const { value, done } = await reader.read();
  if (done) break;
  buf += new TextDecoder().decode(value);
  if (buf.includes("READY\n")) break;
}
for (const l of buf.split("\n")) {
  const i = l.indexOf(" ");
  if (i > 0) inside[l.slice(0, i)] = (inside[l.slice(0, i)] ? `${inside[l.slice(0, i)]}\n` : "") + l.slice(i + 1);
}
out.inside = inside;
out.ready = buf.includes("READY\n");
if (out.ready) {
  const state = JSON.parse(sh("crun", ["--root", crunRoot, "state", jail.name])) as { pid: number; status: string };
  out.hostUidMap = readFileSync(`/proc/${state.pid}/uid_map`, "utf8").trim().split(/\s+/).map(Number);
  out.hostSeccomp = /^Seccomp:\s+(\d+)/m.exec(readFileSync(`/proc/${state.pid}/status`, "utf8"))?.[1];
  out.hostUid = /^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${state.pid}/status`, "utf8"))?.[1];
}
try {
  child.stdin.write("\n");
  await child.stdin.end();
} catch {
  // it ended already: out.exit and out.stderr say why
}
out.exit = await child.exited;
out.stderr = await new Response(child.stderr).text();

// What the jail's root may leave behind, done as its uid outside (as it would): subvolumes in
// its rootfs, one inside another, one whose name forges a line of `btrfs subvolume list`
// naming the share, and a symlink to the share.
const asJail = (args: string[]) => sh("setpriv", [`--reuid=${jail.idBase}`, `--regid=${jail.idBase}`, "--clear-groups", "btrfs", ...args]);
asJail(["subvolume", "create", `${rootfs}/nest`]);
asJail(["subvolume", "create", `${rootfs}/nest/deeper`]);
asJail(["subvolume", "create", `${rootfs}/tmp/x\nID 257 gen 1 parent 256 top level 5 path @data`]);
symlinkSync(`${pool}/@data`, `${rootfs}/tmp/to-data`);
out.subvolumesBefore = sh("btrfs", ["subvolume", "list", pool]).trim().split("\n").length;

removeContainer(sys, log, jail, { crun: { argv: ["crun"], env: {} }, root: crunRoot, pool, btrfs: ["btrfs"], dir: run });
out.subvolumesAfter = sh("btrfs", ["subvolume", "list", pool]).trim().split("\n").map((l) => l.replace(/^.* path /, ""));
out.shareAfter = readFileSync(`${pool}/@data/hello`, "utf8");
out.snapshotLeft = sys.lstat(rootfs).kind !== "missing";
out.stagedLeft = sys.mountPoints().filter((m) => m.startsWith(run));
out.log = lines;
sh("umount", [pool]);
console.log(JSON.stringify(out));
