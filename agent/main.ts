// initos-agent entry point. As PID 1 it boots the machine (boot.ts); it never returns or exits.
import { readdirSync, readFileSync, writeSync } from "node:fs";
import { runAsShell } from "./stages/sidecar.ts";
import { boot, type BootContext, type BootState, rebootDelay, startFailureSidecar } from "./boot.ts";
import { applyFailurePolicy } from "./failure.ts";
import { KmsgLogger, Timeline } from "./log.ts";
import { installPid1Handlers } from "./pid1.ts";
import { realSys } from "./sys/index.ts";

/** Where the initrd build puts sigrelay.so (see initrd/sigrelay.c). */
const SIGRELAY_LIB = "/usr/lib/initos/sigrelay.so";

async function runAsInit(): Promise<never> {
  const log = new KmsgLogger();
  const timeline = new Timeline();
  const sys = await realSys();
  const libc = await import("./sys/libc.ts");
  const ctx: BootContext = { sys, log, timeline };
  const state: BootState = {};

  let failing = false;
  const fail = (e: unknown): Promise<never> => {
    if (failing) {
      // A second failure while handling the first: keep the first reason, do not recurse.
      log.err(`also: ${e instanceof Error ? e.message : String(e)}`);
      return new Promise<never>(() => {});
    }
    failing = true;
    return applyFailurePolicy(sys, log, timeline, e, rebootDelay(state), () => startFailureSidecar(ctx, state));
  };

  installPid1Handlers(sys, log, {
    reap: (pid) => libc.reapIfExited(pid),
    listPids: () => readdirSync("/proc"),
    onFatal: (e) => void fail(e),
    relaySignal: (sig) => libc.relaySignal(sig, SIGRELAY_LIB),
  });
  log.info(`initos-agent starting (pid ${process.pid})`);
  try {
    return await boot(ctx, state);
  } catch (e) {
    return fail(e);
  }
}

/**
 * Only reached when even libc could not be bound, so the failure policy cannot reboot: say why
 * on the console and stay alive. Exiting would be a kernel panic that scrolls the reason away.
 */
function lastResort(e: unknown): void {
  try {
    writeSync(1, `initos: fatal before the failure policy could run: ${e instanceof Error ? e.message : String(e)}\n`);
  } catch {
    // no console either: nothing left to tell
  }
  setInterval(() => {}, 1 << 30);
}

const readStdin = () => readFileSync(0, "utf8");

if (process.pid === 1) {
  await runAsInit().catch(lastResort);
} else if (process.argv[2] === "ctl" || process.argv[2] === "-c") {
  // `initos-agent ctl status`, or sshd running the agent as root's shell: `-c "status"`.
  const args = process.argv[2] === "ctl" ? ["-c", process.argv.slice(3).join(" ")] : process.argv.slice(2);
  process.exit(await runAsShell(args, readStdin).catch((e: unknown) => (process.stderr.write(`initos: ${(e as Error).message}\n`), 1)));
} else {
  process.stderr.write("initos-agent: PID 1 of the initrd; as a client: initos-agent ctl {status|log|unlock|reboot|poweroff}\n");
  process.exit(2);
}
