import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import type { Jail } from "../../agent/jailsconfig.ts";
import { chooseAccel, MAX_CMDLINE, MIN_VM_MEMORY_MIB, openVmShares, powerdownVm, qmpPath, vmLauncher, type VmLaunch, vmArgv, vmDisk, vmHostPaths, vmMac, vmService } from "../../agent/jails/vm.ts";
import { connectUnix } from "../../agent/sys/unixclient.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const jail = (over: Partial<Jail> = {}): Jail => ({
  name: "web",
  kind: "vm",
  image: "deb",
  cpus: 1.5,
  memoryMiB: 512,
  address: "10.77.0.10",
  shares: [{ subvol: "@data", dir: "www", path: "/srv/www", readOnly: true }],
  command: ["/bin/app", "--port", "80", "two words", "initos.mode=host"],
  env: {},
  idBase: 16 * 65536,
  ...over,
});

const launch = (j: Jail, over: Partial<VmLaunch> = {}): VmLaunch => ({
  qemu: ["/t/ld.so", "--library-path", "/t/lib", "/t/qemu-system-x86_64"],
  dataDir: "/t/share/qemu",
  kernel: "/t/vm/vmlinuz",
  initrd: "/t/vm/initrd.img",
  disk: "/x/@vm-disks/jail-web.img",
  shares: j.shares.map((sh, i) => ({ source: `/proc/1/fd/${100 + i}`, tag: `share${i}`, path: sh.path, readOnly: sh.readOnly })),
  tap: "vj-web",
  network: { gateway: "10.77.0.1", prefix: 24 },
  qmp: "/run/initos/jails/web.qmp",
  kvm: false,
  ...over,
});

/** The value after `flag` (the n-th occurrence). */
const after = (argv: string[], flag: string, n = 0) => argv.filter((_, i) => argv[i - 1] === flag)[n];

describe("vmArgv", () => {
  it("TCG: microvm, -cpu max, memory, ceil(cpus), console on stdio, QMP, the disk, the share, the tap; the cmdline is vm mode's and round-trips the command", () => {
    const j = jail();
    const a = vmArgv(j, launch(j));
    expect(a.slice(0, 4)).toEqual(["/t/ld.so", "--library-path", "/t/lib", "/t/qemu-system-x86_64"]);
    for (const f of ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]) expect(a).toContain(f);
    expect(after(a, "-L")).toBe("/t/share/qemu");
    expect(after(a, "-machine")).toMatch(/^microvm,/);
    expect([after(a, "-accel"), after(a, "-cpu")]).toEqual(["tcg", "max"]);
    expect([after(a, "-m"), after(a, "-smp")]).toEqual(["512", "2"]);
    expect(after(a, "-serial")).toBe("stdio");
    expect(after(a, "-qmp")).toBe("unix:/run/initos/jails/web.qmp,server=on,wait=off");
    expect([after(a, "-kernel"), after(a, "-initrd")]).toEqual(["/t/vm/vmlinuz", "/t/vm/initrd.img"]);
    expect(after(a, "-drive")).toBe("file=/x/@vm-disks/jail-web.img,format=raw,if=none,id=root,discard=unmap");
    expect(after(a, "-device", 0)).toBe("virtio-blk-device,drive=root");
    expect(after(a, "-fsdev")).toBe("local,id=fs0,path=/proc/1/fd/100,security_model=mapped-xattr,readonly=on");
    expect(after(a, "-device", 1)).toBe("virtio-9p-device,fsdev=fs0,mount_tag=share0");
    expect(after(a, "-netdev")).toBe("tap,id=net0,ifname=vj-web,script=no,downscript=no");
    expect(after(a, "-device", 2)).toBe(`virtio-net-device,netdev=net0,mac=${vmMac("web")}`);
    const append = after(a, "-append")!;
    expect(append).toContain("tsc_early_khz=2000000");
    const { cmdline, errors } = parseCmdline(append);
    expect(errors).toEqual([]);
    expect(cmdline).toMatchObject({ mode: "vm", root: "/dev/vda", rw: true, staticIp: "10.77.0.10/24", gateway: "10.77.0.1", share: "share0:/srv/www", hostname: "web" });
    // The words after -- are the app's, even one that looks like a key: nothing reconfigures the VM.
    expect(cmdline.app).toEqual(["/bin/app", "--port", "80", "two words", "initos.mode=host"]);
  });

  it("KVM: -accel kvm -cpu host, and no TCG clock hints", () => {
    const j = jail();
    const a = vmArgv(j, launch(j, { kvm: true }));
    expect([after(a, "-accel"), after(a, "-cpu")]).toEqual(["kvm", "host"]);
    expect(after(a, "-append")).not.toContain("tsc_early_khz");
  });

  it("no network, no share, no command: no tap, no initos.ip, the image's own init", () => {
    const j = jail({ shares: [], command: undefined });
    const a = vmArgv(j, launch(j, { network: undefined, tap: undefined }));
    expect(a).not.toContain("-netdev");
    expect(a).not.toContain("-fsdev");
    const { cmdline } = parseCmdline(after(a, "-append")!);
    expect([cmdline.staticIp, cmdline.share, cmdline.app]).toEqual([undefined, undefined, []]);
  });

  it("the MAC is stable, unicast and locally administered", () => {
    expect(vmMac("web")).toBe(vmMac("web"));
    expect(vmMac("web")).not.toBe(vmMac("db"));
    expect(vmMac("web")).toMatch(/^02(:[0-9a-f]{2}){5}$/);
  });

  it("vmService: the jail's name (the log prefix), its argv, and QEMU run as itself from the vmhost image", () => {
    const j = jail();
    expect(vmService(j, launch(j))).toEqual({ name: "web", argv: vmArgv(j, launch(j)), env: {} });
    const { env, ...paths } = vmHostPaths("/run/initos/images/vmhost");
    const svc = vmService(j, launch(j, paths), env);
    expect(svc.argv.slice(0, 1)).toEqual(["/run/initos/images/vmhost/usr/bin/qemu-system-x86_64"]);
    expect(after(svc.argv, "-L")).toBe("/run/initos/images/vmhost/usr/share/qemu");
    expect([after(svc.argv, "-kernel"), after(svc.argv, "-initrd")]).toEqual(["/run/initos/images/vmhost/vm/vmlinuz", "/run/initos/images/vmhost/vm/initrd.img"]);
    expect(svc.env).toEqual({ LD_LIBRARY_PATH: "/run/initos/images/vmhost/usr/lib/x86_64-linux-gnu", QEMU_MODULE_DIR: "/run/initos/images/vmhost/usr/lib/x86_64-linux-gnu/qemu" });
  });

  describe("hostile values are refused with one line naming the jail, never passed to QEMU", () => {
    const refused = (j: Jail, o: VmLaunch, msg: RegExp) => expect(() => vmArgv(j, o)).toThrow(msg);
    it("a ',' in a value QEMU parses as an option list (share source, disk, QMP path, tap, kernel)", () => {
      const k = jail();
      refused(k, launch(k, { shares: [{ source: "/x/@data/a,readonly=off", tag: "s", path: "/srv", readOnly: true }] }), /^jail web: share source "\/x\/@data\/a,readonly=off" holds characters QEMU would parse/);
      refused(k, launch(k, { disk: "/x/d.img,snapshot=off" }), /^jail web: disk /);
      refused(k, launch(k, { qmp: "/run/q.sock,server=on" }), /^jail web: QMP socket /);
      refused(k, launch(k, { tap: "vj-web,script=/bin/sh" }), /^jail web: tap /);
      refused(k, launch(k, { kernel: "/k ernel" }), /^jail web: kernel /);
      refused(k, launch(k, { mac: "02:00:00:00:00:01,netdev=x" }), /^jail web: MAC /);
    });
    it("a share tag or path that would break out of its option or cmdline word", () => {
      const j = jail();
      refused(j, launch(j, { shares: [{ source: "/x/@d", tag: "t,id=x", path: "/d", readOnly: false }] }), /^jail web: share tag /);
      refused(j, launch(j, { shares: [{ source: "/x/@d", tag: "t", path: "/d initos.mode=host", readOnly: false }] }), /^jail web: share path /);
    });
    it("a command word the kernel cmdline cannot carry: a quote, a newline", () => {
      const q = jail({ command: ["/bin/app", 'a" initos.mode=host "'] });
      refused(q, launch(q), /^jail web: command word .* holds a '"' or a control character/);
      const nl = jail({ command: ["/bin/app", "a\ninitos.mode=host"] });
      refused(nl, launch(nl), /^jail web: command word/);
    });
    it("a command longer than the kernel keeps", () => {
      const j = jail({ command: ["/bin/app", "x".repeat(MAX_CMDLINE)] });
      refused(j, launch(j), /^jail web: the kernel cmdline would be \d+ bytes, over the 2047 the kernel keeps/);
    });
    it("what vm mode cannot do: two shares, env; too little memory; not a vm", () => {
      const two = jail({ shares: [{ subvol: "@a", path: "/a", readOnly: false }, { subvol: "@b", path: "/b", readOnly: false }] });
      refused(two, launch(two), /^jail web: 2 shares: a VM jail takes at most one/);
      const env = jail({ env: { A: "1" } });
      refused(env, launch(env), /^jail web: env: /);
      const small = jail({ memoryMiB: 256 });
      refused(small, launch(small), new RegExp(`^jail web: memory 256M is below the ${MIN_VM_MEMORY_MIB}M`));
      const ct = jail({ kind: "container" });
      refused(ct, launch(ct), /^jail web: kind is container, not vm/);
    });
  });
});

describe("chooseAccel", () => {
  it("KVM only with /dev/kvm and vmx or svm in the CPU flags; the reason for the log otherwise", () => {
    const sys = (kvm: boolean, flags: string) => {
      const s = new FakeSys().add("/proc/cpuinfo", { kind: "file", data: `processor\t: 0\nflags\t\t: fpu ${flags} sse4_2\n` });
      return kvm ? s.add("/dev/kvm", { kind: "file" }) : s;
    };
    expect(chooseAccel(sys(true, "vmx"))).toEqual({ kvm: true, why: "KVM" });
    expect(chooseAccel(sys(true, "svm"))).toEqual({ kvm: true, why: "KVM" });
    expect(chooseAccel(sys(false, "vmx"))).toEqual({ kvm: false, why: "TCG (no /dev/kvm)" });
    expect(chooseAccel(sys(true, "lm"))).toMatchObject({ kvm: false, why: expect.stringContaining("neither vmx nor svm") });
  });
});

describe("openVmShares", () => {
  const pool = () => new FakeSys().add("/x", { kind: "dir" }).add("/x/@data", { kind: "dir" }).add("/x/@data/www", { kind: "dir" }).add("/x/@data/out", { kind: "link", target: "/" });
  it("resolves each share inside the pool and hands QEMU the agent's fd as /proc/<pid>/fd/<fd>", () => {
    const sys = pool();
    sys.pidValue = 4242;
    const s = openVmShares(sys, jail());
    expect(s.shares).toEqual([{ source: `/proc/4242/fd/${[...sys.openedInRoot.keys()][0]}`, tag: "share0", path: "/srv/www", readOnly: true }]);
    expect(sys.calls).toContain("openDirInRoot /x @data/www");
    s.close();
    expect(sys.calls.filter((c) => c.startsWith("close "))).toEqual([...sys.openedInRoot.keys()].map((fd) => `close ${fd}`));
  });
  it("a share through a symlink, or missing: one line, nothing left open", () => {
    const sys = pool();
    const two = (dir: string) => jail({ shares: [{ subvol: "@data", dir: "www", path: "/a", readOnly: false }, { subvol: "@data", dir, path: "/b", readOnly: false }] });
    expect(() => openVmShares(sys, two("out/etc"))).toThrow("jail web: share @data/out/etc crosses a symlink in the pool");
    expect(() => openVmShares(sys, two("nope"))).toThrow("jail web: share @data/nope does not exist in the pool");
    // The first share was opened each time, and closed when the second failed.
    expect(sys.calls.filter((c) => c.startsWith("close "))).toEqual([...sys.openedInRoot.keys()].map((fd) => `close ${fd}`));
    expect(sys.openedInRoot.size).toBe(2);
  });
});

describe("vmDisk (fake pool)", () => {
  const UUID = "0f5a2c7e-1111-4222-8333-444455556666";
  const pool = () => {
    const sys = new FakeSys();
    sys.add("/x", { kind: "dir" }).add("/x/@img-deb", { kind: "dir" });
    sys.run = (argv: readonly string[]) => {
      sys.calls.push(`run ${argv.join(" ")}`);
      if (argv.includes("show")) return `@img-deb\n\tName: \t\t\t@img-deb\n\tUUID: \t\t\t${UUID}\n\tParent UUID: \t\t-\n`;
      if (argv.includes("create")) sys.add(argv.at(-1)!, { kind: "dir" });
      return "";
    };
    sys.onRunWithInput = (argv: readonly string[]) => void (argv[0] === "mkfs.btrfs" && sys.add(argv.at(-1)!, { kind: "file", data: "btrfs" }));
    return sys;
  };
  const tools = { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] };

  it("makes the image's disk once (into a temporary name, then renamed) and a reflinked copy per start", async () => {
    const sys = pool();
    const base = `/x/@vm-disks/img-deb.${UUID}.img`;
    expect(await vmDisk(sys, silentLog(), tools, jail())).toBe("/x/@vm-disks/jail-web.img");
    expect(sys.calls.filter((c) => /^(run|rename|cloneFile)/.test(c))).toEqual([
      "run btrfs subvolume create /x/@vm-disks",
      "run btrfs subvolume show /x/@img-deb",
      `runWithInput mkfs.btrfs -q -f -L initos-deb --rootdir /x/@img-deb -b 8192M ${base}.tmp`,
      `rename ${base}.tmp ${base}`,
      `cloneFile ${base} /x/@vm-disks/jail-web.img`,
    ]);
    sys.calls = [];
    await vmDisk(sys, silentLog(), tools, jail());
    expect(sys.calls.filter((c) => c.includes("mkfs"))).toEqual([]);
    expect(sys.calls).toContain(`cloneFile ${base} /x/@vm-disks/jail-web.img`);
  });

  it("a failed mkfs: one line naming the jail and image, no partial disk left", async () => {
    const sys = pool();
    sys.onRunWithInput = (argv: readonly string[]) => {
      sys.add(argv.at(-1)!, { kind: "file", data: "half" });
      throw new Error("mkfs.btrfs: ERROR: no space left");
    };
    await expect(vmDisk(sys, silentLog(), tools, jail())).rejects.toThrow("jail web: image deb: making its VM disk failed: mkfs.btrfs: ERROR: no space left");
    expect([...sys.files.keys()].filter((p) => p.startsWith("/x/@vm-disks/"))).toEqual([]);
  });
});

describe("powerdownVm", () => {
  const greeting = '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}';
  it("qmp_capabilities, then system_powerdown; events in between are skipped", async () => {
    const sys = new FakeSys();
    const peer = { greeting: [greeting], written: [] as string[], answer: (l: string) => (l.includes("system_powerdown") ? ['{"event": "POWERDOWN"}', '{"return": {}}'] : ['{"return": {}}']) };
    sys.unixPeers.set("/q", peer);
    expect(await powerdownVm(sys, silentLog(), "/q", 1000)).toBe(true);
    expect(peer.written).toEqual(['{"execute":"qmp_capabilities"}', '{"execute":"system_powerdown"}']);
  });

  it("an error reply or a hang-up is logged and answered false", async () => {
    const sys = new FakeSys();
    sys.unixPeers.set("/q", { greeting: [greeting], written: [], answer: () => ['{"error": {"class": "GenericError", "desc": "nope"}}'] });
    const log = silentLog();
    expect(await powerdownVm(sys, log, "/q", 1000)).toBe(false);
    expect(log.lines).toEqual(['warn: qmp /q: qmp_capabilities: {"class":"GenericError","desc":"nope"}']);
    sys.unixPeers.set("/h", { greeting: [greeting], written: [], answer: () => null });
    expect(await powerdownVm(sys, log, "/h", 1000)).toBe(false);
    expect(log.lines.at(-1)).toBe("warn: qmp /h: no answer to qmp_capabilities");
  });

  it("over a real unix socket: a peer that greets and goes silent costs the bound, not a hang", async () => {
    const dir = mkdtempSync(`${tmpdir()}/initos-qmp-`);
    const server = createServer((c) => c.write(`${greeting}\r\n`));
    await new Promise<void>((r) => server.listen(`${dir}/qmp.sock`, r));
    try {
      const log = silentLog();
      expect(await powerdownVm({ connectUnix, now: () => performance.now() }, log, `${dir}/qmp.sock`, 300)).toBe(false);
      expect(log.lines).toEqual([expect.stringMatching(new RegExp(`^warn: qmp ${dir}/qmp.sock: no answer within \\d+ms$`))]);
    } finally {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("vmLauncher", () => {
  const net = { bridge: "initos0", address: "10.77.0.1", prefix: 24 as const };
  const machine = () => {
    const sys = new FakeSys().add("/x", { kind: "dir" }).add("/x/@img-deb", { kind: "dir" }).add("/x/@data", { kind: "dir" }).add("/x/@data/www", { kind: "dir" });
    sys.run = (argv: readonly string[]) => {
      sys.calls.push(`run ${argv.join(" ")}`);
      if (argv.includes("show")) return "\tUUID: \t\t\t0f5a2c7e-1111-4222-8333-444455556666\n";
      if (argv.includes("create")) sys.add(argv.at(-1)!, { kind: "dir" });
      return "";
    };
    sys.onRunWithInput = (argv: readonly string[]) => void sys.add(argv.at(-1)!, { kind: "file" });
    return sys;
  };
  const tools = { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] };

  it("prepare: the vmhost image's QEMU (TCG here, said in the log), the jail's disk, share and tap; askStop presses the power button over QMP", async () => {
    const sys = machine();
    const log = silentLog();
    const l = vmLauncher(sys, log, net, { openHost: async () => "/run/initos/images/vmhost", tools });
    const svc = await l.prepare(jail());
    expect(svc.name).toBe("web");
    expect(svc.argv[0]).toBe("/run/initos/images/vmhost/usr/bin/qemu-system-x86_64");
    expect(after(svc.argv, "-accel")).toBe("tcg");
    expect(after(svc.argv, "-netdev")).toBe("tap,id=net0,ifname=vj-web,script=no,downscript=no");
    expect(after(svc.argv, "-drive")).toMatch(/^file=\/x\/@vm-disks\/jail-web\.img,/);
    expect(svc.env?.LD_LIBRARY_PATH).toBe("/run/initos/images/vmhost/usr/lib/x86_64-linux-gnu");
    expect(sys.calls).toContain("net.tap vj-web on initos0");
    expect(log.lines).toContain("info: jail web: TCG (no /dev/kvm)");
    const peer = { greeting: ['{"QMP": {}}'], written: [] as string[], answer: () => ['{"return": {}}'] };
    sys.unixPeers.set(qmpPath("web"), peer);
    await svc.askStop!();
    expect(peer.written).toEqual(['{"execute":"qmp_capabilities"}', '{"execute":"system_powerdown"}']);
    sys.unixPeers.clear();
    await expect(svc.askStop!()).rejects.toThrow(`QMP ${qmpPath("web")} did not take system_powerdown`);
  });

  it("cleanup: the tap, the jail's disk copy and the share fds go; the image's disk stays", async () => {
    const sys = machine();
    const l = vmLauncher(sys, silentLog(), net, { openHost: async () => "/r", tools });
    await l.prepare(jail());
    await l.cleanup(jail());
    expect(sys.calls).toContain("net.removeLink vj-web");
    expect(sys.exists("/x/@vm-disks/jail-web.img")).toBe(false);
    expect(sys.exists("/x/@vm-disks/img-deb.0f5a2c7e-1111-4222-8333-444455556666.img")).toBe(true);
    expect(sys.calls.filter((c) => c.startsWith("close "))).toEqual([...sys.openedInRoot.keys()].map((fd) => `close ${fd}`));
  });

  it("a vmhost image that cannot be opened: prepare throws its line, nothing made", async () => {
    const sys = machine();
    const l = vmLauncher(sys, silentLog(), net, { openHost: async () => Promise.reject(new Error("image vmhost: no copy verifies")), tools });
    await expect(l.prepare(jail())).rejects.toThrow("image vmhost: no copy verifies");
    expect(sys.calls.some((c) => c.startsWith("run ") || c.startsWith("net."))).toBe(false);
  });
});
