// A real OpenSSH client against a guest's forwarded sshd. Asynchronous on purpose: while a
// synchronous child runs, the test process cannot drain QEMU's serial pipe, QEMU blocks on it,
// and the guest's console (and PID 1 writing to it) stalls with it.
import { type ChildProcess, spawn } from "node:child_process";
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, realpathSync } from "node:fs";

export interface SshResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

export interface SshOptions {
  key?: string | null;
  /** Text for the command's stdin. */
  input?: string;
  /**
   * A file for the command's stdin, streamed by ssh itself from the open file (an update
   * bundle, ~95 MB, is never read into this process). Exclusive with `input`.
   */
  inputFile?: string;
  knownHosts?: string;
  strict?: boolean;
  alias?: string;
  /** Killed (status null) after this long; default 120 s. */
  timeoutMs?: number;
  /** Called with the ssh process once started (e.g. to see how much of `inputFile` it has read). */
  onSpawn?: (child: ChildProcess) => void;
}

/**
 * How far a process has read `file` (the largest file position among its descriptors open on
 * it, from /proc/<pid>/fdinfo: ssh reads its stdin through a dup of fd 0); null when the
 * process is gone or has the file open no more.
 */
export function readPosition(pid: number, file: string): number | null {
  const want = realpathSync(file);
  let best: number | null = null;
  try {
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
      try {
        if (readlinkSync(`/proc/${pid}/fd/${fd}`) !== want) continue;
        const m = /^pos:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, "utf8"));
        if (m) best = Math.max(best ?? 0, Number(m[1]));
      } catch {
        // closed meanwhile
      }
    }
  } catch {
    return null;
  }
  return best;
}

/**
 * `strict`: the host key must already be in `knownHosts` (proves a guest kept its key);
 * `alias` names the host in known_hosts instead of [127.0.0.1]:port, which changes every boot.
 */
export function ssh(port: number, command: string, o: SshOptions = {}): Promise<SshResult> {
  if (o.input !== undefined && o.inputFile !== undefined) throw new Error("ssh: input and inputFile both given");
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
    // The file's descriptor is the child's stdin: ssh reads it at its own pace.
    const fd = o.inputFile === undefined ? undefined : openSync(o.inputFile, "r");
    const child = spawn("ssh", args, { stdio: [fd ?? "pipe", "pipe", "pipe"] });
    if (fd !== undefined) closeSync(fd);
    o.onSpawn?.(child);
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (d) => (stdout += d));
    child.stderr!.on("data", (d) => (stderr += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), o.timeoutMs ?? 120_000);
    child.on("close", (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
    child.stdin?.end(o.input ?? "");
  });
}

/**
 * Commands that change nothing in the guest: sending one again after a connection that broke
 * midway is harmless. `unlock`, `reseal`, `switch-root`, `update`, `reboot`, ... are not.
 */
const IDEMPOTENT = /^(status|log|jails|image list|hostconfig show)(\s|$)/;

export const isIdempotent = (command: string): boolean => IDEMPOTENT.test(command.trim());

/**
 * Whether a failed ssh may be run again: always when the connection ended before the SSH
 * identification exchange (nothing of the command reached the server: QEMU's forward accepted,
 * the guest's sshd was not listening yet); a connection closed or reset later may have carried
 * the command, so only an idempotent one is sent again.
 */
export function retryable(stderr: string, idempotent: boolean): boolean {
  if (/kex_exchange_identification:|Connection timed out during banner exchange|connect to host \S+ port \d+: Connection refused/.test(stderr)) return true;
  return idempotent && /Connection (reset|refused|closed)|closed by remote host/.test(stderr);
}

export interface Retry {
  /** Default 30. */
  attempts?: number;
  /** Between attempts; default 2000. */
  delayMs?: number;
  /** Default: isIdempotent(command). */
  idempotent?: boolean;
}

/**
 * sshd comes up a moment after the agent says so: retry, bounded, while the connection never
 * reached it; and, for an idempotent command only, also when a connection broke later. A
 * non-idempotent command (`unlock`, `reseal`, `switch-root`) whose connection broke after the
 * exchange began is not sent again: its result (status 255, ssh's message) is returned.
 */
export async function sshWhenUp(port: number, command: string, o: SshOptions = {}, retry: Retry = {}): Promise<SshResult> {
  const attempts = retry.attempts ?? 30;
  const idempotent = retry.idempotent ?? isIdempotent(command);
  let last: SshResult | undefined;
  for (let i = 0; i < attempts; i++) {
    if (i) await new Promise((res) => setTimeout(res, retry.delayMs ?? 2000));
    last = await ssh(port, command, o);
    if (last.status !== 255 || !retryable(last.stderr, idempotent)) return last;
  }
  throw new Error(`sshd on 127.0.0.1:${port} never answered ${JSON.stringify(command)} in ${attempts} attempts; last: ${last?.stderr.trim()}`);
}
