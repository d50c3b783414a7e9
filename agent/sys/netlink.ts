// rtnetlink, the kernel's interface for links, addresses and routes: message encoding (pure,
// tested against known byte layouts) and a small request/ack client over koffi.
import { check, errno, errnoName, SysError } from "./ffi.ts";
import { libcCalls } from "./libc.ts";

export const RTM = { NEWLINK: 16, DELLINK: 17, NEWADDR: 20, NEWROUTE: 24 } as const;
export const NLM_F = { REQUEST: 0x1, ACK: 0x4, REPLACE: 0x100, EXCL: 0x200, CREATE: 0x400 } as const;
const NLMSG_ERROR = 2;
const AF_INET = 2;
const IFF_UP = 0x1;
const IFA_ADDRESS = 1;
const IFA_LOCAL = 2;
const RTA_OIF = 4;
const RTA_GATEWAY = 5;
const RT_TABLE_MAIN = 254;
const RTPROT_BOOT = 3;
const RTN_UNICAST = 1;
// if_link.h / veth.h attribute numbers.
const IFLA_ADDRESS = 1;
const IFLA_IFNAME = 3;
const IFLA_MASTER = 10;
const IFLA_LINKINFO = 18;
const IFLA_NET_NS_FD = 28;
const IFLA_INFO_KIND = 1;
const IFLA_INFO_DATA = 2;
const VETH_INFO_PEER = 1;

const align4 = (n: number) => (n + 3) & ~3;

export function rtattr(type: number, data: Uint8Array): Buffer {
  const b = Buffer.alloc(align4(4 + data.length));
  b.writeUInt16LE(4 + data.length, 0);
  b.writeUInt16LE(type, 2);
  b.set(data, 4);
  return b;
}

/** nlmsghdr + body; the length field covers both. */
export function nlmsg(type: number, flags: number, seq: number, body: Uint8Array): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32LE(16 + body.length, 0);
  h.writeUInt16LE(type, 4);
  h.writeUInt16LE(flags, 6);
  h.writeUInt32LE(seq, 8);
  h.writeUInt32LE(0, 12);
  return Buffer.concat([h, body]);
}

export function ipv4Bytes(addr: string): Buffer {
  const parts = addr.split(".").map(Number);
  if (parts.length !== 4 || parts.some((p) => !Number.isInteger(p) || p < 0 || p > 255)) throw new Error(`not an IPv4 address: ${addr}`);
  return Buffer.from(parts);
}

/**
 * An interface name as the kernel takes it (dev_valid_name): 1-15 bytes (IFNAMSIZ 16 with the
 * NUL), no "/", ":" or whitespace, not "." or "..". Checked here so a bad name is refused with
 * its own words rather than the kernel's EINVAL.
 */
export function ifName(name: string): Buffer {
  const b = Buffer.from(`${name}\0`);
  if (b.length < 2 || b.length > 16 || /[/:\s\0]/.test(name) || name === "." || name === "..") throw new Error(`not an interface name: ${JSON.stringify(name)}`);
  return b;
}

function ifinfomsg(index: number, flags = 0, change = 0): Buffer {
  const ifi = Buffer.alloc(16);
  ifi.writeUInt8(0, 0); // AF_UNSPEC
  ifi.writeInt32LE(index, 4);
  ifi.writeUInt32LE(flags, 8);
  ifi.writeUInt32LE(change, 12);
  return ifi;
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n, 0);
  return b;
};

/** IFLA_LINKINFO { IFLA_INFO_KIND kind, IFLA_INFO_DATA data? } (kind without NUL, as iproute2 sends it). */
function linkinfo(kind: string, data?: Buffer): Buffer {
  return rtattr(IFLA_LINKINFO, Buffer.concat([rtattr(IFLA_INFO_KIND, Buffer.from(kind)), ...(data ? [rtattr(IFLA_INFO_DATA, data)] : [])]));
}

/**
 * The bridge's MAC, fixed: 02 (locally administered, unicast), 0x49 ("I"), then the host's IPv4
 * address. Left to the kernel, a bridge takes the lowest MAC of its ports (measured: random
 * fe:be:.. at creation, then a new port's 00:00:00:00:00:05; once set, it stays), so the
 * gateway's MAC would move under every jail as jails come and go, and their ARP entries would
 * name a port's MAC that may be gone (inferred from the above, not measured).
 */
export function bridgeMac(address: string): Buffer {
  return Buffer.concat([Buffer.from([0x02, 0x49]), ipv4Bytes(address)]);
}

/**
 * A jail's MAC: 02, 0x4a ("J"), then its IPv4 address; a VM jail's NIC should get the same
 * (QEMU `mac=`). Same address, same MAC across restarts: with a fresh random MAC per start, the
 * host's ARP entry for the jail (REACHABLE for up to ~30 s) still named the old one, and the
 * restarted jail did not answer the host until it expired (measured: a TCP connect right after
 * the restart timed out at 10 s; with the stable MAC it answers at once).
 */
export function jailMac(address: string): Buffer {
  return Buffer.concat([Buffer.from([0x02, 0x4a]), ipv4Bytes(address)]);
}

export function macString(mac: Uint8Array): string {
  return [...mac].map((b) => b.toString(16).padStart(2, "0")).join(":");
}

function macAttr(mac: Uint8Array): Buffer {
  if (mac.length !== 6) throw new Error(`not a MAC address: ${Buffer.from(mac).toString("hex")}`);
  return rtattr(IFLA_ADDRESS, mac);
}

/**
 * RTM_NEWLINK creating bridge `name` with MAC `mac` (IFLA_ADDRESS). NLM_F_CREATE without
 * NLM_F_EXCL: a bridge already there under that name is kept (its MAC set again), any other kind
 * of link is refused (EOPNOTSUPP), so a second boot or a restarted agent goes through.
 */
export function newBridgeMsg(name: string, mac: Uint8Array, seq: number): Buffer {
  return nlmsg(RTM.NEWLINK, NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE, seq, Buffer.concat([ifinfomsg(0), rtattr(IFLA_IFNAME, ifName(name)), macAttr(mac), linkinfo("bridge")]));
}

/**
 * RTM_NEWLINK creating the veth pair `name` with MAC `mac` (in the netns of the socket) and
 * `peer`, placed at once in the netns open on `peerNsFd` (IFLA_NET_NS_FD inside VETH_INFO_PEER,
 * whose payload is an ifinfomsg followed by the peer's attributes). NLM_F_EXCL: a leftover must
 * be removed first, never silently reused.
 */
export function newVethMsg(name: string, mac: Uint8Array, peer: string, peerNsFd: number, seq: number): Buffer {
  const peerInfo = rtattr(VETH_INFO_PEER, Buffer.concat([ifinfomsg(0), rtattr(IFLA_IFNAME, ifName(peer)), rtattr(IFLA_NET_NS_FD, u32(peerNsFd))]));
  return nlmsg(RTM.NEWLINK, NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.EXCL, seq, Buffer.concat([ifinfomsg(0), rtattr(IFLA_IFNAME, ifName(name)), macAttr(mac), linkinfo("veth", peerInfo)]));
}

/** RTM_NEWLINK enslaving interface `index` to the bridge `master` (IFLA_MASTER) and setting it up, in one request. */
export function linkMasterUpMsg(index: number, master: number, seq: number): Buffer {
  return nlmsg(RTM.NEWLINK, NLM_F.REQUEST | NLM_F.ACK, seq, Buffer.concat([ifinfomsg(index, IFF_UP, IFF_UP), rtattr(IFLA_MASTER, u32(master))]));
}

/** RTM_DELLINK of the interface named `name` (by name: no if_nametoindex before it that could race with the link going away). */
export function delLinkMsg(name: string, seq: number): Buffer {
  return nlmsg(RTM.DELLINK, NLM_F.REQUEST | NLM_F.ACK, seq, Buffer.concat([ifinfomsg(0), rtattr(IFLA_IFNAME, ifName(name))]));
}

/** RTM_NEWLINK that sets IFF_UP (and only that) on interface `index`. */
export function linkUpMsg(index: number, seq: number): Buffer {
  return nlmsg(RTM.NEWLINK, NLM_F.REQUEST | NLM_F.ACK, seq, ifinfomsg(index, IFF_UP, IFF_UP));
}

/** RTM_NEWADDR for address/prefix on interface `index` (replacing the same address if present). */
export function addrAddMsg(index: number, address: string, prefix: number, seq: number): Buffer {
  const ifa = Buffer.alloc(8); // ifaddrmsg
  ifa.writeUInt8(AF_INET, 0);
  ifa.writeUInt8(prefix, 1);
  ifa.writeUInt32LE(index, 4);
  const ip = ipv4Bytes(address);
  return nlmsg(RTM.NEWADDR, NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.REPLACE, seq, Buffer.concat([ifa, rtattr(IFA_LOCAL, ip), rtattr(IFA_ADDRESS, ip)]));
}

/** RTM_NEWROUTE for the default route via `gateway` out of interface `index`. */
export function defaultRouteMsg(index: number, gateway: string, seq: number): Buffer {
  const rt = Buffer.alloc(12); // rtmsg
  rt.writeUInt8(AF_INET, 0);
  rt.writeUInt8(RT_TABLE_MAIN, 4);
  rt.writeUInt8(RTPROT_BOOT, 5);
  rt.writeUInt8(0, 6); // RT_SCOPE_UNIVERSE
  rt.writeUInt8(RTN_UNICAST, 7);
  const oif = Buffer.alloc(4);
  oif.writeUInt32LE(index, 0);
  return nlmsg(RTM.NEWROUTE, NLM_F.REQUEST | NLM_F.ACK | NLM_F.CREATE | NLM_F.REPLACE, seq, Buffer.concat([rt, rtattr(RTA_GATEWAY, ipv4Bytes(gateway)), rtattr(RTA_OIF, oif)]));
}

/** The errno of an NLMSG_ERROR answer to `seq` (0 is the ACK); null if `msg` is something else. */
export function ackErrno(msg: Uint8Array, seq: number): number | null {
  const v = Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength);
  if (v.length < 20 || v.readUInt16LE(4) !== NLMSG_ERROR || v.readUInt32LE(8) !== seq) return null;
  return -v.readInt32LE(16) || 0; // not -0 for the ACK
}

// ---- the socket --------------------------------------------------------------------------

const c = () => libcCalls;

export function ifIndex(name: string): number {
  const i = c().ifNameToIndex(name);
  if (i === 0) throw new SysError("if_nametoindex", [name], errno());
  return i;
}

/**
 * A request that failed, named by its `what` (which says the interface): the kernel's errno, or
 * the error met while building it (an interface that is not there). Still a SysError, so callers
 * can tell ENODEV from the rest.
 */
export class NetlinkError extends SysError {
  constructor(what: string, errno: number, cause?: string) {
    super("rtnetlink", [what], errno);
    this.message = `rtnetlink ${what}: ${cause ?? errnoName(errno)}`;
  }
}

/** Sends each request and waits for its ACK; throws naming the request that failed. */
export function rtnetlink(requests: { what: string; build: (seq: number) => Buffer }[]): void {
  const AF_NETLINK = 16;
  const SOCK_RAW = 3;
  const SOCK_CLOEXEC = 0o2000000;
  const NETLINK_ROUTE = 0;
  const fd = check("socket", ["AF_NETLINK", "NETLINK_ROUTE"], c().socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
  try {
    let seq = 1;
    for (const r of requests) {
      const s = seq++;
      let msg: Buffer;
      try {
        msg = r.build(s);
      } catch (e) {
        if (e instanceof SysError) throw new NetlinkError(r.what, e.errno, e.message);
        throw e;
      }
      check("send", [r.what], Number(c().send(fd, msg, msg.length, 0)));
      for (;;) {
        const buf = new Uint8Array(8192);
        const n = check("recv", [r.what], Number(c().recv(fd, buf, buf.length, 0)));
        const errno = ackErrno(buf.subarray(0, n), s);
        if (errno === null) continue;
        if (errno !== 0) throw new NetlinkError(r.what, errno);
        break;
      }
    }
  } finally {
    c().close(fd);
  }
}
