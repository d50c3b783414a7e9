// initos-agent entry point. As PID 1 it boots the machine (boot.ts); it never returns or exits.
import { existsSync, readdirSync, readFileSync, writeSync } from "node:fs";
import { dirname } from "node:path";
import { CONFIG_PATH, parseConfig } from "./config.ts";
import { BUSYBOX, runAsShell } from "./stages/sidecar.ts";
import { boot, type BootContext, type BootState, failBoot, shutdown } from "./boot.ts";
import { CTL_COMMANDS, CTL_SOCKET } from "./admin.ts";
import { describe } from "./errors.ts";
import { KmsgLogger, Timeline } from "./log.ts";
import { installPid1Handlers } from "./pid1.ts";
import { realSys } from "./sys/index.ts";
import { RemoteAdmin } from "./stages/remote.ts";

/** Where the initrd build puts sigrelay.so (see initrd/sigrelay.c). */
const SIGRELAY_LIB = "/usr/lib/initos/sigrelay.so";

async function runAsInit(): Promise<never> {
  const log = new KmsgLogger();
  const timeline = new Timeline();
  const sys = await realSys();
  const libc = await import("./sys/libc.ts");
  const ctx: BootContext = { sys, log, timeline };
  const state: BootState = { remote: new RemoteAdmin(sys, log) };

  let failing = false;
  const fail = (e: unknown): Promise<never> => {
    if (failing) {
      // A second failure while handling the first: keep the first reason, do not recurse.
      log.err(`also: ${describe(e)}`);
      return new Promise<never>(() => {});
    }
    failing = true;
    // After switch_root's chroot (state.pastPointOfNoReturn) this only logs and reboots.
    return failBoot(ctx, state, e);
  };

  installPid1Handlers(sys, log, {
    reap: (pid) => libc.reapIfExited(pid),
    listPids: () => readdirSync("/proc"),
    onFatal: (e) => void fail(e),
    power: (action, why) => void shutdown(ctx, state, action, why),
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
    writeSync(1, `initos: fatal before the failure policy could run: ${describe(e)}\n`);
  } catch {
    // no console either: nothing left to tell
  }
  setInterval(() => {}, 1 << 30);
}

const readStdin = () => readFileSync(0, "utf8");

/** A shell for ssh sessions only when the signed config offers one and the verified image has it. */
function shellOffered(): ((args: string[]) => Promise<number>) | undefined {
  const { config } = parseConfig(existsSync(CONFIG_PATH) ? readFileSync(CONFIG_PATH, "utf8") : null);
  if (!config.ssh.shell || !existsSync(BUSYBOX)) return undefined;
  return async (args) => {
    const child = Bun.spawn([BUSYBOX, ...args], { stdio: ["inherit", "inherit", "inherit"], env: { ...process.env, PATH: `${dirname(BUSYBOX)}:/usr/bin` } });
    return await child.exited;
  };
}

/** The sidecar beside the OS (see stages/beside.ts): phase 1 builds its root, phase 2 serves. */
async function runBesideSidecar(phase: "beside" | "beside-run"): Promise<never> {
  const log = new KmsgLogger();
  try {
    const sys = await realSys();
    const beside = await import("./stages/beside.ts");
    return phase === "beside" ? beside.enterBesideRoot(sys, log) : await beside.runBeside(sys, log, new KmsgLogger());
  } catch (e) {
    log.err(`sidecar beside the OS: ${describe(e)}`);
    process.exit(1);
  }
}

/**
 * Which role this process has. No top-level await: the bytecode build (`bun build --bytecode`,
 * which saves the runtime from parsing the agent at every start) needs a CommonJS bundle.
 */
function main(): void {
  if (process.pid === 1) {
    void runAsInit().catch(lastResort);
  } else if (process.argv[2] === "beside" || process.argv[2] === "beside-run") {
    void runBesideSidecar(process.argv[2]);
  } else if (process.argv[2] === "ctl" || process.argv[2] === "-c" || (process.argv0.startsWith("-") && process.argv.length === 2)) {
    // `initos-agent ctl status`, sshd running the agent as root's shell (`-c "status"`), or an
    // interactive ssh login (argv[0] "-initos-agent", no arguments).
    const args = process.argv[2] === "ctl" ? ["-c", process.argv.slice(3).join(" ")] : process.argv.slice(2);
    const request = async (line: string, body?: AsyncIterable<Uint8Array>) => (await import("./sys/ctlsocket.ts")).requestLine(CTL_SOCKET, line, body);
    const stdinStream = () => process.stdin as AsyncIterable<Uint8Array>;
    void runAsShell(args, { readStdin, stdinStream, request, shell: shellOffered() })
      .catch((e: unknown) => (process.stderr.write(`initos: ${describe(e)}\n`), 1))
      .then((code) => process.exit(code));
  } else {
    process.stderr.write(`initos-agent: PID 1 of the initrd; as a client: initos-agent ctl {${CTL_COMMANDS.join("|")}}\n`);
    process.exit(2);
  }
}

main();
