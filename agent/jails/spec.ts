// The OCI runtime spec (a bundle's config.json) of a container jail, for crun to run. Pure:
// the agent decides everything here and crun only carries it out (the agent is not a
// container runtime).
import type { Jail } from "../jailsconfig.ts";
import { seccompProfile } from "./seccomp.ts";

/** Each jail's ids 0..65535 (uid and gid alike) are host ids idBase.. (config.ts picks them). */
export const ID_RANGE = 65536;
/** Enough for a busy OS image, and a bound on a fork bomb. */
export const PIDS_LIMIT = 4096;
/** The CFS period; the quota is cpus × period. */
const CPU_PERIOD_US = 100_000;

/**
 * What OCI runtimes grant by default (runc's and Docker's set). No CAP_SYS_ADMIN: the jail's
 * root cannot mount, and in its user namespace even these are over its own namespaces only.
 */
export const DEFAULT_CAPABILITIES = [
  "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
  "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
] as const;

/** runc's defaults: kernel state that is not namespaced, hidden (a bind of /dev/null, or an empty tmpfs). */
export const MASKED_PATHS = [
  "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
  "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
];
/** runc's defaults: readable, never writable. */
export const READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"];

export interface SpecMount {
  source: string;
  destination: string;
  readOnly: boolean;
}

export interface SpecOptions {
  rootfs: string;
  /**
   * The network namespace the jail joins (/run/netns/<name>, made and wired to the bridge by
   * the agent's network code); null: a new empty one (tests).
   */
  netnsPath: string | null;
  process: { args: string[]; env: string[]; cwd: string };
  /** The jail's shares, already resolved inside the pool (resolveShares). */
  mounts: SpecMount[];
  /**
   * Cgroup v2 limits and the jail's own cgroup tree at /sys/fs/cgroup; default true. Off only
   * where there is no cgroup v2 to delegate (a test host with cgroup v1).
   */
  cgroups?: boolean;
}

interface OciMount {
  destination: string;
  type: string;
  source: string;
  options: string[];
}

/** The jail's config.json. */
export function containerSpec(jail: Jail, o: SpecOptions): object {
  const cgroups = o.cgroups ?? true;
  const caps = [...DEFAULT_CAPABILITIES];
  const ids = [{ containerID: 0, hostID: jail.idBase, size: ID_RANGE }];
  return {
    ociVersion: "1.0.2",
    root: { path: o.rootfs, readonly: false },
    hostname: jail.name,
    process: {
      terminal: false,
      user: { uid: 0, gid: 0 },
      args: o.process.args,
      env: o.process.env,
      cwd: o.process.cwd,
      capabilities: { bounding: caps, effective: caps, permitted: caps, inheritable: [], ambient: [] },
      noNewPrivileges: true,
    },
    mounts: [...standardMounts(cgroups), ...o.mounts.map(shareMount)],
    linux: {
      namespaces: [
        { type: "user" },
        { type: "pid" },
        { type: "mount" },
        { type: "uts" },
        { type: "ipc" },
        // Only with cgroups: crun refuses a cgroup namespace on a cgroup v1/hybrid host.
        ...(cgroups ? [{ type: "cgroup" }] : []),
        o.netnsPath === null ? { type: "network" } : { type: "network", path: o.netnsPath },
      ],
      uidMappings: ids,
      gidMappings: ids,
      ...(cgroups ? { cgroupsPath: `/initos/${jail.name}/run`, resources: resources(jail) } : {}),
      seccomp: seccompProfile(),
      maskedPaths: MASKED_PATHS,
      readonlyPaths: READONLY_PATHS,
    },
  };
}

function resources(jail: Jail): object {
  const bytes = jail.memoryMiB * 1024 * 1024;
  return {
    // swap is memory+swap in the OCI spec (cgroup v1's memsw): equal to the limit, no swap.
    memory: { limit: bytes, swap: bytes },
    cpu: { quota: Math.round(jail.cpus * CPU_PERIOD_US), period: CPU_PERIOD_US },
    pids: { limit: PIDS_LIMIT },
  };
}

/**
 * /proc, a tmpfs /dev (crun fills it with null, zero, full, random, urandom, tty and the ptmx
 * link, and nothing else: no host device is ever there), /dev/pts, /dev/shm, /dev/mqueue, and
 * /sys read-only.
 *
 * /sys is a bind of the host's, not a new sysfs: the kernel lets a user namespace mount sysfs
 * only when it owns the network namespace, and the jail joins one the agent made (owned by the
 * host's user namespace). Rootless runtimes bind in that case (rbind, ro, nosuid, noexec, nodev).
 * Measured with crun 1.8.1: asked for a sysfs mount there, it falls back to a bind by itself but
 * leaves it read-write; the explicit rbind is read-only down to every submount. It shows device
 * and network *names* of the host, read-only; its files stay owned by host root, who is nobody
 * in the jail.
 */
function standardMounts(cgroups: boolean): OciMount[] {
  const m: OciMount[] = [
    { destination: "/proc", type: "proc", source: "proc", options: ["nosuid", "noexec", "nodev"] },
    { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    { destination: "/dev/pts", type: "devpts", source: "devpts", options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
    { destination: "/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
    { destination: "/dev/mqueue", type: "mqueue", source: "mqueue", options: ["nosuid", "noexec", "nodev"] },
    { destination: "/sys", type: "none", source: "/sys", options: ["rbind", "nosuid", "noexec", "nodev", "ro"] },
  ];
  // Its own cgroup tree (the cgroup namespace makes /initos/<name> its root), over the host's
  // that the /sys bind brought.
  if (cgroups) m.push({ destination: "/sys/fs/cgroup", type: "cgroup", source: "cgroup", options: ["nosuid", "noexec", "nodev", "relatime", "ro"] });
  return m;
}

function shareMount(s: SpecMount): OciMount {
  return { destination: s.destination, type: "none", source: s.source, options: ["rbind", "nosuid", "nodev", ...(s.readOnly ? ["ro"] : ["rw"])] };
}
