// DHCPv4 messages (RFC 2131/2132): building DISCOVER/REQUEST and reading OFFER/ACK/NAK, and the
// checks a reply must pass before anything in it is used (it comes from the network: data, never
// trusted). Pure functions; the socket lives in sys/udp.ts and the exchange in stages/network.ts.
export const DHCP = { DISCOVER: 1, OFFER: 2, REQUEST: 3, ACK: 5, NAK: 6 } as const;
const MAGIC = 0x63825363;
const OPT = { SUBNET: 1, ROUTER: 3, DNS: 6, HOSTNAME: 12, REQUESTED_IP: 50, LEASE: 51, TYPE: 53, SERVER_ID: 54, PARAMS: 55, RENEWAL: 58, REBINDING: 59, END: 255 } as const;
/** Lease time 0xffffffff: the address is the client's for good. */
export const INFINITE_LEASE = 0xffffffff;

export interface DhcpLease {
  type: number;
  xid: number;
  /** chaddr: the client the reply is meant for, lower case. */
  client: string;
  address: string;
  prefix: number;
  /** The subnet mask as sent when it is not contiguous (the prefix is then meaningless). */
  badMask?: string;
  router?: string;
  dns: string[];
  server?: string;
  leaseSeconds?: number;
  /** T1 and T2 when the server sets them (options 58, 59). */
  renewSeconds?: number;
  rebindSeconds?: number;
}

const ip = (b: Uint8Array, o = 0) => `${b[o]}.${b[o + 1]}.${b[o + 2]}.${b[o + 3]}`;
const ipBytes = (s: string) => s.split(".").map(Number);
const ipNumber = (s: string) => ipBytes(s).reduce((n, o) => n * 256 + o, 0);
const TYPE_NAMES: Record<number, string> = { 1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 5: "ACK", 6: "NAK" };
export const typeName = (t: number) => TYPE_NAMES[t] ?? `message type ${t}`;

function macBytes(mac: string): number[] {
  const m = mac.split(":").map((h) => parseInt(h, 16));
  if (m.length !== 6 || m.some((x) => Number.isNaN(x))) throw new Error(`not a MAC address: ${mac}`);
  return m;
}

/**
 * A client message. Without an address yet the broadcast flag asks the server to broadcast its
 * answer; a renewal (`ciaddr`: the address we hold) is answered to that address instead.
 */
export function dhcpMessage(type: number, xid: number, mac: string, extra: { requested?: string; server?: string; ciaddr?: string } = {}): Buffer {
  const b = Buffer.alloc(240);
  b[0] = 1; // BOOTREQUEST
  b[1] = 1; // Ethernet
  b[2] = 6;
  b.writeUInt32BE(xid, 4);
  if (extra.ciaddr) Buffer.from(ipBytes(extra.ciaddr)).copy(b, 12);
  else b.writeUInt16BE(0x8000, 10); // broadcast flag
  Buffer.from(macBytes(mac)).copy(b, 28);
  b.writeUInt32BE(MAGIC, 236);
  const opts: number[] = [OPT.TYPE, 1, type];
  if (extra.requested) opts.push(OPT.REQUESTED_IP, 4, ...ipBytes(extra.requested));
  if (extra.server) opts.push(OPT.SERVER_ID, 4, ...ipBytes(extra.server));
  opts.push(OPT.PARAMS, 4, OPT.SUBNET, OPT.ROUTER, OPT.DNS, OPT.LEASE, OPT.END);
  return Buffer.concat([b, Buffer.from(opts)]);
}

/** Reads a server message; null when it is not a DHCP reply at all. */
export function parseDhcpReply(msg: Uint8Array): DhcpLease | null {
  const b = Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength);
  if (b.length < 240 || b[0] !== 2 || b.readUInt32BE(236) !== MAGIC) return null;
  const client = [...b.subarray(28, 34)].map((x) => x.toString(16).padStart(2, "0")).join(":");
  const lease: DhcpLease = { type: 0, xid: b.readUInt32BE(4), client, address: ip(b, 16), prefix: 32, dns: [] };
  for (let i = 240; i < b.length; ) {
    const code = b[i]!;
    if (code === OPT.END) break;
    if (code === 0) {
      i++;
      continue;
    }
    const len = b[i + 1] ?? 0;
    const v = b.subarray(i + 2, i + 2 + len);
    if (v.length < len) break; // truncated option: stop, keep what was read
    if (code === OPT.TYPE && len === 1) lease.type = v[0]!;
    else if (code === OPT.SUBNET && len === 4) {
      const bits = [...v].map((x) => x.toString(2).padStart(8, "0")).join("");
      if (/^1*0*$/.test(bits)) lease.prefix = bits.indexOf("0") < 0 ? 32 : bits.indexOf("0");
      else lease.badMask = ip(v);
    } else if (code === OPT.ROUTER && len >= 4) lease.router = ip(v);
    else if (code === OPT.DNS) for (let j = 0; j + 4 <= len; j += 4) lease.dns.push(ip(v, j));
    else if (code === OPT.SERVER_ID && len === 4) lease.server = ip(v);
    else if (code === OPT.LEASE && len === 4) lease.leaseSeconds = v.readUInt32BE(0);
    else if (code === OPT.RENEWAL && len === 4) lease.renewSeconds = v.readUInt32BE(0);
    else if (code === OPT.REBINDING && len === 4) lease.rebindSeconds = v.readUInt32BE(0);
    i += 2 + len;
  }
  return lease;
}

/**
 * Why `address` cannot be a host's own address in a subnet of `prefix` bits; null when it can.
 * A server (or whoever answers in its place) offering one of these would cut the machine off or
 * make it answer for addresses that are not its own.
 */
export function unusableAddress(address: string, prefix = 32): string | null {
  const n = ipNumber(address);
  const first = n >>> 24;
  if (n === 0) return "the unspecified address";
  if (n === 0xffffffff) return "the broadcast address";
  if (first === 0) return "in 0.0.0.0/8 (this network)";
  if (first === 127) return "a loopback address";
  if (first >= 224 && first < 240) return "a multicast address";
  if (first >= 240) return "a reserved address (240.0.0.0/4)";
  // /31 (RFC 3021) and /32 have no network or broadcast address of their own.
  if (prefix >= 1 && prefix <= 30) {
    const host = 2 ** (32 - prefix) - 1;
    if ((n & host) === 0) return `the network address of its /${prefix}`;
    if ((n & host) >>> 0 === host) return `the broadcast address of its /${prefix}`;
  }
  return null;
}

/** Whether `a` and `b` are in the same subnet of `prefix` bits. */
export function sameSubnet(a: string, b: string, prefix: number): boolean {
  if (prefix <= 0) return true;
  const shift = 32 - prefix;
  return Math.floor(ipNumber(a) / 2 ** shift) === Math.floor(ipNumber(b) / 2 ** shift);
}

export interface Expected {
  xid: number;
  mac: string;
  /** Message types acceptable now (OFFER while discovering; ACK or NAK after a REQUEST). */
  types: readonly number[];
  /** The server the request went to: a reply from any other server is not an answer to it. */
  server?: string;
  /** When any server may answer (rebinding), a NAK still counts only from this one, ours. */
  nakFrom?: string;
  /** The address the request was for: an ACK must lease exactly that one. */
  address?: string;
}

/**
 * Why a reply is not one to act on; null when it is. Another client's transaction (`xid`, also
 * `chaddr`), a server other than the one asked (also for a NAK: anyone on the segment could send
 * one), no server identifier (RFC 2132 makes it mandatory), or an address no host may have.
 */
export function replyProblem(r: DhcpLease, want: Expected): string | null {
  if (r.xid !== want.xid) return `transaction ${r.xid.toString(16)} is not ours`;
  if (r.client !== want.mac.toLowerCase()) return `it is for ${r.client}`;
  if (!want.types.includes(r.type)) return `${typeName(r.type)} was not expected now`;
  if (!r.server) return "no server identifier";
  if (want.server && r.server !== want.server) return `server ${r.server} was not asked (${want.server} was)`;
  if (r.type === DHCP.NAK) return want.nakFrom && r.server !== want.nakFrom ? `server ${r.server} did not lease it (${want.nakFrom} did)` : null;
  if (r.type === DHCP.ACK && r.leaseSeconds === 0) return "lease time 0";
  if (r.badMask) return `subnet mask ${r.badMask} is not contiguous`;
  if (r.prefix < 1) return `subnet mask /${r.prefix}`;
  const bad = unusableAddress(r.address, r.prefix);
  if (bad) return `${r.address} is ${bad}`;
  if (want.address && r.address !== want.address) return `it leases ${r.address}, not ${want.address}`;
  return null;
}

/**
 * The parts of an accepted lease that may still be wrong without making the address unusable:
 * a router outside the subnet (or no host address) is dropped, as are DNS servers no host can
 * be. Returns the cleaned lease and a line per thing dropped.
 */
export function cleanLease(r: DhcpLease): { lease: DhcpLease; dropped: string[] } {
  const dropped: string[] = [];
  let router = r.router;
  if (router) {
    const bad = unusableAddress(router, r.prefix) ?? (router === r.address ? "our own address" : !sameSubnet(router, r.address, r.prefix) ? `outside ${r.address}/${r.prefix}` : null);
    if (bad) {
      dropped.push(`router ${router}: ${bad}`);
      router = undefined;
    }
  }
  const dns = r.dns.filter((d) => {
    const bad = unusableAddress(d);
    if (bad) dropped.push(`DNS server ${d}: ${bad}`);
    return !bad;
  });
  return { lease: { ...r, router, dns }, dropped };
}

/** When to renew (T1) and rebind (T2), in seconds after the lease began: the server's, if sane. */
export function leaseTimes(r: Pick<DhcpLease, "leaseSeconds" | "renewSeconds" | "rebindSeconds">): { t1: number; t2: number; end: number } | null {
  const end = r.leaseSeconds;
  if (end === undefined || end === INFINITE_LEASE) return null; // for good: nothing to renew
  const t2 = r.rebindSeconds !== undefined && r.rebindSeconds > 0 && r.rebindSeconds < end ? r.rebindSeconds : end * 0.875;
  const t1 = r.renewSeconds !== undefined && r.renewSeconds > 0 && r.renewSeconds < t2 ? r.renewSeconds : Math.min(end * 0.5, t2);
  return { t1, t2, end };
}
