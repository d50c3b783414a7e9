// Container jails: the OCI spec (pure), and the decisions of rootfs, shares, service, removal
// and cgroups with the fake machine. crun itself runs in test/system/crun.test.ts.
import { describe, expect, it } from "vitest";
import type { Jail } from "../../agent/jailsconfig.ts";
import { containerService, containerSpec, makeJailCgroup, prepareRootfs, removeContainer, resolveShares, setupCgroups, writeBundle } from "../../agent/jails/container.ts";
import { shiftOwners } from "../../agent/jails/idshift.ts";
import { DENIED_SYSCALLS } from "../../agent/jails/seccomp.ts";
import { DEFAULT_CAPABILITIES } from "../../agent/jails/spec.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const BASE = 65536 * 20;
const jail = (over: Partial<Jail> = {}): Jail => ({
  name: "web",
  kind: "container",
  image: "deb",
  cpus: 1.5,
  memoryMiB: 256,
  address: "10.77.0.2",
  shares: [],
  env: {},
  idBase: BASE,
  ...over,
});

/** The fake with btrfs snapshots: `subvolume snapshot A B` copies A's tree, `delete B` drops it. */
class PoolFake extends FakeSys {
  override run(argv: readonly string[]): string {
    super.run(argv);
    const [verb, a, b] = argv.slice(argv.indexOf("subvolume") + 1);
    if (verb === "snapshot") {
      for (const [p, n] of [...this.files]) if (p === a || p.startsWith(`${a}/`)) this.files.set(b + p.slice(a!.length), { ...n });
    } else if (verb === "delete") {
      // As btrfs: a subvolume holding another (a directory on another dev, inode 256) stays.
      const dev = this.files.get(a!)?.dev ?? 1;
      if ([...this.files].some(([p, n]) => p.startsWith(`${a}/`) && n.kind === "dir" && (n.dev ?? 1) !== dev && n.ino === 256)) {
        throw new Error(`ERROR: Could not destroy subvolume/snapshot: Directory not empty`);
      }
      for (const p of [...this.files.keys()]) if (p === a || p.startsWith(`${a}/`)) this.files.delete(p);
    }
    return "";
  }
}

function pool(): PoolFake {
  const s = new PoolFake();
  s.add("/x", { kind: "dir" })
    .add("/x/@img-deb", { kind: "dir" })
    .add("/x/@img-deb/bin", { kind: "dir" })
    .add("/x/@img-deb/bin/su", { kind: "file", mode: 0o4755 })
    .add("/x/@img-deb/bin/wall", { kind: "file", mode: 0o2755, gid: 5 })
    .add("/x/@img-deb/bin/sh", { kind: "link", target: "dash", mode: 0o777 })
    .add("/x/@img-deb/home", { kind: "dir", uid: 1000, gid: 1000 })
    .add("/x/@img-deb/big", { kind: "file", uid: 100000, gid: 7 })
    .add("/x/@img-deb/mnt", { kind: "dir" })
    .add("/x/@img-deb/mnt/other", { kind: "file", dev: 2 })
    .add("/x/@img-deb/bin/gzip", { kind: "file", ino: 77, uid: 3 })
    .add("/x/@img-deb/bin/gunzip", { kind: "file", ino: 77, uid: 3 });
  return s;
}

const BTRFS = ["btrfs"];

describe("containerSpec", () => {
  const spec = containerSpec(jail({ shares: [] }), {
    rootfs: "/x/@jail-web",
    netnsPath: "/run/netns/web",
    process: { args: ["/sbin/init"], env: ["PATH=/usr/bin:/bin"], cwd: "/" },
    mounts: [
      { source: "/run/initos/jails/web/shares/0", destination: "/data", readOnly: false },
      { source: "/run/initos/jails/web/shares/1", destination: "/ro", readOnly: true },
    ],
  }) as any;

  it("is an OCI 1.0.2 spec on the snapshot, named after the jail", () => {
    expect(spec.ociVersion).toBe("1.0.2");
    expect(spec.root).toEqual({ path: "/x/@jail-web", readonly: false });
    expect(spec.hostname).toBe("web");
    expect(spec.process).toMatchObject({ args: ["/sbin/init"], env: ["PATH=/usr/bin:/bin"], cwd: "/", user: { uid: 0, gid: 0 }, terminal: false, noNewPrivileges: true });
  });

  it("has its own user, pid, mount, uts, ipc and cgroup namespaces and joins the agent's netns by path", () => {
    expect(spec.linux.namespaces).toEqual([
      { type: "user" }, { type: "pid" }, { type: "mount" }, { type: "uts" }, { type: "ipc" }, { type: "cgroup" },
      { type: "network", path: "/run/netns/web" },
    ]);
  });

  it("maps ids 0..65535 to the jail's range, uid and gid alike", () => {
    const m = [{ containerID: 0, hostID: BASE, size: 65536 }];
    expect(spec.linux.uidMappings).toEqual(m);
    expect(spec.linux.gidMappings).toEqual(m);
  });

  it("grants the OCI default capabilities and none ambient or inheritable", () => {
    const caps = spec.process.capabilities;
    expect(caps.bounding).toEqual([...DEFAULT_CAPABILITIES]);
    expect(caps.effective).toEqual(caps.bounding);
    expect(caps.permitted).toEqual(caps.bounding);
    expect(caps.ambient).toEqual([]);
    expect(caps.inheritable).toEqual([]);
    expect(caps.bounding).toHaveLength(14);
    expect(caps.bounding).not.toContain("CAP_SYS_ADMIN");
  });

  it("limits memory (no swap beyond it), cpu and pids in /initos/<name>", () => {
    expect(spec.linux.cgroupsPath).toBe("/initos/web/run");
    expect(spec.linux.resources).toEqual({
      memory: { limit: 256 * 1024 * 1024, swap: 256 * 1024 * 1024 },
      cpu: { quota: 150_000, period: 100_000 },
      pids: { limit: 4096 },
    });
  });

  it("mounts /proc, a tmpfs /dev, pts, shm, mqueue, a read-only /sys, its cgroup tree and the shares", () => {
    const m = spec.mounts as { destination: string; type: string; source: string; options: string[] }[];
    expect(m.map((x) => x.destination)).toEqual(["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup", "/data", "/ro"]);
    expect(m.find((x) => x.destination === "/dev")).toMatchObject({ type: "tmpfs" });
    expect(m.find((x) => x.destination === "/sys")).toMatchObject({ source: "/sys", options: ["rbind", "nosuid", "noexec", "nodev", "ro"] });
    expect(m.find((x) => x.destination === "/data")).toEqual({ destination: "/data", type: "none", source: "/run/initos/jails/web/shares/0", options: ["rbind", "nosuid", "nodev", "rw"] });
    expect(m.find((x) => x.destination === "/ro")!.options).toContain("ro");
    // no host device anywhere: nothing from the host's /dev is bound in
    expect(m.filter((x) => x.source.startsWith("/dev"))).toEqual([]);
    expect(spec.linux.devices).toBeUndefined();
  });

  it("masks and write-protects runc's default /proc and /sys paths", () => {
    for (const p of ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware", "/proc/acpi", "/proc/scsi"]) expect(spec.linux.maskedPaths).toContain(p);
    for (const p of ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"]) expect(spec.linux.readonlyPaths).toContain(p);
  });

  it("carries the seccomp profile: allow by default, the named groups denied with EPERM, nested user namespaces refused", () => {
    const sc = spec.linux.seccomp;
    expect(sc.defaultAction).toBe("SCMP_ACT_ALLOW");
    expect(sc.architectures).toEqual(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]);
    expect(sc.syscalls[0]).toMatchObject({ action: "SCMP_ACT_ERRNO", errnoRet: 1 });
    for (const c of ["init_module", "kexec_load", "reboot", "swapon", "mount", "fsopen", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "open_by_handle_at", "userfaultfd", "io_uring_setup", "syslog"]) {
      expect(sc.syscalls[0].names).toContain(c);
    }
    expect(DENIED_SYSCALLS).not.toContain("ptrace");
    expect(sc.syscalls[1]).toEqual({ names: ["unshare", "clone"], action: "SCMP_ACT_ERRNO", errnoRet: 1, args: [{ index: 0, value: 0x10000000, valueTwo: 0x10000000, op: "SCMP_CMP_MASKED_EQ" }] });
    expect(sc.syscalls[2]).toEqual({ names: ["clone3"], action: "SCMP_ACT_ERRNO", errnoRet: 38 });
  });

  it("without cgroups (a cgroup v1 host) and without a netns path: no limits, no cgroup namespace or mount, a new netns", () => {
    const s = containerSpec(jail(), { rootfs: "/r", netnsPath: null, process: { args: ["/bin/sh"], env: [], cwd: "/" }, mounts: [], cgroups: false }) as any;
    expect(s.linux.resources).toBeUndefined();
    expect(s.linux.cgroupsPath).toBeUndefined();
    expect(s.linux.namespaces).not.toContainEqual({ type: "cgroup" });
    expect(s.linux.namespaces).toContainEqual({ type: "network" });
    expect(s.mounts.map((m: { destination: string }) => m.destination)).not.toContain("/sys/fs/cgroup");
  });
});

describe("shiftOwners", () => {
  it("shifts every inode by the base, never across devices, restoring setuid/setgid, never chmod-ing a symlink", () => {
    const s = pool();
    const r = shiftOwners(s, "/x/@img-deb", BASE);
    const node = (p: string) => s.files.get(`/x/@img-deb${p}`)!;
    expect(node("").uid).toBe(BASE);
    expect(node("/bin/su")).toMatchObject({ uid: BASE, gid: BASE, mode: 0o4755 });
    expect(node("/bin/wall")).toMatchObject({ uid: BASE, gid: BASE + 5, mode: 0o2755 });
    expect(node("/bin/sh")).toMatchObject({ uid: BASE, gid: BASE });
    expect(node("/home")).toMatchObject({ uid: BASE + 1000, gid: BASE + 1000 });
    expect(node("/mnt/other").uid).toBeUndefined(); // another filesystem: untouched
    expect(s.calls.filter((c) => c.startsWith("chmod"))).toEqual(["chmod /x/@img-deb/bin/su 4755", "chmod /x/@img-deb/bin/wall 2755"]);
    // a hard link is one inode: shifted once, whichever name comes first
    expect(node("/bin/gzip").uid).toBe(BASE + 3);
    expect(node("/bin/gunzip").uid).toBe(BASE + 3);
    expect(s.calls.filter((c) => /lchown .*\/bin\/(gzip|gunzip) /.test(c))).toHaveLength(1);
    expect(r).toEqual({ inodes: 9, overflow: 1 });
    // an id beyond the range becomes nobody inside
    expect(node("/big")).toMatchObject({ uid: BASE + 65534, gid: BASE + 7 });
  });
});

describe("prepareRootfs", () => {
  it("snapshots the image into @jail-<name> and shifts the snapshot only", () => {
    const s = pool();
    const log = silentLog();
    expect(prepareRootfs(s, log, jail(), "/x", BTRFS)).toBe("/x/@jail-web");
    expect(s.calls.filter((c) => c.startsWith("run"))).toEqual(["run btrfs subvolume snapshot /x/@img-deb /x/@jail-web"]);
    expect(s.files.get("/x/@jail-web/bin/su")).toMatchObject({ uid: BASE, mode: 0o4755 });
    expect(s.files.get("/x/@img-deb/bin/su")!.uid).toBeUndefined();
    expect(log.lines[0]).toMatch(/^info: jail web: rootfs @jail-web from @img-deb, 9 inodes owned from uid\/gid 1310720 \(\d+ ms\)$/);
    expect(log.lines[1]).toBe("warn: jail web: 1 owners beyond 65535 in image deb are nobody (65534) in the jail");
  });

  it("deletes the last run's snapshot first", () => {
    const s = pool().add("/x/@jail-web", { kind: "dir" }).add("/x/@jail-web/stale", { kind: "file" });
    prepareRootfs(s, silentLog(), jail(), "/x", BTRFS);
    expect(s.calls.filter((c) => c.startsWith("run"))).toEqual(["run btrfs subvolume delete /x/@jail-web", "run btrfs subvolume snapshot /x/@img-deb /x/@jail-web"]);
    expect(s.files.has("/x/@jail-web/stale")).toBe(false);
  });

  it("a missing image: one line naming it and the command that imports it; nothing made", () => {
    const s = pool();
    expect(() => prepareRootfs(s, silentLog(), jail({ image: "nope" }), "/x", BTRFS)).toThrow(/^jail web: image nope is not imported \(image import nope\)$/);
    expect(s.calls.filter((c) => c.startsWith("run"))).toEqual([]);
  });

  it("a symlink named like the image is not an image", () => {
    const s = pool().add("/x/@img-evil", { kind: "link", target: "/" });
    expect(() => prepareRootfs(s, silentLog(), jail({ image: "evil" }), "/x", BTRFS)).toThrow("jail web: image evil is not imported (image import evil)");
  });

  it("an old snapshot that cannot be deleted stops the start with one line", () => {
    const s = pool().add("/x/@jail-web", { kind: "dir" });
    s.failOn.set("run btrfs subvolume delete", new Error("btrfs subvolume delete /x/@jail-web: Directory not empty"));
    expect(() => prepareRootfs(s, silentLog(), jail(), "/x", BTRFS)).toThrow("jail web: the old @jail-web could not be deleted: btrfs subvolume delete /x/@jail-web: Directory not empty");
  });

  it("subvolumes the jail made inside its rootfs are deleted first, deepest first, found without following its symlinks", () => {
    const s = pool()
      .add("/x/@root", { kind: "dir", dev: 9, ino: 256 })
      .add("/x/@root/etc", { kind: "dir", dev: 9 })
      .add("/x/@jail-web", { kind: "dir", dev: 3, ino: 256 })
      .add("/x/@jail-web/var", { kind: "dir", dev: 3 })
      .add("/x/@jail-web/var/a\nID 256 gen 7 parent 260", { kind: "dir", dev: 4, ino: 256 })
      .add("/x/@jail-web/var/a\nID 256 gen 7 parent 260/b", { kind: "dir", dev: 5, ino: 256 })
      .add("/x/@jail-web/var/c", { kind: "dir", dev: 6, ino: 256 })
      .add("/x/@jail-web/var/to-root", { kind: "link", target: "/x/@root" })
      .add("/x/@jail-web/var/to-root-dir", { kind: "link", target: "/x/@root/etc" });
    prepareRootfs(s, silentLog(), jail(), "/x", BTRFS);
    const runs = s.calls.filter((c) => c.startsWith("run"));
    expect(runs.slice(0, 5)).toEqual([
      "run btrfs subvolume delete /x/@jail-web",
      "run btrfs subvolume delete /x/@jail-web/var/a\nID 256 gen 7 parent 260/b",
      expect.stringMatching(/^run btrfs subvolume delete \/x\/@jail-web\/var\/(c|a\nID 256 gen 7 parent 260)$/),
      expect.stringMatching(/^run btrfs subvolume delete \/x\/@jail-web\/var\/(c|a\nID 256 gen 7 parent 260)$/),
      "run btrfs subvolume delete /x/@jail-web",
    ]);
    expect(new Set(runs.slice(2, 4)).size).toBe(2);
    expect(s.files.has("/x/@root/etc")).toBe(true);
    expect(s.files.has("/x/@jail-web/bin/su")).toBe(true);
  });

  it("a symlink at @jail-<name> is not followed to the subvolume it names: one line, nothing deleted", () => {
    const s = pool().add("/x/@root", { kind: "dir", dev: 9, ino: 256 }).add("/x/@jail-web", { kind: "link", target: "/x/@root" });
    expect(() => prepareRootfs(s, silentLog(), jail(), "/x", BTRFS)).toThrow("jail web: the old @jail-web could not be deleted: /x/@jail-web is a link, not a subvolume");
    expect(s.calls.filter((c) => c.startsWith("run"))).toEqual([]);
  });

  it("a failed shift deletes the new snapshot: nothing is left behind", () => {
    const s = pool();
    s.failOn.set("lchown /x/@jail-web/home", Object.assign(new Error("lchown: EIO"), { errno: 5 }));
    expect(() => prepareRootfs(s, silentLog(), jail(), "/x", BTRFS)).toThrow("jail web: shifting the owners of @jail-web failed: lchown: EIO");
    expect(s.calls.filter((c) => c.startsWith("run")).at(-1)).toBe("run btrfs subvolume delete /x/@jail-web");
    expect(s.files.has("/x/@jail-web")).toBe(false);
  });
});

describe("resolveShares", () => {
  const shares = (s: FakeSys) =>
    s.add("/x/@data", { kind: "dir" }).add("/x/@data/www", { kind: "dir" }).add("/x/@data/out", { kind: "link", target: "/etc" }).add("/x/@data/file", { kind: "file" });

  it("resolves each share in the pool and binds the resolved directory onto a staging point (read-only ones remounted ro)", () => {
    const s = shares(new FakeSys());
    const j = jail({ shares: [{ subvol: "@data", dir: "www", path: "/var/www", readOnly: false }, { subvol: "@data", path: "/data", readOnly: true }] });
    expect(resolveShares(s, j, "/x", "/run/j")).toEqual([
      { source: "/run/j/web/shares/0", destination: "/var/www", readOnly: false },
      { source: "/run/j/web/shares/1", destination: "/data", readOnly: true },
    ]);
    expect(s.calls.filter((c) => /^(openDirInRoot|mount)/.test(c))).toEqual([
      "openDirInRoot /x @data/www",
      "mount /proc/self/fd/100 /run/j/web/shares/0 null 0x1000",
      "mount null /run/j/web/shares/0 null 0x1026",
      "openDirInRoot /x @data",
      "mount /proc/self/fd/101 /run/j/web/shares/1 null 0x1000",
      "mount null /run/j/web/shares/1 null 0x1027",
    ]);
  });

  it.each([
    [{ subvol: "@nope", path: "/d" }, "jail web: share @nope (for /d) does not exist; not started"],
    [{ subvol: "@data", dir: "out", path: "/d" }, "jail web: share @data/out (for /d) passes through a symlink; not started"],
    [{ subvol: "@data", dir: "file", path: "/d" }, "jail web: share @data/file (for /d) is not a directory; not started"],
    [{ subvol: "@jail-db", path: "/d" }, "jail web: share @jail-db (for /d) is a jail's rootfs; not started"],
    [{ subvol: "@img-deb", path: "/d" }, "jail web: share @img-deb (for /d) is an image: it can only be shared readOnly; not started"],
  ])("refuses %j with one line, undoing the shares already staged", (bad, line) => {
    const s = shares(new FakeSys());
    const j = jail({ shares: [{ subvol: "@data", path: "/ok", readOnly: false }, { readOnly: false, ...bad }] });
    expect(() => resolveShares(s, j, "/x", "/run/j")).toThrow(line);
    expect(s.calls).toContain("umount /run/j/web/shares/0 2");
    expect(s.mounts).not.toContain("/run/j/web/shares/0");
  });
});

describe("containerService, writeBundle, removeContainer", () => {
  it("runs crun from the tools image in the foreground with its state in /run/initos/crun", () => {
    expect(containerService(jail(), "/run/initos/jails/web")).toEqual({
      name: "jail-web",
      argv: ["/run/initos/images/tools/usr/bin/crun", "--root", "/run/initos/crun", "--cgroup-manager=cgroupfs", "run", "--bundle", "/run/initos/jails/web", "web"],
      env: { LD_LIBRARY_PATH: "/run/initos/images/tools/usr/lib/x86_64-linux-gnu" },
    });
  });

  it("writes config.json into a root-only bundle directory", () => {
    const s = new FakeSys();
    expect(writeBundle(s, jail(), { ociVersion: "1.0.2" })).toBe("/run/initos/jails/web");
    expect(JSON.parse(s.readFile("/run/initos/jails/web/config.json")!)).toEqual({ ociVersion: "1.0.2" });
  });

  it("deletes crun's state, unmounts staged shares and deletes the snapshot", () => {
    const s = pool().add("/x/@jail-web", { kind: "dir" }).add("/run/initos/jails/web/shares/0", { kind: "dir" });
    s.mounts.push("/run/initos/jails/web/shares/0");
    removeContainer(s, silentLog(), jail(), { btrfs: BTRFS });
    expect(s.calls).toEqual([
      "run /run/initos/images/tools/usr/lib64/ld-linux-x86-64.so.2 --library-path /run/initos/images/tools/usr/lib/x86_64-linux-gnu /run/initos/images/tools/usr/bin/crun --root /run/initos/crun delete --force web",
      "umount /run/initos/jails/web/shares/0 2",
      "run btrfs subvolume delete /x/@jail-web",
    ]);
  });

  it("is quiet when there is nothing to remove", () => {
    const s = pool();
    s.failOn.set("run /run/initos/images/tools/usr/lib64/ld-linux-x86-64.so.2", new Error("crun: container `web` does not exist"));
    const log = silentLog();
    removeContainer(s, log, jail(), { btrfs: BTRFS });
    expect(log.lines).toEqual([]);
    expect(s.calls.filter((c) => c.includes("subvolume"))).toEqual([]);
  });
});

describe("setupCgroups", () => {
  it("mounts cgroup2 with nsdelegate when /sys/fs/cgroup is not cgroup2, then enables cpu, memory, pids for the root and /initos", () => {
    const s = new FakeSys().add("/sys/fs/cgroup/cgroup.controllers", { kind: "file", data: "cpuset cpu io memory hugetlb pids rdma misc\n" });
    setupCgroups(s, silentLog());
    expect(s.calls).toContain("mount cgroup2 /sys/fs/cgroup cgroup2 0xe nsdelegate");
    expect(s.readFile("/sys/fs/cgroup/cgroup.subtree_control")).toBe("+cpu +memory +pids");
    expect(s.readFile("/sys/fs/cgroup/initos/cgroup.subtree_control")).toBe("+cpu +memory +pids");
  });

  it("leaves a mounted cgroup2 alone and says which controllers are missing", () => {
    const s = new FakeSys().add("/sys/fs/cgroup/cgroup.controllers", { kind: "file", data: "memory pids\n" });
    s.statfsMagic.set("/sys/fs/cgroup", 0x63677270);
    const log = silentLog();
    setupCgroups(s, log);
    expect(s.calls.filter((c) => c.startsWith("mount"))).toEqual([]);
    expect(s.readFile("/sys/fs/cgroup/initos/cgroup.subtree_control")).toBe("+memory +pids");
    expect(log.lines).toEqual(["warn: jails: cgroup controllers cpu missing in this kernel: those limits do not apply"]);
  });

  it("a jail's own cgroup gets the controllers /initos has, for crun's run/ below it", () => {
    const s = new FakeSys().add("/sys/fs/cgroup/initos/cgroup.subtree_control", { kind: "file", data: "cpu memory pids\n" });
    makeJailCgroup(s, jail());
    expect(s.readFile("/sys/fs/cgroup/initos/web/cgroup.subtree_control")).toBe("+cpu +memory +pids");
  });
});
