import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { besideHandler, besideWanted, enterBesideRoot, shutdownSignal, startBeside } from "../../agent/stages/beside.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const keyed = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: ["ssh-ed25519 AAAA k"] } };
const withAddress = parseCmdline("initos.ip=10.0.2.15/24 initos.sidecar=1").cmdline;

describe("the sidecar beside the OS", () => {
  it("is wanted when the config says so, and the cmdline wins either way", () => {
    expect(besideWanted(parseCmdline("").cmdline, DEFAULT_CONFIG)).toBe(false);
    expect(besideWanted(parseCmdline("initos.sidecar=1").cmdline, DEFAULT_CONFIG)).toBe(true);
    const on = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, besideOs: true } };
    expect(besideWanted(parseCmdline("").cmdline, on)).toBe(true);
    expect(besideWanted(parseCmdline("initos.sidecar=0").cmdline, on)).toBe(false);
  });

  it("PID 1 brings the network up, starts it as '@initos-sidecar' and waits until its root no longer needs the initramfs", async () => {
    const s = new FakeSys().add("/run/initos/images/sidecar/usr/bin/dropbear", { kind: "file" });
    let network = 0;
    s.onSpawn.set("beside", (f) => void f.add("/run/initos/beside.ready", { kind: "file", data: "4242\n" }));
    s.add("/proc/4242", { kind: "dir" });
    expect(await startBeside(s, silentLog(), withAddress, keyed, async () => void network++)).toBe(4242);
    expect(network).toBe(1);
    expect(s.calls).toContain("spawnDetached @initos-sidecar /usr/bin/initos-agent beside");
    expect(s.calls.at(-1)).toBe("unlink /run/initos/beside.ready");
  });

  it("a sidecar process that dies before its root is ready is an error naming it", async () => {
    const s = new FakeSys().add("/run/initos/images/sidecar/usr/bin/dropbear", { kind: "file" });
    await expect(startBeside(s, silentLog(), withAddress, keyed, async () => {})).rejects.toThrow("sidecar beside the OS: pid 4242 did not set up its root within 30s");
  });

  it("is not started without keys, without an address, or without the sidecar image", async () => {
    const log = silentLog();
    const img = () => new FakeSys().add("/run/initos/images/sidecar/usr/bin/dropbear", { kind: "file" });
    expect(await startBeside(img(), log, withAddress, DEFAULT_CONFIG, async () => {})).toBeNull();
    expect(await startBeside(img(), log, parseCmdline("initos.sidecar=1").cmdline, keyed, async () => {})).toBeNull();
    expect(await startBeside(new FakeSys(), log, withAddress, keyed, async () => {})).toBeNull();
    expect(log.lines).toEqual([
      "warn: sidecar beside the OS: no authorized ssh keys in the config; not started",
      "warn: sidecar beside the OS: no address on the cmdline (initos.ip= or ip=dhcp); not started",
      "warn: sidecar beside the OS: the verified sidecar image is not mounted; not started",
    ]);
  });

  it("builds its root in its own namespace: private first, binds not copies, signals PID 1 before the chroot, execs itself", () => {
    const s = new FakeSys()
      .add("/usr/bin/initos-agent", { kind: "file" })
      .add("/usr/lib/x86_64-linux-gnu/libc.so.6", { kind: "file" })
      .add("/usr/lib64/ld-linux-x86-64.so.2", { kind: "file" })
      .add("/etc/initos/config.json", { kind: "file", data: "{}" })
      .add("/run/initos/ssh/host_ed25519", { kind: "file", data: "key" });
    expect(() => enterBesideRoot(s, silentLog())).toThrow("execve reached");
    const c = s.calls.filter((x) => /^(unshare|mount|chroot|writeFile \/run|execve|copyFile)/.test(x));
    expect(c.slice(0, 3)).toEqual(["unshareMountNs", "mount null / null 0x44000", "mount tmpfs /beside tmpfs 0x6 mode=0755,size=16m"]);
    expect(c).toContain("mount /usr/bin/initos-agent /beside/usr/bin/initos-agent null 0x1000");
    expect(c).toContain("mount /usr/lib/x86_64-linux-gnu/libc.so.6 /beside/usr/lib/x86_64-linux-gnu/libc.so.6 null 0x1000");
    expect(c).toContain("mount /run/initos/images/sidecar /beside/run/initos/images/sidecar null 0x5000");
    expect(c).toContain("copyFile /run/initos/ssh/host_ed25519 /beside/run/initos/ssh/host_ed25519");
    const tail = c.slice(c.indexOf("mount . / null 0x2000"));
    expect(tail).toEqual([
      "mount . / null 0x2000",
      "writeFile /run/initos/beside.ready",
      "chroot .",
      "mount devpts /dev/pts devpts 0xa newinstance,gid=5,mode=620,ptmxmode=0666",
      "execve /usr/bin/initos-agent @initos-sidecar beside-run",
    ]);
  });

  it("asks the OS's init to reboot or power off instead of doing it behind its back", async () => {
    expect(shutdownSignal("reboot", "/usr/lib/systemd/systemd")).toBe(2);
    expect(shutdownSignal("poweroff", "/usr/lib/systemd/systemd")).toBe(38);
    expect(shutdownSignal("poweroff", "/sbin/init")).toBe(12);
    const s = new FakeSys().add("/proc/1/exe", { kind: "link", target: "/lib/systemd/systemd" });
    const h = besideHandler(s, silentLog());
    expect(await h({ cmd: "reboot" })).toEqual({ ok: true, text: "reboot requested from the OS's init" });
    await new Promise((r) => setTimeout(r, 300));
    expect(s.calls).toContain("signal 1 2");
    expect(await h({ cmd: "switch-root" })).toEqual({ ok: false, text: "switch-root: not available beside the running OS" });
    expect(await h({ cmd: "unlock", passphrase: "x" })).toEqual({ ok: false, text: "unlock: not available beside the running OS" });
  });
});
