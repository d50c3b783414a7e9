// Thin bindings to the libc calls the agent needs as PID 1. Each wrapper throws a SysError
// naming the call and its arguments; nothing here decides policy.
import { closeSync, openSync, read, writeSync } from "node:fs";
import { check, type CLong, errno, load, type Library, type Ptr, SysError, type VarArgs } from "./ffi.ts";

export { FS_MAGIC, MNT_DETACH, MS, RB } from "./consts.ts";

const libc = load("libc.so.6");

// `_Out_ int *` takes a one-element array koffi writes back into; fixed-size C buffers
// (struct statfs, termios, sockaddr) are Uint8Arrays the caller lays out.
const c = {
  mount: libc.fn<(src: string | null, target: string, fstype: string | null, flags: number, data: string | null) => number>(
    "int mount(const char *src, const char *target, const char *fstype, unsigned long flags, const char *data)",
  ),
  umount2: libc.fn<(target: string, flags: number) => number>("int umount2(const char *target, int flags)"),
  chroot: libc.fn<(path: string) => number>("int chroot(const char *path)"),
  chdir: libc.fn<(path: string) => number>("int chdir(const char *path)"),
  syscall: libc.fn<(number: number, ...args: VarArgs) => CLong>("long syscall(long number, ...)"),
  statfs: libc.fn<(path: string, buf: Uint8Array) => number>("int statfs(const char *path, _Out_ uint8_t *buf)"),
  reboot: libc.fn<(cmd: number) => number>("int reboot(int cmd)"),
  sync: libc.fn<() => void>("void sync(void)"),
  wait4: libc.fn<(pid: number, status: [number], options: number, rusage: null) => number>("int wait4(int pid, _Out_ int *status, int options, void *rusage)"),
  kill: libc.fn<(pid: number, sig: number) => number>("int kill(int pid, int sig)"),
  unshare: libc.fn<(flags: number) => number>("int unshare(int flags)"),
  setns: libc.fn<(fd: number, nstype: number) => number>("int setns(int fd, int nstype)"),
  execve: libc.fn<(path: string, argv: (string | null)[], envp: (string | null)[]) => number>("int execve(const char *path, const char **argv, const char **envp)"),
  sigprocmask: libc.fn<(how: number, set: Uint8Array, old: null) => number>("int sigprocmask(int how, const uint8_t *set, void *old)"),
  signal: libc.fn<(sig: number, handler: null) => Ptr<"sighandler"> | null>("void *signal(int sig, void *handler)"),
  getpid: libc.fn<() => number>("int getpid(void)"),
  setenv: libc.fn<(name: string, value: string, overwrite: number) => number>("int setenv(const char *name, const char *value, int overwrite)"),
  pipe2: libc.fn<(fds: Int32Array, flags: number) => number>("int pipe2(_Out_ int *fds, int flags)"),
  socket: libc.fn<(domain: number, type: number, protocol: number) => number>("int socket(int domain, int type, int protocol)"),
  bind: libc.fn<(fd: number, addr: Uint8Array, len: number) => number>("int bind(int fd, const uint8_t *addr, uint32_t len)"),
  recv: libc.fn<(fd: number, buf: Uint8Array, len: number, flags: number) => CLong>("long recv(int fd, _Out_ uint8_t *buf, size_t len, int flags)"),
  send: libc.fn<(fd: number, buf: Uint8Array, len: number, flags: number) => CLong>("long send(int fd, const uint8_t *buf, size_t len, int flags)"),
  sendto: libc.fn<(fd: number, buf: Uint8Array, len: number, flags: number, addr: Uint8Array, alen: number) => CLong>(
    "long sendto(int fd, const uint8_t *buf, size_t len, int flags, const uint8_t *addr, uint32_t alen)",
  ),
  setsockopt: libc.fn<(fd: number, level: number, name: number, value: Uint8Array, len: number) => number>(
    "int setsockopt(int fd, int level, int name, const uint8_t *value, uint32_t len)",
  ),
  close: libc.fn<(fd: number) => number>("int close(int fd)"),
  sendfile: libc.fn<(outFd: number, inFd: number, offset: null, count: number) => CLong>("long sendfile(int out_fd, int in_fd, void *offset, size_t count)"),
  ifNameToIndex: libc.fn<(name: string) => number>("unsigned int if_nametoindex(const char *name)"),
  ioctl: libc.fn<(fd: number, request: number, ...args: VarArgs) => number>("int ioctl(int fd, unsigned long request, ...)"),
  tcgetattr: libc.fn<(fd: number, termios: Uint8Array) => number>("int tcgetattr(int fd, _Out_ uint8_t *termios)"),
  tcsetattr: libc.fn<(fd: number, when: number, termios: Uint8Array) => number>("int tcsetattr(int fd, int when, const uint8_t *termios)"),
};

/** The raw calls, for the socket modules next door (netlink, udp) that build on them. */
export const libcCalls = c;

const SYS_pivot_root = 155;
const SYS_openat2 = 437;
const SYS_memfd_create = 319;
const SYS_renameat2 = 316;
/** renameat2(2) flag (linux/fs.h): swap the two names, both must exist. */
const RENAME_EXCHANGE = 2;
const S_IFIFO = 0o010000;
const SYS_mknodat = 259;
const WNOHANG = 1;

export function mount(src: string | null, target: string, fstype: string | null, flags: number, data: string | null = null): void {
  check("mount", [src, target, fstype, flags, data], c.mount(src, target, fstype, flags, data));
}

/**
 * mount(2) on koffi's worker thread, so the event loop goes on meanwhile. errno is that
 * thread's and cannot be read here: a failure only says which mount failed.
 */
export function mountAsync(src: string | null, target: string, fstype: string | null, flags: number): Promise<void> {
  return new Promise((resolve, reject) => {
    c.mount.async(src, target, fstype, flags, null, (err: unknown, r: number) => {
      if (err) reject(err instanceof Error ? err : new Error(String(err)));
      else if (r < 0) reject(new Error(`mount(${JSON.stringify(src)}, ${JSON.stringify(target)}, ${JSON.stringify(fstype)}) failed`));
      else resolve();
    });
  });
}

/**
 * Reads up to `count` bytes of `fd`, from its position on, into /dev/null with sendfile(2) on
 * koffi's worker thread: the kernel does the reading, nothing is copied to user space, and no
 * JS has to run until it is done, so a busy event loop (a synchronous TPM exchange) does not
 * hold it up. Resolves with the bytes read: short when a read failed after the first byte, 0 at
 * the end, -1 when the first read failed (errno is that thread's and is not known here).
 */
export function drainAsync(fd: number, count: number): Promise<number> {
  const sink = openSync("/dev/null", "w");
  return new Promise<number>((resolve, reject) => {
    c.sendfile.async(sink, fd, null, Math.min(count, 0x7ffff000), (err: unknown, r: CLong) => {
      if (err) reject(err instanceof Error ? err : new Error(String(err)));
      else resolve(Number(r));
    });
  }).finally(() => closeSync(sink));
}

export function umount2(target: string, flags: number): void {
  check("umount2", [target, flags], c.umount2(target, flags));
}

export function chroot(path: string): void {
  check("chroot", [path], c.chroot(path));
}

export function chdir(path: string): void {
  check("chdir", [path], c.chdir(path));
}

export function pivotRoot(newRoot: string, putOld: string): void {
  check("pivot_root", [newRoot, putOld], Number(c.syscall(SYS_pivot_root, "const char *", newRoot, "const char *", putOld)));
}

/**
 * Swaps two names atomically (renameat2 RENAME_EXCHANGE, Linux 3.15+; btrfs has it): whoever
 * looks sees one or the other, never neither. Both must exist on one filesystem.
 */
export function renameExchange(a: string, b: string): void {
  check("renameat2", [a, b, "RENAME_EXCHANGE"], Number(c.syscall(SYS_renameat2, "int", AT_FDCWD, "const char *", a, "int", AT_FDCWD, "const char *", b, "unsigned int", RENAME_EXCHANGE)));
}

/** A named pipe (mknodat S_IFIFO): no command needed, and the initrd has no mknod. */
export function mkfifo(path: string, mode: number): void {
  check("mknodat", [path, mode.toString(8)], Number(c.syscall(SYS_mknodat, "int", AT_FDCWD, "const char *", path, "unsigned int", S_IFIFO | (mode & 0o7777), "unsigned int", 0)));
}

export const O_PATH = 0o10000000;
export const O_DIRECTORY = 0o200000;
export const O_CLOEXEC = 0o2000000;
const AT_FDCWD = -100;
/** openat2(2) `resolve` flags (linux/openat2.h). */
export const RESOLVE = { NO_XDEV: 0x01, NO_MAGICLINKS: 0x02, NO_SYMLINKS: 0x04, BENEATH: 0x08, IN_ROOT: 0x10 } as const;

/** openat2(2) (Linux 5.6+): `how` is struct open_how { u64 flags; u64 mode; u64 resolve; }. */
export function openat2(dirfd: number, path: string, flags: number, resolve: number, shown: readonly unknown[] = [dirfd, path]): number {
  const how = new Uint8Array(24);
  const v = new DataView(how.buffer);
  v.setBigUint64(0, BigInt(flags), true);
  v.setBigUint64(16, BigInt(resolve), true);
  return check("openat2", shown, Number(c.syscall(SYS_openat2, "int", dirfd, "const char *", path, "uint8_t *", how, "size_t", how.length)));
}

/**
 * An O_PATH fd for the directory `path` inside `root`, resolved by the kernel as if `root`
 * were "/" (RESOLVE_IN_ROOT: ".." and absolute names cannot leave it) and refusing every
 * symlink on the way (RESOLVE_NO_SYMLINKS: ELOOP), so what it names is a real directory of
 * that tree. Mount onto /proc/self/fd/<fd> to use exactly what was resolved.
 */
export function openDirInRoot(root: string, path: string): number {
  const flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
  const rootFd = openat2(AT_FDCWD, root, flags, 0, [root]);
  try {
    return openat2(rootFd, path, flags, RESOLVE.IN_ROOT | RESOLVE.NO_SYMLINKS | RESOLVE.NO_MAGICLINKS, [root, path]);
  } finally {
    c.close(rootFd);
  }
}

/**
 * An fd for `path` below the directory `root`, opened with `flags`: the kernel resolves it
 * beneath `root` (RESOLVE_BENEATH: ".." and absolute names that would leave it fail with
 * EXDEV) and refuses every symlink on the way, the last one too (RESOLVE_NO_SYMLINKS, and
 * O_NOFOLLOW if given: ELOOP). Close it with close().
 */
export function openBeneath(root: string, path: string, flags: number): number {
  const rootFd = openat2(AT_FDCWD, root, O_PATH | O_DIRECTORY | O_CLOEXEC, 0, [root]);
  try {
    return openat2(rootFd, path, flags, RESOLVE.BENEATH | RESOLVE.NO_SYMLINKS | RESOLVE.NO_MAGICLINKS, [root, path]);
  } finally {
    c.close(rootFd);
  }
}

/** The filesystem magic of the filesystem holding `path` (statfs f_type). */
export function statfsType(path: string): number {
  const buf = new Uint8Array(120); // sizeof(struct statfs) on x86_64
  check("statfs", [path], c.statfs(path, buf));
  return new DataView(buf.buffer).getUint32(0, true); // f_type is the first (long) field
}

export const CLONE_NEWNS = 0x00020000;
export const CLONE_NEWNET = 0x40000000;

export function unshare(flags: number): void {
  check("unshare", [flags.toString(16)], c.unshare(flags));
}

/** setns(2): the calling thread (only it) joins the namespace open on `fd`. */
export function setns(fd: number, nstype: number, shown: string): void {
  check("setns", [shown, nstype.toString(16)], c.setns(fd, nstype));
}

/**
 * Makes (or reopens) the tap device `name` and marks it persistent, so it outlives this open:
 * QEMU opens it later by name (`-netdev tap,ifname=<name>`). IFF_NO_PI: frames without the
 * 4-byte packet-information header, as QEMU expects them. An existing tap of that name is
 * reused (the ioctl attaches to it); a non-tap link of that name is refused (EINVAL), and one a
 * running VM still holds gives EBUSY.
 */
export function persistentTap(name: string): void {
  const TUNSETIFF = 0x400454ca; // _IOW('T', 202, int)
  const TUNSETPERSIST = 0x400454cb; // _IOW('T', 203, int)
  const IFF_TAP = 0x0002;
  const IFF_NO_PI = 0x1000;
  const ifr = new Uint8Array(40); // struct ifreq: ifr_name[16], then the union (ifr_flags, a short)
  const nameBytes = Buffer.from(name);
  if (nameBytes.length < 1 || nameBytes.length > 15) throw new Error(`not an interface name: ${JSON.stringify(name)}`);
  ifr.set(nameBytes, 0);
  new DataView(ifr.buffer).setUint16(16, IFF_TAP | IFF_NO_PI, true);
  const fd = openSync("/dev/net/tun", "r+"); // ENOENT here: the tun module is not loaded
  try {
    check("ioctl", ["/dev/net/tun", "TUNSETIFF", name], c.ioctl(fd, TUNSETIFF, "uint8_t *", ifr));
    check("ioctl", ["/dev/net/tun", "TUNSETPERSIST", name], c.ioctl(fd, TUNSETPERSIST, "unsigned long", 1));
  } finally {
    closeSync(fd);
  }
}

export function reboot(cmd: number): void {
  check("reboot", [cmd.toString(16)], c.reboot(cmd));
}

export function sync(): void {
  c.sync();
}

/**
 * Sets `name` in the C environment, the one getenv(3) in a loaded library reads, unless it is
 * set already. Not process.env: under Bun that is not this environment (measured: getenv saw
 * nothing after an assignment to process.env).
 */
export function setenvDefault(name: string, value: string): void {
  check("setenv", [name, value], c.setenv(name, value, 0));
}

export function getpid(): number {
  return c.getpid();
}

/** Reaps `pid` if it has exited; returns true when it was reaped. */
export function reapIfExited(pid: number): boolean {
  const status: [number] = [0];
  const r = c.wait4(pid, status, WNOHANG, null);
  if (r < 0) return false; // ECHILD: not ours, or already reaped by someone else
  return r === pid;
}

const loaded: Library[] = [];

/** A close-on-exec pipe: [readFd, writeFd]. */
export function pipe(): [number, number] {
  const O_CLOEXEC = 0o2000000;
  const fds = new Int32Array(2);
  check("pipe2", [], c.pipe2(fds, O_CLOEXEC));
  return [fds[0]!, fds[1]!];
}

/**
 * Relays `sig`, when sent by another process, as one byte per signal to the returned fd.
 * Needs the small C handler in sigrelay.so: for signals the runtime owns (SIGPWR is
 * JavaScriptCore's thread-suspend signal) there is no other way to see them. See sigrelay.c.
 */
export function relaySignal(sig: number, sigrelayLib: string): number {
  // Kept for the life of the process: if the handle were collected, koffi could unload the
  // library and the installed handler would point into unmapped memory.
  const lib = load(sigrelayLib);
  loaded.push(lib);
  const relay = lib.fn<(sig: number, fd: number) => number>("int initos_relay_signal(int sig, int fd)");
  const [r, w] = pipe();
  const err = relay(sig, w);
  if (err < 0) throw new SysError("initos_relay_signal", [sig], -err);
  return r;
}

/**
 * A non-blocking netlink socket subscribed to kernel uevents (the stream udev listens to):
 * devices that appear after boot, with their MODALIAS for module loading.
 */
export function openUevents(): number {
  const AF_NETLINK = 16;
  const SOCK_DGRAM = 2;
  const SOCK_NONBLOCK = 0o4000;
  const SOCK_CLOEXEC = 0o2000000;
  const NETLINK_KOBJECT_UEVENT = 15;
  const fd = check("socket", ["AF_NETLINK", "NETLINK_KOBJECT_UEVENT"], c.socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT));
  const addr = new Uint8Array(12); // struct sockaddr_nl
  const v = new DataView(addr.buffer);
  v.setUint16(0, AF_NETLINK, true);
  v.setUint32(8, 1, true); // nl_groups: 1 = kernel events
  check("bind", [fd, "sockaddr_nl"], c.bind(fd, addr, addr.length));
  return fd;
}

/** All datagrams waiting on `fd`, without blocking. */
export function recvAll(fd: number): Uint8Array[] {
  const MSG_DONTWAIT = 0x40;
  const out: Uint8Array[] = [];
  for (;;) {
    const buf = new Uint8Array(8192);
    const n = Number(c.recv(fd, buf, buf.length, MSG_DONTWAIT));
    if (n <= 0) return out; // EAGAIN: drained
    out.push(buf.subarray(0, n));
  }
}

/**
 * Attaches `file` read-only to a free loop device (LOOP_CONFIGURE, Linux 5.8+). No autoclear:
 * that would detach it as soon as we close our fd, before the caller can mount it.
 */
export function attachLoop(file: string): string {
  const LOOP_CTL_GET_FREE = 0x4c82;
  const LOOP_CONFIGURE = 0x4c0a;
  const LO_FLAGS_READ_ONLY = 1;
  const ctl = openSync("/dev/loop-control", "r+");
  let n: number;
  try {
    n = check("ioctl", ["/dev/loop-control", "LOOP_CTL_GET_FREE"], c.ioctl(ctl, LOOP_CTL_GET_FREE));
  } finally {
    closeSync(ctl);
  }
  const dev = `/dev/loop${n}`;
  const backing = openSync(file, "r");
  const loop = openSync(dev, "r");
  try {
    const cfg = new Uint8Array(304); // struct loop_config
    const v = new DataView(cfg.buffer);
    v.setUint32(0, backing, true);
    v.setUint32(8 + 52, LO_FLAGS_READ_ONLY, true); // info.lo_flags
    check("ioctl", [dev, "LOOP_CONFIGURE", file], c.ioctl(loop, LOOP_CONFIGURE, "uint8_t *", cfg));
  } finally {
    closeSync(loop);
    closeSync(backing);
  }
  return dev;
}

export function kill(pid: number, sig: number): void {
  check("kill", [pid, sig], c.kill(pid, sig));
}

/**
 * A memfd with `data` at offset 0 and without MFD_CLOEXEC, so it survives execve: the one fd
 * the agent means the next program to inherit (everything the runtime opens is close-on-exec).
 */
export function memfdWith(name: string, data: Uint8Array): number {
  const fd = check("memfd_create", [name], Number(c.syscall(SYS_memfd_create, "const char *", name, "unsigned int", 0)));
  writeSync(fd, data, 0, data.length, 0); // pwrite: the offset stays at 0, where the reader starts
  return fd;
}

/**
 * Replaces this process. Before exec the signal mask is cleared and SIGPIPE reset, because both
 * survive execve and the runtime may have changed them; the next init must start clean.
 */
export function execve(path: string, argv: readonly string[], envp: readonly string[]): never {
  const SIG_SETMASK = 2;
  const SIGPIPE = 13;
  c.sigprocmask(SIG_SETMASK, new Uint8Array(128), null);
  c.signal(SIGPIPE, null);
  c.execve(path, [...argv, null], [...envp, null]);
  throw new SysError("execve", [path, ...argv], errno());
}

/**
 * Prompts on the console (fd 1) and reads one line from fd 0, with the tty's echo off when
 * `echo` is false (for passphrases). Resolves null when fd 0 is not readable (no console).
 */
export function readConsoleLine(prompt: string, echo: boolean): Promise<string | null> {
  const ECHO = 0o10;
  const TCSANOW = 0;
  const saved = new Uint8Array(60); // struct termios
  const isTty = c.tcgetattr(0, saved) === 0;
  if (isTty && !echo) {
    const quiet = saved.slice();
    const v = new DataView(quiet.buffer);
    v.setUint32(12, v.getUint32(12, true) & ~ECHO, true); // c_lflag
    c.tcsetattr(0, TCSANOW, quiet);
  }
  try {
    writeSync(1, prompt);
  } catch {
    // the prompt is a courtesy; the read below decides
  }
  return new Promise((resolve) => {
    const buf = Buffer.alloc(512);
    let line = "";
    const done = (v: string | null) => {
      if (isTty && !echo) {
        c.tcsetattr(0, TCSANOW, saved);
        try {
          writeSync(1, "\n"); // the newline the user typed was not echoed
        } catch {
          // ignore
        }
      }
      buf.fill(0);
      resolve(v);
    };
    const next = () =>
      read(0, buf, 0, buf.length, null, (err, n) => {
        if (err || n === 0) return done(line ? line : null);
        line += buf.subarray(0, n).toString("utf8");
        const end = line.search(/[\r\n]/);
        if (end >= 0) return done(line.slice(0, end));
        next();
      });
    next();
  });
}

// prctl(2) is variadic in glibc's header; declared so, koffi passes the extra arguments the way
// a C caller would.
const prctl = libc.fn<(option: number, ...args: VarArgs) => number>("int prctl(int option, ...)");
const PR_GET_DUMPABLE = 3;
const PR_SET_DUMPABLE = 4;

/**
 * PR_SET_DUMPABLE: a non-dumpable process leaves no core dump (the OS's core_pattern handler
 * would get its memory) and same-uid processes without CAP_SYS_PTRACE can no longer ptrace it
 * or open its /proc/<pid>/{mem,environ,root,fd}. execve resets it: set it again after each exec.
 */
export function setDumpable(on: boolean): void {
  check("prctl", ["PR_SET_DUMPABLE", on ? 1 : 0], prctl(PR_SET_DUMPABLE, "unsigned long", on ? 1 : 0));
}

export function getDumpable(): boolean {
  return check("prctl", ["PR_GET_DUMPABLE"], prctl(PR_GET_DUMPABLE)) === 1;
}

// inode flags (linux/fs.h). The ioctl numbers say `long` (_IOR('f', 1, long) = 0x80086601),
// but the kernel reads and writes an int: a 4-byte buffer is what it fills (measured on ext4
// and efivarfs, x86_64).
const FS_IOC_GETFLAGS = 0x80086601;
const FS_IOC_SETFLAGS = 0x40086602;
const FS_IMMUTABLE_FL = 0x00000010;

/**
 * Sets or clears FS_IMMUTABLE_FL on `path` (efivarfs marks variables that are not known to be
 * safe to delete immutable: writing or deleting one needs it cleared first). Returns whether it
 * was set before. Other flags are left as they are.
 */
export function setImmutable(path: string, on: boolean): boolean {
  const fd = openSync(path, "r");
  try {
    const flags = new Uint8Array(4);
    check("ioctl", [path, "FS_IOC_GETFLAGS"], c.ioctl(fd, FS_IOC_GETFLAGS, "uint8_t *", flags));
    const v = new DataView(flags.buffer);
    const before = v.getUint32(0, true);
    const was = (before & FS_IMMUTABLE_FL) !== 0;
    if (was !== on) {
      v.setUint32(0, on ? before | FS_IMMUTABLE_FL : before & ~FS_IMMUTABLE_FL, true);
      check("ioctl", [path, "FS_IOC_SETFLAGS", on ? "+i" : "-i"], c.ioctl(fd, FS_IOC_SETFLAGS, "uint8_t *", flags));
    }
    return was;
  } finally {
    closeSync(fd);
  }
}

// btrfs's view of a mounted filesystem (linux/btrfs.h). struct btrfs_ioctl_fs_info_args is 1024
// bytes (max_id u64 @0, num_devices u64 @8, fsid[16] @16); struct btrfs_ioctl_dev_info_args is
// 4096 (devid u64 @0 in/out, uuid[16] @8, ..., path[1024] @3072). _IOR(0x94, 31, 1024) and
// _IOWR(0x94, 30, 4096).
const BTRFS_IOC_FS_INFO = 0x8400941f;
const BTRFS_IOC_DEV_INFO = 0xd000941e;
const ENODEV = 19;

export interface BtrfsDevices {
  /** The filesystem's UUID (FSID), lower case with dashes, as libblkid prints it. */
  fsid: string;
  numDevices: number;
  /** Every device the kernel has in this filesystem: its devid and the path it was added by. */
  devices: { devid: number; path: string }[];
}

const uuidText = (b: Uint8Array): string => {
  const h = Buffer.from(b).toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
};

/** The devices of the btrfs mounted at `mountPoint`, as the kernel assembled it (FS_INFO, DEV_INFO). */
export function btrfsDevices(mountPoint: string): BtrfsDevices {
  const fd = openSync(mountPoint, "r");
  try {
    const info = new Uint8Array(1024);
    check("ioctl", [mountPoint, "BTRFS_IOC_FS_INFO"], c.ioctl(fd, BTRFS_IOC_FS_INFO, "uint8_t *", info));
    const v = new DataView(info.buffer);
    const maxId = Number(v.getBigUint64(0, true));
    const out: BtrfsDevices = { fsid: uuidText(info.subarray(16, 32)), numDevices: Number(v.getBigUint64(8, true)), devices: [] };
    // devids are 1..max_id with holes where a device was removed; a hole answers ENODEV.
    for (let devid = 1; devid <= maxId && devid <= 1024; devid++) {
      const dev = new Uint8Array(4096);
      new DataView(dev.buffer).setBigUint64(0, BigInt(devid), true);
      if (c.ioctl(fd, BTRFS_IOC_DEV_INFO, "uint8_t *", dev) < 0) {
        if (errno() === ENODEV) continue;
        throw new SysError("ioctl", [mountPoint, "BTRFS_IOC_DEV_INFO", devid], errno());
      }
      const path = dev.subarray(3072);
      const end = path.indexOf(0);
      out.devices.push({ devid, path: Buffer.from(path.subarray(0, end < 0 ? path.length : end)).toString("utf8") });
    }
    return out;
  } finally {
    closeSync(fd);
  }
}
