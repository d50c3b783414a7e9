// The boot plan, top to bottom:
//
//   prepare()   early mounts, the inputs (signed config, cmdline), modules, ESP, verified
//               images, the TPM (PCR 11 enter-initrd; the latch on every path but the unlock)
//   a mode      host | vm | install | sidecar: each does its own work and returns a Handoff
//   handOff()   switch_root into the root (systemd told so), or a power action
//
// Each stage is a function with typed inputs and outputs; this file only sequences them, times
// them and decides between them. A thrown error ends in failBoot (the failure policy).
import type { AdminCaps, PowerAction, StatusField } from "./admin.ts";
import type { Cmdline, Mode } from "./cmdline.ts";
import { parseCmdline } from "./cmdline.ts";
import { type AgentConfig, CONFIG_PATH, parseConfig } from "./config.ts";
import { BootTpm } from "./diskkey/latch.ts";
import { BootError, describe } from "./errors.ts";
import { applyFailurePolicy } from "./failure.ts";
import { forgetSecrets, handOverMounts, handoffTarget, initArgs, initEnv, initrdStateFd } from "./handoff.ts";
import { type Logger, Timeline, uptime } from "./log.ts";
import { countZombies, memAvailableKiB, powerAction, procStatusKiB } from "./pid1.ts";
import { besideWanted, startBeside } from "./stages/beside.ts";
import { Coldplug } from "./stages/devices.ts";
import { type EarlyResult, restoreKmsgThrottle, setupEarly } from "./stages/early.ts";
import { type EspResult, findEsps } from "./stages/esp.ts";
import { type MountedImage, setupImages } from "./stages/images.ts";
import { install as installTo, INSTALL_CONFIG, parseInstallConfig } from "./stages/install.ts";
import { loadInBackground, loadModules } from "./stages/modules.ts";
import { networkRequested, setupNetwork } from "./stages/network.ts";
import { mountPool } from "./stages/pool.ts";
import { wipeHostKey } from "./stages/sidecar.ts";
import { unlockPool } from "./stages/volumes.ts";
import { startTrial, type UpdateBoot } from "./stages/trial.ts";
import { realUpdateDeps, updateCommand } from "./update/apply.ts";
import type { FirmwareWithNext } from "./update/session.ts";
import { updateStatus } from "./update/status.ts";
import type { RemoteAdmin } from "./stages/remote.ts";
import { mountRoot, SYSROOT } from "./stages/root.ts";
import { mountVmRoot, setupVmMounts, type VmPlan, vmPlan } from "./stages/vm.ts";
import { type Supervised, stopServices, supervise } from "./supervise.ts";
import { switchRoot } from "./switchroot.ts";
import type { JailsConfig } from "./jailsconfig.ts";
import { startJailMode } from "./jails/mode.ts";
import type { Jails } from "./jails/run.ts";
import type { Sys } from "./sys/index.ts";
import { TOOLS_ROOT } from "./sys/tools.ts";

export interface BootContext {
  sys: Sys;
  log: Logger & { quiet: boolean; verbose: boolean; recent(): string[] };
  timeline: Timeline;
}

/** What the failure policy and the admin commands read about this boot, filled in as it goes. */
export interface BootState {
  /** Network, admin socket and sshd while the initrd needs a human (one per boot). */
  remote: RemoteAdmin;
  /** The inputs and the early facts, once prepare() has them. */
  inputs?: Inputs;
  /** The TPM over this boot: phases, the latch. */
  tpm?: BootTpm;
  /** The boot disk's slots (esp stage), and the update's view of this boot (trial stage). */
  esp?: EspResult;
  update?: UpdateBoot;
  /** Jail mode's jails, once they run: stopped before any power action. */
  jails?: Jails;
  /** The images stage, settled or not: the failure policy's sidecar waits for it (sshd is in the tools image). */
  images?: Promise<unknown>;
  /**
   * switch_root made the OS's root "/" (set by switchRoot just before it pivots or chroots).
   * From then on the failure policy only logs and reboots: nothing is written into the OS.
   */
  pastPointOfNoReturn?: boolean;
}

export interface Inputs {
  cmdline: Cmdline;
  config: AgentConfig;
  early: EarlyResult;
}

/** What every mode starts from: the inputs, and the machine as prepare() left it. */
export interface Prepared extends Inputs {
  cold: Coldplug;
  /** The boot disk's ESPs; none in a VM or without images. */
  esp?: EspResult;
  /**
   * The images mounted from them (each from the slot whose copy verified). Settled when
   * prepare() returns, except on the unlock path, where they go on checking through the TPM's
   * unseal: that path waits for them before it opens a volume (see host()).
   */
  images: Promise<readonly MountedImage[]>;
  tpm: BootTpm;
  /** initos.insecure=1 with Secure Boot off: images that fail verification are used anyway. */
  allowUnverified: boolean;
}

/** How the boot leaves the initrd; each mode returns one. */
export type Handoff =
  | { kind: "switch-root"; vm?: VmPlan; services: readonly Supervised[] }
  | { kind: "poweroff"; why: string };

/** The modes (initos.mode=; host when none), as data: what prepare() does for each, and what runs. */
const MODES: Record<Mode, { esp: boolean; strictCmdline: boolean; run: (ctx: BootContext, state: BootState, p: Prepared) => Promise<Handoff> }> = {
  host: { esp: true, strictCmdline: false, run: (ctx, state, p) => host(ctx, state, p, []) },
  // A VM is configured by its cmdline alone: a bad value there would start a different VM than
  // the one asked for (no share, another address), so it fails instead of using a default.
  // VMs boot without firmware or ESP: what they need is in their initrd.
  vm: { esp: false, strictCmdline: true, run: (ctx, _state, p) => vm(ctx, p) },
  install: { esp: true, strictCmdline: false, run: (ctx, _state, p) => install(ctx, p) },
  sidecar: { esp: true, strictCmdline: false, run: (ctx, state, p) => sidecar(ctx, state, p) },
};

export async function boot(ctx: BootContext, state: BootState): Promise<never> {
  const p = await prepare(ctx, state);
  const handoff = await MODES[p.cmdline.mode ?? "host"].run(ctx, state, p);
  return handOff(ctx, state, p, handoff);
}

async function prepare(ctx: BootContext, state: BootState): Promise<Prepared> {
  const { sys, log } = ctx;
  const early = await stage(ctx, "early", () => setupEarly(sys, log));
  const { cmdline, config, errors } = readInputs(ctx);
  state.inputs = { cmdline, config, early };
  const mode = MODES[cmdline.mode ?? "host"];
  if (mode.strictCmdline && errors.length) throw new BootError(`${cmdline.mode}: ${errors[0]}`);

  const cold = new Coldplug(sys, log);
  await stage(ctx, "modules", () => loadModules(sys, log, config.modules, cold));

  let esp: EspResult | undefined;
  let images: Promise<readonly MountedImage[]> = Promise.resolve([]);
  const allowUnverified = mode.esp && config.images.length > 0 && unverifiedAllowed(early, cmdline, log);
  if (config.images.length > 0 && mode.esp) {
    const found = (esp = await stage(ctx, "esp", async () => {
      await early.efivars; // the booted slot is an EFI variable (LoaderDevicePartUUID)
      return findEsps(sys, log, cold, config.esp.slots, config.esp.waitSeconds);
    }));
    // The kernel checks the images on worker threads (stages/images.ts). The unlock path lets
    // them check while the TPM unseals, which needs none of them: the two took ~1 s each under
    // TCG, one after the other (make bench). Every other path waits here, as it always did.
    // A failure is handled where the images are awaited; the no-op catch only keeps it from
    // being an unhandled rejection (which would end PID 1) when an earlier step fails first.
    images = state.images = stage(ctx, "images", () => setupImages(sys, log, config, found, allowUnverified, cold));
    images.catch(() => {});
    if (whyNoUnseal(cmdline, true) !== null) await images;
    state.esp = found;
    // An update's trial (watchdog, late commit) or the fallback from one: before anything that
    // could hang. A trial waits for the images there (softdog is a module of the modules image).
    state.update = await stage(ctx, "trial", () => startTrial(sys, log, cold, config, found, () => images));
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
  return { cmdline, config, early, cold, esp, images, tpm, allowUnverified };
}

/** A physical machine: the root named on the cmdline, or the encrypted pool's. */
async function host(ctx: BootContext, state: BootState, p: Prepared, services: readonly Supervised[]): Promise<Handoff> {
  const { sys, log } = ctx;
  const { cmdline, config, cold, esp } = p;
  const wait = cmdline.rootWaitSeconds ?? config.rootWaitSeconds;
  if (cmdline.root) {
    // A root named on the cmdline: mount it as it is (tests, unencrypted machines).
    const spec = { spec: cmdline.root, fstypes: cmdline.rootfstype?.split(","), options: cmdline.rootflags, rw: cmdline.rw, waitSeconds: wait };
    await stage(ctx, "root", () => mountRoot(sys, log, cold, spec));
  } else {
    // The installed machine: the encrypted pool says which subvolume is the root.
    if (!esp) throw new BootError("no root= on the kernel command line and no ESP to unlock an encrypted pool with");
    // The pool's filesystem driver loads on the other CPU as soon as the modules image is in,
    // while this one goes on with the unseal: inserting btrfs is ~1 s of kernel time under TCG
    // (raid6_pq benchmarks itself at load). The unlock waits for the images and for it after
    // the latch, before it opens a volume or asks anyone for the passphrase: a driver still
    // loading then printed its kernel lines over the console's prompt (seen: raid6's right
    // after "Recovery passphrase (attempt 1 of 3): ").
    const poolDriver = p.images.then(() => loadInBackground(sys, log, "btrfs"), () => {});
    const drivers = async () => {
      await p.images;
      await poolDriver;
    };
    const pool = await stage(ctx, "unlock", () => unlockPool(sys, log, cold, config, cmdline, p.tpm, p.early.secureBoot, esp, state.remote, initrdAdmin(ctx, state), drivers));
    const mounted = await stage(ctx, "root", () => mountPool(sys, log, pool.devices, cmdline.rw, cmdline.rootSubvolume, config));
    // With ssh keys, mountPool put the pool's own key in place of the recovery host key; without
    // any, no sshd will run, and the recovery key unsealed before the latch just goes.
    if (!config.ssh.authorizedKeys.length) wipeHostKey(sys);
    if (mounted.config.jails && !mounted.config.root) return jailMode(ctx, state, p, mounted.config.jails, services);
    if (mounted.config.jails) log.warn(`jails: not started: the host config names root ${mounted.config.root}, which the machine boots instead`);
  }
  return { kind: "switch-root", services };
}

/**
 * Jail mode (a host config with jails and no root): PID 1 keeps the hardware and the pool (on
 * /x), serves the admin commands over ssh as the sidecar does, and runs the jails; it never
 * leaves the initrd. Power actions stop the jails first (shutdown).
 */
async function jailMode(ctx: BootContext, state: BootState, p: Prepared, jc: JailsConfig, services: readonly Supervised[]): Promise<never> {
  const { sys, log } = ctx;
  const { cmdline, config } = p;
  for (const line of jc.refused) log.err(line);
  // The boot's own part ends here, as at a switch_root: what runs from now on (the jails) is
  // less trusted than the initrd, so PCR 11 leaves the initrd phase and the latch is extended.
  await p.tpm.leaveInitrd();
  p.tpm.close();
  await stage(ctx, "network", () => state.remote.network(p.cold, cmdline, config));
  const vmHost = { config, esp: p.esp, allowUnverified: p.allowUnverified };
  state.jails = await stage(ctx, "jails", () => startJailMode(sys, log, jc, vmHost));
  state.remote.route(initrdAdmin(ctx, state));
  // jail mode's sshd presents the pool's key, as the sidecar beside the OS does (pool.ts
  // keepHostKey): the recovery host key is only ever shown while the pool is locked. An sshd
  // still running from a remote unlock holds the recovery key in its memory: restarted.
  if (!state.remote.running) await stage(ctx, "sshd", () => state.remote.serve(config));
  else await stage(ctx, "sshd", () => state.remote.restartSshd(config));
  const all = services.length ? services : config.services.map((svc) => supervise(sys, log, svc));
  log.info(`timeline: ${ctx.timeline.summary()}`);
  ctx.timeline.save();
  log.info(`jails: ready (${all.length} service(s))`);
  for (;;) await sys.sleep(3_600_000); // PID 1 stays: a power action ends it
}

/**
 * A power action asked for by a signal or an admin: jail mode's jails are stopped first (each
 * asked, then killed after a bound), so their filesystems are clean; then reboot(2).
 */
export async function shutdown(ctx: BootContext, state: BootState, action: PowerAction, why: string): Promise<void> {
  if (state.jails) {
    ctx.log.info(`${why}: stopping the jails before the ${action}`);
    await state.jails.stopAll();
  }
  powerAction(ctx.sys, ctx.log, action, why);
}

/** A VM: its root disk, share and address from the cmdline; its app (after `--`) runs as a pod. */
async function vm(ctx: BootContext, p: Prepared): Promise<Handoff> {
  const { sys, log } = ctx;
  const { cmdline, config, cold } = p;
  const plan = vmPlan(cmdline);
  const wait = cmdline.rootWaitSeconds ?? config.rootWaitSeconds;
  if (networkRequested(cmdline)) await stage(ctx, "network", () => setupNetwork(sys, log, cold, cmdline, wait));
  await stage(ctx, "root", () => mountVmRoot(sys, log, cold, plan, cmdline, wait));
  await stage(ctx, "vm", () => setupVmMounts(sys, log, cold, plan, wait));
  return { kind: "switch-root", vm: plan, services: [] };
}

/** The installer: a blank disk becomes an initos machine, then it powers off. */
async function install(ctx: BootContext, p: Prepared): Promise<Handoff> {
  const { sys, log } = ctx;
  const { esp } = p;
  if (!esp) throw new BootError("install: no ESP with images to install from");
  const ic = parseInstallConfig(sys.readFile(INSTALL_CONFIG));
  const images = await p.images;
  await stage(ctx, "install", () => installTo(sys, log, p.cold, p.config, ic, esp, images, p.tpm, p.early.secureBoot));
  return { kind: "poweroff", why: "install finished" };
}

/**
 * Sidecar mode: network, the admin socket and sshd; PID 1 stays here, supervising, until an
 * admin command reboots, powers off, or continues the boot (`switch-root`): then on as the host
 * mode, which stops the services before it leaves the initrd.
 */
async function sidecar(ctx: BootContext, state: BootState, p: Prepared): Promise<Handoff> {
  const { sys, log } = ctx;
  const { cmdline, config } = p;
  await stage(ctx, "network", () => state.remote.network(p.cold, cmdline, config));
  let continueBoot!: () => void;
  const switchRequested = new Promise<void>((resolve) => (continueBoot = resolve));
  state.remote.route(initrdAdmin(ctx, state, continueBoot));
  await stage(ctx, "sshd", () => state.remote.serve(config));
  const services = config.services.map((svc) => supervise(sys, log, svc));
  log.info(`timeline: ${ctx.timeline.summary()}`);
  ctx.timeline.save();
  log.info("sidecar: ready");
  await switchRequested;
  log.info("sidecar: switch-root requested; continuing the boot");
  return host(ctx, state, p, services);
}

async function handOff(ctx: BootContext, state: BootState, p: Prepared, handoff: Handoff): Promise<never> {
  const { sys, log } = ctx;
  if (handoff.kind === "poweroff") {
    ctx.timeline.save();
    powerAction(sys, log, "poweroff", handoff.why);
    for (;;) await sys.sleep(3_600_000); // reboot(2) does not return; should it, stay PID 1
  }
  const { cmdline, config, esp, tpm } = p;
  const target = await stage(ctx, "handoff-check", () => handoffTarget(sys, log, cmdline, config, handoff.vm));
  // The OS must find the latch extended and PCR 11 past the initrd, whatever path led here.
  await tpm.leaveInitrd();
  tpm.close();
  // Nothing the initrd started may outlive it (unless beside the OS, in its own namespace).
  await state.remote.stop();
  await stopServices(sys, log, handoff.services);
  // A trial's watchdog stays armed across the switch: the agent beside the OS opens it again.
  const trial = state.update?.run;
  trial?.release();
  if (trial && !besideWanted(cmdline, config)) {
    log.warn(`update: no sidecar beside the OS to commit the trial of version ${trial.trial.version}: the watchdog will reset the machine into slot ${trial.trial.from.slot}`);
  }
  let beside = false;
  if (besideWanted(cmdline, config)) {
    ctx.timeline.save(); // the sidecar takes a copy of the timeline with it
    const network = () => state.remote.network(p.cold, cmdline, config);
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
  return switchRoot(sys, log, {
    newRoot: SYSROOT,
    init: target.init,
    args: initArgs(target.resolved, target.app, initrdStateFd(sys, log, target)),
    env: initEnv(),
    beforeExec: () => restoreKmsgThrottle(sys, p.early.devkmsg),
    onPointOfNoReturn: () => void (state.pastPointOfNoReturn = true),
  });
}

/** The verified tools image the sidecar beside the OS runs dropbear from (its name in the config). */
const TOOLS_IMAGE = TOOLS_ROOT.slice(TOOLS_ROOT.lastIndexOf("/") + 1);

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

export function rebootDelay(inputs: Partial<Pick<Inputs, "cmdline" | "config">> | undefined): number {
  const { cmdline, config } = inputs ?? {};
  if (cmdline?.rebootDelaySeconds !== undefined) return cmdline.rebootDelaySeconds;
  if (cmdline?.panic !== undefined && cmdline.panic > 0) return cmdline.panic;
  return config?.rebootDelaySeconds ?? 30;
}

/** The failure policy for this boot: what main.ts runs for any error that ends the boot. */
export function failBoot(ctx: BootContext, state: BootState, error: unknown): Promise<never> {
  const past = state.pastPointOfNoReturn === true;
  // A trial that fails goes back to the old slot at once (BootOrder's first entry): waiting in
  // the recovery sidecar would keep the machine on the version that failed.
  const trial = state.update?.run?.trial;
  if (trial) ctx.log.err(`update: the trial of version ${trial.version} failed; rebooting into slot ${trial.from.slot}`);
  const recovery = past || trial ? undefined : () => startFailureSidecar(ctx, state);
  return applyFailurePolicy(ctx.sys, ctx.log, ctx.timeline, error, rebootDelay(state.inputs), recovery, past);
}

/**
 * After a failure: keep the machine reachable over ssh when it can be (keys in the config, an
 * address on the cmdline) instead of rebooting; false when it cannot.
 */
export async function startFailureSidecar(ctx: BootContext, state: BootState): Promise<boolean> {
  if (!state.inputs) return false;
  const { cmdline, config } = state.inputs;
  // The sidecar's setup writes /etc/passwd, /etc/shells, /root/.ssh: after the chroot those are the OS's.
  if (state.pastPointOfNoReturn) return false;
  // sshd runs from the tools image: a boot that failed while its images were still checking
  // waits for them (if they fail too, sshd cannot start and the policy reboots).
  await state.images?.catch(() => undefined);
  // The network and sshd come after the latch, here too; a latch that fails means no sidecar.
  const tpm = (state.tpm ??= new BootTpm(ctx.sys, ctx.log, config.tpm));
  try {
    await tpm.find();
    tpm.latch("failure policy: recovery sidecar");
  } catch (e) {
    ctx.log.err(describe(e));
    return false;
  }
  return state.remote.start(new Coldplug(ctx.sys, ctx.log), config, cmdline, initrdAdmin(ctx, state));
}

/**
 * What PID 1 in the initrd may do for an admin (sidecar mode, recovery, the failure policy):
 * reboot(2) itself; `switch-root` only in sidecar mode; the passphrase commands only while the
 * unlock waits for one (pool.ts routes them there then).
 */
export function initrdAdmin(ctx: BootContext, state: BootState, continueBoot?: () => void): AdminCaps {
  const { sys, log } = ctx;
  return {
    status: () => initrdStatus(ctx, state),
    log: () => log.recent(),
    power(action) {
      sys.after(200, () => void shutdown(ctx, state, action, "ctl")); // answer first
      return `${action} in progress`;
    },
    passphrase: { refused: "nothing is waiting for a passphrase (it works while the boot waits for the recovery passphrase)" },
    switchRoot: continueBoot
      ? { run: () => (continueBoot(), "continuing the boot") }
      : { refused: "only from sidecar mode (initos.mode=sidecar)" },
    update: continueBoot && state.esp && state.update?.firmware && state.inputs
      ? { run: initrdUpdate(ctx, state.esp, state.update.firmware, state.inputs.config) }
      : { refused: "only in sidecar mode (initos.mode=sidecar) or beside the running OS, on a machine booted through UEFI from its ESP" },
    commit: { refused: "nothing to commit in the initrd: a trial commits beside the OS it booted" },
    jails: state.jails ? { run: state.jails.admin() } : { refused: "only in jail mode (a host config on the pool with jails and no root)" },
  };
}

function initrdUpdate(ctx: BootContext, esp: EspResult, firmware: FirmwareWithNext, config: AgentConfig) {
  const { sys, log } = ctx;
  const reboot = () => (sys.after(200, () => powerAction(sys, log, "reboot", "update --reboot")), "reboot in progress");
  return updateCommand(log, () => realUpdateDeps(sys, log, config, () => esp, firmware), reboot);
}

export function initrdStatus(ctx: BootContext, state: BootState): StatusField[] {
  // Zombies first: reading the slots' UKIs below keeps the event loop (and with it the reaping
  // of exited children) busy for a moment, and an orphan that exits then would be counted (seen:
  // "zombies: 1" on every status while a service made an orphan a second).
  const zombies = countZombies(ctx.sys);
  return [
    ["mode", state.inputs?.cmdline.mode ?? "host"],
    ["secure boot", state.inputs?.early.secureBoot ?? "unknown"],
    ["stages", ctx.timeline.summary()],
    ...updateStatus(ctx.sys, state.inputs?.config, state.esp, state.update?.firmware),
    ["zombies", zombies],
    ["agent rss", `${procStatusKiB(ctx.sys, "VmRSS") ?? "?"} kB`],
    ["memavailable", `${memAvailableKiB(ctx.sys) ?? "?"} kB`],
  ];
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
