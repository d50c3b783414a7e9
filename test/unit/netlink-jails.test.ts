// The rtnetlink messages of jail mode's network, byte for byte. The layouts were checked against
// what iproute2 6.1 sends for `ip link add name initos0 type bridge` and `ip link add eth0 type
// veth peer name vj-web` (strace -e sendmsg -xx): same attributes, same nesting, no
// NLA_F_NESTED; ours adds IFLA_NET_NS_FD to the peer. The calls themselves run for real in
// test/system/jailnet.test.ts.
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { bridgeMac, delLinkMsg, ifName, jailMac, macString, linkMasterUpMsg, newBridgeMsg, newVethMsg } from "../../agent/sys/netlink.ts";
import { FakeSys } from "./fakesys.ts";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");
const ZERO_IFINFO = "00".repeat(16);

describe("rtnetlink messages for jails", () => {
  it("RTM_NEWLINK bridge: IFLA_IFNAME with its NUL, IFLA_ADDRESS, IFLA_LINKINFO { IFLA_INFO_KIND \"bridge\" }, CREATE without EXCL", () => {
    expect(hex(bridgeMac("10.77.0.1"))).toBe("02490a4d0001");
    expect(hex(newBridgeMsg("initos0", bridgeMac("10.77.0.1"), 1))).toBe(
      "48000000" + "1000" + "0504" + "01000000" + "00000000" + // len 72, RTM_NEWLINK, REQUEST|ACK|CREATE, seq 1
        ZERO_IFINFO +
        "0c00" + "0300" + "696e69746f733000" + // IFLA_IFNAME "initos0\0"
        "0a00" + "0100" + "02490a4d0001" + "0000" + // IFLA_ADDRESS 02:49:0a:4d:00:01, padded
        "1000" + "1200" + // IFLA_LINKINFO, 16
        "0a00" + "0100" + "627269646765" + "0000", // IFLA_INFO_KIND "bridge" (no NUL), padded
    );
  });

  it("RTM_NEWLINK veth: the jail end's MAC; the peer's ifinfomsg, name and IFLA_NET_NS_FD nested in IFLA_INFO_DATA/VETH_INFO_PEER, EXCL", () => {
    expect(macString(jailMac("10.77.0.2"))).toBe("02:4a:0a:4d:00:02");
    expect(hex(newVethMsg("eth0", jailMac("10.77.0.2"), "vj-web", 5, 2))).toBe(
      "70000000" + "1000" + "0506" + "02000000" + "00000000" + // len 112, REQUEST|ACK|EXCL|CREATE
        ZERO_IFINFO +
        "0900" + "0300" + "6574683000" + "000000" + // IFLA_IFNAME "eth0\0", padded
        "0a00" + "0100" + "024a0a4d0002" + "0000" + // IFLA_ADDRESS 02:4a:0a:4d:00:02, padded
        "3800" + "1200" + // IFLA_LINKINFO, 56
        "0800" + "0100" + "76657468" + // IFLA_INFO_KIND "veth"
        "2c00" + "0200" + // IFLA_INFO_DATA, 44
        "2800" + "0100" + // VETH_INFO_PEER, 40
        ZERO_IFINFO +
        "0b00" + "0300" + "766a2d77656200" + "00" + // IFLA_IFNAME "vj-web\0", padded
        "0800" + "1c00" + "05000000", // IFLA_NET_NS_FD 5
    );
  });

  it("RTM_NEWLINK with IFLA_MASTER and IFF_UP: attach to the bridge and up in one request", () => {
    expect(hex(linkMasterUpMsg(7, 3, 4))).toBe(
      "28000000" + "1000" + "0500" + "04000000" + "00000000" +
        "00" + "00" + "0000" + "07000000" + "01000000" + "01000000" + // index 7, IFF_UP in flags and change
        "0800" + "0a00" + "03000000", // IFLA_MASTER 3
    );
  });

  it("RTM_DELLINK by name", () => {
    expect(hex(delLinkMsg("vj-web", 5))).toBe("2c000000" + "1100" + "0500" + "05000000" + "00000000" + ZERO_IFINFO + "0b00" + "0300" + "766a2d77656200" + "00");
  });

  it("refuses names the kernel would: empty, over 15 bytes, with / : or spaces, . and ..", () => {
    expect(ifName("vj-abcdefghijk").length).toBe(15); // 14 + NUL: the longest jail host end ("vj-" + 11)
    for (const bad of ["", "a23456789012345x", "a/b", "a:b", "a b", ".", ".."]) expect(() => ifName(bad)).toThrow(`not an interface name: ${JSON.stringify(bad)}`);
    expect(() => newVethMsg("eth0", jailMac("10.77.0.2"), "vj-much-too-long", 3, 1)).toThrow('not an interface name: "vj-much-too-long"');
  });
});

describe("jailNetns input", () => {
  const dir = mkdtempSync(`${tmpdir()}/initos-jailnet-`);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("refuses a bad name, address or prefix with one line, before touching anything", async () => {
    const { jailNetns } = await import("../../agent/sys/jailnet.ts");
    const netnsPath = `${dir}/netns/web`;
    const o = { netnsPath, hostIf: "vj-web", jailIf: "eth0", address: "10.77.0.2", prefix: 24, gateway: "10.77.0.1", bridge: "initos0" };
    expect(() => jailNetns({ ...o, hostIf: "vj-a-name-too-long" })).toThrow('not an interface name: "vj-a-name-too-long"');
    expect(() => jailNetns({ ...o, gateway: "10.77.0" })).toThrow("not an IPv4 address: 10.77.0");
    expect(() => jailNetns({ ...o, prefix: 33 })).toThrow("prefix /33 for eth0: expected 1-32");
    expect(existsSync(`${dir}/netns`)).toBe(false);
  });
});

describe("the fake's network", () => {
  it("records the jail calls in order, as decisions are tested with it", () => {
    const s = new FakeSys();
    s.net.bridge("initos0", "10.77.0.1", 24);
    s.net.jailNetns({ netnsPath: "/run/initos/netns/web", hostIf: "vj-web", jailIf: "eth0", address: "10.77.0.2", prefix: 24, gateway: "10.77.0.1", bridge: "initos0" });
    s.net.tap("vt-vm1", "initos0");
    s.net.removeNetns("/run/initos/netns/web", "vj-web");
    s.net.removeLink("vt-vm1");
    expect(s.calls.filter((c) => c.startsWith("net."))).toEqual([
      "net.bridge initos0 10.77.0.1/24",
      "net.jailNetns /run/initos/netns/web eth0 10.77.0.2/24 via 10.77.0.1 vj-web on initos0",
      "net.tap vt-vm1 on initos0",
      "net.removeNetns /run/initos/netns/web vj-web",
      "net.removeLink vt-vm1",
    ]);
  });
});
