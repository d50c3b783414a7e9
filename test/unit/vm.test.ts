import { describe, expect, it } from "vitest";
import { boot } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { Timeline } from "../../agent/log.ts";
import { RecoverySidecar } from "../../agent/stages/recovery.ts";
import { preparePod, setupVmMounts, vmPlan } from "../../agent/stages/vm.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
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
    await expect(boot(ctx, { sidecar: new RecoverySidecar() })).rejects.toThrow('vm: cmdline: initos.ip="10.0.2.300/24" is invalid');
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
      .add("/sysroot/bin", { kind: "link", target: "usr/bin" });
    expect(preparePod(s, ["app", "x"])).toEqual(["/usr/bin/app", "x"]);
    expect(preparePod(s, ["/bin/app"])).toEqual(["/bin/app"]);
    expect(s.calls).toContain("copyFile /usr/lib/initos/pod /run/initos/pod");
    expect(() => preparePod(s, ["/bin/nope"])).toThrow("vm: app /bin/nope not found (or not executable) in the root");
  });
});
