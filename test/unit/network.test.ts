import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { netmaskToPrefix, setupNetwork, staticIpFrom } from "../../agent/stages/network.ts";
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
