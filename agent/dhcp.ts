// DHCPv4 messages (RFC 2131/2132): building DISCOVER/REQUEST and reading OFFER/ACK. Pure
// functions; the socket lives in sys/udp.ts and the exchange in stages/network.ts.
export const DHCP = { DISCOVER: 1, OFFER: 2, REQUEST: 3, ACK: 5, NAK: 6 } as const;
const MAGIC = 0x63825363;
const OPT = { SUBNET: 1, ROUTER: 3, DNS: 6, HOSTNAME: 12, REQUESTED_IP: 50, LEASE: 51, TYPE: 53, SERVER_ID: 54, PARAMS: 55, END: 255 } as const;

export interface DhcpLease {
  type: number;
  xid: number;
  address: string;
  prefix: number;
  router?: string;
  dns: string[];
  server?: string;
  leaseSeconds?: number;
}

const ip = (b: Uint8Array, o = 0) => `${b[o]}.${b[o + 1]}.${b[o + 2]}.${b[o + 3]}`;
const ipBytes = (s: string) => s.split(".").map(Number);

function macBytes(mac: string): number[] {
  const m = mac.split(":").map((h) => parseInt(h, 16));
  if (m.length !== 6 || m.some((x) => Number.isNaN(x))) throw new Error(`not a MAC address: ${mac}`);
  return m;
}

/** A client message; the broadcast flag asks the server to broadcast its answer (we have no address yet). */
export function dhcpMessage(type: number, xid: number, mac: string, extra: { requested?: string; server?: string } = {}): Buffer {
  const b = Buffer.alloc(240);
  b[0] = 1; // BOOTREQUEST
  b[1] = 1; // Ethernet
  b[2] = 6;
  b.writeUInt32BE(xid, 4);
  b.writeUInt16BE(0x8000, 10); // broadcast flag
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
  const lease: DhcpLease = { type: 0, xid: b.readUInt32BE(4), address: ip(b, 16), prefix: 32, dns: [] };
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
    else if (code === OPT.SUBNET && len === 4) lease.prefix = [...v].map((x) => x.toString(2).padStart(8, "0")).join("").replace(/0+$/, "").length;
    else if (code === OPT.ROUTER && len >= 4) lease.router = ip(v);
    else if (code === OPT.DNS) for (let j = 0; j + 4 <= len; j += 4) lease.dns.push(ip(v, j));
    else if (code === OPT.SERVER_ID && len === 4) lease.server = ip(v);
    else if (code === OPT.LEASE && len === 4) lease.leaseSeconds = v.readUInt32BE(0);
    i += 2 + len;
  }
  return lease;
}
