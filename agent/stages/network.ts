// Stage "network": the loopback, always; then a static address from the cmdline: the kernel's
// `ip=client::gw:netmask:host:device` or initos.ip=/xip= with initos.gw=. Everything goes
// through rtnetlink (agent/sys/netlink.ts); no ip(8), no shell.
import type { Cmdline } from "../cmdline.ts";
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Clock, Crypt, Files, Net } from "../sys/index.ts";
import type { UdpSocket } from "../sys/udp.ts";
import { cleanLease, DHCP, type DhcpLease, dhcpMessage, type Expected, INFINITE_LEASE, leaseTimes, parseDhcpReply, replyProblem, typeName } from "../dhcp.ts";
import { describe } from "../errors.ts";
import { type Coldplug, waitUntil } from "./devices.ts";

export interface StaticIp {
  /** Interface name or MAC address; undefined: the first interface that is not loopback. */
  device?: string;
  address: string;
  prefix: number;
  gateway?: string;
  dns: string[];
  hostname?: string;
}

export function netmaskToPrefix(mask: string): number {
  const bits = mask.split(".").map((o) => Number(o).toString(2).padStart(8, "0")).join("");
  if (!/^1*0*$/.test(bits)) throw new BootError(`ip=: netmask ${mask} is not contiguous`);
  return bits.indexOf("0") < 0 ? 32 : bits.indexOf("0");
}

/** The static configuration the cmdline asks for, or null when it asks for none. */
export function staticIpFrom(cmdline: Pick<Cmdline, "staticIp" | "gateway" | "netInterface" | "ip">): StaticIp | null {
  if (cmdline.staticIp) {
    const [address, prefix] = cmdline.staticIp.split("/") as [string, string];
    return { device: cmdline.netInterface, address, prefix: Number(prefix), gateway: cmdline.gateway, dns: [] };
  }
  const ip = cmdline.ip;
  if (ip?.method === "static" && ip.client) {
    return { device: ip.device, address: ip.client, prefix: ip.netmask ? netmaskToPrefix(ip.netmask) : 24, gateway: ip.gateway, dns: ip.dns, hostname: ip.hostname };
  }
  return null;
}

/** Interface names, loopback excluded, with their MAC addresses. */
export function interfaces(sys: Files): { name: string; mac: string }[] {
  return sys
    .readdir("/sys/class/net")
    .filter((n) => n !== "lo")
    .map((name) => ({ name, mac: (sys.readFile(`/sys/class/net/${name}/address`) ?? "").trim().toLowerCase() }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

/** A DHCP lease in force: what to renew, with whom, and when (times from sys.now(), in ms). */
export interface HeldLease {
  ifname: string;
  mac: string;
  address: string;
  prefix: number;
  server: string;
  gateway?: string;
  dns: string[];
  /** When the REQUEST that got it went out: the lease's times count from there (RFC 2131 4.4.5). */
  since: number;
  /** Seconds after `since`; null for a lease without end (or without a lease time). */
  times: { t1: number; t2: number; end: number } | null;
}

export interface DhcpResult extends StaticIp {
  lease: HeldLease;
}

const BROADCAST = "255.255.255.255";
const xidFrom = (sys: Crypt) => Buffer.from(sys.randomBytes(4)).readUInt32BE(0);

/**
 * Sends `msg` to `to` (again every `retryMs`: UDP may lose it) until a reply passes the checks of
 * replyProblem or `deadline` (sys.now()) passes: null then. Replies to other transactions are
 * skipped quietly (other clients' answers are broadcast on the same segment); one for ours that
 * fails a check is logged once, naming what was wrong with it.
 */
async function exchange(sys: Clock, log: Logger, sock: UdpSocket, ifname: string, msg: Buffer, to: string, deadline: number, retryMs: number, want: Expected, stopped = () => false): Promise<DhcpLease | null> {
  const said = new Set<string>();
  const once = (line: string) => said.has(line) || (said.add(line), log.warn(line));
  let next = 0;
  while (sys.now() < deadline && !stopped()) {
    if (sys.now() >= next) {
      try {
        sock.send(msg, to, 67);
      } catch (e) {
        once(`dhcp: ${ifname}: cannot send to ${to}: ${describe(e)}`);
      }
      next = sys.now() + retryMs;
    }
    for (const d of sock.receive()) {
      const r = parseDhcpReply(d);
      if (r?.xid !== want.xid) continue;
      const problem = replyProblem(r, want);
      if (!problem) return r;
      once(`dhcp: ${ifname}: ignored ${typeName(r.type)} from ${r.server ?? "?"}: ${problem}`);
    }
    await sys.sleep(50);
  }
  return null;
}

/** An accepted ACK as the lease to hold; what is wrong in it but not fatal (a router, DNS) is dropped and said. */
function holdLease(log: Logger, ifname: string, mac: string, ack: DhcpLease, since: number): HeldLease {
  const { lease, dropped } = cleanLease(ack);
  for (const d of dropped) log.warn(`dhcp: ${ifname}: ignored ${d}`);
  return { ifname, mac, address: lease.address, prefix: lease.prefix, server: lease.server!, gateway: lease.router, dns: lease.dns, since, times: leaseTimes(lease) };
}

const leaseText = (ack: DhcpLease) => (ack.leaseSeconds === undefined ? " (no lease time: kept for good)" : ack.leaseSeconds === INFINITE_LEASE ? " for good" : ` for ${ack.leaseSeconds}s`);

/**
 * DHCPv4 on `ifname`: DISCOVER, OFFER, REQUEST, ACK, each answer awaited (bounded) and checked:
 * our transaction and MAC, the server we asked, an address a host may have. A NAK from that
 * server starts over. Returns the lease as a configuration to apply, and the lease to renew.
 */
export async function dhcp(sys: Files & Crypt & Net & Clock, log: Logger, ifname: string, seconds: number): Promise<DhcpResult> {
  const mac = (sys.readFile(`/sys/class/net/${ifname}/address`) ?? "").trim().toLowerCase();
  const sock = sys.net.udp(ifname, 68);
  const deadline = sys.now() + seconds * 1000;
  try {
    while (sys.now() < deadline) {
      const xid = xidFrom(sys);
      const offer = await exchange(sys, log, sock, ifname, dhcpMessage(DHCP.DISCOVER, xid, mac), BROADCAST, deadline, 2000, { xid, mac, types: [DHCP.OFFER] });
      if (!offer) break;
      const since = sys.now();
      const request = dhcpMessage(DHCP.REQUEST, xid, mac, { requested: offer.address, server: offer.server });
      const ack = await exchange(sys, log, sock, ifname, request, BROADCAST, deadline, 2000, { xid, mac, types: [DHCP.ACK, DHCP.NAK], server: offer.server, address: offer.address });
      if (!ack) break;
      if (ack.type === DHCP.NAK) {
        log.warn(`dhcp: ${ifname}: ${ack.server} refused ${offer.address} (NAK); asking again`);
        await sys.sleep(1000);
        continue;
      }
      const lease = holdLease(log, ifname, mac, ack, since);
      log.info(`dhcp: ${ifname} leased ${lease.address}/${lease.prefix} from ${lease.server}${leaseText(ack)}`);
      return { device: ifname, address: lease.address, prefix: lease.prefix, gateway: lease.gateway, dns: lease.dns, lease };
    }
  } finally {
    sock.close();
  }
  throw new BootError(`dhcp on ${ifname}: no answer within ${seconds}s`);
}

/**
 * The address of a lease, with what is left of the lease as its lifetime: the kernel drops it
 * by itself when nobody renews it in time (see keepLease, handLeasesToOs).
 */
function applyLease(sys: Net & Clock, lease: HeldLease): void {
  if (!lease.times) return sys.net.addAddress(lease.ifname, lease.address, lease.prefix);
  const left = Math.round(lease.times.end - (sys.now() - lease.since) / 1000);
  sys.net.addLeasedAddress(lease.ifname, lease.address, lease.prefix, Math.max(1, left));
}

/** Sleeps until `at` (sys.now()); false when stopped meanwhile. */
async function sleepUntil(sys: Clock, at: number, stopped: () => boolean): Promise<boolean> {
  while (!stopped() && sys.now() < at) await sys.sleep(Math.min(at - sys.now(), 60_000));
  return !stopped();
}

/** RFC 2131 4.4.5: retransmit after half the time left in the state, at most a minute apart. */
const retryFor = (sys: Clock, until: number) => Math.min(60_000, Math.max(1000, (until - sys.now()) / 2));

/**
 * One renewal: at T1 a REQUEST to the server that leased it (RENEWING); from T2 a broadcast
 * any server may answer (REBINDING), until the lease ends. Returns the renewed lease; null when
 * it is lost: a NAK from our server (the address is given up at once), or no answer in time (the
 * kernel drops it at the lease's end).
 */
export async function renewLease(sys: Crypt & Net & Clock, log: Logger, lease: HeldLease, stopped = () => false): Promise<HeldLease | null> {
  const { ifname, mac, address, server } = lease;
  const times = lease.times!;
  const at = (s: number) => lease.since + s * 1000;
  const xid = xidFrom(sys);
  const msg = dhcpMessage(DHCP.REQUEST, xid, mac, { ciaddr: address });
  const want = { xid, mac, types: [DHCP.ACK, DHCP.NAK], address };
  const sock = sys.net.udp(ifname, 68);
  try {
    const since = sys.now();
    const ack =
      (await exchange(sys, log, sock, ifname, msg, server, at(times.t2), retryFor(sys, at(times.t2)), { ...want, server }, stopped)) ??
      (await exchange(sys, log, sock, ifname, msg, BROADCAST, at(times.end), retryFor(sys, at(times.end)), { ...want, nakFrom: server }, stopped));
    if (stopped()) return null;
    if (!ack) {
      log.warn(`dhcp: ${ifname}: ${address} not renewed before its lease ended; it is gone`);
      return null;
    }
    if (ack.type === DHCP.NAK) {
      log.warn(`dhcp: ${ifname}: ${ack.server} refused to renew ${address} (NAK); giving it up`);
      sys.net.addLeasedAddress(ifname, address, lease.prefix, 1); // RFC 2131: stop using it now
      return null;
    }
    const renewed = holdLease(log, ifname, mac, ack, since);
    log.info(`dhcp: ${ifname} renewed ${renewed.address}/${renewed.prefix} from ${renewed.server}${leaseText(ack)}`);
    return renewed;
  } finally {
    sock.close();
  }
}

/** A lease being kept: the one in force now, and whether to go on. */
export interface Keeper {
  lease: HeldLease;
  stopped: boolean;
}

/**
 * Keeps a lease for as long as PID 1 stays in the initrd (sidecar mode, recovery): renewed at
 * T1, its address re-added with the new lifetime; when it is lost, a new lease is asked for
 * (every minute until one comes). Ends when `keeper.stopped` is set.
 */
export async function keepLease(sys: Files & Crypt & Net & Clock, log: Logger, keeper: Keeper): Promise<void> {
  const stopped = () => keeper.stopped;
  let lease = keeper.lease;
  while (lease.times && (await sleepUntil(sys, lease.since + lease.times.t1 * 1000, stopped))) {
    let next = await renewLease(sys, log, lease, stopped).catch((e: unknown) => (log.warn(`dhcp: ${lease.ifname}: renewal failed: ${describe(e)}`), null));
    while (!next && !stopped()) {
      next = await dhcp(sys, log, lease.ifname, 30).then(
        (r) => r.lease,
        async (e: unknown) => (log.warn(`${describe(e)}; asking again in 60s`), await sleepUntil(sys, sys.now() + 60_000, stopped), null),
      );
    }
    if (!next || stopped()) return;
    applyLease(sys, next);
    if (next.gateway) sys.net.defaultRoute(next.ifname, next.gateway);
    lease = keeper.lease = next;
  }
}

const held = new Set<Keeper & { log: Logger; sys: Files & Net & Clock }>();

/**
 * Before switch_root: the initrd stops renewing, and the address becomes the OS's, valid for
 * what is left of its lease. The OS's own DHCP client takes it over (or the kernel drops it when
 * the lease ends: never an address the server may have given to another machine). The sidecar
 * beside the OS does not renew: it answers on whatever addresses the OS keeps.
 */
export function handLeasesToOs(): void {
  for (const h of held) {
    h.stopped = true;
    const l = h.lease;
    const left = l.times ? `valid ${Math.max(0, Math.round(l.times.end - (h.sys.now() - l.since) / 1000))}s more unless it renews it` : "for good";
    h.log.info(`dhcp: ${l.ifname} ${l.address} is the OS's now, ${left}`);
  }
  held.clear();
}

/** The cmdline asks for a network: a static address (initos.ip, xip, ip=client:...) or DHCP. */
export function networkRequested(cmdline: Pick<Cmdline, "staticIp" | "gateway" | "netInterface" | "ip">): boolean {
  return staticIpFrom(cmdline) !== null || cmdline.ip?.method === "dhcp";
}

/**
 * The loopback, then the address the cmdline asks for. A DHCP lease is kept (renewed) from then
 * on while PID 1 stays in the initrd, unless `keep` is false; handLeasesToOs ends that.
 */
export async function setupNetwork(sys: Files & Crypt & Net & Clock, log: Logger, cold: Coldplug, cmdline: Cmdline, waitSeconds: number, keep = true): Promise<string | null> {
  sys.net.linkUp("lo");
  const wantDhcp = cmdline.ip?.method === "dhcp";
  let cfg = staticIpFrom(cmdline);
  if (!cfg && !wantDhcp) return null;
  const want = (cfg?.device ?? cmdline.ip?.device)?.toLowerCase();
  const what = want ? `network interface ${want}` : "a network interface";
  const ifname = await waitUntil(sys, log, cold, what, waitSeconds, () => {
    const all = interfaces(sys);
    return (want ? all.find((i) => i.name === want || i.mac === want) : all[0])?.name ?? null;
  });
  sys.net.linkUp(ifname);
  const got = cfg ? undefined : await dhcp(sys, log, ifname, waitSeconds);
  const lease = got?.lease;
  cfg ??= got!;
  if (lease) applyLease(sys, lease);
  else sys.net.addAddress(ifname, cfg.address, cfg.prefix);
  if (cfg.gateway) sys.net.defaultRoute(ifname, cfg.gateway);
  if (cfg.dns.length) sys.writeFile("/etc/resolv.conf", cfg.dns.map((d) => `nameserver ${d}\n`).join(""));
  log.info(`network: ${ifname} ${cfg.address}/${cfg.prefix}${cfg.gateway ? ` via ${cfg.gateway}` : ""}`);
  if (lease?.times && keep) {
    const keeper = { lease, stopped: false, log, sys };
    held.add(keeper);
    void keepLease(sys, log, keeper).finally(() => held.delete(keeper));
  }
  return ifname;
}
