// The sidecar beside the OS: admin over ssh keeps working after switch_root. Before PID 1 leaves
// the initrd it starts a second agent process that
//   1. (still in the initramfs) takes its own mount namespace, builds a small root on a tmpfs
//      from the verified tools image and a few files of the initrd, moves it over "/" and
//      execs itself again inside it;
//   2. (in that root) serves the admin socket and sshd, as sidecar mode does.
// Its argv[0] starts with '@': systemd leaves such processes alone when it kills everything at
// shutdown, so the sidecar can still be reached while the OS goes down. When systemd-shutdown
// kills everything else at the very end, it stops sshd and lets go of its image (watchOsShutdown).
//
// Why its own root and not a process left in the initramfs: switch_root deletes the initramfs
// and moves /dev /proc /sys /run into the OS. A process standing on those paths would see its
// files vanish and the OS's /run instead of its own. The OS's ordinary processes never see the
// sidecar's mounts, key or socket (the OS's root can: see the README).
//
// What it keeps. Its namespace starts as a copy of the initramfs' whole tree: the root
// (/sysroot and its binds), the pool, the ESPs, the verity images, /lib/modules, the API
// filesystems, each copy holding its filesystem and device busy. PID 1's removal of the
// initramfs happens to drop most of them (the kernel detaches, in every namespace, the mounts on
// a directory that is removed), but only after the switch, and only what it removes. So phase 1
// detaches every inherited mount itself, before PID 1 may go on, and keeps:
// its tmpfs root, binds of the agent and its libraries (files of the initramfs, which is never
// freed anyway), fresh proc/sys/devtmpfs/devpts, and the verified tools image. That image is
// needed for as long as sshd runs (dropbear re-execs itself from it for every connection), so
// /dev/mapper/initos-tools, its loop devices and the read-only ESP file under them stay open
// until systemd-shutdown's killing spree, when the sidecar lets go of the image, so that the
// "Detaching DM devices" after it can close the device like any other. Everything there is
// read-only and verified, so nothing is left unflushed; the pool, the root and the ESP's
// mount are not held.
import type { Cmdline } from "../cmdline.ts";
import { type AgentConfig, CONFIG_PATH, parseConfig } from "../config.ts";
import { type AdminCaps, adminHandler, type PowerAction, serveAdmin, type StatusField } from "../admin.ts";
import { BootError, describe } from "../errors.ts";
import { type Logger, savedStages, summarizeStages, TIMELINE_PATH } from "../log.ts";
import { procStatusKiB } from "../pid1.ts";
import { isSystemd, isSystemdShutdown } from "../switchroot.ts";
import { MNT_DETACH, MS } from "../sys/consts.ts";
import type { Clock, Files, Mounts, Processes, Sys } from "../sys/index.ts";
import { EFIVARS_DIR } from "../efi/vars.ts";
import { besideUpdate } from "../update/beside.ts";
import { TOOLS_ROOT } from "../sys/tools.ts";
import type { Supervised } from "../supervise.ts";
import { AGENT_PATH, HOST_KEY, SSH_DIR, startSshd } from "./sidecar.ts";
import { networkRequested } from "./network.ts";
import { pollUntil } from "../wait.ts";

/** argv[0] of the sidecar process: the '@' is systemd's "do not kill me at shutdown". */
export const BESIDE_ARGV0 = "@initos-sidecar";
/** Where phase 1 builds the root, in the initramfs (it becomes "/" of the sidecar). */
const STAGING = "/beside";
/** Phase 1 creates this in the shared /run when its root is in place; PID 1 waits for it. */
const READY = "/run/initos/beside.ready";
/**
 * In the sidecar's own root: the mounts of its namespace that were outside that root when it
 * chrooted (one a line; none when empty). Recorded before the chroot because afterwards
 * /proc/self/mountinfo no longer shows them, though they would still pin their devices.
 */
const OUTSIDE = "/run/initos/beside.outside";
/** Files and directories of the initrd the agent needs to run: itself and its libraries. */
const LIB_DIRS = ["/usr/lib64", "/usr/lib/x86_64-linux-gnu"];

/** The signed config decides; `initos.sidecar=` on the cmdline can turn it on or off. */
export function besideWanted(cmdline: Cmdline, config: AgentConfig): boolean {
  return cmdline.sidecarBeside ?? config.ssh.besideOs;
}

/**
 * PID 1's side: bring the network up (it outlives the initrd), start the sidecar process and
 * wait until it no longer depends on the initramfs. A sidecar that cannot start is logged and
 * the boot goes on: the OS matters more than its remote admin.
 */
export async function startBeside(sys: Files & Processes & Clock, log: Logger, cmdline: Cmdline, config: AgentConfig, network: () => Promise<unknown>, timeoutMs = 30_000): Promise<number | null> {
  if (!config.ssh.authorizedKeys.length) {
    log.warn("sidecar beside the OS: no authorized ssh keys in the config; not started");
    return null;
  }
  if (!networkRequested(cmdline)) {
    log.warn("sidecar beside the OS: no address on the cmdline (initos.ip= or ip=dhcp); not started");
    return null;
  }
  if (!sys.exists(`${TOOLS_ROOT}/usr/bin/dropbear`)) {
    log.warn("sidecar beside the OS: the verified tools image is not mounted; not started");
    return null;
  }
  await network();
  const pid = sys.spawnDetached([AGENT_PATH, "beside"], BESIDE_ARGV0);
  // Ready, or gone (a process that died will never be ready): whichever comes first.
  const ready = await pollUntil(sys, timeoutMs, 20, () => (sys.exists(READY) ? true : sys.exists(`/proc/${pid}`) ? null : false));
  if (!ready) throw new BootError(`sidecar beside the OS: pid ${pid} did not set up its root within ${timeoutMs / 1000}s`);
  sys.unlink(READY);
  log.info(`sidecar beside the OS: pid ${pid}, in its own mount namespace`);
  return pid;
}

/**
 * Phase 1, in the new process: its own mount namespace, a tmpfs root holding binds of the
 * agent, its libraries and the tools image, every inherited mount detached, the tmpfs moved
 * over "/"; then exec the agent again there.
 * Binds, not copies: the files keep using the memory they already use, and a bind survives
 * the initramfs being emptied (only the name goes, the file stays while it is mounted).
 */
export function enterBesideRoot(sys: Files & Mounts & Processes, log: Logger): never {
  // First: the OS's processes must not read this one's memory, nor get it in a core dump.
  sys.setDumpable(false);
  // Opens kmsg while /dev is still there: the log keeps that fd once the old /dev is detached.
  log.debug("sidecar beside the OS: building its root");
  sys.unshareMountNs();
  // Private: nothing we mount here may propagate into the OS's namespace, or back.
  sys.mount(null, "/", null, MS.REC | MS.PRIVATE);
  sys.mkdirp(STAGING);
  sys.mount("tmpfs", STAGING, "tmpfs", MS.NOSUID | MS.NODEV, "mode=0755,size=16m");
  for (const d of ["usr/bin", ...LIB_DIRS.map((l) => l.slice(1)), "etc/initos", "proc", "sys", "dev", "tmp", "root", "run/initos/ssh", TOOLS_ROOT.slice(1)]) {
    sys.mkdirp(`${STAGING}/${d}`);
  }
  sys.symlink("usr/bin", `${STAGING}/bin`);
  sys.symlink("usr/lib64", `${STAGING}/lib64`);
  sys.symlink("usr/lib", `${STAGING}/lib`);
  const bindFile = (path: string) => {
    sys.writeFile(`${STAGING}${path}`, ""); // a bind needs a mount point of the same kind
    sys.mount(path, `${STAGING}${path}`, null, MS.BIND);
  };
  bindFile(AGENT_PATH);
  for (const dir of LIB_DIRS) {
    for (const name of sys.readdir(dir)) if (sys.lstat(`${dir}/${name}`).kind === "file") bindFile(`${dir}/${name}`);
  }
  sys.mount(TOOLS_ROOT, `${STAGING}${TOOLS_ROOT}`, null, MS.BIND | MS.REC);
  sys.mount("proc", `${STAGING}/proc`, "proc", MS.NOSUID | MS.NODEV | MS.NOEXEC);
  sys.mount("sysfs", `${STAGING}/sys`, "sysfs", MS.NOSUID | MS.NODEV | MS.NOEXEC | MS.RDONLY);
  sys.mount("devtmpfs", `${STAGING}/dev`, "devtmpfs", MS.NOSUID, "mode=0755");
  // The firmware's variables: an update's boot entries, BootNext, its trial record.
  if (sys.exists(EFIVARS_DIR)) sys.mount("efivarfs", `${STAGING}${EFIVARS_DIR}`, "efivarfs", MS.NOSUID | MS.NODEV | MS.NOEXEC);
  // Small files are copied: the config (signed, in the initrd), the boot timeline, the host key.
  for (const f of [CONFIG_PATH, TIMELINE_PATH, HOST_KEY]) {
    if (sys.exists(f)) sys.copyFile(f, `${STAGING}${f}`);
  }
  const detached = detachInherited(sys);
  // Over "/" and chroot, as the classic switch_root does: pivot_root refuses the initramfs.
  sys.chdir(STAGING);
  sys.mount(".", "/", null, MS.MOVE);
  // Until the chroot, absolute paths still start at the initramfs root and reach PID 1's /run
  // (the same tmpfs, mounted in our copy of its namespace): the last moment to tell PID 1 that
  // the initramfs may go.
  sys.writeFile(READY, `${sys.pid()}\n`);
  // The OS's /run from now on: not ours to hold. Still reached from the old root, as above.
  sys.umount("/run", MNT_DETACH);
  sys.chroot(".");
  sys.chdir("/");
  // A devpts of our own, for the ptys of shell sessions (when the config allows a shell).
  sys.mkdirp("/dev/pts");
  sys.mount("devpts", "/dev/pts", "devpts", MS.NOSUID | MS.NOEXEC, "newinstance,gid=5,mode=620,ptmxmode=0666");
  log.info(`sidecar beside the OS: root ready, ${detached + 1} inherited mounts detached; starting`); // + /run
  return sys.execve(AGENT_PATH, [BESIDE_ARGV0, "beside-run"], ["PATH=/usr/bin"]);
}

/**
 * Detaches every mount the namespace inherited except "/" (the initramfs, under the new root)
 * and the new root's tree, deepest first; /run stays for PID 1's ready file and is detached
 * after it. Records what is left outside the new root, with /proc/self/mounts still showing
 * the whole namespace. A mount that cannot be detached is an error: no sidecar is better than
 * one that keeps the OS from closing its disks. Returns how many were detached.
 */
function detachInherited(sys: Files & Mounts): number {
  const inside = (m: string, dir: string) => m === dir || m.startsWith(`${dir}/`);
  // "/proc" last: this process reads the mount table through it.
  const kept = (m: string) => m === "/" || m === "/run" || m === "/proc" || inside(m, STAGING);
  const gone: string[] = [];
  for (const m of [...sys.mountPoints()].reverse()) {
    // A lazy detach takes the submounts with it: one listed before its parent is already gone.
    if (kept(m) || gone.some((g) => m.startsWith(`${g}/`))) continue;
    sys.umount(m, MNT_DETACH);
    gone.push(m);
  }
  const outside = sys.mountPoints().filter((m) => !kept(m));
  sys.writeFile(`${STAGING}${OUTSIDE}`, outside.map((m) => `${m}\n`).join(""));
  sys.umount("/proc", MNT_DETACH);
  return gone.length + 1;
}

/**
 * Phase 2, in the sidecar's own root: the admin socket (with the update's commands: update/beside.ts)
 * and sshd, until the machine goes down.
 *
 * `sshdLog`: where sshd's lines go. After the switch /dev/kmsg is rate-limited again (the OS's
 * setting, per open file: a burst of 10 lines in 5 s), and dropbear says three lines or more per
 * session: sharing one open with the agent's own lines lost those (seen: an update's refusal
 * line missing from the log during a test's burst of ssh sessions). main.ts gives it a logger
 * with an open of its own.
 */
export async function runBeside(sys: Sys, log: Logger & { recent(): string[] }, sshdLog: Logger = log): Promise<never> {
  // Again: the exec into this phase made the process dumpable.
  sys.setDumpable(false);
  const { config, error } = parseConfig(sys.readFile(CONFIG_PATH));
  if (error) log.err(error);
  sys.mkdirp(SSH_DIR, 0o700);
  const caps = besideAdmin(sys, log);
  // The update side first: a trial's watchdog was let go by PID 1 and must be petted again soon.
  const upd = await besideUpdate(sys, log, config, () => caps.power("reboot"), AGENT_PATH);
  serveAdmin(sys, log, adminHandler({ ...caps, update: upd.update, commit: upd.commit, status: () => [...caps.status(), ...upd.status()] }));
  const sshd = startSshd(sys, sshdLog, config);
  watchOsShutdown(sys, log, sshd);
  log.info(`sidecar beside the OS: ready (pid ${sys.pid()})`);
  for (;;) await sys.sleep(3_600_000);
}

/**
 * How the sidecar learns that the OS is in its last seconds, and lets go of its image.
 *
 * systemd-shutdown (systemd 252, src/shared/killall.c) sends SIGTERM, then SIGKILL, to every
 * process but those whose argv[0] starts with '@': the sidecar is spared, dropbear and its
 * sessions are not. Right after that it unmounts, detaches loop devices and removes the DM
 * devices nobody holds. Left as it was, the sidecar would keep the verified image mounted in
 * its namespace and systemd-shutdown would find /dev/mapper/initos-tools (and its loops)
 * busy, for nothing: sshd is being killed anyway.
 *
 * The cue: the spree never signals us, but it brackets each round with kill(-1, SIGSTOP) ...
 * kill(-1, SIGCONT), which reaches every process, '@' or not. A SIGCONT while PID 1 is
 * systemd-shutdown: no more sshd restarts, and the image detached (lazily: it goes once the
 * dying dropbear lets go of its file, which the SIGTERM round waits for anyway). Any other
 * SIGCONT (someone's `kill -CONT`) changes nothing. Not a guarantee, a head start: this runs
 * while the SIGTERM round waits for journald and dropbear, and systemd-shutdown still has the
 * SIGKILL round and its unmounts to do before it detaches DM devices (measured under TCG: the
 * detach came 0.2-0.85 s after this); were the sidecar later than that, the device would be
 * reported busy, as it was before, and nothing else would change.
 *
 * Why the sidecar stays rather than exits: a process that is exiting, or a zombie not yet
 * reaped, shows an empty cmdline, so the spree's next round no longer spares it and logs
 * "Sending SIGKILL to PID … (initos-agent)"; the runtime's exit is slow enough under emulation
 * for that to happen (seen). Staying costs nothing: it holds no device any more.
 *
 * Why PID 1 then gets a SIGCHLD from us: the SIGTERM round waits for every process it signalled,
 * but looks again at one that is not its child (dropbear is ours) only when a SIGCHLD wakes it,
 * else after 10 s (seen: the reboot took 10 s longer). It is the SIGCHLD PID 1 would have had,
 * were dropbear its child; an extra one at any other moment is ignored or only re-checks.
 *
 * Other inits do not spare '@' processes: their SIGTERM ends the sidecar (the runtime's default
 * action), and its mounts with it.
 */
export function watchOsShutdown(
  sys: Files & Mounts & Processes & Clock,
  log: Logger,
  sshd: Supervised | null,
  on: (signal: "SIGCONT", handler: () => void) => void = (sig, h) => void process.on(sig, h),
): void {
  let leaving = false;
  on("SIGCONT", () => {
    if (leaving) return;
    let init = "";
    try {
      init = sys.readlink("/proc/1/exe");
    } catch {
      return; // cannot tell: stay as we are
    }
    if (!isSystemdShutdown(init)) return;
    leaving = true;
    // stop() marks it stopped at once (no restart from the image), then ends what is left of it.
    const stopping = sshd?.stop(sys);
    let released = "released the tools image";
    try {
      sys.umount(TOOLS_ROOT, MNT_DETACH);
    } catch (e) {
      released = `could not detach the tools image: ${describe(e)}`;
    }
    log.info(`sidecar beside the OS: the OS is going down (PID 1 is ${init}); no more sshd, ${released}`);
    void stopping
      ?.catch((e: unknown) => log.warn(`sidecar beside the OS: stopping sshd: ${describe(e)}`))
      .then(() => {
        try {
          sys.signal(1, SIGCHLD);
        } catch {
          // PID 1 still finds out, at its next check
        }
      });
  });
}

const SIGCHLD = 17;

/** glibc's SIGRTMIN (the kernel's 32, plus the two glibc keeps for itself), as systemd counts. */
const SIGRTMIN = 34;

/**
 * The OS owns the machine now: reboot and poweroff are requests to its init, not reboot(2),
 * which would skip its clean shutdown.
 * systemd: SIGRTMIN+5 starts reboot.target and SIGRTMIN+4 poweroff.target, both "replace-
 * irreversibly", the job `systemctl reboot` / `poweroff` asks for. Not SIGINT: that is
 * ctrl-alt-del.target, which hardened systems mask (then nothing happens) and which systemd
 * rate-limits into CtrlAltDelBurstAction.
 * Other inits: SIGINT is ctrl-alt-del (sysvinit and busybox init reboot on it), SIGUSR2 is
 * busybox init's poweroff.
 */
export function shutdownSignal(action: PowerAction, initExe: string): { signal: number; name: string } {
  if (isSystemd(initExe)) {
    return action === "reboot" ? { signal: SIGRTMIN + 5, name: "SIGRTMIN+5" } : { signal: SIGRTMIN + 4, name: "SIGRTMIN+4" };
  }
  return action === "reboot" ? { signal: 2, name: "SIGINT" } : { signal: 12, name: "SIGUSR2" };
}

/**
 * What the agent beside the OS may do: it speaks for a machine the OS owns now, so power
 * actions are requests to the OS's init, and nothing that belongs to the boot (unlock,
 * switch-root) is left to do.
 */
export function besideAdmin(sys: Files & Processes & Clock, log: Logger & { recent(): string[] }): AdminCaps {
  const refused = { refused: "not available beside the running OS" };
  return {
    status: () => besideStatus(sys),
    log: () => log.recent(),
    power(action) {
      let init = "";
      try {
        init = sys.readlink("/proc/1/exe");
      } catch {
        // unknown init: the generic signal
      }
      const sig = shutdownSignal(action, init);
      log.info(`sidecar beside the OS: asking init (${init || "?"}) to ${action} (signal ${sig.signal}: ${sig.name})`);
      sys.after(200, () => sys.signal(1, sig.signal)); // answer first: the OS may go down fast
      return `${action} requested from the OS's init`;
    },
    passphrase: refused,
    switchRoot: refused,
    update: { refused: "not available (no EFI variables or boot disk)" },
    commit: { refused: "no trial is running" },
    jails: { refused: "jails run in jail mode, in place of a root: not beside an OS" },
  };
}

export function besideStatus(sys: Files & Processes): StatusField[] {
  const stages = savedStages(sys.readFile(TIMELINE_PATH));
  const argv0 = (sys.readFile("/proc/self/cmdline") ?? "").split("\0")[0];
  const outside = sys.readFile(OUTSIDE)?.split("\n").filter(Boolean);
  return [
    ["mode", "sidecar beside the OS"],
    ["process", `${argv0} (pid ${sys.pid()})`],
    ["boot stages", stages ? summarizeStages(stages) : "unknown"],
    ["agent rss", `${procStatusKiB(sys, "VmRSS") ?? "?"} kB`],
    ["dumpable", sys.getDumpable() ? 1 : 0],
    ["mounts", summarizeMounts(sys.readFile("/proc/self/mountinfo") ?? "")],
    ["mounts left outside its root", outside === undefined ? "unknown" : outside.join(", ") || "none"],
  ];
}

/** mountinfo escapes space, tab, newline and backslash as octal. */
const unoctal = (s: string) => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

/**
 * "/ tmpfs, /run/initos/images/tools squashfs /dev/mapper/initos-tools, ...; N files of the
 * initrd": each mount with its type and, for a block device, its source; binds of the
 * initramfs' own files (the agent, its libraries) only counted.
 */
export function summarizeMounts(mountinfo: string): string {
  const shown: string[] = [];
  let files = 0;
  for (const line of mountinfo.split("\n").filter(Boolean)) {
    const f = line.split(" ");
    const dash = f.indexOf("-", 6);
    if (dash < 0) continue;
    const target = unoctal(f[4]!);
    const [type, source] = [f[dash + 1]!, unoctal(f[dash + 2] ?? "")];
    if (type === "rootfs") files++;
    else shown.push(`${target} ${type}${source.startsWith("/dev/") ? ` ${source}` : ""}`);
  }
  if (files) return `${shown.join(", ")}; ${files} files of the initrd`;
  return shown.join(", ") || "none";
}
