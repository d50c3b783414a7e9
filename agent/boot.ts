// The boot plan, top to bottom. Each stage is a function with typed inputs and outputs; this
// file only sequences them, times them and decides between them.
import { type Cmdline, parseCmdline } from "./cmdline.ts";
import { type AgentConfig, CONFIG_PATH, parseConfig } from "./config.ts";
import { BootError, describe } from "./errors.ts";
import { applyFailurePolicy } from "./failure.ts";
import { type Logger, Timeline, uptime } from "./log.ts";
import { type EarlyResult, restoreKmsgThrottle, setupEarly } from "./stages/early.ts";
import { Coldplug } from "./stages/devices.ts";
import { type EspResult, findEsps, unmountEsps } from "./stages/esp.ts";
import { install, INSTALL_CONFIG, parseInstallConfig } from "./stages/install.ts";
import { mountPool, unlockPool } from "./stages/pool.ts";
import { countZombies, memAvailableKiB, powerAction, procStatusKiB } from "./pid1.ts";
import { type Supervised, stopServices, supervise } from "./supervise.ts";
import { SSH_DIR } from "./stages/sidecar.ts";
import { besideWanted, startBeside } from "./stages/beside.ts";
import { SIDECAR_ROOT } from "./sys/sidecar.ts";
import { networkRequested, setupNetwork } from "./stages/network.ts";
import { mountVmRoot, podHandoff, setupVmMounts, type VmPlan, vmPlan } from "./stages/vm.ts";
import { RecoverySidecar } from "./stages/recovery.ts";
import { BootTpm } from "./diskkey/latch.ts";
import { type CtlHandler, type CtlResponse } from "./ctl.ts";
import { bindImagesForOs, releaseImages, setupImages } from "./stages/images.ts";
import { loadModules } from "./stages/modules.ts";
import { mountRoot, SYSROOT } from "./stages/root.ts";
import { findInit, resolveInRoot, switchRoot } from "./switchroot.ts";
import type { Sys } from "./sys/index.ts";

export interface BootContext {
  sys: Sys;
  log: Logger & { quiet: boolean; verbose: boolean; recent(): string[] };
  timeline: Timeline;
}

/** What the boot learned so far; the failure policy reads it to pick its delay. */
export interface BootState {
  cmdline?: Cmdline;
  config?: AgentConfig;
  early?: EarlyResult;
  /** sshd and the admin socket while the initrd serves humans (sidecar mode, recovery). */
  sidecar: RecoverySidecar;
  /** The TPM over this boot: phases, the latch. */
  tpm?: BootTpm;
  /**
   * switch_root made the OS's root "/" (set by switchRoot just before it pivots or chroots).
   * From then on the failure policy only logs and reboots: nothing is written into the OS.
   */
  pastPointOfNoReturn?: boolean;
}

/** Runs one named stage, logs and records its duration whether it succeeds or fails. */
export async function stage<T>(ctx: BootContext, name: string, fn: () => T | Promise<T>): Promise<T> {
  const start = uptime();
  const record = (ok: boolean, error?: string) => {
    const durationMs = (uptime() - start) * 1000;
    ctx.timeline.record({ name, start, durationMs, ok, ...(error ? { error } : {}) });
    return durationMs;
  };
  try {
    const result = await fn();
    ctx.log.info(`stage ${name}: ok in ${record(true).toFixed(0)}ms`);
    return result;
  } catch (e) {
    const ms = record(false, describe(e));
    ctx.log.err(`stage ${name}: failed after ${ms.toFixed(0)}ms`);
    throw e;
  }
}

/** Reads the two inputs: the signed config from the initrd and the kernel command line. */
export function readInputs(ctx: BootContext): { cmdline: Cmdline; config: AgentConfig; errors: string[] } {
  const { sys, log } = ctx;
  const { config, error } = parseConfig(sys.readFile(CONFIG_PATH));
  if (error) log.err(error);
  const { cmdline, errors } = parseCmdline(sys.readFile("/proc/cmdline") ?? "");
  for (const e of errors) log.err(e);
  log.quiet = cmdline.quiet;
  log.verbose = cmdline.debug;
  return { cmdline, config, errors };
}

export function rebootDelay(state: Pick<BootState, "cmdline" | "config">): number {
  const { cmdline, config } = state;
  if (cmdline?.rebootDelaySeconds !== undefined) return cmdline.rebootDelaySeconds;
  if (cmdline?.panic !== undefined && cmdline.panic > 0) return cmdline.panic;
  return config?.rebootDelaySeconds ?? 30;
}

export async function boot(ctx: BootContext, state: BootState): Promise<never> {
  const { sys, log } = ctx;

  state.early = await stage(ctx, "early", () => setupEarly(sys, log));
  const { cmdline, config, errors } = readInputs(ctx);
  Object.assign(state, { cmdline, config });
  // A VM is configured by its cmdline alone: a bad value there would start a different VM than
  // the one asked for (no share, another address), so it fails instead of using a default.
  if (cmdline.mode === "vm" && errors.length) throw new BootError(`vm: ${errors[0]}`);

  const cold = new Coldplug(sys, log);
  await stage(ctx, "modules", () => loadModules(sys, log, config.modules, cold));

  let esp: EspResult | undefined;
  // VMs boot without firmware or ESP: what they need is in their initrd.
  if (config.images.length > 0 && cmdline.mode !== "vm") {
    const efivars = state.early.efivars;
    esp = await stage(ctx, "esp", async () => {
      await efivars; // the booted slot is an EFI variable (LoaderDevicePartUUID)
      return findEsps(sys, log, cold, config.esp.slots, config.esp.waitSeconds);
    });
    const allowUnverified = unverifiedAllowed(state.early!, cmdline, log);
    await stage(ctx, "images", () => setupImages(sys, log, config, esp!, allowUnverified, cold));
  }

  // The TPM: PCR 11 says "enter-initrd" (what the PCR key signed), then the latch. Only the
  // unlock path unseals, and it latches right after its attempt; every other path latches now,
  // before it touches another disk, the network, sshd or a root.
  const tpm = (state.tpm = new BootTpm(sys, log, config.tpm));
  const noUnseal = whyNoUnseal(cmdline, !!esp);
  await stage(ctx, "tpm", async () => {
    if (!(await tpm.find())) return;
    tpm.measurePhase("enter-initrd");
    if (noUnseal) tpm.latch(noUnseal);
  });

  // Sidecar mode stays here until an operator sends `switch-root`; then the boot goes on.
  const services = cmdline.mode === "sidecar" ? await sidecar(ctx, state, cold) : [];

  if (cmdline.mode === "install") {
    if (!esp) throw new BootError("install: no ESP with images to install from");
    const ic = parseInstallConfig(sys.readFile(INSTALL_CONFIG));
    await stage(ctx, "install", () => install(sys, log, cold, config, ic, esp!, tpm, state.early!.secureBoot));
    ctx.timeline.save();
    powerAction(sys, log, "poweroff", "install finished");
    for (;;) await sys.sleep(3_600_000);
  }

  const vm = cmdline.mode === "vm" ? vmPlan(cmdline) : undefined;
  if (vm) {
    const wait = cmdline.rootWaitSeconds ?? config.rootWaitSeconds;
    if (networkRequested(cmdline)) await stage(ctx, "network", () => setupNetwork(sys, log, cold, cmdline, wait));
    await stage(ctx, "root", () => mountVmRoot(sys, log, cold, vm, cmdline, wait));
    await stage(ctx, "vm", () => setupVmMounts(sys, log, cold, vm, wait));
  } else if (cmdline.root) {
    // A root named on the cmdline: mount it as it is (tests, unencrypted machines).
    const root = cmdline.root;
    await stage(ctx, "root", () =>
      mountRoot(sys, log, cold, {
        spec: root,
        fstypes: cmdline.rootfstype?.split(","),
        options: cmdline.rootflags,
        rw: cmdline.rw,
        waitSeconds: cmdline.rootWaitSeconds ?? config.rootWaitSeconds,
      }),
    );
  } else {
    // The installed machine: the encrypted pool says which subvolume is the root.
    if (!esp) throw new BootError("no root= on the kernel command line and no ESP to unlock an encrypted pool with");
    const pool = await stage(ctx, "unlock", () => unlockPool(sys, log, cold, config, cmdline, tpm, state.early!.secureBoot, esp!, state.sidecar, adminHandler(ctx, state)));
    await stage(ctx, "root", () => mountPool(sys, log, pool.devices, cmdline.rw, cmdline.rootSubvolume, config));
  }

  const target = await stage(ctx, "handoff-check", () => handoffTarget(sys, log, cmdline, config, vm));
  // The OS must find the latch extended and PCR 11 past the initrd, whatever path led here.
  await tpm.leaveInitrd();
  tpm.close();
  // Nothing the initrd started may outlive it (unless beside the OS, in its own namespace).
  await state.sidecar.stop();
  await stopServices(sys, log, services);
  let beside = false;
  if (besideWanted(cmdline, config)) {
    ctx.timeline.save(); // the sidecar takes a copy of the timeline with it
    const network = () => state.sidecar.network(sys, log, cold, cmdline, config);
    // The OS matters more than its remote admin: a sidecar that cannot start is logged, no more.
    beside = await stage(ctx, "sidecar-beside", () => startBeside(sys, log, cmdline, config, network)).then(
      () => true,
      (e: unknown) => (log.err(describe(e)), false),
    );
  }
  // After the sidecar beside the OS took its own copy of its image: /run moves into the OS, and
  // nothing of the initrd may stay mounted there but the modules and firmware bound into the root
  // (and the tools image stays open, unmounted here, for the sidecar that runs from it).
  await stage(ctx, "os-mounts", () => handOverMounts(sys, log, config, esp, beside ? [TOOLS_IMAGE] : []));
  forgetSecrets(sys);
  log.info(`timeline: ${ctx.timeline.summary()}`);
  log.info(`handoff: MemAvailable ${memAvailableKiB(sys) ?? "?"} kB before switch_root`);
  ctx.timeline.save(); // /run moves into the new root: the OS can read it after the switch
  const devkmsg = state.early.devkmsg;
  return switchRoot(sys, log, {
    newRoot: SYSROOT,
    init: target.init,
    args: initArgs(target.resolved, target.app, initrdStateFd(sys, log, target)),
    env: initEnv(),
    beforeExec: () => restoreKmsgThrottle(sys, devkmsg),
    onPointOfNoReturn: () => void (state.pastPointOfNoReturn = true),
  });
}

/** The verified tools image the sidecar beside the OS runs dropbear from (its name in the config). */
const TOOLS_IMAGE = SIDECAR_ROOT.slice(SIDECAR_ROOT.lastIndexOf("/") + 1);

/** The failure policy for this boot: what main.ts runs for any error that ends the boot. */
export function failBoot(ctx: BootContext, state: BootState, error: unknown): Promise<never> {
  const past = state.pastPointOfNoReturn === true;
  const recovery = past ? undefined : () => startFailureSidecar(ctx, state);
  return applyFailurePolicy(ctx.sys, ctx.log, ctx.timeline, error, rebootDelay(state), recovery, past);
}

/**
 * Sidecar mode: network, the admin socket and sshd; PID 1 stays here, supervising, until an
 * admin command reboots, powers off, or continues the boot (`switch-root`). Returns the
 * configured services, for the boot plan to stop before it leaves the initrd.
 */
async function sidecar(ctx: BootContext, state: BootState, cold: Coldplug): Promise<Supervised[]> {
  const { sys, log } = ctx;
  const { cmdline, config } = state as Required<Pick<BootState, "cmdline" | "config">>;
  await stage(ctx, "network", () => state.sidecar.network(sys, log, cold, cmdline, config));
  let continueBoot!: () => void;
  const switchRequested = new Promise<void>((resolve) => (continueBoot = resolve));
  state.sidecar.route(adminHandler(ctx, state, continueBoot));
  await stage(ctx, "sshd", () => state.sidecar.serve(sys, log, config));
  const services = config.services.map((svc) => supervise(log, svc));
  log.info(`timeline: ${ctx.timeline.summary()}`);
  ctx.timeline.save();
  log.info("sidecar: ready");
  await switchRequested;
  log.info("sidecar: switch-root requested; continuing the boot");
  return services;
}

/** The admin commands of a machine that stays in the initrd (sidecar mode, or after a failure). */
export function adminHandler(ctx: BootContext, state: BootState, continueBoot?: () => void): CtlHandler {
  const { sys, log } = ctx;
  return async (req): Promise<CtlResponse> => {
    switch (req.cmd) {
      case "status":
        return { ok: true, text: statusText(ctx, state) };
      case "log":
        return { ok: true, text: ctx.log.recent().join("\n") };
      case "reboot":
      case "poweroff":
        setTimeout(() => powerAction(sys, log, req.cmd, "ctl"), 200); // answer first
        return { ok: true, text: `${req.cmd} in progress` };
      case "unlock":
      case "reseal":
        return { ok: false, text: `${req.cmd}: nothing is waiting for a passphrase (it works while the boot waits for the recovery passphrase)` };
      case "switch-root":
        if (!continueBoot) return { ok: false, text: "switch-root: only from sidecar mode (initos.mode=sidecar)" };
        continueBoot();
        return { ok: true, text: "continuing the boot" };
    }
  };
}

/**
 * After a failure: keep the machine reachable over ssh when it can be (keys in the config, an
 * address on the cmdline) instead of rebooting; false when it cannot.
 */
export async function startFailureSidecar(ctx: BootContext, state: BootState): Promise<boolean> {
  const { cmdline, config } = state;
  if (!cmdline || !config) return false;
  // The sidecar's setup writes /etc/passwd, /etc/shells, /root/.ssh: after the chroot those are the OS's.
  if (state.pastPointOfNoReturn) return false;
  // The network and sshd come after the latch, here too; a latch that fails means no sidecar.
  const tpm = (state.tpm ??= new BootTpm(ctx.sys, ctx.log, config.tpm));
  try {
    await tpm.find();
    tpm.latch("failure policy: recovery sidecar");
  } catch (e) {
    ctx.log.err(describe(e));
    return false;
  }
  return state.sidecar.start(ctx.sys, ctx.log, new Coldplug(ctx.sys, ctx.log), config, cmdline, adminHandler(ctx, state));
}

export function statusText(ctx: BootContext, state: BootState): string {
  return [
    `mode: ${state.cmdline?.mode ?? "host"}`,
    `secure boot: ${state.early?.secureBoot ?? "unknown"}`,
    `stages: ${ctx.timeline.summary()}`,
    `zombies: ${countZombies(ctx.sys)}`,
    `agent rss: ${procStatusKiB(ctx.sys, "VmRSS") ?? "?"} kB`,
    `memavailable: ${memAvailableKiB(ctx.sys) ?? "?"} kB`,
  ].join("\n");
}

/**
 * The ssh host key and the admin socket stay with the initrd: /run moves into the OS, which
 * has no business with the sidecar's key (the sidecar beside the OS took its own copy).
 */
function forgetSecrets(sys: Sys): void {
  if (sys.exists(SSH_DIR)) sys.removeTreeOnDevice(SSH_DIR, sys.lstat(SSH_DIR).dev);
}

/**
 * Why this boot will not unseal the disk key (and so latches at once), or null on the one path
 * that does: the host mode with no root= and an ESP to boot from. Sidecar mode may continue into
 * the unlock later, but only with the passphrase: it runs network and sshd first.
 */
export function whyNoUnseal(cmdline: Pick<Cmdline, "mode" | "root">, hasEsp: boolean): string | null {
  if (cmdline.mode && cmdline.mode !== "host") return `${cmdline.mode} mode`;
  if (cmdline.root) return "root= on the cmdline";
  if (!hasEsp) return "no ESP";
  return null;
}

/** initos.insecure=1 weakens verification, so it counts only when Secure Boot is off. */
export function unverifiedAllowed(early: EarlyResult, cmdline: Cmdline, log: Logger): boolean {
  if (!cmdline.insecure) return false;
  if (early.secureBoot === "on") {
    log.warn("initos.insecure=1 ignored: Secure Boot is on");
    return false;
  }
  log.warn("initos.insecure=1: images that fail verification will be mounted anyway");
  return true;
}

export interface HandoffTarget {
  /** What is exec'd, as named: argv[0] (busybox picks its applet by it). */
  init: string;
  /** The same init resolved inside the new root (/sbin/init -> /usr/lib/systemd/systemd). */
  resolved: string;
  /** Its arguments, before what systemd is told about the initrd. */
  app: string[];
}

/** What runs as PID 1 after the switch: a VM's app under the pod reaper, else the root's init. */
export function handoffTarget(sys: Sys, log: Logger, cmdline: Cmdline, config: AgentConfig, vm?: VmPlan): HandoffTarget {
  if (vm?.app.length) {
    // The pod reaper goes where the root lets it survive the move (/run, else /dev): vm.ts.
    const pod = podHandoff(sys, vm.app);
    return { init: pod.init, resolved: pod.init, app: pod.args };
  }
  const init = chooseInit(sys, cmdline, config);
  // Resolved the way exec will after the chroot: symlinks followed, never out of the new root.
  const resolved = resolveInRoot(sys, SYSROOT, init) ?? init;
  log.info(`handoff: init ${init}${resolved === init ? "" : ` is ${resolved}`}${isSystemd(resolved) ? " (systemd: switched root)" : ""}`);
  return { init, resolved, app: [...cmdline.app] };
}

export function chooseInit(sys: Sys, cmdline: Cmdline, config: AgentConfig): string {
  const candidates = cmdline.init ? [cmdline.init] : config.initCandidates;
  const init = findInit(sys, SYSROOT, candidates);
  if (!init) throw new BootError(`no init in the root: tried ${candidates.join(", ")}`);
  return init;
}

/** Whether an init, resolved inside the new root, is systemd (decided on the file, not the name asked for). */
export function isSystemd(resolved: string): boolean {
  return /(^|\/)systemd$/.test(resolved);
}

/**
 * systemd must be told it comes from an initrd, as systemd's own initrd does at its switch_root:
 * `--switched-root --system --deserialize FD`, the fd holding the state it reads (here only the
 * initrd's start). Other inits get the `--` args as they are.
 */
export function initArgs(resolved: string, app: readonly string[], stateFd?: number): string[] {
  if (!isSystemd(resolved)) return [...app];
  return ["--switched-root", "--system", ...(stateFd === undefined ? [] : ["--deserialize", String(stateFd)]), ...app];
}

/**
 * systemd 252 reads no RD_TIMESTAMP from its environment: it learns when the initrd started the
 * way its own initrd tells it, as `initrd-timestamp=<realtime µs> <monotonic µs>` in the state
 * it deserializes, and `systemd-analyze` then shows the "(initrd)" part. preinit noted that
 * time in RD_TIMESTAMP (dracut's format, the same two numbers). null when it is not there.
 */
export function initrdState(rdTimestamp: string | undefined): string | null {
  const m = /^(\d{1,20}) (\d{1,20})$/.exec(rdTimestamp?.trim() ?? "");
  return m ? `initrd-timestamp=${m[1]} ${m[2]}\n` : null;
}

/** The fd for `--deserialize`, made last (only the exec inherits it); undefined when systemd gets none. */
function initrdStateFd(sys: Sys, log: Logger, target: HandoffTarget): number | undefined {
  if (!isSystemd(target.resolved)) return undefined;
  const state = initrdState(process.env.RD_TIMESTAMP);
  if (!state) {
    log.warn("handoff: no RD_TIMESTAMP; systemd will not show the initrd's time");
    return undefined;
  }
  try {
    return sys.inheritableData("initrd-state", state);
  } catch (e) {
    log.warn(`handoff: initrd state for systemd: ${describe(e)}`);
    return undefined;
  }
}

/**
 * The mounts the OS keeps, and the ones it must not get. The kernel came from the UKI, so its
 * modules and firmware stay, bound read-only into the new root from the verified image (its
 * dm-verity device stays open under them). Everything else the initrd mounted under /run (the
 * images, the ESPs) is let go: /run moves into the OS, where it would stay mounted and busy
 * until systemd's shutdown failed to unmount it.
 */
export function handOverMounts(sys: Sys, log: Logger, config: AgentConfig, esp?: EspResult, inUse: readonly string[] = []): void {
  const kept = bindImagesForOs(sys, log, config, SYSROOT);
  // An image the sidecar beside the OS runs from cannot be closed (libcryptsetup would retry the
  // removal for ~5 s before it gives up): it is left open for that sidecar.
  releaseImages(sys, log, config, kept, new Set(inUse));
  if (esp) unmountEsps(sys, log, esp);
}

function initEnv(): string[] {
  return Object.entries(process.env)
    .filter((kv): kv is [string, string] => kv[1] !== undefined)
    .map(([k, v]) => `${k}=${v}`);
}
