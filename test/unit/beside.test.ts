import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { adminHandler, formatStatus } from "../../agent/admin.ts";
import { besideAdmin, besideStatus, besideWanted, enterBesideRoot, runBeside, shutdownSignal, startBeside, summarizeMounts, watchOsShutdown } from "../../agent/stages/beside.ts";
import { isSystemdShutdown } from "../../agent/switchroot.ts";
import type { Supervised } from "../../agent/supervise.ts";
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
    const s = new FakeSys().add("/run/initos/images/tools/usr/bin/dropbear", { kind: "file" });
    let network = 0;
    s.onSpawn.set("beside", (f) => void f.add("/run/initos/beside.ready", { kind: "file", data: "4242\n" }));
    s.add("/proc/4242", { kind: "dir" });
    expect(await startBeside(s, silentLog(), withAddress, keyed, async () => void network++)).toBe(4242);
    expect(network).toBe(1);
    expect(s.calls).toContain("spawnDetached @initos-sidecar /usr/bin/initos-agent beside");
    expect(s.calls.at(-1)).toBe("unlink /run/initos/beside.ready");
  });

  it("a sidecar process that dies before its root is ready is an error naming it", async () => {
    const s = new FakeSys().add("/run/initos/images/tools/usr/bin/dropbear", { kind: "file" });
    await expect(startBeside(s, silentLog(), withAddress, keyed, async () => {})).rejects.toThrow("sidecar beside the OS: pid 4242 did not set up its root within 30s");
  });

  it("is not started without keys, without an address, or without the tools image", async () => {
    const log = silentLog();
    const img = () => new FakeSys().add("/run/initos/images/tools/usr/bin/dropbear", { kind: "file" });
    expect(await startBeside(img(), log, withAddress, DEFAULT_CONFIG, async () => {})).toBeNull();
    expect(await startBeside(img(), log, parseCmdline("initos.sidecar=1").cmdline, keyed, async () => {})).toBeNull();
    expect(await startBeside(new FakeSys(), log, withAddress, keyed, async () => {})).toBeNull();
    expect(log.lines).toEqual([
      "warn: sidecar beside the OS: no authorized ssh keys in the config; not started",
      "warn: sidecar beside the OS: no address on the cmdline (initos.ip= or ip=dhcp); not started",
      "warn: sidecar beside the OS: the verified tools image is not mounted; not started",
    ]);
  });

  it("builds its root in its own namespace: private first, binds not copies, signals PID 1 before the chroot, execs itself", () => {
    const s = agentFiles();
    expect(() => enterBesideRoot(s, silentLog())).toThrow("execve reached");
    const c = s.calls.filter((x) => /^(unshare|mount|chroot|writeFile \/run|execve|copyFile)/.test(x));
    expect(c.slice(0, 3)).toEqual(["unshareMountNs", "mount null / null 0x44000", "mount tmpfs /beside tmpfs 0x6 mode=0755,size=16m"]);
    expect(c).toContain("mount /usr/bin/initos-agent /beside/usr/bin/initos-agent null 0x1000");
    expect(c).toContain("mount /usr/lib/x86_64-linux-gnu/libc.so.6 /beside/usr/lib/x86_64-linux-gnu/libc.so.6 null 0x1000");
    expect(c).toContain("mount /run/initos/images/tools /beside/run/initos/images/tools null 0x5000");
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

  it("phase 1 makes itself non-dumpable before anything else", () => {
    const s = initramfs();
    expect(() => enterBesideRoot(s, silentLog())).toThrow("execve reached");
    expect(s.calls[0]).toBe("setDumpable 0");
    expect(s.getDumpable()).toBe(false);
  });

  it("phase 2 makes itself non-dumpable before anything else (exec made it dumpable again)", async () => {
    const s = new FakeSys();
    s.failOn.set("mkdirp", new Error("stop here"));
    await expect(runBeside(s, silentLog())).rejects.toThrow("stop here");
    expect(s.calls).toEqual(["setDumpable 0", "mkdirp /run/initos/ssh"]);
  });

  it("detaches every mount it inherited (pool, ESP, images, /sysroot, the API filesystems) before PID 1 may go on; keeps only its own root", () => {
    const s = initramfs();
    expect(() => enterBesideRoot(s, silentLog())).toThrow("execve reached");
    const umounts = s.calls.filter((c) => c.startsWith("umount"));
    // Deepest first, all lazily (MNT_DETACH = 2): nothing of the initramfs' tree is kept.
    expect(umounts).toEqual([
      "umount /sysroot/var/log 2",
      "umount /sysroot/home 2",
      "umount /sysroot 2",
      "umount /lib/firmware 2",
      "umount /lib/modules 2",
      "umount /run/initos/pool 2",
      "umount /run/initos/images/tools 2",
      "umount /run/initos/images/modules 2",
      "umount /run/initos/esp-a 2",
      "umount /sys/firmware/efi/efivars 2",
      "umount /dev/pts 2",
      "umount /dev 2",
      "umount /sys 2",
      "umount /proc 2",
      "umount /run 2",
    ]);
    // What is left is its own tree, which becomes "/", and the initramfs under it.
    // (and the devpts of its own, mounted after the chroot on its /dev/pts)
    // (a Set: the fake also records the propagation change on "/" as a mount)
    expect(new Set(s.mounts.filter((m) => !m.startsWith("/beside")))).toEqual(new Set(["/", "/dev/pts"]));
    expect(s.mounts).toContain("/beside/run/initos/images/tools");
    const at = (c: string) => s.calls.indexOf(c);
    // The verified image is bound into its root before the original goes.
    expect(at("mount /run/initos/images/tools /beside/run/initos/images/tools null 0x5000")).toBeLessThan(at("umount /run/initos/images/tools 2"));
    // The record of what was left outside its root is taken with the full view, before the chroot hides it.
    expect(s.readFile("/beside/run/initos/beside.outside")).toBe("");
    // /run, the OS's own tmpfs, goes last: right after PID 1 is told, before the chroot.
    expect(at("writeFile /run/initos/beside.ready")).toBeLessThan(at("umount /run 2"));
    expect(at("umount /run 2")).toBeLessThan(at("chroot ."));
    expect(at("umount /proc 2")).toBeLessThan(at("mount . / null 0x2000"));
  });

  it("a mount it cannot detach stops it before PID 1 is told to go on: no sidecar rather than one pinning the pool", () => {
    const s = initramfs();
    s.failOn.set("umount /sysroot 2", new Error("umount2: EINVAL"));
    expect(() => enterBesideRoot(s, silentLog())).toThrow("umount2: EINVAL");
    expect(s.calls).not.toContain("writeFile /run/initos/beside.ready");
    expect(s.calls.filter((c) => /^(chroot|execve)/.test(c))).toEqual([]);
  });

  it("status: not dumpable, its own mounts, and what was left outside its root", () => {
    const s = new FakeSys();
    s.setDumpable(false);
    s.add("/proc/self/mountinfo", { kind: "file", data: MOUNTINFO });
    s.add("/run/initos/beside.outside", { kind: "file", data: "" });
    const st = formatStatus(besideStatus(s)).split("\n");
    expect(st).toContain("dumpable: 0");
    expect(st).toContain("mounts: / tmpfs, /run/initos/images/tools squashfs /dev/mapper/initos-tools, /proc proc, /sys sysfs, /dev devtmpfs, /dev/pts devpts; 2 files of the initrd");
    expect(st).toContain("mounts left outside its root: none");
    s.add("/run/initos/beside.outside", { kind: "file", data: "/sysroot\n/run/initos/esp-a\n" });
    expect(formatStatus(besideStatus(s)).split("\n")).toContain("mounts left outside its root: /sysroot, /run/initos/esp-a");
  });

  it("summarizes mountinfo, unescaping names", () => {
    expect(summarizeMounts("30 1 0:30 / / rw - tmpfs tmpfs rw\n31 30 0:31 / /my\\040dir rw - proc proc rw\n")).toBe("/ tmpfs, /my dir proc");
    expect(summarizeMounts("")).toBe("none");
  });

  it("asks systemd for reboot.target / poweroff.target (SIGRTMIN+5 / +4), not ctrl-alt-del.target, which may be masked", () => {
    expect(shutdownSignal("reboot", "/usr/lib/systemd/systemd")).toEqual({ signal: 39, name: "SIGRTMIN+5" });
    expect(shutdownSignal("poweroff", "/usr/lib/systemd/systemd")).toEqual({ signal: 38, name: "SIGRTMIN+4" });
    expect(shutdownSignal("reboot", "/lib/systemd/systemd")).toEqual({ signal: 39, name: "SIGRTMIN+5" });
    // Other inits: ctrl-alt-del, and busybox init's poweroff; systemd-shutdown is not systemd.
    expect(shutdownSignal("reboot", "/sbin/init")).toEqual({ signal: 2, name: "SIGINT" });
    expect(shutdownSignal("poweroff", "/sbin/init")).toEqual({ signal: 12, name: "SIGUSR2" });
    expect(shutdownSignal("reboot", "")).toEqual({ signal: 2, name: "SIGINT" });
    expect(shutdownSignal("reboot", "/usr/lib/systemd/systemd-shutdown")).toEqual({ signal: 2, name: "SIGINT" });
  });

  it("asks the OS's init to reboot or power off instead of doing it behind its back, answering first", async () => {
    const s = new FakeSys().add("/proc/1/exe", { kind: "link", target: "/lib/systemd/systemd" });
    const log = silentLog();
    const h = adminHandler(besideAdmin(s, log));
    expect(await h({ cmd: "reboot" })).toEqual({ ok: true, text: "reboot requested from the OS's init" });
    s.advance(199);
    expect(s.calls.filter((c) => c.startsWith("signal"))).toEqual([]);
    s.advance(1);
    expect(s.calls).toContain("signal 1 39");
    expect(log.lines).toContain("info: sidecar beside the OS: asking init (/lib/systemd/systemd) to reboot (signal 39: SIGRTMIN+5)");
    const busybox = new FakeSys().add("/proc/1/exe", { kind: "link", target: "/bin/busybox" });
    expect(await adminHandler(besideAdmin(busybox, silentLog()))({ cmd: "poweroff" })).toEqual({ ok: true, text: "poweroff requested from the OS's init" });
    busybox.advance(200);
    expect(busybox.calls).toContain("signal 1 12");
    expect(await h({ cmd: "switch-root" })).toEqual({ ok: false, text: "switch-root: not available beside the running OS" });
    expect(await h({ cmd: "unlock", passphrase: "x" })).toEqual({ ok: false, text: "unlock: not available beside the running OS" });
    expect(await h({ cmd: "reseal", passphrase: "x" })).toEqual({ ok: false, text: "reseal: not available beside the running OS" });
  });
});

describe("the sidecar beside the OS at the OS's shutdown", () => {
  /** watchOsShutdown with its SIGCONT handler caught and a fake sshd that records its stop. */
  function watched(sys: FakeSys, withSshd = true) {
    const log = silentLog();
    const handlers: (() => void)[] = [];
    const order: string[] = [];
    const sshd: Supervised = {
      name: "sshd",
      state: () => ({ running: false, since: 0, restarts: 0 }),
      stop: async () => {
        // What the real one does first, synchronously: no restart from here on.
        order.push(`stop sshd (after ${sys.calls.length} calls)`);
      },
    };
    watchOsShutdown(sys, log, withSshd ? sshd : null, (sig, h) => (expect(sig).toBe("SIGCONT"), handlers.push(h)));
    expect(handlers).toHaveLength(1);
    return { log, order, cont: () => handlers[0]!() };
  }
  const pid1 = (init: string) => new FakeSys().add("/proc/1/exe", { kind: "link", target: init });

  it("knows systemd-shutdown by its path, not systemd itself", () => {
    expect(isSystemdShutdown("/usr/lib/systemd/systemd-shutdown")).toBe(true);
    expect(isSystemdShutdown("/lib/systemd/systemd-shutdown")).toBe(true);
    expect(isSystemdShutdown("/usr/lib/systemd/systemd")).toBe(false);
    expect(isSystemdShutdown("/sbin/my-systemd-shutdown-wrapper")).toBe(false);
    expect(isSystemdShutdown("")).toBe(false);
  });

  it("on systemd-shutdown's killing spree (the SIGCONT of its kill(-1, SIGSTOP/SIGCONT)): sshd stopped for good, then the image detached; it stays, once", async () => {
    const s = pid1("/usr/lib/systemd/systemd-shutdown");
    s.mounts.push("/run/initos/images/tools");
    const w = watched(s);
    w.cont();
    // No sshd restart from the image first, then the image lazily (MNT_DETACH = 2) detached.
    expect(w.order).toEqual(["stop sshd (after 0 calls)"]);
    expect(s.calls).toEqual(["umount /run/initos/images/tools 2"]);
    expect(s.mounts).not.toContain("/run/initos/images/tools");
    expect(w.log.lines).toEqual(["info: sidecar beside the OS: the OS is going down (PID 1 is /usr/lib/systemd/systemd-shutdown); no more sshd, released the tools image"]);
    // Once sshd is gone: the SIGCHLD that wakes systemd-shutdown to look for dropbear again.
    // No exit, no other signal: spared until the end, it holds nothing more.
    await new Promise((r) => setTimeout(r, 0));
    expect(s.calls).toEqual(["umount /run/initos/images/tools 2", "signal 1 17"]);
    // The spree's second round (SIGKILL) continues everyone again: nothing more to do.
    w.cont();
    await new Promise((r) => setTimeout(r, 0));
    expect(s.calls).toHaveLength(2);
    expect(w.order).toHaveLength(1);
  });

  it("wakes systemd-shutdown only once sshd is gone, not before", async () => {
    const s = pid1("/usr/lib/systemd/systemd-shutdown");
    let gone!: () => void;
    const sshd: Supervised = { name: "sshd", state: () => ({ running: false, since: 0, restarts: 0 }), stop: () => new Promise<void>((r) => (gone = r)) };
    let cont!: () => void;
    watchOsShutdown(s, silentLog(), sshd, (_sig, h) => (cont = h));
    cont();
    await new Promise((r) => setTimeout(r, 0));
    expect(s.calls).toEqual(["umount /run/initos/images/tools 2"]);
    gone();
    await new Promise((r) => setTimeout(r, 0));
    expect(s.calls).toEqual(["umount /run/initos/images/tools 2", "signal 1 17"]);
  });

  it("a SIGCONT while the OS runs (systemd, or any other init) changes nothing", () => {
    for (const init of ["/usr/lib/systemd/systemd", "/sbin/init", ""]) {
      const s = pid1(init);
      const w = watched(s);
      w.cont();
      expect(s.calls).toEqual([]);
      expect(w.order).toEqual([]);
      expect(w.log.lines).toEqual([]);
    }
    // PID 1 unreadable: cannot tell, so stay as it is.
    const s = new FakeSys();
    s.readlink = (p: string): string => {
      throw new Error(`readlink ${p}: EACCES`);
    };
    const w = watched(s);
    w.cont();
    expect(s.calls).toEqual([]);
    expect(w.order).toEqual([]);
  });

  it("without sshd, or when the image cannot be detached, says so and goes on", async () => {
    const s = pid1("/usr/lib/systemd/systemd-shutdown");
    s.failOn.set("umount", new Error("umount2: EINVAL"));
    const w = watched(s, false);
    w.cont();
    await new Promise((r) => setTimeout(r, 0));
    // No dropbear of ours for systemd-shutdown to wait for: no SIGCHLD either.
    expect(s.calls).toEqual(["umount /run/initos/images/tools 2"]);
    expect(w.log.lines).toEqual(["info: sidecar beside the OS: the OS is going down (PID 1 is /usr/lib/systemd/systemd-shutdown); no more sshd, could not detach the tools image: umount2: EINVAL"]);
  });
});

/** What the sidecar binds into its root: the agent, its libraries, its config and host key. */
function agentFiles(): FakeSys {
  return new FakeSys()
    .add("/usr/bin/initos-agent", { kind: "file" })
    .add("/usr/lib/x86_64-linux-gnu/libc.so.6", { kind: "file" })
    .add("/usr/lib64/ld-linux-x86-64.so.2", { kind: "file" })
    .add("/etc/initos/config.json", { kind: "file", data: "{}" })
    .add("/run/initos/ssh/host_ed25519", { kind: "file", data: "key" });
}

/** The initramfs as PID 1 leaves it just before switch_root, with an open pool and ESP. */
function initramfs(): FakeSys {
  const s = agentFiles();
  s.mounts = [
    "/",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/dev/pts",
    "/sys/firmware/efi/efivars",
    "/run/initos/esp-a",
    "/run/initos/images/modules",
    "/run/initos/images/tools",
    "/run/initos/pool",
    "/lib/modules",
    "/lib/firmware",
    "/sysroot",
    "/sysroot/home",
    "/sysroot/var/log",
  ];
  return s;
}

/** The sidecar's own /proc/self/mountinfo as the kernel shows it after the chroot. */
const MOUNTINFO = [
  "40 21 0:40 / / rw,nosuid,nodev - tmpfs tmpfs rw,size=16384k,mode=755",
  "41 40 0:2 /usr/bin/initos-agent /usr/bin/initos-agent rw - rootfs rootfs rw",
  "42 40 0:2 /usr/lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/libc.so.6 rw - rootfs rootfs rw",
  "43 40 253:1 / /run/initos/images/tools ro,nosuid,nodev - squashfs /dev/mapper/initos-tools ro",
  "44 40 0:41 / /proc rw,nosuid,nodev,noexec - proc proc rw",
  "45 40 0:42 / /sys ro,nosuid,nodev,noexec - sysfs sysfs ro",
  "46 40 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw,size=4096k,mode=755",
  "47 46 0:43 / /dev/pts rw,nosuid,noexec - devpts devpts rw,gid=5,mode=620,ptmxmode=666",
  "",
].join("\n");

describe("PR_SET_DUMPABLE through koffi, for real", () => {
  it("sets and reads this process's dumpable flag (restored after)", async () => {
    const libc = await import("../../agent/sys/libc.ts");
    expect(libc.getDumpable()).toBe(true);
    try {
      libc.setDumpable(false);
      expect(libc.getDumpable()).toBe(false);
    } finally {
      libc.setDumpable(true);
    }
    expect(libc.getDumpable()).toBe(true);
  });
});
