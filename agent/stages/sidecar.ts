// Sidecar mode: no root to switch to (or recovery): PID 1 stays, with sshd on the network and
// the admin commands behind it. An ssh session gets the agent itself as its "shell", which only
// speaks the ctl commands: there is no shell to break into.
import type { AgentConfig } from "../config.ts";
import { callAdmin, requestFromArgs, takesBody } from "../admin.ts";
import type { Logger } from "../log.ts";
import { type Supervised, supervise } from "../supervise.ts";
import type { Clock, Files, Processes } from "../sys/index.ts";
import { TOOLS_ROOT, toolArgv, toolExec } from "../sys/tools.ts";

export const AGENT_PATH = "/usr/bin/initos-agent";
export const SSH_DIR = "/run/initos/ssh";
export const HOST_KEY = `${SSH_DIR}/host_ed25519`;

/**
 * authorized_keys lines: no forwarding of any kind; no pty either unless the config offers a
 * shell (the command interface needs none).
 */
export function authorizedKeys(keys: readonly string[], shell = false): string {
  const opts = `no-port-forwarding,no-agent-forwarding,no-X11-forwarding${shell ? "" : ",no-pty"}`;
  return keys.map((k) => `${opts} ${k.trim()}\n`).join("");
}

/** root's account: home /root, and the agent as its login shell. */
export function writeAccounts(sys: Files, keys: readonly string[], shell = false): void {
  sys.mkdirp("/etc");
  sys.writeFile("/etc/passwd", `root:x:0:0:root:/root:${AGENT_PATH}\n`);
  sys.writeFile("/etc/group", "root:x:0:\n");
  sys.writeFile("/etc/shells", `${AGENT_PATH}\n`);
  sys.mkdirp("/root/.ssh", 0o700);
  sys.writeBytes("/root/.ssh/authorized_keys", Buffer.from(authorizedKeys(keys, shell)), 0o600);
}

export function startSshd(sys: Files & Processes & Clock, log: Logger, cfg: AgentConfig): Supervised | null {
  if (!cfg.ssh.authorizedKeys.length) {
    log.warn("sidecar: no authorized ssh keys in the config; sshd not started");
    return null;
  }
  writeAccounts(sys, cfg.ssh.authorizedKeys, cfg.ssh.shell);
  const hostKey = ensureHostKey(sys);
  // -F foreground, -E log to stderr (our log), -s no passwords, -j/-k no forwarding.
  const dropbear = toolExec("dropbear");
  const svc = supervise(sys, log, { name: "sshd", argv: [...dropbear.argv, "-F", "-E", "-s", "-j", "-k", "-p", String(cfg.ssh.port), "-r", hostKey], env: dropbear.env });
  log.info(`sidecar: sshd on port ${cfg.ssh.port}, ${cfg.ssh.authorizedKeys.length} authorized key(s)`);
  return svc;
}

/**
 * The key sshd presents, in tmpfs: while the pool is locked the recovery host key (unsealed by
 * release.ts) when this boot may have it; once the pool is open the pool's own key (pool.ts
 * keepHostKey); else one made now, for this boot.
 */
export function ensureHostKey(sys: Files & Processes): string {
  sys.mkdirp(SSH_DIR, 0o700);
  if (!sys.exists(HOST_KEY)) sys.run([...toolArgv("dropbearkey"), "-t", "ed25519", "-f", HOST_KEY]);
  return HOST_KEY;
}

/**
 * Removes the key sshd presented from /run: its bytes overwritten in place first (a truncate
 * would hand tmpfs's pages back with the key still in them), then the name. /run moves into
 * the OS; the recovery host key must not be there, nor in a page the OS may get.
 */
export function wipeHostKey(sys: Files): void {
  const kind = sys.lstat(HOST_KEY).kind;
  if (kind === "missing") return;
  const old = kind === "file" ? sys.readBytes(HOST_KEY) : null;
  if (old?.length) {
    sys.writeOnce(HOST_KEY, new Uint8Array(old.length), 0o600);
    old.fill(0);
  }
  sys.unlink(HOST_KEY);
}

/** dropbear's ed25519 private key file: string "ssh-ed25519", then a string of 64 bytes (private half, public half). */
const DROPBEAR_ED25519 = Buffer.from([0, 0, 0, 11, ...Buffer.from("ssh-ed25519"), 0, 0, 0, 64]);

/**
 * The public half (32 bytes) of a dropbear ed25519 private key file, which is what tells two
 * keys apart (and what a client pins); null when `key` is not such a file.
 */
export function dropbearPublicKey(key: Uint8Array): Buffer | null {
  const b = Buffer.from(key.buffer, key.byteOffset, key.byteLength);
  if (b.length !== DROPBEAR_ED25519.length + 64 || !b.subarray(0, DROPBEAR_ED25519.length).equals(DROPBEAR_ED25519)) return null;
  return Buffer.from(b.subarray(DROPBEAR_ED25519.length + 32));
}

/** A public half as known_hosts and the install's "pin it" line spell it: "ssh-ed25519 AAAA...". */
export function sshPublicKey(pub: Uint8Array): string {
  const blob = Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from("ssh-ed25519"), Buffer.from([0, 0, 0, 32]), pub]);
  return `ssh-ed25519 ${blob.toString("base64")}`;
}

/** busybox from the verified tools image: the only shell there is, and only when the config offers it. */
export const BUSYBOX = `${TOOLS_ROOT}/usr/bin/busybox`;

export interface ShellIo {
  readStdin(): string;
  /** The session's stdin as a stream (an update bundle). */
  stdinStream(): AsyncIterable<Uint8Array>;
  /** Sends one request line (then `body`, if given) to the admin socket; the reply line. */
  request(line: string, body?: AsyncIterable<Uint8Array>): Promise<string>;
  /** Runs busybox with these arguments on the session's stdio; absent when no shell is offered. */
  shell?: (args: string[]) => Promise<number>;
}

/**
 * The agent started by sshd as root's shell: `-c "<command>"`, or nothing for an interactive
 * login. ctl commands always work; anything else goes to busybox sh when the signed config
 * offers a shell, and is refused with the list of commands otherwise. Returns the exit code.
 */
export async function runAsShell(args: readonly string[], io: ShellIo): Promise<number> {
  const line = args[0] === "-c" ? (args[1] ?? "").trim() : "";
  const words = line.split(/\s+/).filter(Boolean);
  const req = requestFromArgs(words[0] === "ctl" ? words.slice(1) : words, io.readStdin);
  if (typeof req === "string") {
    if (io.shell) return io.shell(line ? ["sh", "-c", line] : ["sh", "-l"]);
    process.stderr.write(`initos: ${req}\n`);
    return 2;
  }
  const res = await callAdmin(req, (l) => io.request(l, takesBody(req) ? io.stdinStream() : undefined));
  process.stdout.write(res.text.endsWith("\n") ? res.text : `${res.text}\n`);
  return res.ok ? 0 : 1;
}
