// The sidecar beside the OS: admin over ssh keeps working after switch_root. Before PID 1 leaves
// the initrd it starts a second agent process that
//   1. (still in the initramfs) takes its own mount namespace, builds a small root on a tmpfs
//      from the verified sidecar image and a few files of the initrd, moves it over "/" and
//      execs itself again inside it;
//   2. (in that root) serves the admin socket and sshd, as sidecar mode does.
// Its argv[0] starts with '@': systemd leaves such processes alone when it kills everything at
// shutdown, so the sidecar can still be reached while the OS goes down.
//
// Why its own root and not a process left in the initramfs: switch_root deletes the initramfs
// and moves /dev /proc /sys /run into the OS. A process standing on those paths would see its
// files vanish and the OS's /run instead of its own. The OS, for its part, never sees the
// sidecar's mounts, key or socket.
import type { Cmdline } from "../cmdline.ts";
import { type AgentConfig, CONFIG_PATH, parseConfig } from "../config.ts";
import type { CtlHandler, CtlResponse } from "../ctl.ts";
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import { procStatusKiB } from "../pid1.ts";
import { MS } from "../sys/consts.ts";
import type { Sys } from "../sys/index.ts";
import { SIDECAR_ROOT } from "../sys/sidecar.ts";
import { AGENT_PATH, HOST_KEY, SSH_DIR, startCtl, startSshd } from "./sidecar.ts";
import { networkRequested } from "./network.ts";

/** argv[0] of the sidecar process: the '@' is systemd's "do not kill me at shutdown". */
export const BESIDE_ARGV0 = "@initos-sidecar";
/** Where phase 1 builds the root, in the initramfs (it becomes "/" of the sidecar). */
const STAGING = "/beside";
/** Phase 1 creates this in the shared /run when its root is in place; PID 1 waits for it. */
const READY = "/run/initos/beside.ready";
const TIMELINE = "/run/initos/boot.json";
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
export async function startBeside(sys: Sys, log: Logger, cmdline: Cmdline, config: AgentConfig, network: () => Promise<unknown>, timeoutMs = 30_000): Promise<number | null> {
  if (!config.ssh.authorizedKeys.length) {
    log.warn("sidecar beside the OS: no authorized ssh keys in the config; not started");
    return null;
  }
  if (!networkRequested(cmdline)) {
    log.warn("sidecar beside the OS: no address on the cmdline (initos.ip= or ip=dhcp); not started");
    return null;
  }
  if (!sys.exists(`${SIDECAR_ROOT}/usr/bin/dropbear`)) {
    log.warn("sidecar beside the OS: the verified sidecar image is not mounted; not started");
    return null;
  }
  await network();
  const pid = sys.spawnDetached([AGENT_PATH, "beside"], BESIDE_ARGV0);
  const start = performance.now();
  while (!sys.exists(READY)) {
    if (performance.now() - start > timeoutMs || !sys.exists(`/proc/${pid}`)) {
      throw new BootError(`sidecar beside the OS: pid ${pid} did not set up its root within ${timeoutMs / 1000}s`);
    }
    await sys.sleep(20);
  }
  sys.unlink(READY);
  log.info(`sidecar beside the OS: pid ${pid}, in its own mount namespace`);
  return pid;
}

/**
 * Phase 1, in the new process: its own mount namespace, a tmpfs root holding binds of the
 * agent, its libraries and the sidecar image, moved over "/"; then exec the agent again there.
 * Binds, not copies: the files keep using the memory they already use, and a bind survives
 * the initramfs being emptied (only the name goes, the file stays while it is mounted).
 */
export function enterBesideRoot(sys: Sys, log: Logger): never {
  sys.unshareMountNs();
  // Private: nothing we mount here may propagate into the OS's namespace, or back.
  sys.mount(null, "/", null, MS.REC | MS.PRIVATE);
  sys.mkdirp(STAGING);
  sys.mount("tmpfs", STAGING, "tmpfs", MS.NOSUID | MS.NODEV, "mode=0755,size=16m");
  for (const d of ["usr/bin", ...LIB_DIRS.map((l) => l.slice(1)), "etc/initos", "proc", "sys", "dev", "tmp", "root", "run/initos/ssh", SIDECAR_ROOT.slice(1)]) {
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
  sys.mount(SIDECAR_ROOT, `${STAGING}${SIDECAR_ROOT}`, null, MS.BIND | MS.REC);
  sys.mount("proc", `${STAGING}/proc`, "proc", MS.NOSUID | MS.NODEV | MS.NOEXEC);
  sys.mount("sysfs", `${STAGING}/sys`, "sysfs", MS.NOSUID | MS.NODEV | MS.NOEXEC | MS.RDONLY);
  sys.mount("devtmpfs", `${STAGING}/dev`, "devtmpfs", MS.NOSUID, "mode=0755");
  // Small files are copied: the config (signed, in the initrd), the boot timeline, the host key.
  for (const f of [CONFIG_PATH, TIMELINE, HOST_KEY]) {
    if (sys.exists(f)) sys.copyFile(f, `${STAGING}${f}`);
  }
  // Over "/" and chroot, as the classic switch_root does: pivot_root refuses the initramfs.
  sys.chdir(STAGING);
  sys.mount(".", "/", null, MS.MOVE);
  // Until the chroot, absolute paths still start at the initramfs root and reach PID 1's /run
  // (the same tmpfs, mounted in our copy of its namespace): the last moment to tell PID 1 that
  // the initramfs may go.
  sys.writeFile(READY, `${sys.pid()}\n`);
  sys.chroot(".");
  sys.chdir("/");
  // A devpts of our own, for the ptys of shell sessions (when the config allows a shell).
  sys.mkdirp("/dev/pts");
  sys.mount("devpts", "/dev/pts", "devpts", MS.NOSUID | MS.NOEXEC, "newinstance,gid=5,mode=620,ptmxmode=0666");
  log.info("sidecar beside the OS: root ready; starting");
  return sys.execve(AGENT_PATH, [BESIDE_ARGV0, "beside-run"], ["PATH=/usr/bin"]);
}

/** Phase 2, in the sidecar's own root: the admin socket and sshd, until the machine goes down. */
export async function runBeside(sys: Sys, log: Logger & { recent(): string[] }): Promise<never> {
  const { config, error } = parseConfig(sys.readFile(CONFIG_PATH));
  if (error) log.err(error);
  sys.mkdirp(SSH_DIR, 0o700);
  startCtl(log, besideHandler(sys, log));
  startSshd(sys, log, config);
  log.info(`sidecar beside the OS: ready (pid ${sys.pid()})`);
  for (;;) await sys.sleep(3_600_000);
}

/** Linux signal numbers for asking the OS's init to shut down. */
const SIGINT = 2;
const SIGUSR2 = 12;
const SIGRTMIN_4 = 34 + 4;

/**
 * The OS owns the machine now: reboot and poweroff are requests to its init, not reboot(2),
 * which would skip its clean shutdown. SIGINT is ctrl-alt-del (systemd, sysvinit and busybox
 * init reboot on it); poweroff is SIGRTMIN+4 for systemd and SIGUSR2 for busybox-style inits.
 */
export function shutdownSignal(action: "reboot" | "poweroff", initExe: string): number {
  if (action === "reboot") return SIGINT;
  return /(^|\/)systemd$/.test(initExe) ? SIGRTMIN_4 : SIGUSR2;
}

export function besideHandler(sys: Sys, log: Logger & { recent(): string[] }): CtlHandler {
  return async (req): Promise<CtlResponse> => {
    switch (req.cmd) {
      case "status":
        return { ok: true, text: besideStatus(sys) };
      case "log":
        return { ok: true, text: log.recent().join("\n") };
      case "reboot":
      case "poweroff": {
        let init = "";
        try {
          init = sys.readlink("/proc/1/exe");
        } catch {
          // unknown init: the generic signal
        }
        const sig = shutdownSignal(req.cmd, init);
        log.info(`sidecar beside the OS: asking init (${init || "?"}) to ${req.cmd}`);
        setTimeout(() => sys.signal(1, sig), 200); // answer first: the OS may go down fast
        return { ok: true, text: `${req.cmd} requested from the OS's init` };
      }
      case "unlock":
      case "reseal":
      case "switch-root":
        return { ok: false, text: `${req.cmd}: not available beside the running OS` };
    }
  };
}

export function besideStatus(sys: Sys): string {
  let stages = "unknown";
  try {
    const t = JSON.parse(sys.readFile(TIMELINE) ?? "") as { stages: { name: string; durationMs: number }[] };
    stages = t.stages.map((s) => `${s.name} ${s.durationMs.toFixed(0)}ms`).join(", ");
  } catch {
    // no timeline: say so
  }
  const argv0 = (sys.readFile("/proc/self/cmdline") ?? "").split("\0")[0];
  const rss = procStatusKiB(sys, "VmRSS") ?? "?";
  return [`mode: sidecar beside the OS`, `process: ${argv0} (pid ${sys.pid()})`, `boot stages: ${stages}`, `agent rss: ${rss} kB`].join("\n");
}
