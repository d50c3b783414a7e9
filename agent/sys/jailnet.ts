// The jails' network, over rtnetlink (netlink.ts) and a few namespace calls (libc.ts): the
// bridge holding the host's address on the machine's /24, a network namespace per container
// jail (a veth pair between it and the bridge) and a persistent tap per VM jail. No `ip`, no
// iptables: the /24 is routed to the host, so forwarding is all it takes (no NAT).
//
// Kernel modules: "bridge", "veth" and "tun" (=m in Debian's 6.1 cloud kernel); the caller loads
// them before the first call.
import { closeSync, mkdirSync, openSync, unlinkSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { SysError } from "./ffi.ts";
import { CLONE_NEWNET, MNT_DETACH, MS, mount, persistentTap, setns, umount2, unshare } from "./libc.ts";
import { addrAddMsg, bridgeMac, defaultRouteMsg, jailMac, delLinkMsg, ifIndex, ifName, ipv4Bytes, linkMasterUpMsg, linkUpMsg, newBridgeMsg, newVethMsg, rtnetlink } from "./netlink.ts";

const ENOENT = 2;
const EINVAL = 22;
const ENODEV = 19;

export interface JailNetnsOptions {
  /** Where the netns persists (a bind mount of its nsfs file), for crun to join by path. */
  netnsPath: string;
  /** The veth end left in the host's netns, attached to `bridge`, e.g. "vj-web". */
  hostIf: string;
  /** The veth end inside the jail, e.g. "eth0". */
  jailIf: string;
  address: string;
  prefix: number;
  /** The jail's default route: the host's address on the bridge. */
  gateway: string;
  bridge: string;
}

/**
 * Thrown when the calling thread could not return to the host's netns: it is left in a jail's,
 * and everything it opens from then on (sockets, the admin's ssh) would be there. The caller
 * must treat it as fatal for the agent, not for the jail.
 */
export class NetnsStuckError extends Error {
  override name = "NetnsStuckError";
}

/**
 * The bridge `name` with `address/prefix` and a MAC made of it (bridgeMac: stable whatever
 * ports come and go), up; IPv4 forwarding on (the host routes the /24 it holds to the jails and
 * back: no NAT). Idempotent: an existing bridge of that name is kept.
 */
export function bridge(name: string, address: string, prefix: number): void {
  checkPrefix(prefix, name);
  rtnetlink([
    { what: `create bridge ${name}`, build: (s) => newBridgeMsg(name, bridgeMac(address), s) },
    { what: `address ${address}/${prefix} on ${name}`, build: (s) => addrAddMsg(ifIndex(name), address, prefix, s) },
    { what: `link ${name} up`, build: (s) => linkUpMsg(ifIndex(name), s) },
  ]);
  // Per netns, like every /proc/sys/net knob: this is the host's (the caller's thread's).
  writeFileSync("/proc/sys/net/ipv4/ip_forward", "1");
}

/** Deletes the link `name` (a veth takes its peer along); a missing link is fine. */
export function removeLink(name: string): void {
  try {
    rtnetlink([{ what: `delete link ${name}`, build: (s) => delLinkMsg(name, s) }]);
  } catch (e) {
    if (!(e instanceof SysError && e.errno === ENODEV)) throw e;
  }
}

/**
 * The persistent tap `name` (a VM jail's: QEMU opens it with script=no), attached to `bridgeName`
 * and up. Idempotent; when it cannot be attached it is removed again.
 */
export function tap(name: string, bridgeName: string): void {
  ifName(name);
  ifName(bridgeName);
  persistentTap(name);
  try {
    rtnetlink([{ what: `attach ${name} to ${bridgeName}, up`, build: (s) => linkMasterUpMsg(ifIndex(name), ifIndex(bridgeName), s) }]);
  } catch (e) {
    removeLink(name);
    throw e;
  }
}

/**
 * Removes a jail's netns: unmounts (MNT_DETACH) and unlinks `netnsPath`, deletes `hostIf` (and
 * with it the jail's end, if the netns still lives). Whatever is already gone is fine.
 */
export function removeNetns(netnsPath: string, hostIf: string): void {
  // A path can hold stacked bind mounts (a crash between two runs): unmount until none is left.
  for (let i = 0; i < 8; i++) {
    try {
      umount2(netnsPath, MNT_DETACH);
    } catch (e) {
      if (e instanceof SysError && (e.errno === EINVAL || e.errno === ENOENT)) break; // not (or no longer) a mount point
      throw e;
    }
  }
  try {
    unlinkSync(netnsPath);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  removeLink(hostIf);
}

/**
 * A new network namespace for a jail, persisted on `o.netnsPath`: lo up; `o.jailIf` with its
 * address and a MAC made of it (jailMac: the host's ARP entry stays right across restarts), up,
 * default route via the gateway; its veth peer `o.hostIf` in the host's netns,
 * attached to the bridge and up. What a previous run of the same jail left on those names is
 * replaced; on failure nothing of this call is left behind.
 */
export function jailNetns(o: JailNetnsOptions): void {
  // Everything that can be refused without touching the machine, first.
  for (const n of [o.hostIf, o.jailIf, o.bridge]) ifName(n);
  ipv4Bytes(o.address);
  ipv4Bytes(o.gateway);
  checkPrefix(o.prefix, o.jailIf);
  removeNetns(o.netnsPath, o.hostIf);
  mkdirSync(dirname(o.netnsPath), { recursive: true, mode: 0o755 });
  writeFileSync(o.netnsPath, "", { mode: 0o444 }); // the bind mount's target
  try {
    inNewNetns(o.netnsPath, (hostNs) =>
      rtnetlink([
        { what: `link lo up in ${o.netnsPath}`, build: (s) => linkUpMsg(ifIndex("lo"), s) },
        { what: `create veth ${o.jailIf} with peer ${o.hostIf} in the host's netns`, build: (s) => newVethMsg(o.jailIf, jailMac(o.address), o.hostIf, hostNs, s) },
        { what: `address ${o.address}/${o.prefix} on ${o.jailIf} in ${o.netnsPath}`, build: (s) => addrAddMsg(ifIndex(o.jailIf), o.address, o.prefix, s) },
        { what: `link ${o.jailIf} up in ${o.netnsPath}`, build: (s) => linkUpMsg(ifIndex(o.jailIf), s) },
        { what: `default route via ${o.gateway} on ${o.jailIf} in ${o.netnsPath}`, build: (s) => defaultRouteMsg(ifIndex(o.jailIf), o.gateway, s) },
      ]),
    );
    rtnetlink([{ what: `attach ${o.hostIf} to ${o.bridge}, up`, build: (s) => linkMasterUpMsg(ifIndex(o.hostIf), ifIndex(o.bridge), s) }]);
  } catch (e) {
    // Stuck in the jail's netns, a cleanup would look for hostIf in the wrong place: the error
    // alone goes up. Otherwise the netns (and with it the jail's veth end) and hostIf go.
    if (!(e instanceof NetnsStuckError)) removeNetns(o.netnsPath, o.hostIf);
    throw e;
  }
}

/**
 * Runs `fn` with the calling thread in a new netns, bind-mounted on `netnsPath` first; `fn` gets
 * an fd of the host's netns (for IFLA_NET_NS_FD). The thread always goes back to the host's
 * netns, whatever `fn` did.
 *
 * Why this is safe in a multithreaded runtime (Bun's JS thread, its worker and I/O threads):
 * unshare(CLONE_NEWNET) and setns() change the calling thread's namespaces only, and everything
 * between them is synchronous on that thread (koffi calls, sync fs calls), so no other code runs
 * in the jail's netns and no other thread ever sees it. A socket belongs to the netns current
 * when socket() was called, which is how rtnetlink() inside `fn` reaches the jail's links.
 * /proc/thread-self (not /proc/self, the main thread's) names this thread's namespace.
 */
function inNewNetns(netnsPath: string, fn: (hostNs: number) => void): void {
  const hostNs = openSync("/proc/thread-self/ns/net", "r");
  let moved = false;
  try {
    unshare(CLONE_NEWNET);
    moved = true;
    mount("/proc/thread-self/ns/net", netnsPath, null, MS.BIND);
    fn(hostNs);
  } finally {
    try {
      if (moved) {
        try {
          setns(hostNs, CLONE_NEWNET, "the host's netns");
        } catch (e) {
          throw new NetnsStuckError(`could not return to the host's network namespace after creating ${netnsPath} (${e instanceof Error ? e.message : String(e)}): this thread stays in the jail's`);
        }
      }
    } finally {
      closeSync(hostNs);
    }
  }
}

function checkPrefix(prefix: number, ifname: string): void {
  if (!Number.isInteger(prefix) || prefix < 1 || prefix > 32) throw new Error(`prefix /${prefix} for ${ifname}: expected 1-32`);
}
