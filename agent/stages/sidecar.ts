// Sidecar mode: no root to switch to (or recovery): PID 1 stays, with sshd on the network and
// the admin commands behind it. An ssh session gets the agent itself as its "shell", which only
// speaks the ctl commands: there is no shell to break into.
import type { Server } from "node:net";
import type { AgentConfig } from "../config.ts";
import { callCtl, type CtlHandler, requestFromArgs, serveCtl } from "../ctl.ts";
import type { Logger } from "../log.ts";
import { type Supervised, supervise } from "../supervise.ts";
import type { Sys } from "../sys/index.ts";
import { sidecarArgv, sidecarExec } from "../sys/sidecar.ts";

export const AGENT_PATH = "/usr/bin/initos-agent";
const SSH_DIR = "/run/initos/ssh";

/** authorized_keys lines: every key is restricted to the command interface. */
export function authorizedKeys(keys: readonly string[]): string {
  return keys.map((k) => `no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty ${k.trim()}\n`).join("");
}

/** root's account: home /root, and the agent as its login shell. */
export function writeAccounts(sys: Sys, keys: readonly string[]): void {
  sys.mkdirp("/etc");
  sys.writeFile("/etc/passwd", `root:x:0:0:root:/root:${AGENT_PATH}\n`);
  sys.writeFile("/etc/group", "root:x:0:\n");
  sys.writeFile("/etc/shells", `${AGENT_PATH}\n`);
  sys.mkdirp("/root/.ssh", 0o700);
  sys.writeBytes("/root/.ssh/authorized_keys", Buffer.from(authorizedKeys(keys)), 0o600);
}

export function startSshd(sys: Sys, log: Logger, cfg: AgentConfig): Supervised | null {
  if (!cfg.ssh.authorizedKeys.length) {
    log.warn("sidecar: no authorized ssh keys in the config; sshd not started");
    return null;
  }
  writeAccounts(sys, cfg.ssh.authorizedKeys);
  sys.mkdirp(SSH_DIR, 0o700);
  const hostKey = `${SSH_DIR}/host_ed25519`;
  if (!sys.exists(hostKey)) sys.run([...sidecarArgv("dropbearkey"), "-t", "ed25519", "-f", hostKey]);
  // -F foreground, -E log to stderr (our log), -s no passwords, -j/-k no forwarding.
  const dropbear = sidecarExec("dropbear");
  const svc = supervise(log, { name: "sshd", argv: [...dropbear.argv, "-F", "-E", "-s", "-j", "-k", "-p", String(cfg.ssh.port), "-r", hostKey], env: dropbear.env });
  log.info(`sidecar: sshd on port ${cfg.ssh.port}, ${cfg.ssh.authorizedKeys.length} authorized key(s)`);
  return svc;
}

export function startCtl(log: Logger, handle: CtlHandler): Server {
  return serveCtl(log, handle);
}

/**
 * The agent started by sshd as root's shell: `-c "<command>"`. Only ctl commands run; anything
 * else is refused with the list of commands. Returns the exit code.
 */
export async function runAsShell(args: readonly string[], readStdin: () => string): Promise<number> {
  const words = args[0] === "-c" ? (args[1] ?? "").trim().split(/\s+/).filter(Boolean) : [];
  const req = requestFromArgs(words[0] === "ctl" ? words.slice(1) : words, readStdin);
  if (typeof req === "string") {
    process.stderr.write(`initos: ${req}\n`);
    return 2;
  }
  const res = await callCtl(req);
  process.stdout.write(res.text.endsWith("\n") ? res.text : `${res.text}\n`);
  return res.ok ? 0 : 1;
}
