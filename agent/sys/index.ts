// The one seam between boot logic and the machine: files, mounts, modules, devices, crypto, the
// network, the TPM, processes, time, the console and the admin socket. Stages take the small
// interfaces below and touch nothing else (no koffi, no node:fs, no child_process, no timers),
// so their decisions are tested with fakes (test/unit/fakesys.ts).
import { chmodSync, closeSync, lchownSync, constants, copyFileSync, existsSync, fstatSync, fsyncSync, ftruncateSync, renameSync, writeSync, lstatSync, mkdirSync, readdirSync, readFileSync, openSync, readlinkSync, readSync, rmdirSync, statSync, symlinkSync, unlinkSync, writeFileSync } from "node:fs";

import { open } from "node:fs/promises";
import type { Kdf, VerityParams } from "./cryptsetup.ts";
import type { TpmDevice } from "./tss.ts";
import { readRegularBeneath } from "./regular.ts";

export { RefusedFile } from "./regular.ts";

/** LUKS2 volumes (libcryptsetup). Keys are bytes; nothing here logs them. */
export interface LuksOps {
  format(device: string, key: Uint8Array, kdf: Kdf): number;
  addKey(device: string, existingKey: Uint8Array, newKey: Uint8Array, kdf: Kdf): number;
  destroySlot(device: string, slot: number): void;
  /**
   * Opens /dev/mapper/<name>, trying only `slot` when given (each slot tried costs its KDF);
   * throws LuksError (errno EPERM: wrong key).
   */
  open(device: string, name: string, key: Uint8Array, flags: number, slot?: number): { path: string; slot: number };
  close(name: string): void;
  /** The header's tokens as JSON text: data to validate, never policy. */
  tokens(device: string): { id: number; json: string }[];
  /** Writes a token (in a free slot unless `id`); returns its id. */
  setToken(device: string, json: string, id?: number): number;
  removeToken(device: string, id: number): void;
  /** The header's JSON metadata (keyslots, segments, ...), as text: data to validate (luks.ts). */
  header(device: string): string;
}

/** Links, addresses and routes over rtnetlink. */
export interface NetOps {
  /** A UDP socket on port `port` bound to the interface (DHCP before there is an address). */
  udp(ifname: string, port: number): import("./udp.ts").UdpSocket;
  linkUp(ifname: string): void;
  addAddress(ifname: string, address: string, prefix: number): void;
  defaultRoute(ifname: string, gateway: string): void;
  /**
   * A DHCP lease's address: the kernel drops it by itself after `seconds` unless it is added
   * again (renewed) before, so nobody keeps an address the server may give to someone else.
   */
  addLeasedAddress(ifname: string, address: string, prefix: number, seconds: number): void;
  // Jail mode (agent/sys/jailnet.ts). Modules "bridge", "veth", "tun" must be loaded first.
  /**
   * Bridge `name` (created, or kept if there) with `address/prefix`, up; and IPv4 forwarding
   * on, since the machine's /24 behind it is routed to the host, not NATed.
   */
  bridge(name: string, address: string, prefix: number): void;
  /**
   * A jail's own network namespace, persisted as a bind mount on `netnsPath` (for crun:
   * linux.namespaces [{ type: "network", path }]): lo up, `jailIf` with `address/prefix`, up,
   * default route via `gateway`; its veth peer `hostIf` in the host's netns, on `bridge`, up.
   * A previous run's netnsPath and hostIf are replaced; on failure nothing is left. Throws
   * NetnsStuckError (fatal for the agent) if the thread could not return to the host's netns.
   */
  jailNetns(o: import("./jailnet.ts").JailNetnsOptions): void;
  /** Unmounts and unlinks `netnsPath`, deletes `hostIf`; missing pieces are fine. */
  removeNetns(netnsPath: string, hostIf: string): void;
  /** A persistent tap `name` (for QEMU's `-netdev tap,ifname=<name>,script=no`), on `bridge`, up. Idempotent. */
  tap(name: string, bridge: string): void;
  /** Deletes a link (RTM_DELLINK); a missing one is fine. */
  removeLink(name: string): void;
}

/** The TPM2, in-process (tpm2-tss's ESYS through koffi): the interface lives with it in tss.ts. */
export type TpmOps = TpmDevice;

/** A partition's entry in its disk's partition table, as libblkid reads it (PART_ENTRY_*). */
export interface PartitionEntry {
  /** PART_ENTRY_UUID, lower case. */
  uuid: string | null;
  /** PART_ENTRY_NAME: the GPT partition name (MBR has none). */
  name: string | null;
}

export type FileKind = "file" | "dir" | "link" | "other" | "missing";
export interface FileInfo {
  kind: FileKind;
  /** Permission bits, e.g. 0o755. */
  mode: number;
  /** st_dev: which filesystem the path is on. */
  dev: number;
  /** The owner (jails shift a rootfs's owners into their id range). */
  uid: number;
  gid: number;
  /** st_ino and st_nlink: a hard-linked file is one inode under several names. */
  ino: number;
  nlink: number;
}

// Small interfaces, one per kind of side effect: a stage takes the intersection of those it
// uses (`sys: Files & Mounts`), so its signature shows what it touches, and a fake needs only
// those. `Sys` is all of them: what the real machine (realSys) and the full fake provide.

/**
 * One open file read at any offset (an update's UKI: its section table and block headers,
 * never the whole file). Every read is of the file as it was opened.
 */
export interface FileReader {
  /** The size when opened. */
  readonly size: number;
  /** Up to `length` bytes at `offset` (fewer only at the end of the file). */
  read(offset: number, length: number): Uint8Array;
  close(): void;
}

/** Files and directories (never a mount). */
export interface Files {
  readFile(path: string): string | null;
  /** A file's bytes (the first `limit` bytes when given, e.g. a disk's head); null if unreadable. */
  readBytes(path: string, limit?: number): Uint8Array | null;
  writeBytes(path: string, data: Uint8Array, mode?: number): void;
  /**
   * A small regular file below `root` that someone less trusted wrote (the pool's host config
   * and key, by the OS's root): null when there is none; throws RefusedFile saying what is
   * there instead (a symlink anywhere on its path, a FIFO, a directory, a device, more than
   * `maxBytes`). Opened once without following links and without blocking, checked by fstat of
   * that fd, read from it (regular.ts): it can neither stall PID 1 nor fill its memory.
   */
  readRegular(root: string, path: string, maxBytes: number): Uint8Array | null;
  copyFile(from: string, to: string): void;
  /**
   * A copy sharing the source's data (FICLONE: a btrfs reflink), which costs nothing until
   * either is written; throws (EXDEV, EOPNOTSUPP) rather than copying the bytes.
   */
  cloneFile(from: string, to: string): void;
  writeFile(path: string, data: string): void;
  exists(path: string): boolean;
  lstat(path: string): FileInfo;
  readlink(path: string): string;
  /** Directory entries; empty when the directory cannot be read. */
  readdir(path: string): string[];
  mkdirp(path: string, mode?: number): void;
  unlink(path: string): void;
  /** Removes an empty directory. */
  rmdir(path: string): void;
  symlink(target: string, path: string): void;
  /** lchown(2): the owner of `path` itself, never of what a symlink points to. */
  lchown(path: string, uid: number, gid: number): void;
  /** chmod(2) of a file or directory (never call it on a symlink: it would follow it). */
  chmod(path: string, mode: number): void;
  /** Opens a file for reads at any offset; throws (with errno) when it cannot be opened. */
  openReader(path: string): FileReader;
  /** A file's bytes in order, `chunk` bytes at a time, from one open (so one version of it). */
  readChunks(path: string, chunk?: number): AsyncIterable<Uint8Array>;
  /**
   * An O_PATH fd for the directory `path` resolved inside `root` as if it were "/" (openat2
   * RESOLVE_IN_ROOT), refusing any symlink on the way (errno ELOOP): what the root's owner wrote
   * cannot lead out of it. Throws with errno (ENOENT, ENOTDIR, ELOOP). Close it with close().
   */
  openDirInRoot(root: string, path: string): number;
  openDir(path: string): number;
  close(fd: number): void;
  /** Deletes everything below `dir` that is on device `dev`, never crossing into other mounts. */
  removeTreeOnDevice(dir: string, dev: number): number;
  /**
   * Writes `data` into a new file (replacing one there) as it comes, then fsyncs it before
   * closing: once this resolves its bytes are on the disk. Resolves with the number of bytes.
   */
  writeStream(path: string, data: AsyncIterable<Uint8Array>, mode?: number): Promise<number>;
  /** rename(2): atomic within one filesystem. */
  rename(from: string, to: string): void;
  /** Swaps two existing names atomically (renameat2 RENAME_EXCHANGE): one filesystem. */
  exchange(a: string, b: string): void;
  /** Creates a named pipe (mknod S_IFIFO), `mode` less the umask. */
  mkfifo(path: string, mode: number): void;
  /** fsync(2) of a file or directory (a directory: the names in it are on the disk). */
  fsyncPath(path: string): void;
  /**
   * Writes `data` with one open (created if missing, never truncated first) and one write(2)
   * from offset 0, as efivarfs requires (a variable is set by a single write of attributes and
   * value; truncating would not change it). A plain file is then cut to `data`'s length.
   * Throws on a short write.
   */
  writeOnce(path: string, data: Uint8Array, mode?: number): void;
  /**
   * Sets or clears the immutable inode flag (FS_IOC_SETFLAGS, FS_IMMUTABLE_FL) of `path`;
   * returns whether it was set. efivarfs makes variables it does not know to be safe to delete
   * immutable: writing or deleting one needs the flag cleared first.
   */
  setImmutable(path: string, on: boolean): boolean;
}

/** The mount table, and this process's root and mount namespace. */
export interface Mounts {
  /** Mount points from /proc/self/mounts. */
  mountPoints(): string[];
  mount(src: string | null, target: string, fstype: string | null, flags: number, data?: string | null): void;
  umount(target: string, flags: number): void;
  /** mount(2) on a worker thread, for mounts that take long; the error names no errno. */
  mountInBackground(src: string | null, target: string, fstype: string | null, flags: number): Promise<void>;
  statfsType(path: string): number;
  /** The devices of the btrfs mounted at `mountPoint`, as the kernel assembled it. */
  btrfsDevices(mountPoint: string): import("./libc.ts").BtrfsDevices;
  chdir(path: string): void;
  chroot(path: string): void;
  pivotRoot(newRoot: string, putOld: string): void;
  /** This process (its calling thread, then whatever it execs) gets its own mount namespace. */
  unshareMountNs(): void;
}

/** Kernel modules (libkmod). */
export interface Modules {
  /** Loads a module (name or alias) with its dependencies: what was inserted, what matched. */
  loadModule(nameOrAlias: string): { modules: string[]; matched: string[] };
  /** loadModule on a worker thread: the kernel's insertion runs on another CPU meanwhile. */
  loadModuleInBackground(nameOrAlias: string): Promise<{ modules: string[]; matched: string[] }>;
  /** Re-reads /lib/modules/<release> after a new tree is mounted there. */
  reloadModuleIndex(): void;
}

/** Devices as they appear: uevents, and what libblkid says about them. */
export interface Devices {
  /** Kernel uevents received since the last call, as key/value maps (ACTION, DEVPATH, MODALIAS, ...). */
  pollUevents(): Record<string, string>[];
  resolveDevice(spec: string): string | null;
  probe(device: string): Record<string, string> | null;
  /** `device`'s partition table entry; null when it is not a partition (or cannot be read yet). */
  partitionEntry(device: string): PartitionEntry | null;
  /** A read-only loop device for an image file (only for images allowed unverified). */
  attachLoop(file: string): string;
  /** st_rdev of a block device node (major/minor as one number); null when it is not one. */
  deviceNumber(path: string): number | null;
}

/** Block-device crypto (libcryptsetup) and key material. */
export interface Crypt {
  /**
   * Checks the hash device's superblock against the pinned `verity` parameters, opens
   * /dev/mapper/<name> and reads every block through it off the event loop (dm-verity proves
   * each). Resolves once all of it verified; otherwise closes it and rejects naming what did not match.
   */
  verityOpen(name: string, data: string, hash: string, rootHash: string, verity: VerityParams): Promise<string>;
  /**
   * The same checks in userspace, with no device opened (an update's image files before they
   * are renamed into place): the superblock against `verity`, then every block against
   * `rootHash`. Rejects naming what did not match. A promise so that it can move off the event
   * loop (koffi's async calls) without changing its callers; today it runs inline.
   */
  verityVerify(data: string, hash: string, rootHash: string, verity: VerityParams): Promise<void>;
  luks: LuksOps;
  randomBytes(n: number): Uint8Array;
}

export interface Net {
  net: NetOps;
}

export interface Tpm {
  /** The TPM on /dev/tpmrm0 (the kernel's resource manager). */
  tpm(): TpmOps;
}

/** A service process (supervise.ts): started in a session of its own, its output by line. */
export interface ServiceProcess {
  /** undefined when it could not be started (exited then says why). */
  readonly pid: number | undefined;
  /** Resolves once it has ended and been reaped: "exited with N", "killed by SIG…", "failed to start: …". */
  readonly exited: Promise<string>;
}

/** Processes: tools, services, signals; this process's identity and power over the machine. */
export interface Processes {
  /** Runs a tool to completion (install mode: sfdisk, mkfs); throws with its stderr on failure. */
  run(argv: readonly string[], input?: Uint8Array): string;
  /**
   * Runs a tool with `input` streamed to its stdin as it comes (never whole in memory); resolves
   * with its stdout, throws with its stderr on failure. `input` is always read to its end, even
   * when the tool stops reading early (the caller may be hashing what it hands over).
   */
  runWithInput(argv: readonly string[], input: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<string>;
  /**
   * Starts a service: its own session (setsid), only `env` in its environment, stdout and
   * stderr handed to `onLine` line by line. Registered with PID 1's reaper as the runtime's.
   */
  spawnService(argv: readonly string[], env: Readonly<Record<string, string>>, onLine: (line: string) => void): ServiceProcess;
  /** Starts a process that nobody waits for, stdio on /dev/null, with its own argv[0]; its pid. */
  spawnDetached(argv: readonly string[], argv0: string): number;
  signal(pid: number, sig: number): void;
  pid(): number;
  execve(path: string, argv: readonly string[], env: readonly string[]): never;
  /**
   * A memfd holding `data` from offset 0, left open across execve (not close-on-exec): state
   * handed to the next program by fd number (systemd's `--deserialize FD`). Its fd.
   */
  inheritableData(name: string, data: string): number;
  /** prctl(PR_SET_DUMPABLE): off, no core dump and no ptrace or /proc/<pid> access without CAP_SYS_PTRACE; execve turns it back on. */
  setDumpable(on: boolean): void;
  /** prctl(PR_GET_DUMPABLE). */
  getDumpable(): boolean;
  sync(): void;
  reboot(cmd: number): void;
}

/** Time: bounds on waits, and work done later. The fake's clock moves only when told to. */
export interface Clock {
  sleep(ms: number): Promise<void>;
  /** Milliseconds on a monotonic clock. */
  now(): number;
  /** Runs `fn` after `ms` (e.g. a power action once its answer went out); the returned function cancels it. */
  after(ms: number, fn: () => void): () => void;
}

/** The console, for humans at the machine. */
export interface Console {
  /** Reads one line from the console; with echo off for secrets. null: no console. */
  readLine(prompt: string, echo: boolean): Promise<string | null>;
  /** Writes to the console only (never kmsg): for what must not be logged, like a new passphrase. */
  toConsole(text: string): void;
}

/** A unix socket answering one line per connection (the admin socket): see ctlsocket.ts. */
export interface LineServer {
  /** Stops accepting; resolves once every open connection has ended. */
  close(): Promise<void>;
}
/** One client connection to a unix socket speaking lines (QMP): see unixclient.ts. */
export interface LineConnection {
  /** The next line without its newline; null at the end of the stream. Rejects after `timeoutMs`. */
  readLine(timeoutMs: number): Promise<string | null>;
  write(text: string): void;
  close(): void;
}
export interface Sockets {
  /** Connects to the unix socket `path`; rejects when nothing answers within `timeoutMs` (the caller names the path). */
  connectUnix(path: string, timeoutMs: number): Promise<LineConnection>;
  /**
   * Listens on `path` (mode 0600, a stale socket file replaced). Each connection sends one
   * line; `answer` gets it (null when it ran past `maxLine` bytes without a newline) and its
   * result is sent back as the reply before the connection is closed. What the client sends
   * after the line (until it half-closes) is `body`, read at most once, by the commands that
   * take one (an update bundle); the others leave it unread.
   */
  serveLines(path: string, maxLine: number, answer: (line: string | null, body: AsyncIterable<Buffer>) => Promise<string>): LineServer;
  /** A TCP connection to a jail's port (over the bridge): the first line it answers; rejects naming why not. */
  tcpProbe(address: string, port: number, timeoutMs: number): Promise<string>;
}

/** An open watchdog device (agent/sys/watchdog.ts): running from the open until disarmed. */
export interface WatchdogHandle {
  /** The device node, e.g. /dev/watchdog0. */
  readonly path: string;
  /** The driver's identity (WDIOC_GETSUPPORT), e.g. "Software Watchdog", "i6300ESB timer". */
  readonly identity: string;
  /** WDIOF_* option bits the driver supports (WDIOF_MAGICCLOSE = 0x100, WDIOF_SETTIMEOUT = 0x80). */
  readonly options: number;
  /** The timeout in seconds as the driver set it (it may round what was asked). */
  readonly timeout: number;
  /** Restarts the countdown (WDIOC_KEEPALIVE). */
  pet(): void;
  /** Seconds left before the reset (WDIOC_GETTIMELEFT); null when the driver cannot tell. */
  timeLeft(): number | null;
  /** Writes the magic 'V' and closes: the driver stops the countdown (unless built nowayout). */
  disarm(): void;
  /** Closes without the magic 'V': the countdown goes on, for whoever opens the device next (the OS's systemd). */
  release(): void;
}

/** Watchdog devices. */
export interface Watchdogs {
  /** Opens `path` (which starts the countdown) and sets its timeout; throws naming the device. */
  openWatchdog(path: string, timeoutSeconds: number): WatchdogHandle;
}

export interface Sys extends Files, Mounts, Modules, Devices, Crypt, Net, Tpm, Processes, Clock, Console, Sockets, Watchdogs {}

function info(path: string): FileInfo {
  try {
    const st = lstatSync(path);
    const kind: FileKind = st.isFile() ? "file" : st.isDirectory() ? "dir" : st.isSymbolicLink() ? "link" : "other";
    return { kind, mode: st.mode & 0o7777, dev: st.dev, uid: st.uid, gid: st.gid, ino: st.ino, nlink: st.nlink };
  } catch {
    return { kind: "missing", mode: 0, dev: -1, uid: -1, gid: -1, ino: 0, nlink: 0 };
  }
}

/** "add@/devices/...\0ACTION=add\0DEVPATH=...\0" → { ACTION: "add", DEVPATH: ... } */
export function parseUevent(datagram: Uint8Array): Record<string, string> | null {
  const parts = Buffer.from(datagram).toString("latin1").split("\0");
  if (!parts[0]?.includes("@")) return null; // libudev's re-broadcasts start with "libudev"
  const out: Record<string, string> = {};
  for (const p of parts.slice(1)) {
    const eq = p.indexOf("=");
    if (eq > 0) out[p.slice(0, eq)] = p.slice(eq + 1);
  }
  return out;
}

function removeTreeOnDevice(dir: string, dev: number): number {
  let removed = 0;
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return 0;
  }
  for (const name of names) {
    const p = `${dir}/${name}`;
    const st = info(p);
    // A different st_dev is another mount (the moved /dev, a leftover bind): never cross it.
    if (st.dev !== dev) continue;
    try {
      if (st.kind === "dir") {
        removed += removeTreeOnDevice(p, dev);
        rmdirSync(p);
      } else {
        unlinkSync(p);
      }
      removed++;
    } catch {
      // Best effort: a file we cannot delete only costs memory, not correctness.
    }
  }
  return removed;
}

/** One open, then sequential reads into a fresh buffer each (a consumer may still hold the last). */
/** See Files.openReader (exported for the build, which reads UKIs as the agent does). */
export function openReader(path: string): FileReader {
  const fd = openSync(path, "r");
  return {
    size: fstatSync(fd).size,
    read: (offset, length) => {
      const buf = Buffer.alloc(length);
      let got = 0;
      while (got < length) {
        const n = readSync(fd, buf, got, length - got, offset + got);
        if (n === 0) break;
        got += n;
      }
      return buf.subarray(0, got);
    },
    close: () => closeSync(fd),
  };
}

async function writeStream(path: string, data: AsyncIterable<Uint8Array>, mode = 0o600): Promise<number> {
  const f = await open(path, "w", mode);
  let n = 0;
  try {
    for await (const chunk of data) {
      let off = 0;
      while (off < chunk.length) off += (await f.write(chunk, off, chunk.length - off)).bytesWritten;
      n += chunk.length;
    }
    await f.sync();
  } finally {
    await f.close();
  }
  return n;
}

function fsyncPath(path: string): void {
  const fd = openSync(path, constants.O_RDONLY);
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

export async function* readChunks(path: string, chunk = 1 << 20): AsyncGenerator<Uint8Array> {
  const f = await open(path, "r");
  try {
    for (;;) {
      const buf = Buffer.alloc(chunk);
      const { bytesRead } = await f.read(buf, 0, chunk, null);
      if (bytesRead === 0) return;
      yield buf.subarray(0, bytesRead);
    }
  } finally {
    await f.close();
  }
}

/**
 * An RTM_NEWADDR request with IFA_CACHEINFO appended: valid and preferred for `seconds`, after
 * which the kernel removes the address. Re-sending it (NLM_F_REPLACE) extends the lifetime.
 */
export function withLifetime(newaddr: Buffer, seconds: number): Buffer {
  const IFA_CACHEINFO = 6;
  const secs = Math.max(1, Math.min(0xfffffffe, Math.floor(seconds))); // 0 is refused, ~0 means forever
  const info = Buffer.alloc(16); // struct ifa_cacheinfo: ifa_prefered, ifa_valid, cstamp, tstamp
  info.writeUInt32LE(secs, 0);
  info.writeUInt32LE(secs, 4);
  const attr = Buffer.alloc(20); // rtattr header + payload, already a multiple of 4
  attr.writeUInt16LE(20, 0);
  attr.writeUInt16LE(IFA_CACHEINFO, 2);
  info.copy(attr, 4);
  const out = Buffer.concat([newaddr, attr]);
  out.writeUInt32LE(out.length, 0); // nlmsg_len covers the new attribute
  return out;
}

type Libc = typeof import("./libc.ts");

function realFiles(libc: Libc): Files {
  return {
    readFile: (p) => {
      try {
        return readFileSync(p, "utf8");
      } catch {
        return null;
      }
    },
    readBytes: (p, limit) => {
      try {
        if (limit === undefined) return readFileSync(p);
        const fd = openSync(p, "r");
        try {
          const buf = Buffer.alloc(limit);
          return buf.subarray(0, readSync(fd, buf, 0, limit, 0));
        } finally {
          closeSync(fd);
        }
      } catch {
        return null;
      }
    },
    writeFile: (p, d) => writeFileSync(p, d),
    writeBytes: (p, d, mode = 0o600) => writeFileSync(p, d, { mode }),
    readRegular: (root, path, max) => readRegularBeneath(libc.openBeneath, root, path, max),
    copyFile: (a, b) => copyFileSync(a, b),
    cloneFile: (a, b) => copyFileSync(a, b, constants.COPYFILE_FICLONE_FORCE),
    exists: (p) => existsSync(p),
    lstat: info,
    readlink: (p) => readlinkSync(p),
    readdir: (p) => {
      try {
        return readdirSync(p);
      } catch {
        return [];
      }
    },
    mkdirp: (p, mode = 0o755) => void mkdirSync(p, { recursive: true, mode }),
    unlink: (p) => unlinkSync(p),
    rmdir: (p) => rmdirSync(p),
    symlink: (t, p) => symlinkSync(t, p),
    lchown: (p, u, g) => lchownSync(p, u, g),
    chmod: (p, m) => chmodSync(p, m),
    readChunks: (path, chunk) => readChunks(path, chunk),
    openReader,
    openDirInRoot: (root, path) => libc.openDirInRoot(root, path),
    openDir: (p) => openSync(p, constants.O_RDONLY | constants.O_DIRECTORY),
    close: (fd) => closeSync(fd),
    removeTreeOnDevice,
    writeStream,
    rename: (from, to) => renameSync(from, to),
    exchange: (a, b) => libc.renameExchange(a, b),
    mkfifo: (p, mode) => libc.mkfifo(p, mode),
    fsyncPath,
    writeOnce: (p, d, mode = 0o644) => {
      const fd = openSync(p, constants.O_WRONLY | constants.O_CREAT, mode);
      try {
        const n = writeSync(fd, d, 0, d.length, 0);
        if (n !== d.length) throw new Error(`write ${p}: ${n} of ${d.length} bytes written`);
        if (fstatSync(fd).size > d.length) ftruncateSync(fd, d.length);
      } finally {
        closeSync(fd);
      }
    },
    setImmutable: (p, on) => libc.setImmutable(p, on),
  };
}

function realMounts(libc: Libc): Mounts {
  return {
    mountPoints: () =>
      readFileSync("/proc/self/mounts", "utf8")
        .split("\n")
        .filter(Boolean)
        .map((l) => l.split(" ")[1]!.replace(/\\040/g, " ")),
    mount: (s, t, f, fl, d = null) => libc.mount(s, t, f, fl, d),
    umount: (t, fl) => libc.umount2(t, fl),
    mountInBackground: (s, t, f, fl) => libc.mountAsync(s, t, f, fl),
    statfsType: (p) => libc.statfsType(p),
    btrfsDevices: (p) => libc.btrfsDevices(p),
    chdir: (p) => libc.chdir(p),
    chroot: (p) => libc.chroot(p),
    pivotRoot: (n, o) => libc.pivotRoot(n, o),
    unshareMountNs: () => libc.unshare(libc.CLONE_NEWNS),
  };
}

function realDevices(libc: Libc, blkid: typeof import("./blkid.ts")): Devices {
  let ueventFd: number | undefined;
  return {
    pollUevents: () => {
      ueventFd ??= libc.openUevents();
      return libc
        .recvAll(ueventFd)
        .map(parseUevent)
        .filter((e): e is Record<string, string> => e !== null);
    },
    resolveDevice: (s) => blkid.resolveSpec(s),
    probe: (d) => blkid.probe(d),
    partitionEntry: (d) => blkid.partitionEntry(d),
    attachLoop: (f) => libc.attachLoop(f),
    deviceNumber: (p) => {
      try {
        const st = statSync(p);
        return st.isBlockDevice() ? st.rdev : null;
      } catch {
        return null;
      }
    },
  };
}

function realCrypt(cryptsetup: typeof import("./cryptsetup.ts"), randomBytes: (n: number) => Uint8Array): Crypt {
  return {
    verityOpen: (n, d, h, r, v) => cryptsetup.verityOpenChecked(n, d, h, r, v),
    verityVerify: async (d, h, r, v) => cryptsetup.verityVerify(d, h, r, v),
    luks: {
      format: cryptsetup.luksFormat,
      addKey: cryptsetup.luksAddKey,
      destroySlot: cryptsetup.luksDestroySlot,
      open: cryptsetup.luksOpen,
      close: cryptsetup.luksClose,
      tokens: cryptsetup.luksTokens,
      setToken: cryptsetup.luksSetToken,
      removeToken: cryptsetup.luksRemoveToken,
      header: cryptsetup.luksHeader,
    },
    randomBytes,
  };
}

function realNet(nl: typeof import("./netlink.ts"), udp: typeof import("./udp.ts"), jn: typeof import("./jailnet.ts")): Net {
  return {
    net: {
      udp: (n, p) => udp.udpOnDevice(n, p),
      linkUp: (n) => nl.rtnetlink([{ what: `link ${n} up`, build: (s) => nl.linkUpMsg(nl.ifIndex(n), s) }]),
      addAddress: (n, a, p) => nl.rtnetlink([{ what: `address ${a}/${p} on ${n}`, build: (s) => nl.addrAddMsg(nl.ifIndex(n), a, p, s) }]),
      defaultRoute: (n, g) => nl.rtnetlink([{ what: `default route via ${g}`, build: (s) => nl.defaultRouteMsg(nl.ifIndex(n), g, s) }]),
      addLeasedAddress: (n, a, p, secs) => nl.rtnetlink([{ what: `address ${a}/${p} on ${n} for ${secs}s`, build: (s) => withLifetime(nl.addrAddMsg(nl.ifIndex(n), a, p, s), secs) }]),
      bridge: jn.bridge,
      jailNetns: jn.jailNetns,
      removeNetns: jn.removeNetns,
      tap: jn.tap,
      removeLink: jn.removeLink,
    },
  };
}

function realProcesses(libc: Libc, cp: typeof import("node:child_process"), spawning: typeof import("./spawn.ts")): Processes {
  return {
    run: (argv, input) => {
      const [cmd, ...args] = argv;
      const r = cp.spawnSync(cmd!, args, { input, encoding: "utf8" });
      if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
      if (r.status !== 0) throw new Error(`${argv.join(" ")}: ${(r.stderr || r.stdout).trim().split("\n").at(-1) ?? `exit ${r.status}`}`);
      return r.stdout;
    },
    runWithInput: (argv, input) => spawning.runWithInput(cp.spawn, argv, input),
    spawnService: (argv, env, onLine) => spawning.spawnService(cp.spawn, argv, env, onLine),
    spawnDetached: (argv, argv0) => {
      const child = Bun.spawn([...argv], { argv0, stdio: ["ignore", "ignore", "ignore"] });
      child.unref();
      return child.pid;
    },
    signal: (pid, sig) => libc.kill(pid, sig),
    pid: () => libc.getpid(),
    execve: (p, a, e) => libc.execve(p, a, e),
    inheritableData: (n, d) => libc.memfdWith(n, Buffer.from(d, "utf8")),
    setDumpable: (on) => libc.setDumpable(on),
    getDumpable: () => libc.getDumpable(),
    sync: () => libc.sync(),
    reboot: (c) => libc.reboot(c),
  };
}

const realClock: Clock = {
  sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
  now: () => performance.now(),
  after: (ms, fn) => {
    const t = setTimeout(fn, ms);
    return () => clearTimeout(t);
  },
};

function realConsole(libc: Libc): Console {
  return {
    readLine: (prompt, echo) => libc.readConsoleLine(prompt, echo),
    toConsole: (t) => {
      try {
        writeSync(1, t);
      } catch {
        // no console: nothing to show it on
      }
    },
  };
}

/** The real machine. Loaded lazily so unit tests of boot logic never load C libraries. */
export async function realSys(): Promise<Sys> {
  const libc = await import("./libc.ts");
  const tss = await import("./tss.ts");
  const { randomBytes } = await import("node:crypto");
  const { serveLines, tcpProbe } = await import("./ctlsocket.ts");
  return {
    ...realFiles(libc),
    ...realMounts(libc),
    ...(await import("./kmod.ts").then((kmod): Modules => ({ loadModule: (m) => kmod.loadModule(m), loadModuleInBackground: (m) => kmod.loadModuleAsync(m), reloadModuleIndex: () => kmod.resetModuleIndex() }))),
    ...realDevices(libc, await import("./blkid.ts")),
    ...realCrypt(await import("./cryptsetup.ts"), randomBytes),
    ...realNet(await import("./netlink.ts"), await import("./udp.ts"), await import("./jailnet.ts")),
    tpm: () => tss.openTpm(),
    ...realProcesses(libc, await import("node:child_process"), await import("./spawn.ts")),
    ...realClock,
    ...realConsole(libc),
    serveLines,
    tcpProbe,
    connectUnix: (await import("./unixclient.ts")).connectUnix,
    openWatchdog: (await import("./watchdog.ts")).openWatchdog,
  };
}
