// Stage "network": the loopback, always; then a static address from the cmdline: the kernel's
// `ip=client::gw:netmask:host:device` or initos.ip=/xip= with initos.gw=. Everything goes
// through rtnetlink (agent/sys/netlink.ts); no ip(8), no shell.
import type { Cmdline } from "../cmdline.ts";
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Sys } from "../sys/index.ts";
import { DHCP, type DhcpLease, dhcpMessage, parseDhcpReply } from "../dhcp.ts";
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
export function interfaces(sys: Sys): { name: string; mac: string }[] {
  return sys
    .readdir("/sys/class/net")
    .filter((n) => n !== "lo")
    .map((name) => ({ name, mac: (sys.readFile(`/sys/class/net/${name}/address`) ?? "").trim().toLowerCase() }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

/**
 * DHCPv4 on `ifname`: DISCOVER, OFFER, REQUEST, ACK, each answer awaited (bounded) and matched
 * by transaction id. Returns the lease as a static configuration to apply.
 */
export async function dhcp(sys: Sys, log: Logger, ifname: string, seconds: number): Promise<StaticIp> {
  const mac = (sys.readFile(`/sys/class/net/${ifname}/address`) ?? "").trim();
  const xid = Buffer.from(sys.randomBytes(4)).readUInt32BE(0);
  const sock = sys.net.udp(ifname, 68);
  const deadline = performance.now() + seconds * 1000;
  const exchange = async (msg: Buffer, want: number): Promise<DhcpLease> => {
    let next = 0;
    while (performance.now() < deadline) {
      if (performance.now() >= next) {
        sock.send(msg, "255.255.255.255", 67); // and again every 2s: UDP may lose it
        next = performance.now() + 2000;
      }
      for (const d of sock.receive()) {
        const r = parseDhcpReply(d);
        if (r?.xid !== xid) continue;
        if (r.type === DHCP.NAK) throw new BootError(`dhcp on ${ifname}: the server refused the address (NAK)`);
        if (r.type === want) return r;
      }
      await sys.sleep(50);
    }
    throw new BootError(`dhcp on ${ifname}: no answer within ${seconds}s`);
  };
  try {
    const offer = await exchange(dhcpMessage(DHCP.DISCOVER, xid, mac), DHCP.OFFER);
    const ack = await exchange(dhcpMessage(DHCP.REQUEST, xid, mac, { requested: offer.address, server: offer.server }), DHCP.ACK);
    log.info(`dhcp: ${ifname} leased ${ack.address}/${ack.prefix} from ${ack.server ?? "?"}${ack.leaseSeconds ? ` for ${ack.leaseSeconds}s` : ""}`);
    return { device: ifname, address: ack.address, prefix: ack.prefix, gateway: ack.router, dns: ack.dns };
  } finally {
    sock.close();
  }
}

/** The cmdline asks for a network: a static address (initos.ip, xip, ip=client:...) or DHCP. */
export function networkRequested(cmdline: Pick<Cmdline, "staticIp" | "gateway" | "netInterface" | "ip">): boolean {
  return staticIpFrom(cmdline) !== null || cmdline.ip?.method === "dhcp";
}

export async function setupNetwork(sys: Sys, log: Logger, cold: Coldplug, cmdline: Cmdline, waitSeconds: number): Promise<string | null> {
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
  cfg ??= await dhcp(sys, log, ifname, waitSeconds);
  sys.net.addAddress(ifname, cfg.address, cfg.prefix);
  if (cfg.gateway) sys.net.defaultRoute(ifname, cfg.gateway);
  if (cfg.dns.length) sys.writeFile("/etc/resolv.conf", cfg.dns.map((d) => `nameserver ${d}\n`).join(""));
  log.info(`network: ${ifname} ${cfg.address}/${cfg.prefix}${cfg.gateway ? ` via ${cfg.gateway}` : ""}`);
  return ifname;
}
