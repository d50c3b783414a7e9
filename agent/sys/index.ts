// The one seam between boot logic and the machine. Boot stages receive a `Sys` and never touch
// koffi, processes or files directly, so their decisions can be tested with fakes.
import { closeSync, constants, copyFileSync, existsSync, writeSync, lstatSync, mkdirSync, readdirSync, readFileSync, openSync, readlinkSync, readSync, rmdirSync, symlinkSync, unlinkSync, writeFileSync } from "node:fs";

import type { Kdf } from "./cryptsetup.ts";
import type { PolicyStep, Primary } from "./tss.ts";

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
}

/** Links, addresses and routes over rtnetlink. */
export interface NetOps {
  /** A UDP socket on port `port` bound to the interface (DHCP before there is an address). */
  udp(ifname: string, port: number): import("./udp.ts").UdpSocket;
  linkUp(ifname: string): void;
  addAddress(ifname: string, address: string, prefix: number): void;
  defaultRoute(ifname: string, gateway: string): void;
}

/** The TPM2, in-process (tpm2-tss's ESYS through koffi, see tss.ts). */
export interface TpmOps {
  /** sha256 bank values. */
  pcrRead(pcrs: readonly number[]): Map<number, Uint8Array>;
  /** Extends `pcr`'s sha256 bank with a 32-byte digest. */
  extend(pcr: number, digest: Uint8Array): void;
  /** The persistent SRK at 0x81000001, created when absent. */
  ensureSrk(): { created: boolean; name: Uint8Array; serialized: Uint8Array };
  /** Seals `secret` to `policyDigest`; systemd's "tpm2-blob" (TPM2B_PRIVATE then TPM2B_PUBLIC). */
  seal(secret: Uint8Array, policyDigest: Uint8Array, primary: Primary): Uint8Array;
  /** Replays `steps` in a salted policy session and unseals; TpmError on refusal. */
  unseal(blob: Uint8Array, primary: Primary, steps: readonly PolicyStep[], srkSerialized?: Uint8Array): Uint8Array;
  close(): void;
}

export type FileKind = "file" | "dir" | "link" | "other" | "missing";
export interface FileInfo {
  kind: FileKind;
  /** Permission bits, e.g. 0o755. */
  mode: number;
  /** st_dev: which filesystem the path is on. */
  dev: number;
}

export interface Sys {
  readFile(path: string): string | null;
  /** A file's bytes (the first `limit` bytes when given, e.g. a disk's head); null if unreadable. */
  readBytes(path: string, limit?: number): Uint8Array | null;
  writeBytes(path: string, data: Uint8Array, mode?: number): void;
  copyFile(from: string, to: string): void;
  writeFile(path: string, data: string): void;
  exists(path: string): boolean;
  lstat(path: string): FileInfo;
  readlink(path: string): string;
  /** Directory entries; empty when the directory cannot be read. */
  readdir(path: string): string[];
  mkdirp(path: string, mode?: number): void;
  /** Mount points from /proc/self/mounts. */
  mountPoints(): string[];
  mount(src: string | null, target: string, fstype: string | null, flags: number, data?: string | null): void;
  umount(target: string, flags: number): void;
  /** mount(2) on a worker thread, for mounts that take long; the error names no errno. */
  mountInBackground(src: string | null, target: string, fstype: string | null, flags: number): Promise<void>;
  statfsType(path: string): number;
  /** Loads a module (name or alias) with its dependencies: what was inserted, what matched. */
  loadModule(nameOrAlias: string): { modules: string[]; matched: string[] };
  /** Re-reads /lib/modules/<release> after a new tree is mounted there. */
  reloadModuleIndex(): void;
  /** Kernel uevents received since the last call, as key/value maps (ACTION, DEVPATH, MODALIAS, ...). */
  pollUevents(): Record<string, string>[];
  /** Verifies every block, then opens /dev/mapper/<name>. Throws naming what did not match. */
  verityOpen(name: string, data: string, hash: string, rootHash: string): string;
  /** A read-only loop device for an image file (only for images allowed unverified). */
  attachLoop(file: string): string;
  luks: LuksOps;
  net: NetOps;
  /** The TPM on /dev/tpmrm0 (the kernel's resource manager). */
  tpm(): TpmOps;
  /** Runs a tool to completion (install mode: sfdisk, mkfs); throws with its stderr on failure. */
  run(argv: readonly string[], input?: Uint8Array): string;
  /** Reads one line from the console; with echo off for secrets. null: no console. */
  readLine(prompt: string, echo: boolean): Promise<string | null>;
  /** Writes to the console only (never kmsg): for what must not be logged, like a new passphrase. */
  toConsole(text: string): void;
  randomBytes(n: number): Uint8Array;
  resolveDevice(spec: string): string | null;
  probe(device: string): Record<string, string> | null;
  pid(): number;
  sync(): void;
  chdir(path: string): void;
  chroot(path: string): void;
  pivotRoot(newRoot: string, putOld: string): void;
  openDir(path: string): number;
  close(fd: number): void;
  /** Deletes everything below `dir` that is on device `dev`, never crossing into other mounts. */
  removeTreeOnDevice(dir: string, dev: number): number;
  execve(path: string, argv: readonly string[], env: readonly string[]): never;
  unlink(path: string): void;
  symlink(target: string, path: string): void;
  /** This process (its calling thread, then whatever it execs) gets its own mount namespace. */
  unshareMountNs(): void;
  /** Starts a process that nobody waits for, stdio on /dev/null, with its own argv[0]; its pid. */
  spawnDetached(argv: readonly string[], argv0: string): number;
  signal(pid: number, sig: number): void;
  reboot(cmd: number): void;
  sleep(ms: number): Promise<void>;
}

function info(path: string): FileInfo {
  try {
    const st = lstatSync(path);
    const kind: FileKind = st.isFile() ? "file" : st.isDirectory() ? "dir" : st.isSymbolicLink() ? "link" : "other";
    return { kind, mode: st.mode & 0o7777, dev: st.dev };
  } catch {
    return { kind: "missing", mode: 0, dev: -1 };
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

/** The real machine. Loaded lazily so unit tests of boot logic never load C libraries. */
export async function realSys(): Promise<Sys> {
  const libc = await import("./libc.ts");
  const kmod = await import("./kmod.ts");
  const blkid = await import("./blkid.ts");
  const cryptsetup = await import("./cryptsetup.ts");
  const tss = await import("./tss.ts");
  const nl = await import("./netlink.ts");
  const udp = await import("./udp.ts");
  const { spawnSync } = await import("node:child_process");
  const { randomBytes } = await import("node:crypto");
  let ueventFd: number | undefined;
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
    copyFile: (a, b) => copyFileSync(a, b),
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
    mountPoints: () =>
      readFileSync("/proc/self/mounts", "utf8")
        .split("\n")
        .filter(Boolean)
        .map((l) => l.split(" ")[1]!.replace(/\\040/g, " ")),
    mount: (s, t, f, fl, d = null) => libc.mount(s, t, f, fl, d),
    umount: (t, fl) => libc.umount2(t, fl),
    mountInBackground: (s, t, f, fl) => libc.mountAsync(s, t, f, fl),
    statfsType: (p) => libc.statfsType(p),
    loadModule: (m) => kmod.loadModule(m),
    reloadModuleIndex: () => kmod.resetModuleIndex(),
    pollUevents: () => {
      ueventFd ??= libc.openUevents();
      return libc
        .recvAll(ueventFd)
        .map(parseUevent)
        .filter((e): e is Record<string, string> => e !== null);
    },
    verityOpen: (n, d, h, r) => cryptsetup.verityOpen(n, d, h, r, true),
    attachLoop: (f) => libc.attachLoop(f),
    luks: {
      format: cryptsetup.luksFormat,
      addKey: cryptsetup.luksAddKey,
      destroySlot: cryptsetup.luksDestroySlot,
      open: cryptsetup.luksOpen,
      close: cryptsetup.luksClose,
      tokens: cryptsetup.luksTokens,
      setToken: cryptsetup.luksSetToken,
      removeToken: cryptsetup.luksRemoveToken,
    },
    tpm: () => tss.openTpm(),
    net: {
      udp: (n, p) => udp.udpOnDevice(n, p),
      linkUp: (n) => nl.rtnetlink([{ what: `link ${n} up`, build: (s) => nl.linkUpMsg(nl.ifIndex(n), s) }]),
      addAddress: (n, a, p) => nl.rtnetlink([{ what: `address ${a}/${p} on ${n}`, build: (s) => nl.addrAddMsg(nl.ifIndex(n), a, p, s) }]),
      defaultRoute: (n, g) => nl.rtnetlink([{ what: `default route via ${g}`, build: (s) => nl.defaultRouteMsg(nl.ifIndex(n), g, s) }]),
    },
    run: (argv, input) => {
      const [cmd, ...args] = argv;
      const r = spawnSync(cmd!, args, { input, encoding: "utf8" });
      if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
      if (r.status !== 0) throw new Error(`${argv.join(" ")}: ${(r.stderr || r.stdout).trim().split("\n").at(-1) ?? `exit ${r.status}`}`);
      return r.stdout;
    },
    readLine: (prompt, echo) => libc.readConsoleLine(prompt, echo),
    toConsole: (t) => {
      try {
        writeSync(1, t);
      } catch {
        // no console: nothing to show it on
      }
    },
    randomBytes: (n) => randomBytes(n),
    resolveDevice: (s) => blkid.resolveSpec(s),
    probe: (d) => blkid.probe(d),
    pid: () => libc.getpid(),
    sync: () => libc.sync(),
    chdir: (p) => libc.chdir(p),
    chroot: (p) => libc.chroot(p),
    pivotRoot: (n, o) => libc.pivotRoot(n, o),
    openDir: (p) => openSync(p, constants.O_RDONLY | constants.O_DIRECTORY),
    close: (fd) => closeSync(fd),
    removeTreeOnDevice,
    execve: (p, a, e) => libc.execve(p, a, e),
    unlink: (p) => unlinkSync(p),
    symlink: (t, p) => symlinkSync(t, p),
    unshareMountNs: () => libc.unshare(libc.CLONE_NEWNS),
    spawnDetached: (argv, argv0) => {
      const child = Bun.spawn([...argv], { argv0, stdio: ["ignore", "ignore", "ignore"] });
      child.unref();
      return child.pid;
    },
    signal: (pid, sig) => libc.kill(pid, sig),
    reboot: (c) => libc.reboot(c),
    sleep: (ms) => new Promise((r) => setTimeout(r, ms)),
  };
}

