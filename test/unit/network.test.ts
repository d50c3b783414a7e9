import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { dhcp, handLeasesToOs, type HeldLease, keepLease, netmaskToPrefix, renewLease, setupNetwork, staticIpFrom } from "../../agent/stages/network.ts";
import { ackErrno, addrAddMsg, defaultRouteMsg, linkUpMsg, nlmsg, rtattr } from "../../agent/sys/netlink.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

describe("rtnetlink encoding", () => {
  it("pads attributes to 4 bytes but counts only the payload in rta_len", () => {
    expect(hex(rtattr(1, Buffer.from([10, 0, 2, 15])))).toBe("0800" + "0100" + "0a00020f");
    expect(hex(rtattr(3, Buffer.from("eth0\0")))).toBe("0900" + "0300" + "6574683000" + "000000");
  });

  it("RTM_NEWLINK: ifinfomsg with IFF_UP in flags and change", () => {
    expect(hex(linkUpMsg(2, 7))).toBe(
      "20000000" + "1000" + "0500" + "07000000" + "00000000" + // nlmsghdr: len 32, RTM_NEWLINK, REQUEST|ACK, seq 7
        "00" + "00" + "0000" + "02000000" + "01000000" + "01000000", // AF_UNSPEC, index 2, flags IFF_UP, change IFF_UP
    );
  });

  it("RTM_NEWADDR: ifaddrmsg and IFA_LOCAL/IFA_ADDRESS for 10.0.2.15/24 on index 2", () => {
    expect(hex(addrAddMsg(2, "10.0.2.15", 24, 1))).toBe(
      "28000000" + "1400" + "0505" + "01000000" + "00000000" + // len 40, RTM_NEWADDR, REQUEST|ACK|CREATE|REPLACE
        "02" + "18" + "00" + "00" + "02000000" + // AF_INET, /24, flags, scope, index 2
        "0800" + "0200" + "0a00020f" + // IFA_LOCAL
        "0800" + "0100" + "0a00020f", // IFA_ADDRESS
    );
  });

  it("RTM_NEWROUTE: default route via 10.0.2.2 out of index 2, main table, proto boot", () => {
    expect(hex(defaultRouteMsg(2, "10.0.2.2", 3))).toBe(
      "2c000000" + "1800" + "0505" + "03000000" + "00000000" +
        "02" + "00" + "00" + "00" + "fe" + "03" + "00" + "01" + "00000000" + // AF_INET, dst_len 0, table 254, RTPROT_BOOT, universe, unicast
        "0800" + "0500" + "0a000202" + // RTA_GATEWAY
        "0800" + "0400" + "02000000", // RTA_OIF
    );
  });

  it("reads ACKs and errors for its own sequence number only", () => {
    const ack = (seq: number, err: number) => {
      const body = Buffer.alloc(4);
      body.writeInt32LE(err, 0);
      return nlmsg(2, 0, seq, body);
    };
    expect(ackErrno(ack(5, 0), 5)).toBe(0);
    expect(ackErrno(ack(5, -17), 5)).toBe(17); // EEXIST
    expect(ackErrno(ack(4, 0), 5)).toBeNull();
    expect(ackErrno(nlmsg(16, 0, 5, Buffer.alloc(16)), 5)).toBeNull();
  });

  it("refuses malformed addresses", () => {
    expect(() => addrAddMsg(1, "10.0.2", 24, 1)).toThrow("not an IPv4 address: 10.0.2");
  });
});

describe("network from the cmdline", () => {
  it("reads initos.ip/xip with initos.gw, and the kernel's ip= colon form", () => {
    expect(staticIpFrom(parseCmdline("xip=10.0.2.15/24 initos.gw=10.0.2.2").cmdline)).toEqual({ address: "10.0.2.15", prefix: 24, gateway: "10.0.2.2", dns: [] });
    expect(staticIpFrom(parseCmdline("initos.ip=10.0.2.15/24 initos.if=52:54:00:AB:CD:EF").cmdline)?.device).toBe("52:54:00:AB:CD:EF");
    expect(staticIpFrom(parseCmdline("ip=192.168.7.2::192.168.7.1:255.255.255.128:box:eth1:none:1.1.1.1").cmdline)).toEqual({
      device: "eth1",
      address: "192.168.7.2",
      prefix: 25,
      gateway: "192.168.7.1",
      dns: ["1.1.1.1"],
      hostname: "box",
    });
    expect(staticIpFrom(parseCmdline("ip=dhcp").cmdline)).toBeNull();
  });

  it("turns netmasks into prefixes and refuses holes", () => {
    expect(netmaskToPrefix("255.255.255.0")).toBe(24);
    expect(netmaskToPrefix("255.255.255.255")).toBe(32);
    expect(netmaskToPrefix("0.0.0.0")).toBe(0);
    expect(() => netmaskToPrefix("255.0.255.0")).toThrow("netmask 255.0.255.0 is not contiguous");
  });

  it("brings up lo, then the first interface (or the one named by name or MAC) with address and route", async () => {
    const s = new FakeSys()
      .add("/sys/class/net/lo/address", { kind: "file", data: "00:00:00:00:00:00\n" })
      .add("/sys/class/net/eth0/address", { kind: "file", data: "52:54:00:12:34:56\n" })
      .add("/sys/class/net/eth1/address", { kind: "file", data: "52:54:00:AB:CD:EF\n" });
    const cold = new Coldplug(s, silentLog());
    expect(await setupNetwork(s, silentLog(), cold, parseCmdline("xip=10.0.2.15/24 initos.gw=10.0.2.2").cmdline, 1)).toBe("eth0");
    expect(s.calls.filter((c) => c.startsWith("net."))).toEqual(["net.linkUp lo", "net.linkUp eth0", "net.addAddress eth0 10.0.2.15/24", "net.defaultRoute eth0 10.0.2.2"]);
    expect(await setupNetwork(s, silentLog(), cold, parseCmdline("initos.ip=10.0.3.9/16 initos.if=52:54:00:ab:cd:ef").cmdline, 1)).toBe("eth1");
    expect(s.calls).toContain("net.addAddress eth1 10.0.3.9/16");
  });

  it("with no address asked for, only the loopback", async () => {
    const s = new FakeSys();
    expect(await setupNetwork(s, silentLog(), new Coldplug(s, silentLog()), parseCmdline("").cmdline, 1)).toBeNull();
    expect(s.calls.filter((c) => c.startsWith("net."))).toEqual(["net.linkUp lo"]);
  });
});

describe("DHCPv4 messages", () => {
  it("builds a broadcast DISCOVER with the client MAC and the options we need", async () => {
    const { dhcpMessage } = await import("../../agent/dhcp.ts");
    const m = dhcpMessage(1, 0x11223344, "52:54:00:12:34:56");
    expect(m[0]).toBe(1); // BOOTREQUEST
    expect(m.readUInt32BE(4)).toBe(0x11223344);
    expect(m.readUInt16BE(10)).toBe(0x8000); // answer by broadcast: no address yet
    expect(hex(m.subarray(28, 34))).toBe("525400123456");
    expect(m.readUInt32BE(236)).toBe(0x63825363);
    expect(hex(m.subarray(240))).toBe("350101" + "370401030633" + "ff"); // type DISCOVER; ask subnet, router, dns, lease
    const req = dhcpMessage(3, 1, "52:54:00:12:34:56", { requested: "10.0.2.15", server: "10.0.2.2" });
    expect(hex(req.subarray(240))).toBe("350103" + "32040a00020f" + "36040a000202" + "370401030633" + "ff");
  });

  it("reads an OFFER: address, prefix, router, DNS servers, server id, lease; ignores pads and unknown options", async () => {
    const { parseDhcpReply } = await import("../../agent/dhcp.ts");
    const b = Buffer.alloc(240);
    b[0] = 2;
    b.writeUInt32BE(42, 4);
    Buffer.from([10, 0, 2, 15]).copy(b, 16);
    b.writeUInt32BE(0x63825363, 236);
    const opts = Buffer.from([53, 1, 2, 0, 1, 4, 255, 255, 255, 0, 3, 4, 10, 0, 2, 2, 6, 8, 10, 0, 2, 3, 1, 1, 1, 1, 54, 4, 10, 0, 2, 2, 51, 4, 0, 0, 0x0e, 0x10, 99, 1, 7, 255]);
    expect(parseDhcpReply(Buffer.concat([b, opts]))).toEqual({
      type: 2,
      xid: 42,
      client: "00:00:00:00:00:00",
      address: "10.0.2.15",
      prefix: 24,
      router: "10.0.2.2",
      dns: ["10.0.2.3", "1.1.1.1"],
      server: "10.0.2.2",
      leaseSeconds: 3600,
    });
    expect(parseDhcpReply(Buffer.alloc(100))).toBeNull();
    const request = Buffer.concat([b, opts]);
    request[0] = 1;
    expect(parseDhcpReply(request)).toBeNull(); // a client's message, not a reply
  });

  it("survives a truncated option", async () => {
    const { parseDhcpReply } = await import("../../agent/dhcp.ts");
    const b = Buffer.alloc(240);
    b[0] = 2;
    b.writeUInt32BE(0x63825363, 236);
    expect(parseDhcpReply(Buffer.concat([b, Buffer.from([53, 1, 5, 6, 8, 10, 0])]))).toMatchObject({ type: 5, dns: [] });
  });
});

// ---- DHCP against crafted packets: a fake socket whose "server" answers each request -------------

const MAC = "52:54:00:12:34:56";
const SERVER = "10.0.2.2";

interface Sent {
  type: number;
  xid: number;
  to: string;
  ciaddr: string;
  broadcastFlag: boolean;
  requested?: string;
  server?: string;
  at: number;
}

/** A server message as the network would carry it. `server: null` leaves out the server identifier. */
function reply(o: { type: number; xid: number; address?: string; mac?: string; server?: string | null; mask?: number[]; router?: string; dns?: string[]; lease?: number; t1?: number; t2?: number }): Buffer {
  const b = Buffer.alloc(240);
  b[0] = 2;
  b[1] = 1;
  b[2] = 6;
  b.writeUInt32BE(o.xid, 4);
  Buffer.from((o.address ?? "0.0.0.0").split(".").map(Number)).copy(b, 16);
  Buffer.from((o.mac ?? MAC).split(":").map((h) => parseInt(h, 16))).copy(b, 28);
  b.writeUInt32BE(0x63825363, 236);
  const ip4 = (a: string) => a.split(".").map(Number);
  const u32 = (n: number) => [(n >>> 24) & 255, (n >>> 16) & 255, (n >>> 8) & 255, n & 255];
  const opts = [53, 1, o.type];
  if (o.server !== null) opts.push(54, 4, ...ip4(o.server ?? SERVER));
  if (o.type !== 6) {
    opts.push(1, 4, ...(o.mask ?? [255, 255, 255, 0]));
    if (o.router) opts.push(3, 4, ...ip4(o.router));
    if (o.dns) opts.push(6, 4 * o.dns.length, ...o.dns.flatMap(ip4));
    if (o.lease !== undefined) opts.push(51, 4, ...u32(o.lease));
    if (o.t1 !== undefined) opts.push(58, 4, ...u32(o.t1));
    if (o.t2 !== undefined) opts.push(59, 4, ...u32(o.t2));
  }
  opts.push(255);
  return Buffer.concat([b, Buffer.from(opts)]);
}

/** A UDP socket on port 68 whose peer is `answer`: each request sent may bring replies. */
function dhcpNet(s: FakeSys, answer: (req: Sent) => Buffer[]): Sent[] {
  const sent: Sent[] = [];
  s.net.udp = () => {
    const queue: Uint8Array[] = [];
    return {
      send(data, to) {
        const b = Buffer.from(data);
        const req: Sent = { type: 0, xid: b.readUInt32BE(4), to, ciaddr: [...b.subarray(12, 16)].join("."), broadcastFlag: b.readUInt16BE(10) === 0x8000, at: s.clock };
        for (let i = 240; i < b.length && b[i] !== 255; i += 2 + b[i + 1]!) {
          const v = b.subarray(i + 2, i + 2 + b[i + 1]!);
          if (b[i] === 53) req.type = v[0]!;
          if (b[i] === 50) req.requested = [...v].join(".");
          if (b[i] === 54) req.server = [...v].join(".");
        }
        sent.push(req);
        queue.push(...answer(req));
      },
      receive: () => queue.splice(0),
      close: () => {},
    };
  };
  return sent;
}

/** The usual server: offers 10.0.2.15/24 and ACKs a REQUEST for it, lease 3600s. */
const honest = (o: Partial<Parameters<typeof reply>[0]> = {}) => (req: Sent) =>
  req.type === 1 ? [reply({ type: 2, xid: req.xid, address: "10.0.2.15", router: SERVER, dns: ["10.0.2.3"], lease: 3600, ...o })] : req.type === 3 ? [reply({ type: 5, xid: req.xid, address: "10.0.2.15", router: SERVER, dns: ["10.0.2.3"], lease: 3600, ...o })] : [];

function withEth0(): FakeSys {
  return new FakeSys().add("/sys/class/net/eth0/address", { kind: "file", data: `${MAC}\n` });
}

describe("DHCP replies are data: checked before use", () => {
  it("no address a host may not have: unspecified, broadcast, loopback, multicast, the subnet's network and broadcast", async () => {
    const { unusableAddress } = await import("../../agent/dhcp.ts");
    expect(unusableAddress("0.0.0.0", 24)).toBe("the unspecified address");
    expect(unusableAddress("255.255.255.255", 24)).toBe("the broadcast address");
    expect(unusableAddress("127.0.0.1", 8)).toBe("a loopback address");
    expect(unusableAddress("127.1.2.3", 24)).toBe("a loopback address");
    expect(unusableAddress("224.0.0.251", 24)).toBe("a multicast address");
    expect(unusableAddress("239.255.255.250", 24)).toBe("a multicast address");
    expect(unusableAddress("240.0.0.1", 24)).toBe("a reserved address (240.0.0.0/4)");
    expect(unusableAddress("0.1.2.3", 24)).toBe("in 0.0.0.0/8 (this network)");
    expect(unusableAddress("10.0.2.0", 24)).toBe("the network address of its /24");
    expect(unusableAddress("10.0.2.255", 24)).toBe("the broadcast address of its /24");
    expect(unusableAddress("192.168.7.127", 25)).toBe("the broadcast address of its /25");
    expect(unusableAddress("10.0.2.15", 24)).toBeNull();
    expect(unusableAddress("10.0.2.0", 31)).toBeNull(); // RFC 3021: both addresses are hosts
    expect(unusableAddress("10.0.2.255", 32)).toBeNull();
    expect(unusableAddress("223.255.255.1", 24)).toBeNull();
  });

  it("a reply to act on is ours (xid, chaddr), from the server asked, with a server identifier and a usable address", async () => {
    const { parseDhcpReply, replyProblem } = await import("../../agent/dhcp.ts");
    const want = { xid: 7, mac: MAC, types: [5, 6], server: SERVER, address: "10.0.2.15" };
    const check = (o: Parameters<typeof reply>[0]) => replyProblem(parseDhcpReply(reply(o))!, want);
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", lease: 60 })).toBeNull();
    expect(check({ type: 5, xid: 8, address: "10.0.2.15" })).toBe("transaction 8 is not ours");
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", mac: "52:54:00:00:00:01" })).toBe("it is for 52:54:00:00:00:01");
    expect(check({ type: 2, xid: 7, address: "10.0.2.15" })).toBe("OFFER was not expected now");
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", server: null })).toBe("no server identifier");
    expect(check({ type: 6, xid: 7, server: "10.0.2.66" })).toBe("server 10.0.2.66 was not asked (10.0.2.2 was)");
    expect(check({ type: 6, xid: 7 })).toBeNull();
    expect(check({ type: 5, xid: 7, address: "10.0.2.16", lease: 60 })).toBe("it leases 10.0.2.16, not 10.0.2.15");
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", mask: [255, 0, 255, 0] })).toBe("subnet mask 255.0.255.0 is not contiguous");
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", mask: [0, 0, 0, 0] })).toBe("subnet mask /0");
    expect(check({ type: 5, xid: 7, address: "10.0.2.15", lease: 0 })).toBe("lease time 0");
    expect(check({ type: 5, xid: 7, address: "10.0.2.255", lease: 60 })).toBe("10.0.2.255 is the broadcast address of its /24");
    // rebinding: any server may renew, but a NAK counts only from the one that leased it
    const rebind = { xid: 7, mac: MAC, types: [5, 6], address: "10.0.2.15", nakFrom: SERVER };
    expect(replyProblem(parseDhcpReply(reply({ type: 6, xid: 7, server: "10.0.2.66" }))!, rebind)).toBe("server 10.0.2.66 did not lease it (10.0.2.2 did)");
    expect(replyProblem(parseDhcpReply(reply({ type: 5, xid: 7, address: "10.0.2.15", server: "10.0.2.3", lease: 60 }))!, rebind)).toBeNull();
  });

  it("T1 and T2: the server's when they make sense, else half and seven eighths of the lease", async () => {
    const { leaseTimes, INFINITE_LEASE } = await import("../../agent/dhcp.ts");
    expect(leaseTimes({ leaseSeconds: 3600 })).toEqual({ t1: 1800, t2: 3150, end: 3600 });
    expect(leaseTimes({ leaseSeconds: 3600, renewSeconds: 600, rebindSeconds: 1200 })).toEqual({ t1: 600, t2: 1200, end: 3600 });
    expect(leaseTimes({ leaseSeconds: 3600, renewSeconds: 4000, rebindSeconds: 9000 })).toEqual({ t1: 1800, t2: 3150, end: 3600 });
    expect(leaseTimes({ leaseSeconds: INFINITE_LEASE })).toBeNull();
    expect(leaseTimes({})).toBeNull();
  });
});

describe("DHCP exchange", () => {
  it("DISCOVER, OFFER, REQUEST to the offering server, ACK: the lease, with the address's lifetime for the kernel", async () => {
    const s = withEth0();
    const sent = dhcpNet(s, honest());
    const log = silentLog();
    expect(await setupNetwork(s, log, new Coldplug(s, silentLog()), parseCmdline("ip=dhcp").cmdline, 5, false)).toBe("eth0");
    expect(sent.map((r) => [r.type, r.to, r.broadcastFlag, r.requested, r.server])).toEqual([
      [1, "255.255.255.255", true, undefined, undefined],
      [3, "255.255.255.255", true, "10.0.2.15", SERVER],
    ]);
    expect(s.calls.filter((c) => c.startsWith("net."))).toEqual(["net.linkUp lo", "net.linkUp eth0", "net.addLeasedAddress eth0 10.0.2.15/24 3600s", `net.defaultRoute eth0 ${SERVER}`]);
    expect(s.readFile("/etc/resolv.conf")).toBe("nameserver 10.0.2.3\n");
    expect(log.lines).toContain(`info: dhcp: eth0 leased 10.0.2.15/24 from ${SERVER} for 3600s`);
  });

  it("ignores rogue answers: other transactions, other clients, bad addresses, no server id, and NAKs and ACKs from a server not asked", async () => {
    const s = withEth0();
    const log = silentLog();
    dhcpNet(s, (req) => {
      if (req.type === 1)
        return [
          reply({ type: 2, xid: req.xid + 1, address: "10.0.2.99" }), // someone else's: not even logged
          reply({ type: 2, xid: req.xid, address: "10.0.2.98", mac: "52:54:00:00:00:01" }),
          reply({ type: 2, xid: req.xid, address: "127.0.0.1", server: "10.0.2.66" }),
          reply({ type: 2, xid: req.xid, address: "10.0.2.97", server: null }),
          reply({ type: 2, xid: req.xid, address: "10.0.2.15", router: SERVER, lease: 3600 }),
        ];
      return [
        reply({ type: 6, xid: req.xid, server: "10.0.2.66" }),
        reply({ type: 5, xid: req.xid, address: "10.0.2.15", server: "10.0.2.66", lease: 3600 }),
        reply({ type: 5, xid: req.xid, address: "10.0.2.16", lease: 3600 }),
        reply({ type: 5, xid: req.xid, address: "10.0.2.15", router: SERVER, lease: 3600 }),
      ];
    });
    const r = await dhcp(s, log, "eth0", 5);
    expect([r.address, r.prefix, r.gateway, r.lease.server]).toEqual(["10.0.2.15", 24, SERVER, SERVER]);
    expect(log.lines.filter((l) => l.startsWith("warn"))).toEqual([
      "warn: dhcp: eth0: ignored OFFER from 10.0.2.2: it is for 52:54:00:00:00:01",
      "warn: dhcp: eth0: ignored OFFER from 10.0.2.66: 127.0.0.1 is a loopback address",
      "warn: dhcp: eth0: ignored OFFER from ?: no server identifier",
      "warn: dhcp: eth0: ignored NAK from 10.0.2.66: server 10.0.2.66 was not asked (10.0.2.2 was)",
      "warn: dhcp: eth0: ignored ACK from 10.0.2.66: server 10.0.2.66 was not asked (10.0.2.2 was)",
      "warn: dhcp: eth0: ignored ACK from 10.0.2.2: it leases 10.0.2.16, not 10.0.2.15",
    ]);
  });

  it("only bad offers: no address is taken, and the error says there was no answer", async () => {
    const s = withEth0();
    const log = silentLog();
    const sent = dhcpNet(s, (req) => (req.type === 1 ? [reply({ type: 2, xid: req.xid, address: "224.0.0.1" })] : []));
    await expect(dhcp(s, log, "eth0", 5)).rejects.toThrow("dhcp on eth0: no answer within 5s");
    expect(sent.every((r) => r.type === 1)).toBe(true); // never asked for it
    expect(sent.length).toBe(3); // sent again every 2s
    expect(log.lines.filter((l) => l.startsWith("warn"))).toEqual(["warn: dhcp: eth0: ignored OFFER from 10.0.2.2: 224.0.0.1 is a multicast address"]); // once
  });

  it("a NAK from the server asked starts over with a DISCOVER", async () => {
    const s = withEth0();
    const log = silentLog();
    let naks = 1;
    const sent = dhcpNet(s, (req) => (req.type === 3 && naks-- > 0 ? [reply({ type: 6, xid: req.xid })] : honest()(req)));
    expect((await dhcp(s, log, "eth0", 10)).address).toBe("10.0.2.15");
    expect(sent.map((r) => r.type)).toEqual([1, 3, 1, 3]);
    expect(log.lines).toContain(`warn: dhcp: eth0: ${SERVER} refused 10.0.2.15 (NAK); asking again`);
  });

  it("a router outside the subnet and DNS servers no host can be are dropped, the lease kept", async () => {
    const s = withEth0();
    const log = silentLog();
    dhcpNet(s, honest({ router: "192.168.9.1", dns: ["0.0.0.0", "10.0.2.3", "224.0.0.251"] }));
    const r = await dhcp(s, log, "eth0", 5);
    expect([r.address, r.gateway, r.dns]).toEqual(["10.0.2.15", undefined, ["10.0.2.3"]]);
    expect(log.lines).toContain("warn: dhcp: eth0: ignored router 192.168.9.1: outside 10.0.2.15/24");
    expect(log.lines).toContain("warn: dhcp: eth0: ignored DNS server 0.0.0.0: the unspecified address");
    expect(log.lines).toContain("warn: dhcp: eth0: ignored DNS server 224.0.0.251: a multicast address");
  });

  it("the address carries the lease's lifetime (IFA_CACHEINFO), so the kernel drops it if nobody renews", async () => {
    const { withLifetime } = await import("../../agent/sys/index.ts");
    const m = withLifetime(addrAddMsg(2, "10.0.2.15", 24, 1), 3600);
    expect(m.readUInt32LE(0)).toBe(m.length);
    expect(hex(m.subarray(40))).toBe("1400" + "0600" + "100e0000" + "100e0000" + "00000000" + "00000000"); // preferred = valid = 3600s
    expect(withLifetime(addrAddMsg(2, "10.0.2.15", 24, 1), 0).readUInt32LE(44)).toBe(1); // 0 would be refused
  });
});

describe("DHCP lease kept while PID 1 stays, handed to the OS at switch_root", () => {
  const lease = (o: Partial<HeldLease> = {}): HeldLease => ({ ifname: "eth0", mac: MAC, address: "10.0.2.15", prefix: 24, server: SERVER, gateway: SERVER, dns: [], since: 0, times: { t1: 50, t2: 87.5, end: 100 }, ...o });

  it("renews at T1 with a REQUEST to its server (ciaddr, no broadcast), and the address gets the new lifetime", async () => {
    const s = withEth0();
    const log = silentLog();
    const keeper = { lease: lease(), stopped: false };
    const sent = dhcpNet(s, (req) => {
      if (sent.length > 2) keeper.stopped = true; // enough: the third request goes unanswered
      return [reply({ type: 5, xid: req.xid, address: "10.0.2.15", router: SERVER, lease: 100 })];
    });
    await keepLease(s, log, keeper);
    expect(sent.slice(0, 2).map((r) => [r.type, r.to, r.ciaddr, r.broadcastFlag, r.requested, r.server])).toEqual([
      [3, SERVER, "10.0.2.15", false, undefined, undefined],
      [3, SERVER, "10.0.2.15", false, undefined, undefined],
    ]);
    expect(sent[0]!.at).toBe(50_000); // T1
    expect(sent[1]!.at).toBe(100_000); // T1 of the renewed lease, which began at 50s
    expect(s.calls.filter((c) => c.startsWith("net.addLeasedAddress"))).toEqual(["net.addLeasedAddress eth0 10.0.2.15/24 100s", "net.addLeasedAddress eth0 10.0.2.15/24 100s"]);
    expect(log.lines).toContain(`info: dhcp: eth0 renewed 10.0.2.15/24 from ${SERVER} for 100s`);
  });

  it("its server silent until T2: broadcast (rebinding); a NAK from another server is ignored, another server's ACK taken", async () => {
    const s = withEth0();
    const log = silentLog();
    const sent = dhcpNet(s, (req) =>
      req.to === SERVER ? [] : [reply({ type: 6, xid: req.xid, server: "10.0.2.66" }), reply({ type: 5, xid: req.xid, address: "10.0.2.15", server: "10.0.2.3", lease: 100 })],
    );
    s.clock = 50_000; // T1
    const renewed = await renewLease(s, log, lease());
    expect(renewed?.server).toBe("10.0.2.3");
    expect(sent.filter((r) => r.to === SERVER).every((r) => r.at < 87_500)).toBe(true);
    expect(sent.filter((r) => r.to === "255.255.255.255").map((r) => r.at)).toEqual([87_500]);
    expect(log.lines).toContain("warn: dhcp: eth0: ignored NAK from 10.0.2.66: server 10.0.2.66 did not lease it (10.0.2.2 did)");
  });

  it("a NAK from its server: the address is given up at once and a new lease asked for", async () => {
    const s = withEth0();
    const log = silentLog();
    const keeper = { lease: lease(), stopped: false };
    const sent = dhcpNet(s, (req) => {
      if (req.ciaddr === "10.0.2.15") return [reply({ type: 6, xid: req.xid })];
      if (req.type === 3) keeper.stopped = true; // the new lease is the last thing this test needs
      return [reply({ type: req.type === 1 ? 2 : 5, xid: req.xid, address: "10.0.2.16", lease: 100 })];
    });
    await keepLease(s, log, keeper);
    expect(sent.map((r) => [r.type, r.ciaddr])).toEqual([
      [3, "10.0.2.15"],
      [1, "0.0.0.0"],
      [3, "0.0.0.0"],
    ]);
    expect(s.calls).toContain("net.addLeasedAddress eth0 10.0.2.15/24 1s");
    expect(log.lines).toContain(`warn: dhcp: eth0: ${SERVER} refused to renew 10.0.2.15 (NAK); giving it up`);
  });

  it("nobody answers: at the lease's end it is gone (the kernel drops it), and a new one is asked for", async () => {
    const s = withEth0();
    const log = silentLog();
    const keeper = { lease: lease(), stopped: false };
    const sent = dhcpNet(s, (req) => {
      if (req.type === 1) keeper.stopped = true;
      return [];
    });
    await keepLease(s, log, keeper);
    expect(log.lines).toContain("warn: dhcp: eth0: 10.0.2.15 not renewed before its lease ended; it is gone");
    expect(sent.find((r) => r.type === 1)).toMatchObject({ to: "255.255.255.255", at: 100_000 });
    expect(sent.filter((r) => r.type === 3).every((r) => r.at < 100_000)).toBe(true);
  });

  it("handLeasesToOs: renewing stops, the address stays with what is left of its lifetime", async () => {
    const s = withEth0();
    const log = silentLog();
    const sent = dhcpNet(s, honest({ lease: 3600 }));
    await setupNetwork(s, log, new Coldplug(s, silentLog()), parseCmdline("ip=dhcp").cmdline, 5);
    handLeasesToOs();
    const before = sent.length;
    for (let i = 0; i < 100; i++) await s.sleep(60_000); // well past T1
    expect(sent.length).toBe(before);
    expect(log.lines.find((l) => l.includes("is the OS's now"))).toMatch(/^info: dhcp: eth0 10\.0\.2\.15 is the OS's now, valid \d+s more unless it renews it$/);
  });
});
