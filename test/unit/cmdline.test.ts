import { describe, expect, it } from "vitest";
import { parseCmdline, tokenize } from "../../agent/cmdline.ts";

describe("tokenize", () => {
  it("splits on whitespace and groups double quotes like the kernel", () => {
    expect(tokenize(' a=1  b="x y"  "c d"=2\n')).toEqual(["a=1", "b=x y", "c d=2"]);
  });
  it("keeps an empty quoted value as an empty token", () => {
    expect(tokenize('a="" b')).toEqual(["a=", "b"]);
  });
});

describe("parseCmdline", () => {
  it("reads root, fs type, flags, init and the app after --", () => {
    const { cmdline, errors } = parseCmdline(
      "BOOT_IMAGE=/vmlinuz console=ttyS0 root=/dev/vda rootfstype=btrfs rootflags=subvol=@,compress=zstd init=/sbin/init rw -- /bin/app arg1 'x'",
    );
    expect(errors).toEqual([]);
    expect(cmdline).toMatchObject({
      root: "/dev/vda",
      rootfstype: "btrfs",
      rootflags: "subvol=@,compress=zstd",
      init: "/sbin/init",
      rw: true,
      app: ["/bin/app", "arg1", "'x'"],
    });
  });

  it("defaults to a read-only root like the kernel, and the last of ro/rw wins", () => {
    expect(parseCmdline("root=/dev/vda").cmdline.rw).toBe(false);
    expect(parseCmdline("rw ro").cmdline.rw).toBe(false);
    expect(parseCmdline("ro rw").cmdline.rw).toBe(true);
  });

  it("accepts LABEL=, UUID=, PARTUUID= and PARTLABEL= roots", () => {
    for (const r of ["LABEL=root", "UUID=0c5b-11", "PARTUUID=abc-def", "PARTLABEL=root-a"]) {
      expect(parseCmdline(`root=${r}`).cmdline.root).toBe(r);
    }
  });

  it("reads the initos keys", () => {
    const { cmdline, errors } = parseCmdline(
      "initos.mode=vm initos.rootwait=5 initos.reboot_delay=0 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 initos.insecure=1 quiet debug panic=-1",
    );
    expect(errors).toEqual([]);
    expect(cmdline).toMatchObject({
      mode: "vm",
      rootWaitSeconds: 5,
      rebootDelaySeconds: 0,
      staticIp: "10.0.2.15/24",
      gateway: "10.0.2.2",
      insecure: true,
      quiet: true,
      debug: true,
      panic: -1,
    });
  });

  it("takes xip= as the alias of initos.ip=, initos.ip winning", () => {
    expect(parseCmdline("xip=192.168.1.5/24").cmdline.staticIp).toBe("192.168.1.5/24");
    expect(parseCmdline("xip=192.168.1.5/24 initos.ip=10.1.1.1/8").cmdline.staticIp).toBe("10.1.1.1/8");
  });

  it("parses kernel ip= in its method and colon forms", () => {
    expect(parseCmdline("ip=dhcp").cmdline.ip).toEqual({ method: "dhcp", dns: [] });
    expect(parseCmdline("ip=off").cmdline.ip?.method).toBe("off");
    expect(parseCmdline("ip=10.0.2.15::10.0.2.2:255.255.255.0:host1:eth0:none:10.0.2.3").cmdline.ip).toEqual({
      method: "static",
      client: "10.0.2.15",
      gateway: "10.0.2.2",
      netmask: "255.255.255.0",
      hostname: "host1",
      device: "eth0",
      dns: ["10.0.2.3"],
    });
    expect(parseCmdline("ip=:::::eth1:dhcp").cmdline.ip).toMatchObject({ method: "dhcp", device: "eth1" });
  });

  it("ignores unknown keys and flags", () => {
    const { cmdline, errors } = parseCmdline("foo=bar initos.unknown=1 splash");
    expect(errors).toEqual([]);
    expect(cmdline.root).toBeUndefined();
  });

  it("reports each malformed known key in one line naming key and value, and falls back", () => {
    const { cmdline, errors } = parseCmdline(
      "root=sda1 initos.rootwait=abc initos.mode=bogus xip=10.0.0.300/24 initos.gw=1.2.3 ip=1.2.3.999:: init=sbin/init panic=soon initos.insecure=maybe rootfstype=Bad!",
    );
    expect(cmdline).toMatchObject({ root: undefined, rootWaitSeconds: undefined, mode: undefined, staticIp: undefined, gateway: undefined, ip: undefined, init: undefined, panic: undefined, insecure: false, rootfstype: undefined });
    expect(errors).toHaveLength(10);
    for (const e of errors) expect(e).not.toMatch(/\n/);
    expect(errors).toContain('cmdline: initos.rootwait="abc" is invalid (expected whole seconds 0-3600); using the default');
    expect(errors.find((e) => e.startsWith("cmdline: root="))).toMatch(/root="sda1" is invalid \(expected \/dev\/\.\.\., LABEL=/);
    expect(errors.find((e) => e.startsWith("cmdline: initos.insecure="))).toMatch(/using false$/);
    expect(errors.find((e) => e.startsWith("cmdline: ip="))).toMatch(/client "1.2.3.999" is not an IPv4 address/);
  });

  it("rejects out-of-range seconds", () => {
    const { cmdline, errors } = parseCmdline("initos.rootwait=99999");
    expect(cmdline.rootWaitSeconds).toBeUndefined();
    expect(errors[0]).toMatch(/initos.rootwait="99999"/);
  });

  it("treats everything after the first -- as app args, even key=value", () => {
    const { cmdline } = parseCmdline("root=/dev/vda -- root=/dev/evil -- x");
    expect(cmdline.root).toBe("/dev/vda");
    expect(cmdline.app).toEqual(["root=/dev/evil", "--", "x"]);
  });
});
