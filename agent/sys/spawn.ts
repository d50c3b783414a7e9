// Child processes of the agent: tools fed a stream, and services (supervise.ts). Every child
// is registered with PID 1's orphan reaper as the runtime's own, so the runtime, not the
// reaper, collects its exit status.
import type { spawn as spawnType } from "node:child_process";
import type { ServiceProcess } from "./index.ts";

/**
 * Children the runtime itself spawned and will wait for; PID 1's orphan reaper (pid1.ts) leaves
 * them alone. It lives here, with the spawns that fill it, so this layer needs nothing above it.
 */
export const ownChildren = new Set<number>();

/** See Sys.runWithInput. The child is registered with PID 1's reaper so the runtime gets its status. */
export async function runWithInput(spawnFn: typeof spawnType, argv: readonly string[], input: AsyncIterable<Uint8Array> | Iterable<Uint8Array>): Promise<string> {
  const [cmd, ...args] = argv;
  const child = spawnFn(cmd!, args, { stdio: ["pipe", "pipe", "pipe"] });
  const pid = child.pid;
  if (pid) ownChildren.add(pid);
  const stdout: Buffer[] = [];
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => void stdout.push(d));
  child.stderr!.on("data", (d: Buffer) => void (stderr = (stderr + d.toString("utf8")).slice(-4096)));
  const exited = new Promise<{ code: number | null; signal: string | null; error?: Error }>((resolve) => {
    child.on("error", (error) => resolve({ code: null, signal: null, error }));
    child.on("close", (code, signal) => resolve({ code, signal }));
  });
  // EPIPE once the tool stops reading (or never started): from then on the input is only drained.
  let writable = true;
  const stdin = child.stdin!;
  stdin.on("error", () => void (writable = false));
  stdin.on("close", () => void (writable = false));
  let r: Awaited<typeof exited>;
  try {
    try {
      for await (const chunk of input) {
        if (!writable) continue;
        if (!stdin.write(chunk)) {
          await new Promise<void>((resolve) => {
            const done = () => (stdin.off("drain", done), stdin.off("close", done), resolve());
            stdin.on("drain", done);
            stdin.on("close", done);
          });
        }
      }
    } catch (e) {
      // The input failed (an unreadable stick): the tool must not finish on a truncated stream.
      child.kill("SIGKILL");
      await exited;
      throw e;
    } finally {
      stdin.end();
    }
    r = await exited;
  } finally {
    if (pid) ownChildren.delete(pid);
  }
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.code !== 0) throw new Error(`${argv.join(" ")}: ${stderr.trim().split("\n").at(-1) || (r.signal ? `killed by ${r.signal}` : `exit ${r.code}`)}`);
  return Buffer.concat(stdout).toString("utf8");
}

/** See Proc.spawnService. */
export function spawnService(spawnFn: typeof spawnType, argv: readonly string[], env: Readonly<Record<string, string>>, onLine: (line: string) => void): ServiceProcess {
  // detached: setsid() in the child, so the service and what it starts share a session id.
  const child = spawnFn(argv[0]!, argv.slice(1), { env: { ...env }, stdio: ["ignore", "pipe", "pipe"], detached: true });
  const pid = child.pid;
  if (pid) ownChildren.add(pid);
  for (const stream of [child.stdout!, child.stderr!]) {
    let rest = "";
    stream.setEncoding("utf8");
    stream.on("data", (d: string) => {
      const lines = (rest + d).split("\n");
      rest = lines.pop()!;
      for (const l of lines) if (l.trim()) onLine(l.trim());
    });
  }
  const exited = new Promise<string>((resolve) => {
    let done = false;
    const end = (why: string) => {
      if (done) return;
      done = true;
      if (pid) ownChildren.delete(pid);
      resolve(why);
    };
    child.on("exit", (code, signal) => end(signal ? `killed by ${signal}` : `exited with ${code}`));
    child.on("error", (e) => end(`failed to start: ${e.message}`));
  });
  return { pid, exited };
}
