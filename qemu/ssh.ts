// A real OpenSSH client against a guest's forwarded sshd. Asynchronous on purpose: while a
// synchronous child runs, the test process cannot drain QEMU's serial pipe, QEMU blocks on it,
// and the guest's console (and PID 1 writing to it) stalls with it.
import { spawn } from "node:child_process";

export interface SshResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/**
 * `strict`: the host key must already be in `knownHosts` (proves a guest kept its key);
 * `alias` names the host in known_hosts instead of [127.0.0.1]:port, which changes every boot.
 */
export function ssh(port: number, command: string, o: { key?: string | null; input?: string; knownHosts?: string; strict?: boolean; alias?: string } = {}): Promise<SshResult> {
  const auth = o.key
    ? ["-i", o.key, "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey"]
    : ["-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1"];
  const args = [
    ...auth,
    "-p", String(port),
    "-o", `StrictHostKeyChecking=${o.strict ? "yes" : o.knownHosts ? "accept-new" : "no"}`,
    "-o", `UserKnownHostsFile=${o.knownHosts ?? "/dev/null"}`,
    "-o", "BatchMode=yes",
    ...(o.alias ? ["-o", `HostKeyAlias=${o.alias}`] : []),
    "-o", "ConnectTimeout=30",
    "root@127.0.0.1",
    command,
  ];
  return new Promise((resolve) => {
    const child = spawn("ssh", args, { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout += d));
    child.stderr.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), 120_000);
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
    child.stdin.end(o.input ?? "");
  });
}

/** sshd comes up a moment after the agent says so: retry while the connection is refused, bounded. */
export async function sshWhenUp(port: number, command: string, o: Parameters<typeof ssh>[2] = {}): Promise<SshResult> {
  for (let i = 0; i < 30; i++) {
    const r = await ssh(port, command, o);
    if (!/kex_exchange_identification|Connection (reset|refused|closed)/.test(r.stderr)) return r;
    await new Promise((res) => setTimeout(res, 2000));
  }
  throw new Error(`sshd on 127.0.0.1:${port} never answered`);
}
