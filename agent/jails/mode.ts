// Jail mode's host side, as a list of steps: the kernel's parts (bridge, veth, tun; cgroup v2
// with its controllers), the bridge with the host's address on the machine's /24, then each
// jail by its launcher. The launchers tie the pieces together: the image store (images.ts),
// the container's rootfs, shares and spec (container.ts, spec.ts), its network namespace
// (agent/sys/jailnet.ts), and crun, supervised (run.ts).
import { describe } from "../errors.ts";
import { powerAction } from "../pid1.ts";
import { MS } from "../sys/consts.ts";
import type { Logger } from "../log.ts";
import type { AgentConfig } from "../config.ts";
import type { EspResult } from "../stages/esp.ts";
import type { Sys } from "../sys/index.ts";
import type { Jail, JailNetwork, JailsConfig } from "../jailsconfig.ts";
import { containerService, deleteCrunState, makeJailCgroup, prepareRootfs, removeContainer, resolveShares, setupCgroups, writeBundle } from "./container.ts";
import { hostConfigFile } from "./hostfile.ts";
import { formatImages, importImage, listImages, readImage, removeImage } from "./images.ts";
import { type ImageStore, Jails, type Launcher } from "./run.ts";
import { containerSpec } from "./spec.ts";
import { vmHostOpener, vmLauncher } from "./vm.ts";

/** Kernel modules jail mode needs (modules in Debian's cloud kernel; built in elsewhere). */
const JAIL_MODULES = ["bridge", "veth", "tun"];
/** What a jail's process finds on its PATH when neither the image nor the config sets one. */
const DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** Where the VM jails' image (QEMU, the VM kernel) comes from: the boot's slots, verified at first use. */
export interface VmHostSource {
  config: AgentConfig;
  esp?: EspResult;
  allowUnverified: boolean;
}

export async function startJailMode(sys: Sys, log: Logger, jc: JailsConfig, vmHost: VmHostSource): Promise<Jails> {
  rootAsMount(sys, log);
  for (const m of JAIL_MODULES) {
    try {
      sys.loadModule(m);
    } catch (e) {
      log.warn(`jails: module ${m}: ${describe(e)} (fine if built in)`);
    }
  }
  setupCgroups(sys, log);
  sys.net.bridge(jc.network.bridge, jc.network.address, jc.network.prefix);
  log.info(`jails: bridge ${jc.network.bridge} ${jc.network.address}/${jc.network.prefix}, forwarding on`);
  const openHost = vmHostOpener(sys, log, vmHost.config, vmHost.esp, vmHost.allowUnverified);
  const launchers = { container: containerLauncher(sys, log, jc.network), vm: vmLauncher(sys, log, jc.network, { openHost }) };
  const jails = new Jails(sys, log, jc, launchers, imageStore(sys, log), hostConfigFile(sys, log));
  await jails.startAll();
  return jails;
}

/** Where the initramfs is bound to become a root that can be pivoted from (rootAsMount). */
const BOUND_ROOT = "/run/initos/root";

/**
 * crun enters a jail's rootfs with pivot_root(2), which refuses to move the initramfs (the
 * rootfs mount has no parent: "pivot_root: Invalid argument", seen at the first jail start).
 * crun's --no-pivot (MS_MOVE + chroot) would do instead, but leaves the rootfs mount it made
 * inside the jail's user namespace unlocked: the jail's root could unmount it and find the
 * initramfs (and under it the pool on /x) below. So PID 1 makes its own root a mount, as every
 * initramfs switch_root does but onto a recursive bind of itself: the same files and mounts,
 * now on a mount with a parent, and every process started from here (crun) inherits it. Only
 * in jail mode: the agent never leaves the initramfs here, so nothing else notices.
 */
function rootAsMount(sys: Sys, log: Logger): void {
  sys.mkdirp(BOUND_ROOT, 0o700);
  sys.mount("/", BOUND_ROOT, null, MS.BIND | MS.REC);
  sys.chdir(BOUND_ROOT);
  sys.mount(".", "/", null, MS.MOVE);
  sys.chroot(".");
  sys.chdir("/");
  log.info("jails: the initramfs is bound onto itself, so that runtimes can pivot_root out of it");
}

function imageStore(sys: Sys, log: Logger): ImageStore {
  return {
    importImage: (name, body) => importImage(sys, log, name, body),
    list: () => formatImages(listImages(sys)),
    remove: (name, inUse) => removeImage(sys, log, name, inUse),
  };
}

const netnsPath = (name: string) => `/run/initos/netns/${name}`;
const hostIf = (name: string) => `vj-${name}`;

/**
 * A container jail: a fresh rootfs from its image (ids shifted into its range), its shares
 * staged, its network namespace on the bridge, its spec; then crun in the foreground, which
 * supervise.ts restarts (with crun's leftovers of a killed run deleted first).
 */
function containerLauncher(sys: Sys, log: Logger, net: JailNetwork): Launcher {
  return {
    async prepare(jail: Jail) {
      const image = readImage(sys, jail.image);
      if (!image) throw new Error(`image ${jail.image} is not imported (image import ${jail.image})`);
      const rootfs = prepareRootfs(sys, log, jail);
      const mounts = resolveShares(sys, jail);
      makeJailCgroup(sys, jail);
      try {
        sys.net.jailNetns({ netnsPath: netnsPath(jail.name), hostIf: hostIf(jail.name), jailIf: "eth0", address: jail.address, prefix: net.prefix, gateway: net.address, bridge: net.bridge });
      } catch (e) {
        // PID 1's thread left in a jail's network namespace: every socket and process it made
        // from now on (sshd, the next jail's network) would be the jail's. Nothing short of a
        // reboot puts that right.
        // (By name: jailnet.ts binds libc, which the boot logic's import graph must not load.)
        if (e instanceof Error && e.name === "NetnsStuckError") powerAction(sys, log, "reboot", `jail ${jail.name}: ${e.message}`);
        throw e;
      }
      const args = jail.command ?? [...image.entrypoint, ...image.cmd];
      if (!args.length) throw new Error(`image ${jail.image} names no command and the host config gives none ("command")`);
      const env = [...image.env, ...Object.entries(jail.env).map(([k, v]) => `${k}=${v}`)];
      if (!env.some((e) => e.startsWith("PATH="))) env.unshift(DEFAULT_PATH);
      const spec = containerSpec(jail, { rootfs, netnsPath: netnsPath(jail.name), process: { args, env, cwd: image.workingDir || "/" }, mounts });
      const bundle = writeBundle(sys, jail, spec);
      const svc = containerService(jail, bundle);
      // A run that was killed (or crun with it) leaves crun's state behind: deleted before every start.
      return { ...svc, beforeStart: () => deleteCrunState(sys, log, jail) };
    },
    async cleanup(jail: Jail) {
      removeContainer(sys, log, jail);
      sys.net.removeNetns(netnsPath(jail.name), hostIf(jail.name));
    },
  };
}
