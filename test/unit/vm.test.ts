import { describe, expect, it } from "vitest";
import { boot } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { Timeline } from "../../agent/log.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { POD_PATH, POD_PATH_DEV, podHandoff, setupVmMounts, vmPlan } from "../../agent/stages/vm.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { MemTree } from "../../agent/oci/fstree.ts";
import { addMountPoints } from "../../initrd/vmimage.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const plan = (cmdline: string) => vmPlan(parseCmdline(cmdline).cmdline);

describe("vm mode: cmdline to plan", () => {
  it("defaults: /dev/vda, share z on /z (optional), no disks, the root's init", () => {
    expect(plan("initos.mode=vm")).toEqual({ root: "/dev/vda", rw: false, share: { tag: "z", path: "/z", required: false }, disks: [], hostname: undefined, app: [] });
  });

  it("everything from the cmdline: root, share with its mount point, disks, host name (also from ip=), the app after --", () => {
    expect(plan("initos.mode=vm root=/dev/vdc rw initos.share=data:/srv/data initos.disks=/dev/vdb:/x,/dev/vdd:/var/lib initos.hostname=web1 -- /bin/app a b")).toEqual({
      root: "/dev/vdc",
      rw: true,
      share: { tag: "data", path: "/srv/data", required: true },
      disks: [
        { device: "/dev/vdb", path: "/x" },
        { device: "/dev/vdd", path: "/var/lib" },
      ],
      hostname: "web1",
      app: ["/bin/app", "a", "b"],
    });
    expect(plan("ip=10.0.0.2::10.0.0.1:255.255.255.0:fromip:eth0:off").hostname).toBe("fromip");
  });

  it("refuses a disk over / or a path that climbs out", () => {
    expect(() => plan("initos.disks=/dev/vdb:/")).toThrow("vm: initos.disks: /dev/vdb cannot be mounted on /");
    expect(() => plan("initos.disks=/dev/vdb:/x/../..")).toThrow("cannot be mounted on /x/../..");
  });

  it("a malformed vm key fails the boot instead of starting a different VM", async () => {
    const s = new FakeSys();
    s.add("/proc/cmdline", { kind: "file", data: "initos.mode=vm initos.ip=10.0.2.300/24 -- /bin/app" });
    const ctx = { sys: s, log: silentLog(), timeline: new Timeline("/nonexistent/boot.json") };
    await expect(boot(ctx, { remote: new RemoteAdmin(s, ctx.log) })).rejects.toThrow('vm: cmdline: initos.ip="10.0.2.300/24" is invalid');
  });
});

describe("vm mode: share, disks, app", () => {
  const rooted = () => new FakeSys().add("/sysroot", { kind: "dir", dev: 2 }).add("/sysroot/z", { kind: "dir", dev: 2 });

  it("tries virtiofs, then 9p with the same tag", async () => {
    const s = rooted();
    s.failOn.set("mount z /sysroot/z virtiofs", new Error("mount: ENOENT"));
    const log = silentLog();
    await setupVmMounts(s, log, new Coldplug(s, log), plan("initos.mode=vm"), 1);
    expect(s.calls.filter((c) => c.startsWith("mount"))).toEqual(["mount z /sysroot/z virtiofs 0x6", "mount z /sysroot/z 9p 0x6 trans=virtio,version=9p2000.L,msize=262144,cache=loose"]);
    expect(log.lines).toContain("info: vm: share z (9p) on /z");
  });

  it("a share named on the cmdline that cannot be mounted is an error; the default one is only noted", async () => {
    const s = rooted();
    s.failOn.set("mount z /sysroot/z", new Error("mount: ENOENT"));
    const log = silentLog();
    await setupVmMounts(s, log, new Coldplug(s, log), plan("initos.mode=vm"), 1);
    expect(log.lines).toContain("info: vm: no share tagged z");
    await expect(setupVmMounts(s, log, new Coldplug(s, log), plan("initos.mode=vm initos.share=z"), 1)).rejects.toThrow(
      "vm: share z (initos.share) could not be mounted: virtiofs: mount: ENOENT; 9p: mount: ENOENT",
    );
  });

  it("a mount point missing from a read-only root is a clear error (rw would create it)", async () => {
    const s = new FakeSys().add("/sysroot", { kind: "dir", dev: 2 }).add("/sysroot/z", { kind: "dir", dev: 2 });
    s.devices.add("/dev/vdb");
    const log = silentLog();
    await expect(setupVmMounts(s, log, new Coldplug(s, log), plan("initos.mode=vm initos.disks=/dev/vdb:/data"), 1)).rejects.toThrow(
      "vm: disk /data: /data does not exist in the read-only root (add rw, or create it in the image)",
    );
  });

  it("finds the app in the root (by path or like PATH) and puts the pod reaper where the switch keeps it", () => {
    const s = new FakeSys()
      .add("/usr/lib/initos/pod", { kind: "file", mode: 0o755 })
      .add("/sysroot/usr", { kind: "dir" })
      .add("/sysroot/usr/bin", { kind: "dir" })
      .add("/sysroot/usr/bin/app", { kind: "file", mode: 0o755 })
      .add("/sysroot/bin", { kind: "link", target: "usr/bin" })
      .add("/sysroot/run", { kind: "dir" });
    s.mounts.push("/run");
    expect(podHandoff(s, ["app", "x"])).toEqual({ init: "/run/initos/pod", args: ["/usr/bin/app", "x"] });
    expect(podHandoff(s, ["/bin/app"]).args).toEqual(["/bin/app"]);
    expect(s.calls).toContain("copyFile /usr/lib/initos/pod /run/initos/pod");
    expect(() => podHandoff(s, ["/bin/nope"])).toThrow("vm: app /bin/nope not found (or not executable) in the root");
  });
});

describe("vm mode: the API mount points (/dev /proc /sys /run) on any root", () => {
  /** A root as real images come (FROM scratch + files): no /dev, /proc, /sys or /run. The initramfs has all four mounted. */
  const bare = () => {
    const s = new FakeSys()
      .add("/usr/lib/initos/pod", { kind: "file", mode: 0o755 })
      .add("/run", { kind: "dir" })
      .add("/run/initos", { kind: "dir", mode: 0o700 })
      .add("/sysroot", { kind: "dir", dev: 2 })
      .add("/sysroot/bin", { kind: "dir", dev: 2 })
      .add("/sysroot/bin/app", { kind: "file", mode: 0o755, dev: 2 })
      .add("/sysroot/z", { kind: "dir", dev: 2 });
    s.mounts.push("/run", "/sysroot");
    const modes = new Map<string, number | undefined>();
    const mkdirp = s.mkdirp.bind(s);
    s.mkdirp = (p: string, mode?: number) => (modes.set(p, mode), mkdirp(p));
    return { s, modes };
  };
  const setup = async (s: FakeSys, cmdline: string) => {
    const log = silentLog();
    await setupVmMounts(s, log, new Coldplug(s, log), plan(`initos.mode=vm ${cmdline}`), 1);
    return log;
  };

  it("rw root: creates the missing ones with their usual modes, and says so; the pod stays in /run", async () => {
    const { s, modes } = bare();
    s.add("/sysroot/proc", { kind: "dir", dev: 2 }); // one the image has: left alone
    const log = await setup(s, "rw");
    expect([...modes]).toEqual([
      ["/sysroot/dev", 0o755],
      ["/sysroot/sys", 0o555],
      ["/sysroot/run", 0o755],
    ]);
    expect(log.lines).toContain("info: vm: created /dev /sys /run in the root (the image has none)");
    expect(podHandoff(s, ["/bin/app", "x"])).toEqual({ init: POD_PATH, args: ["/bin/app", "x"] });
    expect(s.calls).toContain("copyFile /usr/lib/initos/pod /run/initos/pod");
    // A second boot of the same root finds them all: nothing is made, nothing said.
    modes.clear();
    const again = await setup(s, "rw");
    expect(modes.size).toBe(0);
    expect(again.lines.filter((l) => /\/(dev|proc|sys|run)\b/.test(l))).toEqual([]);
  });

  it("read-only root without /run but with /dev: the pod lives in /dev (a devtmpfs: writable, exec allowed, and it moves)", async () => {
    const { s, modes } = bare();
    s.add("/sysroot/dev", { kind: "dir", dev: 2 });
    const log = await setup(s, "");
    expect(modes.size).toBe(0); // nothing is written into a read-only root
    expect(log.lines).toContain("warn: vm: /proc /sys /run missing from the read-only root: not mounted there (boot with rw, or add them to the image)");
    expect(podHandoff(s, ["/bin/app"])).toEqual({ init: POD_PATH_DEV, args: ["/bin/app"] });
    expect(POD_PATH_DEV).toBe("/dev/.initos/pod");
    expect(s.calls).toContain("copyFile /usr/lib/initos/pod /dev/.initos/pod");
    expect(s.calls).not.toContain("copyFile /usr/lib/initos/pod /run/initos/pod");
  });

  it("rw root that refuses the mkdir: noted with the reason; the pod falls back to /dev", async () => {
    const { s } = bare();
    s.add("/sysroot/dev", { kind: "dir", dev: 2 }).add("/sysroot/proc", { kind: "dir", dev: 2 }).add("/sysroot/sys", { kind: "dir", dev: 2 });
    s.failOn.set("mkdirp /sysroot/run", Object.assign(new Error("EROFS: read-only file system, mkdir '/sysroot/run'"), { errno: 30 }));
    const log = await setup(s, "rw");
    expect(log.lines).toContain("warn: vm: cannot create /run in the root (EROFS: read-only file system, mkdir '/sysroot/run'): not mounted there");
    expect(podHandoff(s, ["/bin/app"]).init).toBe(POD_PATH_DEV);
  });

  it("a mount point that is a file or a symlink is not used (the move would follow it in the initramfs) nor replaced", async () => {
    const { s, modes } = bare();
    s.add("/sysroot/dev", { kind: "dir", dev: 2 }).add("/sysroot/proc", { kind: "dir", dev: 2 }).add("/sysroot/sys", { kind: "dir", dev: 2 });
    s.add("/sysroot/run", { kind: "link", target: "/var/run", dev: 2 });
    const log = await setup(s, "rw");
    expect(modes.size).toBe(0);
    expect(log.lines).toContain("warn: vm: /run in the root is not a directory: not mounted there");
    expect(podHandoff(s, ["/bin/app"]).init).toBe(POD_PATH_DEV);
  });

  it("a read-only root with neither /run nor /dev: refused before the switch, with one line", async () => {
    const { s } = bare();
    await setup(s, "");
    expect(() => podHandoff(s, ["/bin/app"])).toThrow("vm: the root has neither /run nor /dev for the pod reaper (boot with rw, or add them to the image)");
    expect(s.calls.filter((c) => c.startsWith("copyFile"))).toEqual([]);
  });
});

describe("vmimage: the API mount points in the image it writes", () => {
  it("adds /dev /proc /sys /run /tmp with their usual modes where the layers have none, keeping what they have", () => {
    const t = new MemTree();
    t.mkdir("run", { mode: 0o700, uid: 0, gid: 0, mtime: 5 });
    t.symlink("tmp", "var/tmp", { mode: 0o777, uid: 0, gid: 0, mtime: 5 });
    expect(addMountPoints(t)).toEqual(["dev", "proc", "sys"]);
    const mode = (p: string) => t.nodes.get(p)?.meta.mode;
    expect([mode("dev"), mode("proc"), mode("sys"), mode("run")]).toEqual([0o755, 0o555, 0o555, 0o700]);
    expect(t.kind("tmp")).toBe("symlink");
    const empty = new MemTree();
    expect(addMountPoints(empty)).toEqual(["dev", "proc", "sys", "run", "tmp"]);
    expect(empty.nodes.get("tmp")?.meta).toEqual({ mode: 0o1777, uid: 0, gid: 0, mtime: 0 });
  });
});
