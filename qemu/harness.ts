// Boots initos under QEMU (TCG: nested KVM hangs on these machines) for tests and the demo.
// Direct kernel boot or OVMF Secure Boot of the UKI, with an optional swtpm. Every VM writes
// its serial console to a log file, is waited on with timeouts, and is always torn down with
// its swtpm and temp dir, also when a test fails (stopAll in afterEach).
import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { createConnection, createServer } from "node:net";
import { resolve } from "node:path";
import { StringDecoder } from "node:string_decoder";

export const OVMF = {
  code: "/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd",
  /** Secure Boot enabled, snakeoil keys enrolled. */
  varsSecure: "/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd",
  /** No keys enrolled: Secure Boot off. */
  varsPlain: "/usr/share/OVMF/OVMF_VARS_4M.fd",
} as const;

export interface Disk {
  file: string;
  /** virtio-blk (default) or NVMe: different driver paths in the guest. */
  bus?: "virtio" | "nvme";
  /** Writes go to a throwaway overlay, so images can be shared between scenarios (default on). */
  snapshot?: boolean;
  format?: "raw" | "qcow2";
  /**
   * The firmware's boot order (QEMU `bootindex`, lowest first; OVMF follows it): boots a disk
   * other than the first, e.g. the second of two disks that both carry a bootable ESP.
   */
  bootIndex?: number;
}

export interface VmOptions {
  /** Names the serial log: <logDir>/<name>.log */
  name: string;
  logDir?: string;
  /** Direct kernel boot (no firmware), as cloud-hypervisor does. */
  direct?: { kernel: string; initrd: string; append: string };
  /**
   * Firmware boot: OVMF with this vars template (copied; the original stays pristine). With
   * `file`, the variables live in that file, used in place and made as a copy of `vars` only
   * when missing: BootOrder, BootNext and Boot#### the guest writes survive into the next QEMU
   * process started with the same file (one machine's NVRAM across power cuts).
   */
  firmware?: { vars: string; code?: string; file?: string };
  disks?: Disk[];
  /** Attach a TPM 2.0 (swtpm). `stateDir` keeps state between boots; otherwise a fresh TPM. */
  tpm?: boolean | { stateDir: string };
  memoryMiB?: number;
  cpus?: number;
  /**
   * User networking with restrict=on (the guest reaches nothing outside QEMU; QEMU's DHCP
   * still answers) and TCP forwards from 127.0.0.1:<host> to the guest's <guest> port. Without
   * `host` (the way to use it), QEMU binds a free port itself and startVm asks it which
   * (Vm.hostPort): no window in which another process can take the port, as freePort() leaves.
   */
  net?: { forward: { host?: number; guest: number }[] };
  /**
   * q35 (default: PCI devices) or microvm (virtio-mmio devices found through ACPI, no PCI, as
   * cloud-hypervisor's and firecracker's VMs look); microvm needs a direct boot.
   */
  machine?: "q35" | "microvm";
  /** A host directory shared with the guest over 9p under `tag`. */
  share?: { tag: string; dir: string };
  /**
   * Reboots stay in this QEMU process (no -no-reboot): a guest reboot, a kernel panic with
   * panic=N or a watchdog's reset goes on into the next boot, as a real machine does, and the
   * serial log accumulates across boots (mark() and waitFor's `from` look at one boot's part).
   * Only a poweroff (or stop()) ends the process.
   */
  reboot?: boolean;
  /**
   * An emulated i6300esb watchdog (PCI; its expiry resets the machine). Debian's cloud kernel
   * has no driver for it, so a guest of that kernel uses softdog, which needs nothing here.
   */
  i6300esb?: boolean;
}

/** What waitFor looks for besides the pattern, and where. */
export interface WaitOptions {
  /**
   * A prompt: text that ends without a newline, waited for in the incomplete last line too. A
   * `$` at the end of the pattern means the end of the prompt, not of the output: a kernel line
   * printed after the prompt does not hide it. Only a prompt printed after the last send() is
   * one (a prompt already answered is never matched again).
   */
  prompt?: boolean;
  /** A mark(): only the output after it is searched; match indexes are then relative to it. */
  from?: number;
  /**
   * Fails the wait as soon as this appears (after `from`, incomplete lines included): e.g. the
   * passphrase prompt while waiting for an unattended unlock's root, instead of the timeout.
   */
  failOn?: RegExp;
}

/** A pattern for prompt waits: without the `$` that ends it (see WaitOptions.prompt). */
export function promptPattern(re: RegExp): RegExp {
  const src = re.source;
  // A final `$` that is not escaped (an odd number of backslashes before it escapes it).
  const trailing = /(\\*)\$$/.exec(src);
  const body = trailing && trailing[1]!.length % 2 === 0 ? src.slice(0, -1) : src;
  return new RegExp(body, re.flags.replace(/[gy]/g, ""));
}

/**
 * Reads a log file that another process appends to, from the start, until `done()` says that
 * process is gone and the file has nothing more: QEMU writes the serial console to the file
 * itself, so it never waits on this process (a pipe would fill while the event loop is busy,
 * and the guest would block on its serial port).
 */
async function follow(path: string, onText: (s: string) => void, done: () => boolean, pollMs = 20): Promise<void> {
  const fh = await open(path, "r");
  const chunk = Buffer.alloc(1 << 16);
  const dec = new StringDecoder("utf8"); // a multi-byte character split across two reads stays intact
  let pos = 0;
  try {
    for (;;) {
      const last = done(); // before the read: what the process wrote before it ended is read next
      const { bytesRead } = await fh.read(chunk, 0, chunk.length, pos);
      if (bytesRead > 0) {
        pos += bytesRead;
        onText(dec.write(chunk.subarray(0, bytesRead)));
        continue;
      }
      if (last) break;
      await new Promise((r) => setTimeout(r, pollMs));
    }
    const rest = dec.end();
    if (rest) onText(rest);
  } finally {
    await fh.close();
  }
}

/**
 * Starts `command` with its stdout and stderr appended to `logPath` (created empty) and its stdin
 * a pipe (for send()): what Vm reads. Exported for the harness's unit tests.
 */
export function spawnLogged(command: string, args: string[], logPath: string): ChildProcess {
  const fd = openSync(logPath, "w");
  try {
    // One open file description for both: O_APPEND not needed, the offset is shared.
    return spawn(command, args, { stdio: ["pipe", fd, fd] });
  } finally {
    closeSync(fd);
  }
}

export class Vm {
  private buf = "";
  private waiters = new Set<() => void>();
  private exitCode: number | null | undefined;
  /** Where the output was when send() was last called: prompts before it are answered. */
  private lastInput = 0;
  readonly exited: Promise<number | null>;

  /**
   * `child` writes its output to `logPath` (spawnLogged); `ports` maps a guest port to the host
   * port QEMU forwards to it.
   */
  constructor(
    readonly name: string,
    readonly logPath: string,
    private readonly qemu: ChildProcess,
    private readonly cleanup: () => void,
    private readonly monitorSock: string,
    private readonly ports: ReadonlyMap<number, number> = new Map(),
  ) {
    let childDone = false;
    const childExit = new Promise<number | null>((res) => qemu.on("exit", (code) => ((childDone = true), res(code))));
    const read = follow(
      logPath,
      (s) => {
        this.buf += s;
        for (const w of this.waiters) w();
      },
      () => childDone,
    );
    this.exited = (async () => {
      const code = await childExit;
      await read.catch(() => {});
      this.exitCode = code;
      this.cleanup();
      for (const w of this.waiters) w();
      return code;
    })();
  }

  /** The host port on 127.0.0.1 that QEMU forwards to the guest's port `guest`. */
  hostPort(guest: number): number {
    const p = this.ports.get(guest);
    if (p === undefined) throw new Error(`${this.name}: no forward to guest port ${guest}`);
    return p;
  }

  /** Everything the serial console (and QEMU itself) printed so far. */
  get output(): string {
    return this.buf;
  }

  get running(): boolean {
    return this.exitCode === undefined;
  }

  /**
   * Where the output is now: pass it to waitFor (`from`) or since() to look only at what comes
   * after it, e.g. the next boot's lines in a VM that reboots in place (`reboot: true`).
   */
  mark(): number {
    return this.buf.length;
  }

  /** The output after `mark` (a mark() taken earlier). */
  since(mark: number): string {
    return this.buf.slice(mark);
  }

  /**
   * Resolves with the first match of `re` in the complete lines of output (a line still being
   * written could match a prefix of what it will say); rejects on timeout, on VM exit, or when
   * `failOn` appears. A prompt, which ends without a newline, is waited for with `prompt` (see
   * WaitOptions). The third argument may be `prompt` alone and the fourth `from`, as before.
   */
  waitFor(re: RegExp, timeoutMs: number, opts: boolean | WaitOptions = {}, fromArg = 0): Promise<RegExpMatchArray> {
    const o: WaitOptions = typeof opts === "boolean" ? { prompt: opts, from: fromArg } : opts;
    const prompt = o.prompt ?? false;
    const from = o.from ?? 0;
    const pattern = prompt ? promptPattern(re) : re;
    const where = from ? ` after output offset ${from}` : "";
    return new Promise((res, rej) => {
      const check = () => {
        // A prompt is one only if printed after the input that answered the last one.
        const start = prompt ? Math.max(from, this.lastInput) : from;
        const end = this.running && !prompt ? this.buf.lastIndexOf("\n") + 1 : this.buf.length;
        const m = end > start ? this.buf.slice(start, end).match(pattern) : null;
        if (m) {
          // Indexes relative to `from`, as documented, also when the search started later.
          if (m.index !== undefined) m.index += start - from;
          return done(() => res(m));
        }
        if (o.failOn) {
          const bad = this.buf.slice(from).match(o.failOn);
          if (bad) return done(() => rej(new Error(`${this.name}: ${JSON.stringify(bad[0])} (${o.failOn}) while waiting for ${re}${where}; log ${this.logPath}${this.tail()}`)));
        }
        if (!this.running) return done(() => rej(new Error(`${this.name}: VM exited (code ${this.exitCode}) before ${re}${from ? ` (after output offset ${from})` : ""}; log ${this.logPath}${this.tail()}`)));
      };
      const timer = setTimeout(() => done(() => rej(new Error(`${this.name}: no ${re}${where} within ${timeoutMs} ms; log ${this.logPath}${this.tail()}`))), timeoutMs);
      const done = (f: () => void) => {
        clearTimeout(timer);
        this.waiters.delete(check);
        f();
      };
      this.waiters.add(check);
      check();
    });
  }

  /**
   * The console's last lines, for an error message: CI keeps what the test runner prints, not
   * build/logs, and a timeout that only says "no match" cannot be diagnosed from there.
   */
  private tail(lines = 12): string {
    const last = this.buf.slice(-8000).replace(/\r/g, "").trimEnd().split("\n").slice(-lines);
    return `; the console's last lines:\n${last.map((l) => `  | ${l.slice(0, 200)}`).join("\n")}`;
  }

  /** Waits for the VM to power off, or reboot unless `reboot` was asked (-no-reboot); kills it on timeout. */
  async waitExit(timeoutMs: number): Promise<number | null> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<"timeout">((res) => (timer = setTimeout(() => res("timeout"), timeoutMs)));
    const r = await Promise.race([this.exited, timeout]);
    clearTimeout(timer);
    if (r === "timeout") {
      await this.stop();
      throw new Error(`${this.name}: still running after ${timeoutMs} ms; log ${this.logPath}${this.tail()}`);
    }
    return r;
  }

  /** Sends one command to the QEMU monitor, e.g. `sendkey ctrl-alt-delete`, `system_powerdown`. */
  monitor(command: string): Promise<void> {
    return new Promise((res, rej) => {
      const c = createConnection(this.monitorSock);
      c.on("error", rej);
      c.resume(); // drain the banner and replies; a paused socket never reports its end
      c.on("connect", () => c.end(`${command}\n`));
      c.on("close", () => res());
    });
  }

  /** Types on the serial console (an answer: the prompts printed so far are answered). */
  send(text: string): void {
    this.lastInput = this.buf.length;
    this.qemu.stdin!.write(text);
  }

  /** Synchronous teardown, for process exit where nothing can be awaited. */
  kill(): void {
    if (this.running) this.qemu.kill("SIGKILL");
    this.cleanup();
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.qemu.kill("SIGKILL");
    await this.exited;
  }
}

const live = new Set<Vm>();

/** Kills every VM still running (and with it its swtpm); for afterEach/afterAll. */
export async function stopAll(): Promise<void> {
  await Promise.all([...live].map((v) => v.stop()));
}

async function waitForFile(path: string, timeoutMs: number, what: string): Promise<void> {
  const start = Date.now();
  while (!existsSync(path)) {
    if (Date.now() - start > timeoutMs) throw new Error(`${what}: ${path} did not appear within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function qemuArgs(o: VmOptions, tmp: string, tpmSock?: string): string[] {
  const args = ["-accel", "tcg", "-cpu", "max", "-m", String(o.memoryMiB ?? 1024), "-smp", String(o.cpus ?? 2)];
  // -no-reboot: a reboot ends QEMU, so the failure policy's reboot is observable as an exit.
  // With `reboot`, a reboot (or a watchdog's reset) goes on into the next boot instead.
  args.push("-display", "none", "-serial", "stdio", "-monitor", `unix:${tmp}/monitor.sock,server=on,wait=off`);
  if (!o.reboot) args.push("-no-reboot");
  const microvm = o.machine === "microvm";
  if (microvm && (o.firmware || !o.direct)) throw new Error(`${o.name}: microvm boots the kernel directly, without firmware`);
  // The same virtio devices on either transport: PCI on q35, MMIO on microvm.
  const dev = (kind: string) => `virtio-${kind}-${microvm ? "device" : "pci"}`;
  if (o.net) {
    const fwd = o.net.forward.map((f) => `,hostfwd=tcp:127.0.0.1:${f.host ?? 0}-:${f.guest}`).join("");
    args.push("-netdev", `user,id=net0,restrict=on${fwd}`, "-device", `${dev("net")},netdev=net0`);
  } else {
    args.push("-nic", "none");
  }
  if (o.firmware) {
    const vars = o.firmware.file ? resolve(o.firmware.file) : `${tmp}/vars.fd`;
    if (!o.firmware.file || !existsSync(vars)) copyFileSync(o.firmware.vars, vars);
    args.push(
      "-machine", "q35,smm=on",
      "-global", "driver=cfi.pflash01,property=secure,value=on",
      "-drive", `if=pflash,format=raw,unit=0,readonly=on,file=${o.firmware.code ?? OVMF.code}`,
      "-drive", `if=pflash,format=raw,unit=1,file=${vars}`,
    );
  } else if (microvm) {
    // acpi=on: the guest finds the virtio-mmio devices and the power button (system_powerdown) in
    // ACPI. pit=on: without KVM there is no kvmclock, and the kernel calibrates its TSC on the PIT.
    args.push("-machine", "microvm,acpi=on,pit=on,pic=on,rtc=on,isa-serial=on");
  } else {
    args.push("-machine", "q35");
  }
  if (o.direct) {
    // microvm has no HPET, PM timer or speaker port: without KVM's clock the kernel cannot
    // measure its TSC and stalls; under TCG it is told the rate instead (harmless: TCG's TSC
    // is virtual anyway). With KVM (cloud-hypervisor) none of this is needed. First, so that it
    // lands before any `--`.
    const clock = microvm ? "tsc_early_khz=2000000 tsc=reliable " : "";
    args.push("-kernel", o.direct.kernel, "-initrd", o.direct.initrd, "-append", clock + o.direct.append);
  }
  (o.disks ?? []).forEach((d, i) => {
    const drive = `file=${resolve(d.file)},format=${d.format ?? "raw"}${(d.snapshot ?? true) ? ",snapshot=on" : ""},if=none,id=disk${i}`;
    const boot = d.bootIndex === undefined ? "" : `,bootindex=${d.bootIndex}`;
    if (d.bus === "nvme") args.push("-drive", drive, "-device", `nvme,serial=initos${i},drive=disk${i}${boot}`);
    else args.push("-drive", drive, "-device", `${dev("blk")},drive=disk${i}${boot}`);
  });
  if (o.share) args.push("-fsdev", `local,id=share0,path=${resolve(o.share.dir)},security_model=none`, "-device", `${dev("9p")},fsdev=share0,mount_tag=${o.share.tag}`);
  // The action on expiry is QEMU's default (-action watchdog=reset).
  if (o.i6300esb) {
    if (microvm) throw new Error(`${o.name}: the i6300esb watchdog is a PCI device; microvm has no PCI`);
    args.push("-device", "i6300esb");
  }
  if (tpmSock) args.push("-chardev", `socket,id=tpmchr,path=${tpmSock}`, "-tpmdev", "emulator,id=tpm0,chardev=tpmchr", "-device", "tpm-tis,tpmdev=tpm0");
  return args;
}

export async function startVm(o: VmOptions): Promise<Vm> {
  const logDir = o.logDir ?? "build/logs";
  mkdirSync(logDir, { recursive: true });
  const tmp = mkdtempSync(`${tmpdir()}/initos-vm-`);
  let swtpm: ChildProcess | undefined;
  let cleaned = false;
  const cleanup = () => {
    if (cleaned) return;
    cleaned = true;
    swtpm?.kill("SIGKILL");
    rmSync(tmp, { recursive: true, force: true });
  };
  try {
    let tpmSock: string | undefined;
    if (o.tpm) {
      const stateDir = typeof o.tpm === "object" ? o.tpm.stateDir : `${tmp}/tpm`;
      mkdirSync(stateDir, { recursive: true });
      tpmSock = `${tmp}/swtpm.sock`;
      swtpm = spawn("swtpm", ["socket", "--tpm2", "--tpmstate", `dir=${stateDir}`, "--ctrl", `type=unixio,path=${tpmSock}`, "--flags", "not-need-init"], {
        stdio: "ignore",
      });
      await waitForFile(tpmSock, 5000, "swtpm");
    }
    const logPath = `${logDir}/${o.name}.log`;
    const qemu = spawnLogged("qemu-system-x86_64", qemuArgs(o, tmp, tpmSock), logPath);
    const monitorSock = `${tmp}/monitor.sock`;
    let ports: Map<number, number> = new Map();
    const fixed = (o.net?.forward ?? []).filter((f) => f.host);
    for (const f of fixed) ports.set(f.guest, f.host!);
    if (fixed.length < (o.net?.forward.length ?? 0)) {
      // QEMU bound these itself (port 0): ask it which ports it got.
      const alive = () => qemu.exitCode === null && qemu.signalCode === null;
      try {
        ports = new Map([...parseHostForwards(await monitorQuery(monitorSock, "info usernet", { alive })), ...ports]);
      } catch (e) {
        if (!alive()) throw new Error(`${o.name}: QEMU exited at its start: ${readFileSync(logPath, "utf8").trim().slice(-2000)}`);
        qemu.kill("SIGKILL");
        throw e;
      }
      const missing = o.net!.forward.filter((f) => !ports.has(f.guest));
      if (missing.length) {
        qemu.kill("SIGKILL");
        throw new Error(`${o.name}: QEMU reports no forward to guest port(s) ${missing.map((f) => f.guest).join(", ")}; log ${logPath}`);
      }
    }
    const vm = new Vm(o.name, logPath, qemu, cleanup, monitorSock, ports);
    live.add(vm);
    void vm.exited.then(() => live.delete(vm));
    return vm;
  } catch (e) {
    cleanup();
    throw e;
  }
}

process.on("exit", () => {
  for (const v of live) v.kill();
});

/**
 * The host forwards in QEMU's `info usernet` table, guest port -> host port, e.g.
 * `  TCP[HOST_FORWARD]   8       127.0.0.1 33301       10.0.2.15 15022     0     0`.
 */
export function parseHostForwards(table: string): Map<number, number> {
  const m = new Map<number, number>();
  for (const l of table.matchAll(/^\s*TCP\[HOST_FORWARD\]\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)\s/gm)) m.set(Number(l[2]), Number(l[1]));
  return m;
}

function queryOnce(sock: string, command: string): Promise<string> {
  return new Promise((res, rej) => {
    let out = "";
    const c = createConnection(sock);
    c.setEncoding("utf8");
    c.on("error", rej);
    c.on("data", (d: string) => (out += d));
    c.on("connect", () => c.end(`${command}\n`));
    c.on("close", (hadError) => hadError || res(out));
  });
}

/**
 * One command to QEMU's human monitor, and what it printed (banner and echo included). QEMU
 * binds the socket before it listens on it: until then a connection finds no file (ENOENT) or is
 * refused (ECONNREFUSED), and is tried again every 20 ms, while `alive()` and for `timeoutMs`.
 */
export async function monitorQuery(sock: string, command: string, o: { alive?: () => boolean; timeoutMs?: number } = {}): Promise<string> {
  const end = Date.now() + (o.timeoutMs ?? 30_000);
  for (;;) {
    try {
      return await queryOnce(sock, command);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if ((code !== "ENOENT" && code !== "ECONNREFUSED") || Date.now() > end || (o.alive && !o.alive())) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

/**
 * A TCP port on 127.0.0.1 that is free right now (for a host forward). Racy: it is free again
 * until QEMU binds it, and another process may take it first. A forward without `host` has
 * QEMU bind a free port itself (Vm.hostPort) and has no such window.
 */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}
