// Stage "network": the loopback, always; then a static address from the cmdline: the kernel's
// `ip=client::gw:netmask:host:device` or initos.ip=/xip= with initos.gw=. Everything goes
// through rtnetlink (agent/sys/netlink.ts); no ip(8), no shell.
import type { Cmdline } from "../cmdline.ts";
import { BootError } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Sys } from "../sys/index.ts";
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
export function staticIpFrom(cmdline: Cmdline): StaticIp | null {
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

export async function setupNetwork(sys: Sys, log: Logger, cold: Coldplug, cmdline: Cmdline, waitSeconds: number): Promise<string | null> {
  sys.net.linkUp("lo");
  const cfg = staticIpFrom(cmdline);
  if (!cfg) return null;
  const want = cfg.device?.toLowerCase();
  const what = want ? `network interface ${want}` : "a network interface";
  const ifname = await waitUntil(sys, log, cold, what, waitSeconds, () => {
    const all = interfaces(sys);
    return (want ? all.find((i) => i.name === want || i.mac === want) : all[0])?.name ?? null;
  });
  sys.net.linkUp(ifname);
  sys.net.addAddress(ifname, cfg.address, cfg.prefix);
  if (cfg.gateway) sys.net.defaultRoute(ifname, cfg.gateway);
  if (cfg.dns.length) sys.writeFile("/etc/resolv.conf", cfg.dns.map((d) => `nameserver ${d}\n`).join(""));
  log.info(`network: ${ifname} ${cfg.address}/${cfg.prefix}${cfg.gateway ? ` via ${cfg.gateway}` : ""}`);
  return ifname;
}
