// rtnetlink, the kernel's interface for links, addresses and routes: message encoding (pure,
// tested against known byte layouts) and a small request/ack client over koffi.
import { check, errno, SysError } from "./ffi.ts";
import { libcCalls } from "./libc.ts";

export const RTM = { NEWLINK: 16, NEWADDR: 20, NEWROUTE: 24 } as const;
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

/** RTM_NEWLINK that sets IFF_UP (and only that) on interface `index`. */
export function linkUpMsg(index: number, seq: number): Buffer {
  const ifi = Buffer.alloc(16); // ifinfomsg
  ifi.writeUInt8(0, 0); // AF_UNSPEC
  ifi.writeInt32LE(index, 4);
  ifi.writeUInt32LE(IFF_UP, 8); // flags
  ifi.writeUInt32LE(IFF_UP, 12); // change mask
  return nlmsg(RTM.NEWLINK, NLM_F.REQUEST | NLM_F.ACK, seq, ifi);
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
      const msg = r.build(s);
      check("send", [r.what], Number(c().send(fd, msg, msg.length, 0)));
      for (;;) {
        const buf = new Uint8Array(8192);
        const n = check("recv", [r.what], Number(c().recv(fd, buf, buf.length, 0)));
        const errno = ackErrno(buf.subarray(0, n), s);
        if (errno === null) continue;
        if (errno !== 0) throw new SysError(`rtnetlink ${r.what}`, [], errno);
        break;
      }
    }
  } finally {
    c().close(fd);
  }
}
