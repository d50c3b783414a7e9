// VM jails: the host (PID 1 in jail mode, the pool at /x) boots a jail's image as a VM under
// QEMU, with the VM kernel + initrd this project builds, driven by vm mode's cmdline contract
// (agent/stages/vm.ts): the image's btrfs disk on /dev/vda, one share over 9p, a static address
// on the bridge, and the jail's command run as a pod that powers the VM off when it exits.
//
// Measured on this 2-core host without KVM (test/system/vm-jail.test.ts): QEMU TCG start to the
// app's marker 12-17 s wall; system_powerdown to QEMU's exit 0.2 s.
//
// What QEMU gets comes from the pool's host config (validated by config.ts), so vmArgv checks
// again that none of it can become another QEMU option: a value inside a QEMU option list
// (path=, file=, mount_tag=, ifname=) holding a ',' would start a new option, so such values are
// held to a plain path alphabet and refused otherwise; the kernel cmdline has no way to quote a
// '"', so a command word with one is refused too.
import { createHash } from "node:crypto";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Service } from "../supervise.ts";
import type { Launcher } from "./run.ts";
import type { AgentConfig } from "../config.ts";
import type { EspResult } from "../stages/esp.ts";
import { IMAGES_DIR, openImage } from "../stages/images.ts";
import type { Clock, Crypt, Devices, Files, Mounts, NetOps, Processes, Sockets } from "../sys/index.ts";
import { toolArgv } from "../sys/tools.ts";
import { imageSubvolume, type Jail, type JailNetwork, POOL_MOUNT } from "../jailsconfig.ts";

/** A jail that cannot be started as asked: one line naming the jail and what is wrong. */
export class VmJailError extends Error {
  constructor(jail: string, why: string) {
    super(`jail ${jail}: ${why}`);
    this.name = "VmJailError";
  }
}

export interface VmShare {
  /** The host directory (in the pool). */
  source: string;
  /** The 9p mount tag the guest mounts it by. */
  tag: string;
  /** Where the guest mounts it. */
  path: string;
  readOnly: boolean;
}

export interface VmLaunch {
  /** QEMU's argv prefix: a path, or the tools image's loader + library path + binary (toolArgv). */
  qemu: string[];
  /** QEMU's data directory (firmware: qboot's bios-microvm.bin), passed as -L; needed when QEMU runs through ld.so and cannot find its own. */
  dataDir?: string;
  kernel: string;
  initrd: string;
  /** The VM's root disk: a raw btrfs image (vmDisk). */
  disk: string;
  shares: VmShare[];
  /** A tap device (made and attached to the bridge by the network part) and the VM's MAC on it. */
  tap?: string;
  mac?: string;
  /** The jail's address on the machine's /24: its gateway (the bridge) and prefix. Absent: no network. */
  network?: { gateway: string; prefix: number };
  /** QMP's unix socket (powerdownVm talks to it). */
  qmp: string;
  kvm: boolean;
}

/**
 * The x86 kernel's COMMAND_LINE_SIZE (arch/x86/include/asm/setup.h): a longer -append is cut
 * by the boot protocol, which would silently drop the end of the jail's command.
 */
export const MAX_CMDLINE = 2048;
/**
 * The VM initrd (build/vm/initrd.img) is 49 MB of zstd that unpacks to ~140 MB (the agent is
 * 110 MB), and both are in RAM during the unpack. Measured with build/vm's kernel under TCG,
 * one CPU: 256M panics while unpacking ("System is deadlocked on memory"); 320M boots to the app.
 */
export const MIN_VM_MEMORY_MIB = 320;

/** Values that go inside QEMU option lists (paths, tags, interface names): no ',' (the list separator) and nothing a shell or QEMU would read specially. */
const PLAIN = /^[A-Za-z0-9_./@+:-]+$/;
/** A 9p mount tag: QEMU takes up to 31 bytes; the cmdline's initos.share wants [\w.-]. */
const TAG = /^[\w.-]{1,31}$/;
const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function plain(jail: string, what: string, v: string): string {
  if (!PLAIN.test(v)) throw new VmJailError(jail, `${what} ${JSON.stringify(v)} holds characters QEMU would parse (only letters, digits and _./@+:- are passed)`);
  return v;
}

/**
 * One word of the kernel cmdline after `--`: the kernel (and agent/cmdline.ts's tokenize) split
 * on whitespace and group with double quotes, with no escape for a quote itself. A word with a
 * space is quoted; one with a quote or a control character cannot be passed and is refused.
 */
function cmdlineWord(jail: string, w: string): string {
  // eslint-disable-next-line no-control-regex
  if (/["\x00-\x1f\x7f]/.test(w)) throw new VmJailError(jail, `command word ${JSON.stringify(w.slice(0, 40))} holds a '"' or a control character, which the kernel cmdline cannot carry`);
  return /\s/.test(w) || w === "" ? `"${w}"` : w;
}

/** A locally administered unicast MAC, stable for a name (so the guest's interface keeps its identity across restarts). */
export function vmMac(name: string): string {
  const h = createHash("sha256").update(`initos-vm:${name}`).digest();
  return ["02", ...[...h.subarray(0, 5)].map((b) => b.toString(16).padStart(2, "0"))].join(":");
}

/** The kernel cmdline for vm mode (agent/stages/vm.ts's contract). */
export function vmCmdline(jail: Jail, o: Pick<VmLaunch, "shares" | "network" | "kvm">): string {
  // panic=-1: a guest kernel panic reboots at once, which -no-reboot turns into QEMU's exit, so
  // the supervisor sees it and restarts with backoff (a panicked guest otherwise sits forever:
  // seen with 256M, "System is deadlocked on memory").
  const words = ["console=ttyS0", "panic=-1", "initos.mode=vm", "root=/dev/vda", "rw", `initos.hostname=${jail.name}`];
  // microvm has no HPET or PM timer: without KVM's clock the kernel cannot calibrate its TSC
  // and stalls; under TCG it is told the rate (qemu/harness.ts measured this).
  if (!o.kvm) words.push("tsc_early_khz=2000000", "tsc=reliable");
  if (o.network) {
    if (!IPV4.test(jail.address) || !IPV4.test(o.network.gateway)) throw new VmJailError(jail.name, `address ${JSON.stringify(jail.address)} or gateway ${JSON.stringify(o.network.gateway)} is not an IPv4 address`);
    if (!Number.isInteger(o.network.prefix) || o.network.prefix < 1 || o.network.prefix > 30) throw new VmJailError(jail.name, `prefix ${o.network.prefix} is not 1-30`);
    words.push(`initos.ip=${jail.address}/${o.network.prefix}`, `initos.gw=${o.network.gateway}`);
  }
  const share = o.shares[0];
  if (share) words.push(`initos.share=${share.tag}:${plain(jail.name, "share path", share.path)}`);
  if (jail.command) words.push("--", ...jail.command.map((w) => cmdlineWord(jail.name, w)));
  const line = words.join(" ");
  if (Buffer.byteLength(line) >= MAX_CMDLINE) throw new VmJailError(jail.name, `the kernel cmdline would be ${Buffer.byteLength(line)} bytes, over the ${MAX_CMDLINE - 1} the kernel keeps (shorten the command)`);
  return line;
}

/**
 * QEMU's argv for a VM jail. Pure. microvm (virtio-mmio devices and the power button found
 * through ACPI; no PCI, no firmware beyond qboot): the VM kernel boots on it, measured in
 * test/integration/vm.test.ts and test/system/vm-jail.test.ts.
 */
export function vmArgv(jail: Jail, o: VmLaunch): string[] {
  const n = jail.name;
  if (jail.kind !== "vm") throw new VmJailError(n, `kind is ${jail.kind}, not vm`);
  // vm mode mounts one share (initos.share): a second would be silently missing in the guest.
  if (o.shares.length > 1) throw new VmJailError(n, `${o.shares.length} shares: a VM jail takes at most one (vm mode mounts one initos.share)`);
  if (Object.keys(jail.env).length) throw new VmJailError(n, "env: a VM jail's app gets no environment from the host (vm mode has no way to pass one); drop env or use a container");
  if (!Number.isInteger(jail.memoryMiB) || jail.memoryMiB < MIN_VM_MEMORY_MIB) throw new VmJailError(n, `memory ${jail.memoryMiB}M is below the ${MIN_VM_MEMORY_MIB}M the VM initrd needs to unpack`);
  if (!(jail.cpus > 0 && jail.cpus <= 256)) throw new VmJailError(n, `cpus ${jail.cpus} is not in (0, 256]`);
  const args = [...o.qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"];
  // QEMU parses what the guest sends (virtio rings, 9p requests): its seccomp filter takes
  // away exec, setuid/setgid, obsolete and resource-control calls should a guest break in.
  args.push("-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
  if (o.dataDir) args.push("-L", plain(n, "QEMU data directory", o.dataDir));
  args.push("-name", `initos-${n}`);
  args.push("-machine", "microvm,acpi=on,pit=on,pic=on,rtc=on,isa-serial=on");
  // Bun's baseline build needs SSE4.2, which TCG's default qemu64 CPU lacks (DESIGN §3).
  args.push(...(o.kvm ? ["-accel", "kvm", "-cpu", "host"] : ["-accel", "tcg", "-cpu", "max"]));
  args.push("-m", String(jail.memoryMiB), "-smp", String(Math.ceil(jail.cpus)));
  // The serial console on stdout, which the supervisor logs line by line as "<name>: ...".
  args.push("-serial", "stdio");
  args.push("-qmp", `unix:${plain(n, "QMP socket", o.qmp)},server=on,wait=off`);
  args.push("-kernel", plain(n, "kernel", o.kernel), "-initrd", plain(n, "initrd", o.initrd), "-append", vmCmdline(jail, o));
  // discard=unmap: what the guest frees goes back to the pool (the disk file is sparse).
  args.push("-drive", `file=${plain(n, "disk", o.disk)},format=raw,if=none,id=root,discard=unmap`, "-device", "virtio-blk-device,drive=root");
  o.shares.forEach((s, i) => {
    if (!TAG.test(s.tag)) throw new VmJailError(n, `share tag ${JSON.stringify(s.tag)} is not 1-31 of letters, digits, _.-`);
    // mapped-xattr: the guest's owners and modes live in user.virtfs.* xattrs; on the host the
    // files it creates are QEMU's, mode 0600 (directories 0700), so a guest root cannot plant a
    // setuid-root file in the pool (security_model=none/passthrough would set the real bits).
    const ro = s.readOnly ? ",readonly=on" : "";
    args.push("-fsdev", `local,id=fs${i},path=${plain(n, "share source", s.source)},security_model=mapped-xattr${ro}`, "-device", `virtio-9p-device,fsdev=fs${i},mount_tag=${s.tag}`);
  });
  if (o.network) {
    if (!o.tap) throw new VmJailError(n, "a network without a tap device");
    const mac = o.mac ?? vmMac(n);
    if (!MAC.test(mac)) throw new VmJailError(n, `MAC ${JSON.stringify(mac)} is not xx:xx:xx:xx:xx:xx`);
    args.push("-netdev", `tap,id=net0,ifname=${plain(n, "tap", o.tap)},script=no,downscript=no`, "-device", `virtio-net-device,netdev=net0,mac=${mac}`);
  }
  return args;
}

/**
 * KVM when the host can do it, else TCG, with the reason for the log. /dev/kvm alone is not
 * enough: on this build machine (a VM itself) /dev/kvm exists but the CPU shows neither vmx nor
 * svm, and a KVM guest hangs there (DESIGN §3); the flags in /proc/cpuinfo say whether the CPU
 * offers virtualization to this kernel.
 */
export function chooseAccel(sys: Pick<Files, "exists" | "readFile">): { kvm: boolean; why: string } {
  if (!sys.exists("/dev/kvm")) return { kvm: false, why: "TCG (no /dev/kvm)" };
  const flags = /^flags\s*:(.*)$/m.exec(sys.readFile("/proc/cpuinfo") ?? "")?.[1]?.split(/\s+/) ?? [];
  if (!flags.includes("vmx") && !flags.includes("svm")) return { kvm: false, why: "TCG (/dev/kvm exists, but the CPU has neither vmx nor svm: nested virtualization is off)" };
  return { kvm: true, why: "KVM" };
}

/** The jail's shares opened for QEMU; close() once the jail is stopped for good (not between restarts). */
export interface OpenShares {
  shares: VmShare[];
  close(): void;
}

/**
 * The jail's shares (config.ts: a pool subvolume, or a directory in it), each resolved inside
 * the pool with no symlink followed (openat2 RESOLVE_IN_ROOT|NO_SYMLINKS), and handed to QEMU as
 * /proc/<agent>/fd/<fd>: QEMU opens that magic link, which is the directory the agent resolved,
 * not a path resolved again. A jail writes into its shares: a symlink it left there must not
 * export the host's / to the next VM (QEMU's 9p backend follows symlinks in its root path, and
 * a check before a path-based launch would leave a race). A share that is missing or crosses a
 * symlink: one line, the jail not started. The fds stay open while the jail may restart.
 */
export function openVmShares(sys: Pick<Files, "openDirInRoot" | "close"> & Pick<Processes, "pid">, jail: Jail, pool = POOL_MOUNT): OpenShares {
  const fds: number[] = [];
  const close = () => fds.splice(0).forEach((fd) => sys.close(fd));
  try {
    const shares = jail.shares.map((s, i) => {
      const inPool = s.dir ? `${s.subvol}/${s.dir}` : s.subvol;
      let fd: number;
      try {
        fd = sys.openDirInRoot(pool, inPool);
      } catch (e) {
        const errno = (e as { errno?: number }).errno;
        const why = errno === 40 ? "crosses a symlink" : errno === 2 ? "does not exist" : errno === 20 ? "is not a directory" : describe(e);
        throw new VmJailError(jail.name, `share ${inPool} ${why} in the pool`);
      }
      fds.push(fd);
      return { source: `/proc/${sys.pid()}/fd/${fd}`, tag: `share${i}`, path: s.path, readOnly: s.readOnly };
    });
    return { shares, close };
  } catch (e) {
    close();
    throw e;
  }
}

/**
 * The verified image QEMU and the VM kernel + initrd come from (initrd/images.ts,
 * buildVmHostImage), listed in the signed config with `onDemand`: the images stage leaves it
 * alone and whoever starts the first VM jail opens it (stages/images.ts openImage), so hosts
 * without VM jails never read or verify it. Measured: 72 MB (the VM initrd alone is 49 MB,
 * vmlinuz 8 MB, QEMU with its 51 libraries and its TCG module 15 MB) against tools' 13 MB.
 */
export const VM_HOST_IMAGE = "vmhost";

/**
 * vmLauncher's openHost for the real machine: the signed config's vmhost image, opened and
 * verified the first time a VM jail starts (stages/images.ts openImage, every block checked
 * against the root hash in the UKI), then reused. Its lines say what is missing.
 */
export function vmHostOpener(sys: Files & Mounts & Devices & Crypt, log: Logger, config: AgentConfig, esp: EspResult | undefined, allowUnverified: boolean): () => Promise<string> {
  return async () => {
    const image = config.images.find((i) => i.name === VM_HOST_IMAGE);
    if (!image) throw new Error(`the signed config has no ${VM_HOST_IMAGE} image (QEMU and the VM kernel): VM jails cannot run on this build`);
    const mountPoint = `${IMAGES_DIR}/${VM_HOST_IMAGE}`;
    if (sys.mountPoints().includes(mountPoint)) return mountPoint;
    if (!esp) throw new Error(`no boot partition to open the ${VM_HOST_IMAGE} image from`);
    return (await openImage(sys, log, esp, config.esp.dir, image, allowUnverified)).mountPoint;
  };
}

/**
 * Where QEMU and the VM kernel are in the mounted vmhost image. QEMU runs as itself with
 * LD_LIBRARY_PATH (toolExec's way), not through ld.so: it finds its TCG module and its
 * firmware relative to /proc/self/exe, which through ld.so would be ld.so. -L and
 * QEMU_MODULE_DIR say the same explicitly (measured with strace: it opens
 * <exe>/../share/qemu/bios-microvm.bin and <exe>/../lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so).
 * The image's libraries come from the same Debian glibc as the initrd's ld.so.
 */
export function vmHostPaths(root = `${IMAGES_DIR}/${VM_HOST_IMAGE}`): Pick<VmLaunch, "qemu" | "dataDir" | "kernel" | "initrd"> & { env: Record<string, string> } {
  const lib = `${root}/usr/lib/x86_64-linux-gnu`;
  return {
    qemu: [`${root}/usr/bin/qemu-system-x86_64`],
    env: { LD_LIBRARY_PATH: lib, QEMU_MODULE_DIR: `${lib}/qemu` },
    dataDir: `${root}/usr/share/qemu`,
    kernel: `${root}/vm/vmlinuz`,
    initrd: `${root}/vm/initrd.img`,
  };
}

/** What agent/supervise.ts runs: QEMU in the foreground, its console logged as "<jail>: ...", restarted with backoff. */
export function vmService(jail: Jail, o: VmLaunch, env: Record<string, string> = {}): Service {
  return { name: jail.name, argv: vmArgv(jail, o), env };
}

// --- the disk ------------------------------------------------------------------------------

/**
 * VM disks live in the pool, in one subvolume of their own (kept out of the images' and the
 * jails' names): per image, the btrfs image made from its subvolume, kept while the image is
 * the same; per jail, a reflinked copy made at each start (the image stays pristine, like a
 * container's snapshot, and the copy costs no data until the VM writes).
 */
export const VM_DISKS = "@vm-disks";
/**
 * The disk file's size. It is sparse: mkfs.btrfs --rootdir writes only the tree, and the guest's
 * discards give back what it frees, so this is the most a VM can grow to, not what it costs.
 */
export const VM_DISK_MIB = 8192;

export type DiskSys = Pick<Files, "lstat" | "exists" | "mkdirp" | "unlink" | "rename" | "readdir" | "cloneFile"> & Pick<Processes, "run" | "runWithInput">;

export interface DiskTools {
  /** argv prefixes of btrfs and mkfs.btrfs (the tools image's, through toolArgv). */
  btrfs: string[];
  mkfs: string[];
}

/** The image subvolume's UUID (`btrfs subvolume show`): a new import is a new subvolume, so a new UUID. */
function subvolumeUuid(sys: DiskSys, tools: DiskTools, path: string): string {
  const out = sys.run([...tools.btrfs, "subvolume", "show", path]);
  const m = /^\s*UUID:\s*([0-9a-f-]{36})\s*$/m.exec(out);
  if (!m) throw new Error(`btrfs subvolume show ${path}: no UUID in its output`);
  return m[1]!;
}

/**
 * The jail's root disk: the image's btrfs disk (made once per image subvolume, by mkfs.btrfs
 * --rootdir into a temporary name, renamed into place when whole), and a fresh reflinked copy
 * for this start. Returns the copy's path. A failure leaves no partial file behind.
 */
export async function vmDisk(sys: DiskSys, log: Logger, tools: DiskTools, jail: Jail, pool = POOL_MOUNT): Promise<string> {
  const src = `${pool}/${imageSubvolume(jail.image)}`;
  if (sys.lstat(src).kind !== "dir") throw new VmJailError(jail.name, `image ${jail.image}: ${src} does not exist (image import ${jail.image})`);
  const dir = `${pool}/${VM_DISKS}`;
  if (sys.lstat(dir).kind === "missing") sys.run([...tools.btrfs, "subvolume", "create", dir]);
  else if (sys.lstat(dir).kind !== "dir") throw new VmJailError(jail.name, `${dir} is not a directory`);
  const uuid = subvolumeUuid(sys, tools, src);
  const base = `${dir}/img-${jail.image}.${uuid}.img`;
  if (!sys.exists(base)) {
    const tmp = `${base}.tmp`;
    try {
      if (sys.exists(tmp)) sys.unlink(tmp); // a crash's leftover
      // -b: the size of the sparse file it creates; --rootdir writes the tree and nothing else.
      // Run without blocking PID 1's event loop (runWithInput, no input): measured 0.9 s for a
      // 110 MB tree, seconds for a distribution's, while the supervisor and admin socket wait.
      await sys.runWithInput([...tools.mkfs, "-q", "-f", "-L", `initos-${jail.image}`, "--rootdir", src, "-b", `${VM_DISK_MIB}M`, tmp], []);
      sys.rename(tmp, base);
    } catch (e) {
      if (sys.exists(tmp)) sys.unlink(tmp);
      throw new VmJailError(jail.name, `image ${jail.image}: making its VM disk failed: ${describe(e)}`);
    }
    log.info(`jail ${jail.name}: made the VM disk of image ${jail.image} (${uuid})`);
    // Disks of earlier imports of this image are no longer any jail's source.
    for (const f of sys.readdir(dir)) {
      if (f.startsWith(`img-${jail.image}.`) && `${dir}/${f}` !== base) sys.unlink(`${dir}/${f}`);
    }
  }
  const disk = `${dir}/jail-${jail.name}.img`;
  if (sys.exists(disk)) sys.unlink(disk);
  try {
    sys.cloneFile(base, disk);
  } catch (e) {
    if (sys.exists(disk)) sys.unlink(disk);
    throw new VmJailError(jail.name, `copying the VM disk: ${describe(e)}`);
  }
  return disk;
}

// --- stopping ------------------------------------------------------------------------------

/**
 * Asks the VM to power off through QMP: qmp_capabilities (QMP answers nothing else first), then
 * system_powerdown, which presses the ACPI power button. In the guest, vm mode's pod
 * (initrd/pod.c) turns KEY_POWER into SIGTERM for the app and powers off when it exits
 * (test/integration/vm.test.ts shows it); a root's own init (systemd) shuts down. The caller
 * kills QEMU after its own bound if the VM does not go. Resolves true when QEMU accepted the
 * request, false (with the reason logged) when it could not be asked.
 */
export async function powerdownVm(sys: Pick<Sockets, "connectUnix"> & Pick<Clock, "now">, log: Logger, qmpPath: string, timeoutMs: number): Promise<boolean> {
  const deadline = sys.now() + timeoutMs;
  const left = () => Math.max(1, Math.round(deadline - sys.now()));
  let conn;
  try {
    conn = await sys.connectUnix(qmpPath, left());
  } catch (e) {
    log.warn(`qmp ${qmpPath}: ${describe(e)}`);
    return false;
  }
  try {
    /** The next reply (events, which QMP sends unasked, are skipped). */
    const reply = async (what: string): Promise<void> => {
      for (;;) {
        const line = await conn.readLine(left());
        if (line === null) throw new Error(`no answer to ${what}`);
        let msg: unknown;
        try {
          msg = JSON.parse(line);
        } catch {
          throw new Error(`not JSON: ${line.slice(0, 80)}`);
        }
        if (typeof msg !== "object" || msg === null || "event" in msg) continue;
        if ("error" in msg) throw new Error(`${what}: ${JSON.stringify((msg as { error: unknown }).error).slice(0, 200)}`);
        if ("return" in msg) return;
      }
    };
    const greeting = await conn.readLine(left());
    if (greeting === null || !greeting.includes('"QMP"')) throw new Error("no QMP greeting");
    conn.write('{"execute":"qmp_capabilities"}\n');
    await reply("qmp_capabilities");
    conn.write('{"execute":"system_powerdown"}\n');
    await reply("system_powerdown");
    return true;
  } catch (e) {
    log.warn(`qmp ${qmpPath}: ${describe(e)}`);
    return false;
  } finally {
    conn.close();
  }
}

// --- the launcher (run.ts's Launcher for kind "vm") ---------------------------------------

/** Where a VM jail's QMP socket lives (one per jail; QEMU replaces a stale one). */
export const qmpPath = (name: string) => `/run/initos/jails/${name}.qmp`;
/** The tap on the bridge: the same host-side name a container's veth gets (config.ts: "vj-<name>"). */
export const vmTap = (name: string) => `vj-${name}`;
/** How long the power button is pressed before run.ts's stop goes on to SIGTERM (its termMs). */
const QMP_TIMEOUT_MS = 5000;

export type VmLauncherSys = DiskSys & Pick<Files, "openDirInRoot" | "close" | "readFile"> & Pick<Processes, "pid"> & Pick<Sockets, "connectUnix"> & Pick<Clock, "now"> & { net: Pick<NetOps, "tap" | "removeLink"> };

export interface VmLauncherOptions {
  /** The mounted vmhost image's root: opens it on demand (stages/images.ts openImage) and says where. Throws one line. */
  openHost(): Promise<string>;
  tools?: DiskTools;
  pool?: string;
}

/**
 * A VM jail: the vmhost image opened (on the first VM jail), the disk copied from its image,
 * its share opened inside the pool, its tap on the bridge; then QEMU in the foreground, which
 * supervise.ts restarts, and the ACPI power button as the way to ask it to stop.
 */
export function vmLauncher(sys: VmLauncherSys, log: Logger, net: JailNetwork, o: VmLauncherOptions): Launcher {
  const open = new Map<string, OpenShares>();
  const tools = o.tools ?? { btrfs: toolArgv("btrfs"), mkfs: toolArgv("mkfs.btrfs") };
  return {
    async prepare(jail: Jail): Promise<Service> {
      const accel = chooseAccel(sys);
      log.info(`jail ${jail.name}: ${accel.why}`);
      const { env, ...host } = vmHostPaths(await o.openHost());
      const disk = await vmDisk(sys, log, tools, jail, o.pool);
      open.get(jail.name)?.close();
      const shares = openVmShares(sys, jail, o.pool);
      open.set(jail.name, shares);
      sys.net.tap(vmTap(jail.name), net.bridge);
      const qmp = qmpPath(jail.name);
      sys.mkdirp(qmp.slice(0, qmp.lastIndexOf("/")), 0o700);
      const svc = vmService(jail, { ...host, disk, shares: shares.shares, tap: vmTap(jail.name), mac: vmMac(jail.name), network: { gateway: net.address, prefix: net.prefix }, qmp, kvm: accel.kvm }, env);
      return {
        ...svc,
        askStop: async () => {
          if (!(await powerdownVm(sys, log, qmp, QMP_TIMEOUT_MS))) throw new Error(`QMP ${qmp} did not take system_powerdown`);
        },
      };
    },
    async cleanup(jail: Jail): Promise<void> {
      open.get(jail.name)?.close();
      open.delete(jail.name);
      sys.net.removeLink(vmTap(jail.name));
      for (const f of [qmpPath(jail.name), `${o.pool ?? POOL_MOUNT}/${VM_DISKS}/jail-${jail.name}.img`]) if (sys.exists(f)) sys.unlink(f);
    },
  };
}
