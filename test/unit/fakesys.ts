// A fake machine for unit tests of boot decisions: an in-memory file tree with devices and
// mounts, and a journal of every system call so tests can assert order and absence.
import type { AgentConfig } from "../../agent/config.ts";
import type { MountedImage } from "../../agent/stages/images.ts";
import type { Kdf, VerityParams } from "../../agent/sys/cryptsetup.ts";
import { RefusedFile } from "../../agent/sys/regular.ts";
import type { FileInfo, FileReader, LineConnection, LineServer, LuksOps, NetOps, PartitionEntry, ServiceProcess, Sys, TpmOps, WatchdogHandle } from "../../agent/sys/index.ts";

export interface FakeNode {
  /** "fifo": a named pipe (readRegular refuses it; lstat says "other"). */
  kind: "file" | "dir" | "link" | "fifo";
  mode?: number;
  dev?: number;
  target?: string;
  data?: string;
  uid?: number;
  gid?: number;
  /** Two paths with the same ino are one inode (a hard link): the fake keeps them in step. */
  ino?: number;
}

/**
 * A dropbear ed25519 private key file as dropbearkey writes it (string "ssh-ed25519", string of
 * private then public half), the halves derived from `name`: the same name, the same key.
 */
export function fakeDropbearKey(name: string): Buffer {
  const half = (tag: string) => Buffer.alloc(32, Buffer.from(`${tag}:${name}:`));
  return Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from("ssh-ed25519"), Buffer.from([0, 0, 0, 64]), half("private"), half("public")]);
}

export class FakeSys implements Sys {
  calls: string[] = [];
  files = new Map<string, FakeNode>();
  mounts: string[] = ["/", "/proc", "/sys", "/dev"];
  pidValue = 1;
  rootMagic = 0x858458f6; // ramfs
  /** Devices that exist now, and ones that appear after N sleeps. */
  devices = new Set<string>();
  appearAfterSleeps = new Map<string, number>();
  sleeps = 0;
  failOn = new Map<string, Error>();
  /** Pending uevents, handed out by pollUevents. */
  uevents: Record<string, string>[] = [];
  /** image data path → error thrown by verityOpen (anything else verifies). */
  verityFailures = new Map<string, Error>();

  constructor() {
    this.add("/", { kind: "dir", dev: 1 });
  }

  add(path: string, node: FakeNode): this {
    this.files.set(path, { mode: node.kind === "dir" ? 0o755 : 0o644, dev: 1, ...node });
    return this;
  }

  private log(call: string): void {
    this.calls.push(call);
    const f = [...this.failOn.keys()].find((k) => call.startsWith(k));
    if (f) throw this.failOn.get(f)!;
  }

  readFile(p: string): string | null {
    const n = this.files.get(p);
    return n?.kind === "file" ? (n.data ?? "") : null;
  }
  readBytes(p: string): Uint8Array | null {
    const t = this.readFile(p);
    return t === null ? null : Buffer.from(t, "latin1");
  }
  writeBytes(p: string, d: Uint8Array): void {
    this.writeFile(p, Buffer.from(d).toString("latin1"));
  }
  /** Like regular.ts on the real machine: the refusals by what the node is, the cap by its length. */
  readRegular(root: string, path: string, maxBytes: number): Uint8Array | null {
    this.log(`readRegular ${root} ${path}`);
    const names = path.split("/").filter(Boolean);
    for (let i = 1; i <= names.length; i++) {
      const n = this.files.get(`${root}/${names.slice(0, i).join("/")}`);
      if (!n) return null;
      if (n.kind === "link") throw new RefusedFile("a symlink, or a symlink on its path (links there are not followed)");
      if (i < names.length && n.kind !== "dir") throw new RefusedFile("something on its path is not a directory");
      if (i === names.length && n.kind !== "file") throw new RefusedFile(`${n.kind === "fifo" ? "a FIFO" : "a directory"}, not a regular file`);
    }
    const data = Buffer.from(this.readFile(`${root}/${names.join("/")}`) ?? "", "latin1");
    if (data.length > maxBytes) throw new RefusedFile(`${data.length} bytes, more than the ${maxBytes} allowed`);
    return data;
  }
  cloneFile(a: string, b: string): void {
    this.log(`cloneFile ${a} ${b}`);
    this.add(b, { kind: "file", data: this.readFile(a) ?? "" });
  }
  copyFile(a: string, b: string): void {
    this.log(`copyFile ${a} ${b}`);
    this.add(b, { kind: "file", data: this.readFile(a) ?? "" });
  }
  /** LUKS2 volumes: device → keyslot → key (latin1), and device → token id → JSON. */
  luksSlots = new Map<string, Map<number, string>>();
  luksTokenJson = new Map<string, Map<number, string>>();
  /** Per device: KDFs by keyslot (as format/addKey were given them), and a segment cipher other than aes-xts. */
  luksKdfs = new Map<string, Map<number, Kdf>>();
  luksCipher = new Map<string, string>();
  private kdfOf(d: string): Map<number, Kdf> {
    if (!this.luksKdfs.has(d)) this.luksKdfs.set(d, new Map());
    return this.luksKdfs.get(d)!;
  }
  private slotsOf(d: string): Map<number, string> {
    const s = this.luksSlots.get(d);
    if (!s) throw Object.assign(new Error(`${d}: not a LUKS2 volume`), { errno: 22 });
    return s;
  }
  private tokensOf(d: string): Map<number, string> {
    if (!this.luksTokenJson.has(d)) this.luksTokenJson.set(d, new Map());
    return this.luksTokenJson.get(d)!;
  }
  private slotFor(d: string, k: Uint8Array, only?: number): number | undefined {
    const key = Buffer.from(k).toString("latin1");
    return [...this.slotsOf(d)].find(([n, v]) => v === key && (only === undefined || n === only))?.[0];
  }
  luks: LuksOps = {
    format: (d, k, kdf) => (this.log(`luks.format ${d}`), this.luksSlots.set(d, new Map([[0, Buffer.from(k).toString("latin1")]])), this.kdfOf(d).set(0, kdf), 0),
    addKey: (d, e, k, kdf) => {
      this.log(`luks.addKey ${d}`);
      if (this.slotFor(d, e) === undefined) throw Object.assign(new Error(`${d}: add keyslot: wrong key`), { errno: 1 });
      let n = 0;
      while (this.slotsOf(d).has(n)) n++;
      this.slotsOf(d).set(n, Buffer.from(k).toString("latin1"));
      this.kdfOf(d).set(n, kdf);
      return n;
    },
    destroySlot: (d, s) => (this.log(`luks.destroySlot ${d} ${s}`), void this.slotsOf(d).delete(s)),
    open: (d, name, k, _flags, slot) => {
      this.log(`luks.open ${d} ${name}${slot === undefined ? "" : ` slot=${slot}`}`);
      const n = this.slotFor(d, k, slot);
      if (n === undefined) throw Object.assign(new Error("wrong key"), { errno: 1 });
      return { path: `/dev/mapper/${name}`, slot: n };
    },
    close: (name) => this.log(`luks.close ${name}`),
    tokens: (d) => (this.slotsOf(d), [...this.tokensOf(d)].map(([id, json]) => ({ id, json }))),
    setToken: (d, json, id) => {
      this.log(`luks.setToken ${d}`);
      let n = id ?? 0;
      while (id === undefined && this.tokensOf(d).has(n)) n++;
      this.tokensOf(d).set(n, json);
      return n;
    },
    removeToken: (d, id) => (this.log(`luks.removeToken ${d} ${id}`), void this.tokensOf(d).delete(id)),
    // crypt_dump_json's shape: the keyslots with their KDFs, one aes-xts (or luksCipher) segment.
    header: (d) => {
      const cipher = this.luksCipher.get(d) ?? "aes-xts-plain64";
      const keyslots = Object.fromEntries(
        [...this.slotsOf(d).keys()].map((n) => {
          const k = this.kdfOf(d).get(n) ?? { type: "pbkdf2", iterations: 1000 };
          const kdf = k.type === "pbkdf2" ? { type: "pbkdf2", iterations: k.iterations } : { type: k.type, time: k.iterations, memory: k.memoryKb ?? 131072, cpus: k.threads ?? 2 };
          return [String(n), { type: "luks2", area: { type: "raw", encryption: cipher === "cipher_null-ecb" ? cipher : "aes-xts-plain64" }, kdf }];
        }),
      );
      return JSON.stringify({ keyslots, segments: { "0": { type: "crypt", encryption: cipher } } });
    },
  };
  net: NetOps = {
    udp: () => {
      throw new Error("no fake UDP");
    },
    linkUp: (n) => this.log(`net.linkUp ${n}`),
    addAddress: (n, a, p) => this.log(`net.addAddress ${n} ${a}/${p}`),
    defaultRoute: (n, g) => this.log(`net.defaultRoute ${n} ${g}`),
    addLeasedAddress: (n, a, p, secs) => this.log(`net.addLeasedAddress ${n} ${a}/${p} ${secs}s`),
    bridge: (n, a, p) => this.log(`net.bridge ${n} ${a}/${p}`),
    jailNetns: (o) => this.log(`net.jailNetns ${o.netnsPath} ${o.jailIf} ${o.address}/${o.prefix} via ${o.gateway} ${o.hostIf} on ${o.bridge}`),
    removeNetns: (p, h) => this.log(`net.removeNetns ${p} ${h}`),
    tap: (n, b) => this.log(`net.tap ${n} on ${b}`),
    removeLink: (n) => this.log(`net.removeLink ${n}`),
  };
  tpmFake?: TpmOps;
  tpm(): TpmOps {
    this.log("tpm");
    if (!this.tpmFake) throw new Error("no fake TPM");
    return this.tpmFake;
  }
  /** How many keys `dropbearkey -t ed25519 -f F` made: each is a new key file (fakeDropbearKey). */
  keysMade = 0;
  run(argv: readonly string[]): string {
    this.log(`run ${argv.join(" ")}`);
    const f = argv.indexOf("-f");
    if (argv.some((a) => a.endsWith("dropbearkey")) && argv.includes("-t") && f > 0) {
      if (this.files.has(argv[f + 1]!)) throw new Error(`dropbearkey: ${argv[f + 1]} exists`);
      this.add(argv[f + 1]!, { kind: "file", data: fakeDropbearKey(`made-${++this.keysMade}`).toString("latin1") });
    }
    return "";
  }
  /** Lines the console will answer with, in order; null when they run out. */
  consoleInput: string[] = [];
  consoleOutput = "";
  async readLine(prompt: string): Promise<string | null> {
    this.consoleOutput += prompt;
    return this.consoleInput.shift() ?? null;
  }
  toConsole(t: string): void {
    this.consoleOutput += t;
  }
  randomBytes(n: number): Uint8Array {
    return Buffer.alloc(n, 0x42);
  }
  writeFile(p: string, d: string): void {
    this.log(`writeFile ${p}`);
    this.add(p, { kind: "file", data: d });
  }
  exists(p: string): boolean {
    return this.files.has(p) || this.devices.has(p);
  }
  lstat(p: string): FileInfo {
    const n = this.files.get(p.replace(/(.)\/+$/, "$1"));
    if (!n) return { kind: "missing", mode: 0, dev: -1, uid: -1, gid: -1, ino: 0, nlink: 0 };
    const nlink = n.ino === undefined ? 1 : [...this.files.values()].filter((o) => o.ino === n.ino).length;
    return { kind: n.kind === "fifo" ? "other" : n.kind, mode: n.mode ?? 0, dev: n.dev ?? 1, uid: n.uid ?? 0, gid: n.gid ?? 0, ino: n.ino ?? 0, nlink };
  }
  /** As the kernel does: a new owner clears setuid/setgid of what is not a directory. */
  lchown(p: string, uid: number, gid: number): void {
    this.log(`lchown ${p} ${uid} ${gid}`);
    const n = this.files.get(p);
    if (!n) throw Object.assign(new Error(`lchown ${p}: ENOENT`), { errno: 2 });
    const same = n.ino === undefined ? [n] : [...this.files.values()].filter((o) => o.ino === n.ino);
    for (const o of same) {
      o.uid = uid;
      o.gid = gid;
      if (o.kind === "file") o.mode = (o.mode ?? 0) & ~0o6000;
    }
  }
  chmod(p: string, mode: number): void {
    this.log(`chmod ${p} ${mode.toString(8)}`);
    const n = this.files.get(p);
    if (!n) throw Object.assign(new Error(`chmod ${p}: ENOENT`), { errno: 2 });
    n.mode = mode;
  }
  readlink(p: string): string {
    return this.files.get(p)?.target ?? "";
  }
  readdir(p: string): string[] {
    const prefix = p.endsWith("/") ? p : `${p}/`;
    const names = new Set<string>();
    for (const f of this.files.keys()) if (f.startsWith(prefix)) names.add(f.slice(prefix.length).split("/")[0]!);
    return [...names].sort();
  }
  reloadModuleIndex(): void {
    this.log("reloadModuleIndex");
  }
  pollUevents(): Record<string, string>[] {
    return this.uevents.splice(0);
  }
  async verityOpen(name: string, data: string, hash: string, rootHash: string, verity?: VerityParams): Promise<string> {
    this.log(`verityOpen ${name} ${data} ${hash} ${rootHash.slice(0, 8)}`);
    if (verity) this.verityPinned.set(data, verity);
    const e = this.verityFailures.get(data);
    if (e) throw e;
    return `/dev/mapper/${name}`;
  }
  /** verityVerify: as verityOpen, the data path's entry in verityFailures makes it fail. */
  async verityVerify(data: string, hash: string, rootHash: string, verity: VerityParams): Promise<void> {
    this.log(`verityVerify ${data} ${hash} ${rootHash.slice(0, 8)}`);
    this.verityPinned.set(data, verity);
    const e = this.verityFailures.get(data);
    if (e) throw e;
  }
  /** Reads of the file's content as it was when opened (latin1 bytes, like readBytes). */
  openReader(path: string): FileReader {
    this.log(`openReader ${path}`);
    const text = this.readFile(path);
    if (text === null) throw Object.assign(new Error(`open ${path}: ENOENT`), { errno: 2 });
    const data = Buffer.from(text, "latin1");
    return { size: data.length, read: (offset, length) => data.subarray(offset, offset + length), close: () => undefined };
  }
  attachLoop(file: string): string {
    this.log(`attachLoop ${file}`);
    return "/dev/loop7";
  }
  mkdirp(p: string): void {
    this.log(`mkdirp ${p}`);
    if (!this.files.has(p)) this.add(p, { kind: "dir" });
  }
  mountPoints(): string[] {
    return [...this.mounts];
  }
  mount(src: string | null, target: string, fstype: string | null, flags: number, data: string | null = null): void {
    this.log(`mount ${src} ${target} ${fstype} 0x${flags.toString(16)}${data ? ` ${data}` : ""}`);
    if (fstype === "btrfs" && data) this.btrfsMounted.set(target, [...data.matchAll(/device=([^,]+)/g)].map((m) => m[1]!));
    if (flags & 0x2000 && src) {
      // MS_MOVE: the mount and its submounts now live under the target
      this.mounts = this.mounts.map((m) => (m === src || m.startsWith(`${src}/`) ? target + m.slice(src.length) : m));
    } else {
      this.mounts.push(target);
    }
  }
  async mountInBackground(src: string | null, target: string, fstype: string | null, flags: number): Promise<void> {
    this.mount(src, target, fstype, flags);
  }
  umount(target: string, flags: number): void {
    this.log(`umount ${target} ${flags}`);
    this.mounts = this.mounts.filter((m) => m !== target);
  }
  /**
   * The btrfs a mount assembled: by default exactly the devices its device= options named
   * (what the kernel does when nothing else was scanned); `btrfsStray` adds devices the
   * kernel had from elsewhere.
   */
  btrfsMounted = new Map<string, string[]>();
  btrfsStray: string[] = [];
  btrfsDevices(mountPoint: string): { fsid: string; numDevices: number; devices: { devid: number; path: string }[] } {
    this.log(`btrfsDevices ${mountPoint}`);
    const paths = [...(this.btrfsMounted.get(mountPoint) ?? []), ...this.btrfsStray];
    return { fsid: "0f5e7a1d-0000-4000-8000-000000000001", numDevices: paths.length, devices: paths.map((path, i) => ({ devid: i + 1, path })) };
  }
  /** Device numbers: one per path, as if every path were its own node. */
  deviceNumber(path: string): number | null {
    let h = 7;
    for (const ch of path) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    return h;
  }
  /** Filesystem magic by path (statfsType); anything else is on the root's. */
  statfsMagic = new Map<string, number>();
  statfsType(p?: string): number {
    return (p !== undefined ? this.statfsMagic.get(p) : undefined) ?? this.rootMagic;
  }
  loadModule(name: string): { modules: string[]; matched: string[] } {
    this.log(`loadModule ${name}`);
    return { modules: [name], matched: [name] };
  }
  async loadModuleInBackground(name: string): Promise<{ modules: string[]; matched: string[] }> {
    this.log(`loadModule ${name} (background)`);
    return { modules: [name], matched: [name] };
  }
  resolveDevice(spec: string): string | null {
    return this.devices.has(spec) ? spec : null;
  }
  probe(): Record<string, string> | null {
    return { TYPE: "btrfs" };
  }
  /** Partition table entries by partition device (what libblkid reads); see addPartition. */
  partEntries = new Map<string, PartitionEntry>();
  /** Partition `/dev/<part>` of disk `/dev/<disk>`, as sysfs shows it (a link under the disk) and libblkid reads it. */
  addPartition(disk: string, part: string, entry: PartitionEntry): this {
    this.add(`/sys/class/block/${disk}`, { kind: "link", target: `../../devices/pci0000:00/block/${disk}` });
    this.add(`/sys/class/block/${part}`, { kind: "link", target: `../../devices/pci0000:00/block/${disk}/${part}` });
    this.add(`/sys/class/block/${part}/partition`, { kind: "file", data: "1\n" });
    this.partEntries.set(`/dev/${part}`, entry);
    return this;
  }
  partitionEntry(device: string): PartitionEntry | null {
    return this.partEntries.get(device) ?? null;
  }
  /** The pinned verity parameters each verityOpen was given, by image data path. */
  verityPinned = new Map<string, VerityParams>();
  pid(): number {
    return this.pidValue;
  }
  sync(): void {
    this.log("sync");
  }
  chdir(p: string): void {
    this.log(`chdir ${p}`);
  }
  chroot(p: string): void {
    this.log(`chroot ${p}`);
  }
  pivotRoot(n: string, o: string): void {
    this.log(`pivotRoot ${n} ${o}`);
  }
  openDir(p: string): number {
    this.log(`openDir ${p}`);
    return 9;
  }
  close(fd: number): void {
    this.log(`close ${fd}`);
  }
  removeTreeOnDevice(dir: string, dev: number): number {
    this.log(`removeTree ${dir} dev=${dev}`);
    return 3;
  }
  /** Bytes writeStream may write in all before it fails with ENOSPC (a full filesystem). */
  spaceLeft = Infinity;
  async writeStream(p: string, data: AsyncIterable<Uint8Array>): Promise<number> {
    this.log(`writeStream ${p}`);
    const parts: Buffer[] = [];
    let n = 0;
    for await (const c of data) {
      if (n + c.length > this.spaceLeft) throw Object.assign(new Error(`write ${p}: ENOSPC`), { errno: 28, code: "ENOSPC" });
      parts.push(Buffer.from(c));
      n += c.length;
    }
    this.spaceLeft -= n;
    this.add(p, { kind: "file", data: Buffer.concat(parts).toString("latin1") });
    return n;
  }
  rename(a: string, b: string): void {
    this.log(`rename ${a} ${b}`);
    const n = this.files.get(a);
    if (!n) throw Object.assign(new Error(`rename ${a}: ENOENT`), { errno: 2 });
    this.files.delete(a);
    this.files.set(b, n);
  }
  /** Swaps two names and everything below them, as renameat2(RENAME_EXCHANGE) does. */
  exchange(a: string, b: string): void {
    this.log(`exchange ${a} ${b}`);
    if (!this.files.has(a) || !this.files.has(b)) throw Object.assign(new Error(`renameat2(${a}, ${b}): ENOENT`), { errno: 2 });
    const moved = [...this.files.entries()].filter(([k]) => k === a || k === b || k.startsWith(`${a}/`) || k.startsWith(`${b}/`));
    for (const [k] of moved) this.files.delete(k);
    for (const [k, n] of moved) this.files.set(k === a || k.startsWith(`${a}/`) ? b + k.slice(a.length) : a + k.slice(b.length), n);
  }
  mkfifo(p: string, mode: number): void {
    this.log(`mkfifo ${p} ${mode.toString(8)}`);
    this.add(p, { kind: "file", mode });
  }
  fsyncPath(p: string): void {
    this.log(`fsync ${p}`);
  }
  execve(p: string, argv: readonly string[]): never {
    this.log(`execve ${p} ${argv.join(" ")}`);
    throw new Error("execve reached (fake)");
  }
  /** What inheritableData handed out: fd → [name, data]. */
  inherited = new Map<number, [string, string]>();
  inheritableData(name: string, data: string): number {
    this.log(`inheritableData ${name}`);
    const fd = 3 + this.inherited.size;
    this.inherited.set(fd, [name, data]);
    return fd;
  }
  reboot(cmd: number): void {
    this.log(`reboot 0x${cmd.toString(16)}`);
  }
  unlink(p: string): void {
    this.log(`unlink ${p}`);
    if (this.immutable.has(p)) throw Object.assign(new Error(`unlink ${p}: EPERM`), { errno: 1, code: "EPERM" });
    this.files.delete(p);
  }
  rmdir(p: string): void {
    this.log(`rmdir ${p}`);
    if ([...this.files.keys()].some((k) => k.startsWith(`${p}/`))) throw Object.assign(new Error(`rmdir ${p}: ENOTEMPTY`), { errno: 39 });
    this.files.delete(p);
  }
  /** Paths with the immutable inode flag (efivarfs's protected variables): writes and unlinks fail with EPERM. */
  immutable = new Set<string>();
  writeOnce(p: string, d: Uint8Array): void {
    this.log(`writeOnce ${p}`);
    if (this.immutable.has(p)) throw Object.assign(new Error(`open ${p}: EPERM`), { errno: 1, code: "EPERM" });
    this.add(p, { kind: "file", data: Buffer.from(d).toString("latin1") });
  }
  setImmutable(p: string, on: boolean): boolean {
    this.log(`setImmutable ${p} ${on ? "+i" : "-i"}`);
    if (!this.files.has(p)) throw Object.assign(new Error(`open ${p}: ENOENT`), { errno: 2, code: "ENOENT" });
    const was = this.immutable.has(p);
    if (on) this.immutable.add(p);
    else this.immutable.delete(p);
    return was;
  }
  /** Watchdog devices by path: the driver's identity, options (WDIOF_*) and the largest timeout it takes. */
  watchdogDevices = new Map<string, { identity: string; options?: number; maxTimeout?: number }>();
  /** Each opened watchdog: its state and how often it was petted. */
  watchdogState = new Map<string, { state: "armed" | "disarmed" | "released"; pets: number; timeout: number }>();
  openWatchdog(path: string, timeoutSeconds: number): WatchdogHandle {
    this.log(`openWatchdog ${path} ${timeoutSeconds}`);
    const dev = this.watchdogDevices.get(path);
    if (!dev) throw Object.assign(new Error(`open ${path}: ENOENT`), { errno: 2, code: "ENOENT" });
    const timeout = Math.min(timeoutSeconds, dev.maxTimeout ?? 65535);
    const st = { state: "armed" as "armed" | "disarmed" | "released", pets: 0, timeout };
    this.watchdogState.set(path, st);
    const live = () => {
      if (st.state !== "armed") throw new Error(`${path}: already closed`);
    };
    return {
      path,
      identity: dev.identity,
      options: dev.options ?? 0x8180,
      timeout,
      pet: () => (live(), this.log(`watchdog.pet ${path}`), void st.pets++),
      timeLeft: () => (live(), null),
      disarm: () => (live(), this.log(`watchdog.disarm ${path}`), void (st.state = "disarmed")),
      release: () => (live(), this.log(`watchdog.release ${path}`), void (st.state = "released")),
    };
  }
  symlink(t: string, p: string): void {
    this.log(`symlink ${t} ${p}`);
    this.add(p, { kind: "link", target: t });
  }
  unshareMountNs(): void {
    this.log("unshareMountNs");
  }
  /** prctl PR_SET_DUMPABLE / PR_GET_DUMPABLE; a process starts dumpable. */
  dumpableValue = true;
  setDumpable(on: boolean): void {
    this.log(`setDumpable ${on ? 1 : 0}`);
    this.dumpableValue = on;
  }
  getDumpable(): boolean {
    return this.dumpableValue;
  }
  /** What a detached process does when it starts (e.g. create a file), by argv[1]. */
  onSpawn = new Map<string, (sys: FakeSys) => void>();
  spawnDetached(argv: readonly string[], argv0: string): number {
    this.log(`spawnDetached ${argv0} ${argv.join(" ")}`);
    this.onSpawn.get(argv[1] ?? "")?.(this);
    return 4242;
  }
  /** The last signal each pid got. */
  lastSignal = new Map<number, number>();
  signal(pid: number, sig: number): void {
    this.log(`signal ${pid} ${sig}`);
    this.lastSignal.set(pid, sig);
    const p = this.procs.get(pid);
    if (!p) return;
    p.onSignal?.(sig, this);
    if (sig !== 9 && p.ignore?.includes(sig)) return;
    if (p.exitAfterMs) this.dying.set(pid, Math.min(this.dying.get(pid) ?? Infinity, this.clock + p.exitAfterMs));
    else this.endProcess(pid);
  }
  /** Processes shown in /proc/<pid>/stat; see addProcess. */
  procs = new Map<number, FakeProc>();
  /** pid → when (on the fake clock) a signalled process is gone. */
  private dying = new Map<number, number>();
  /** A running process: signals end it (and its parent's reaping with it) unless it ignores them. */
  addProcess(p: FakeProc): this {
    this.procs.set(p.pid, p);
    const flags = p.kthread ? 0x00200000 : 0x00400100;
    const sid = p.sid ?? p.pid;
    this.add(`/proc/${p.pid}/stat`, { kind: "file", data: `${p.pid} (${p.comm ?? "proc"}) ${p.state ?? "S"} ${p.ppid} ${sid} ${sid} 0 -1 ${flags} 0 0 0 0 0 0 0 0 20 0 1 0 ${p.start ?? 100} 0 0` });
    return this;
  }
  /** The process exits and is reaped; its children go to PID 1, as the kernel does. */
  endProcess(pid: number, why = `killed by signal ${this.lastSignal.get(pid) ?? "?"}`): void {
    this.services.get(pid)?.end(why);
    this.procs.delete(pid);
    this.dying.delete(pid);
    this.files.delete(`/proc/${pid}/stat`);
    for (const c of [...this.procs.values()]) if (c.ppid === pid) this.addProcess({ ...c, ppid: 1 });
  }
  /** The fake monotonic clock: sleep() advances it, and nothing else does. */
  clock = 0;
  now(): number {
    return this.clock;
  }
  /** Fds handed out by openDirInRoot, and the path (with the root) each one resolved to. */
  openedInRoot = new Map<number, string>();
  private nextFd = 100;
  /** Like openat2(RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS): ENOENT, ELOOP on any symlink, ENOTDIR. */
  openDirInRoot(root: string, path: string): number {
    this.log(`openDirInRoot ${root} ${path}`);
    const fail = (errno: number, name: string) => {
      throw Object.assign(new Error(`openat2(${JSON.stringify(root)}, ${JSON.stringify(path)}): ${name}`), { errno });
    };
    const done: string[] = [];
    for (const name of path.split("/").filter((n) => n && n !== ".")) {
      if (name === "..") {
        done.pop(); // scoped to the root, as RESOLVE_IN_ROOT does
        continue;
      }
      done.push(name);
      const n = this.files.get(`${root}/${done.join("/")}`);
      if (!n) fail(2, "ENOENT");
      else if (n.kind === "link") fail(40, "ELOOP");
      else if (n.kind !== "dir") fail(20, "ENOTDIR");
    }
    const fd = this.nextFd++;
    this.openedInRoot.set(fd, done.length ? `${root}/${done.join("/")}` : root);
    return fd;
  }
  /** Sizes of the chunks readChunks handed out, per path. */
  chunkSizes = new Map<string, number[]>();
  /** The file's content as it is when opened, in chunks (one open, like the real one). */
  async *readChunks(path: string, chunk = 1 << 20): AsyncGenerator<Uint8Array> {
    this.log(`readChunks ${path}`);
    const text = this.readFile(path);
    if (text === null) throw Object.assign(new Error(`open ${path}: ENOENT`), { errno: 2 });
    const data = Buffer.from(text, "latin1");
    const sizes = this.chunkSizes.get(path) ?? [];
    this.chunkSizes.set(path, sizes);
    for (let at = 0; at < data.length; at += chunk) {
      const c = data.subarray(at, at + chunk);
      sizes.push(c.length);
      yield c;
    }
  }
  /** What each runWithInput got on stdin, in order; `onRunWithInput` may make it fail. */
  inputs: { argv: string; data: Buffer }[] = [];
  onRunWithInput?: (argv: readonly string[]) => void;
  async runWithInput(argv: readonly string[], input: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<string> {
    this.log(`runWithInput ${argv.join(" ")}`);
    const parts: Buffer[] = [];
    for await (const c of input) parts.push(Buffer.from(c));
    this.inputs.push({ argv: argv.join(" "), data: Buffer.concat(parts) });
    this.onRunWithInput?.(argv);
    return "";
  }
  async sleep(ms: number): Promise<void> {
    this.sleeps++;
    this.advance(ms);
    for (const [dev, n] of this.appearAfterSleeps) if (this.sleeps >= n) this.devices.add(dev);
  }
  /** Moves the fake clock: processes due to exit do, timers due run (in order). */
  advance(ms: number): void {
    const until = this.clock + ms;
    for (;;) {
      const next = this.timers.filter((t) => t.at <= until).sort((a, b) => a.at - b.at)[0];
      if (!next) break;
      this.timers.splice(this.timers.indexOf(next), 1);
      this.clock = Math.max(this.clock, next.at);
      next.fn();
    }
    this.clock = until;
    for (const [pid, at] of this.dying) if (at <= this.clock) this.endProcess(pid);
  }
  /** Pending timers (after()), by when they run on the fake clock. */
  timers: { at: number; fn: () => void }[] = [];
  after(ms: number, fn: () => void): () => void {
    const t = { at: this.clock + ms, fn };
    this.timers.push(t);
    return () => void this.timers.splice(this.timers.indexOf(t) >>> 0, this.timers.includes(t) ? 1 : 0);
  }
  /** Services started with spawnService, by pid: what they were given, and how to end them. */
  services = new Map<number, { argv: string[]; env: Readonly<Record<string, string>>; say(line: string): void; end(why: string): void }>();
  private nextPid = 500;
  /** argv[0] → why it fails to start (its pid is then undefined). */
  failToStart = new Map<string, string>();
  spawnService(argv: readonly string[], env: Readonly<Record<string, string>>, onLine: (line: string) => void): ServiceProcess {
    this.log(`spawnService ${argv.join(" ")}`);
    let end!: (why: string) => void;
    const exited = new Promise<string>((resolve) => (end = resolve));
    const failed = this.failToStart.get(argv[0]!);
    if (failed) {
      end(`failed to start: ${failed}`);
      return { pid: undefined, exited };
    }
    const pid = this.nextPid++;
    this.addProcess({ pid, ppid: this.pidValue, comm: argv[0]!.split("/").pop()! });
    let ended = false;
    this.services.set(pid, {
      argv: [...argv],
      env,
      say: onLine,
      end: (why) => {
        if (ended) return;
        ended = true;
        this.services.delete(pid);
        end(why);
      },
    });
    return { pid, exited };
  }
  /** tcpProbe answers, by "address:port"; a missing one is refused. */
  probes = new Map<string, string>();
  async tcpProbe(address: string, port: number, _timeoutMs: number): Promise<string> {
    this.log(`tcpProbe ${address}:${port}`);
    const a = this.probes.get(`${address}:${port}`);
    if (a === undefined) throw new Error("connection refused");
    return a;
  }

  /** Admin sockets served (serveLines), by path; request() talks to one. */
  lineServers = new Map<string, { maxLine: number; answer: (line: string | null, body: AsyncIterable<Buffer>) => Promise<string>; closed: boolean }>();
  serveLines(path: string, maxLine: number, answer: (line: string | null, body: AsyncIterable<Buffer>) => Promise<string>): LineServer {
    this.log(`serveLines ${path}`);
    const server = { maxLine, answer, closed: false };
    this.lineServers.set(path, server);
    return { close: async () => void (this.log(`close ${path}`), (server.closed = true)) };
  }
  /**
   * Unix sockets a client can connect to (connectUnix), by path: the lines the peer greets
   * with, and its answer (lines) to each line written; an answer of null hangs up.
   */
  unixPeers = new Map<string, { greeting: string[]; answer: (line: string) => string[] | null; written: string[] }>();
  async connectUnix(path: string, _timeoutMs: number): Promise<LineConnection> {
    this.log(`connectUnix ${path}`);
    const peer = this.unixPeers.get(path);
    if (!peer) throw new Error(`${path}: connect ENOENT`);
    const queue = [...peer.greeting];
    let ended = false;
    return {
      readLine: async () => queue.shift() ?? (ended ? null : Promise.reject(new Error(`${path}: no answer`))),
      write: (text) => {
        for (const line of text.split("\n").filter(Boolean)) {
          peer.written.push(line);
          const a = peer.answer(line);
          if (a === null) ended = true;
          else queue.push(...a);
        }
      },
      close: () => this.log(`close ${path}`),
    };
  }
  /** A client's request line on a served socket (as serveLines' transport would hand it over). */
  async request(path: string, line: string, body: readonly Buffer[] = []): Promise<string> {
    const server = this.lineServers.get(path);
    if (!server || server.closed) throw new Error(`nothing serves ${path}`);
    return server.answer(line.length > server.maxLine ? null : line, (async function* () { yield* body; })());
  }
}

/** A process of FakeSys.addProcess: /proc/<pid>/stat fields and how it takes signals. */
export interface FakeProc {
  pid: number;
  ppid: number;
  /** Session id; its own pid by default (a session leader). */
  sid?: number;
  comm?: string;
  state?: string;
  /** starttime, in clock ticks after boot. */
  start?: number;
  kthread?: boolean;
  /** Signals it ignores (SIGKILL cannot be). */
  ignore?: number[];
  /** It takes this long (fake clock) to exit once signalled. */
  exitAfterMs?: number;
  /** Called before the signal takes effect (e.g. to fork a child). */
  onSignal?: (sig: number, sys: FakeSys) => void;
}

export function silentLog() {
  const lines: string[] = [];
  const push = (lvl: string) => (m: string) => void lines.push(`${lvl}: ${m}`);
  return { lines, err: push("err"), warn: push("warn"), info: push("info"), debug: push("debug"), quiet: false, verbose: false, recent: () => [...lines] };
}

/** Every image of the config as the images stage leaves it: verified from `slot`. */
export function verifiedImages(cfg: AgentConfig, slot = "a"): MountedImage[] {
  return cfg.images.map((i) => ({ name: i.name, slot, device: `/dev/mapper/initos-${i.name}`, mountPoint: `/run/initos/images/${i.name}`, verified: true }));
}
