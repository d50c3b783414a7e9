import { describe, expect, it } from "vitest";
import { checkSwitchRoot, findInit, resolveInRoot, switchRoot, type SwitchRootPlan } from "../../agent/switchroot.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

/** A machine ready to switch: initramfs on dev 1, the new root mounted from dev 2. */
function ready(): FakeSys {
  const s = new FakeSys();
  s.add("/sysroot", { kind: "dir", dev: 2 })
    .add("/sysroot/sbin", { kind: "dir", dev: 2 })
    .add("/sysroot/sbin/init", { kind: "file", mode: 0o755, dev: 2 })
    .add("/sysroot/dev", { kind: "dir", dev: 2 })
    .add("/sysroot/proc", { kind: "dir", dev: 2 })
    .add("/sysroot/sys", { kind: "dir", dev: 2 })
    .add("/sysroot/run", { kind: "dir", dev: 2 });
  s.mounts.push("/run", "/sysroot");
  return s;
}
const plan: SwitchRootPlan = { newRoot: "/sysroot", init: "/sbin/init", args: ["a", "b"], env: ["TERM=linux"] };
const DESTRUCTIVE = /^(mount|umount|chroot|chdir|pivotRoot|removeTree|execve|sync)/;

describe("switch_root guards", () => {
  it("refuses when not PID 1, touching nothing", () => {
    const s = ready();
    s.pidValue = 42;
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("switch_root refused: not PID 1 (pid 42)");
    expect(s.calls.filter((c) => DESTRUCTIVE.test(c))).toEqual([]);
  });

  it("refuses when / is not ramfs/tmpfs (e.g. ext4), touching nothing", () => {
    const s = ready();
    s.rootMagic = 0xef53;
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("/ is not an initramfs (statfs magic 0xef53)");
    expect(s.calls.filter((c) => DESTRUCTIVE.test(c))).toEqual([]);
  });

  it("accepts tmpfs as the initramfs", () => {
    const s = ready();
    s.rootMagic = 0x01021994;
    expect(() => checkSwitchRoot(s, plan)).not.toThrow();
  });

  it("refuses when the new root is on the same device as / (not mounted)", () => {
    const s = ready();
    s.add("/sysroot", { kind: "dir", dev: 1 });
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("/sysroot is not a mount (same device as /)");
    expect(s.calls.filter((c) => DESTRUCTIVE.test(c))).toEqual([]);
  });

  it("refuses when the init is missing or not executable, before destroying anything", () => {
    const s = ready();
    s.add("/sysroot/sbin/init", { kind: "file", mode: 0o644, dev: 2 });
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("init /sbin/init not found or not executable in /sysroot");
    const t = ready();
    expect(() => switchRoot(t, silentLog(), { ...plan, init: "/usr/lib/systemd/systemd" })).toThrow(/not found/);
    expect([...s.calls, ...t.calls].filter((c) => DESTRUCTIVE.test(c))).toEqual([]);
  });
});

describe("switch_root guard: an init kept in a moved mount must survive the move", () => {
  const pod: SwitchRootPlan = { ...plan, init: "/run/initos/pod", args: ["/bin/app"] };
  /** The VM case: the pod reaper was copied into the initramfs' /run; the root has no /sbin/init. */
  const withPod = (at = "/run/initos/pod") => {
    const s = ready();
    s.files.delete("/sysroot/sbin/init");
    const parts = at.split("/").filter(Boolean);
    for (let i = 1; i < parts.length; i++) s.add(`/${parts.slice(0, i).join("/")}`, { kind: "dir" });
    return s.add(at, { kind: "file", mode: 0o755 });
  };

  it("refuses before anything moves when the new root has no /run for /run/initos/pod", () => {
    const s = withPod();
    s.files.delete("/sysroot/run");
    let past = false;
    const log = silentLog();
    expect(() => switchRoot(s, log, { ...pod, onPointOfNoReturn: () => (past = true) })).toThrow(
      "switch_root refused: init /run/initos/pod lives in /run, which /sysroot has no directory for (it would be detached)",
    );
    expect(s.calls.filter((c) => DESTRUCTIVE.test(c))).toEqual([]);
    expect(past).toBe(false);
    expect(log.lines).toEqual([]);
    // Only an init inside a moved mount depends on it: the root's own /sbin/init does not.
    const own = ready();
    own.files.delete("/sysroot/run");
    expect(() => checkSwitchRoot(own, plan)).not.toThrow();
  });

  it("a mount point that is a file or a symlink in the new root does not count: the move would detach it too", () => {
    for (const node of [{ kind: "file" as const }, { kind: "link" as const, target: "/var/run" }]) {
      const s = withPod();
      s.add("/sysroot/run", { ...node, dev: 2 });
      expect(() => checkSwitchRoot(s, pod)).toThrow("which /sysroot has no directory for");
    }
  });

  it("refuses when the mount holding the init is not mounted (nothing would move it)", () => {
    const s = withPod();
    s.mounts = s.mounts.filter((m) => m !== "/run");
    expect(() => checkSwitchRoot(s, pod)).toThrow("switch_root refused: init /run/initos/pod lives in /run, which is not a mount (it would stay behind)");
  });

  it("checks an init in a moved mount in place: any of /dev /proc /sys /run, not only /run", () => {
    const s = withPod("/dev/.initos/pod");
    expect(() => checkSwitchRoot(s, { ...pod, init: "/dev/.initos/pod" })).not.toThrow();
    s.files.delete("/sysroot/dev");
    expect(() => checkSwitchRoot(s, { ...pod, init: "/dev/.initos/pod" })).toThrow("init /dev/.initos/pod lives in /dev, which /sysroot has no directory for");
    expect(() => checkSwitchRoot(withPod(), { ...pod, init: "/run/initos/nope" })).toThrow("init /run/initos/nope not found or not executable in /run");
  });
});

describe("switch_root sequence", () => {
  it("syncs, makes / private, moves the API mounts, falls back to MS_MOVE+chroot, frees the old root, execs", () => {
    const s = ready();
    s.failOn.set("pivotRoot", new Error("EINVAL")); // rootfs cannot be pivoted
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("execve reached (fake)");
    expect(s.calls).toEqual([
      "sync",
      "mount null / null 0x44000", // MS_REC | MS_PRIVATE
      "mount /dev /sysroot/dev null 0x2000",
      "mount /proc /sysroot/proc null 0x2000",
      "mount /sys /sysroot/sys null 0x2000",
      "mount /run /sysroot/run null 0x2000",
      "openDir /",
      "chdir /sysroot",
      "pivotRoot . .",
      "mount . / null 0x2000",
      "chroot .",
      "chdir /",
      "removeTree /proc/self/fd/9 dev=1",
      "close 9",
      "execve /sbin/init /sbin/init a b",
    ]);
  });

  it("uses pivot_root when the kernel allows it, and detaches the old root", () => {
    const s = ready();
    expect(() => switchRoot(s, silentLog(), plan)).toThrow("execve reached");
    const i = s.calls.indexOf("pivotRoot . .");
    expect(s.calls.slice(i, i + 2)).toEqual(["pivotRoot . .", "umount . 2"]);
    expect(s.calls).not.toContain("chroot .");
  });

  it("detaches an API mount the new root has no directory for, and says so", () => {
    const s = ready();
    s.files.delete("/sysroot/run");
    const log = silentLog();
    expect(() => switchRoot(s, log, plan)).toThrow("execve reached");
    expect(s.calls).toContain("umount /run 2");
    expect(log.lines).toContain("warn: switch_root: /sysroot/run missing, detaching /run");
  });

  it("tells the boot when it passes the point of no return: right before / becomes the new root, never when refused", () => {
    const s = ready();
    s.failOn.set("pivotRoot", new Error("EINVAL"));
    let at = -1;
    let times = 0;
    const marked = { ...plan, onPointOfNoReturn: () => ((at = s.calls.length), times++) };
    expect(() => switchRoot(s, silentLog(), marked)).toThrow("execve reached");
    expect(times).toBe(1);
    expect(s.calls.slice(at - 2, at + 1)).toEqual(["mount /run /sysroot/run null 0x2000", "openDir /", "chdir /sysroot"]);
    const refused = ready();
    refused.pidValue = 7;
    expect(() => switchRoot(refused, silentLog(), marked)).toThrow("switch_root refused");
    expect(times).toBe(1);
  });

  it("runs beforeExec after the cleanup, just before exec", () => {
    const s = ready();
    let at = -1;
    expect(() => switchRoot(s, silentLog(), { ...plan, beforeExec: () => (at = s.calls.length) })).toThrow("execve reached");
    expect(s.calls[at - 1]).toBe("close 9");
    expect(s.calls[at]).toMatch(/^execve/);
  });
});

describe("switch_root: nothing of the initrd moves into the OS with /run", () => {
  it("detaches a mount left under /run/initos, names it, and still moves /run with the rest of it", () => {
    const s = ready();
    s.mounts.push("/run/initos/esp-a", "/run/initos/images/modules", "/run/credentials");
    s.failOn.set("pivotRoot", new Error("EINVAL"));
    const log = silentLog();
    expect(() => switchRoot(s, log, plan)).toThrow("execve reached");
    const moveRun = s.calls.indexOf("mount /run /sysroot/run null 0x2000");
    expect(s.calls.indexOf("umount /run/initos/images/modules 2")).toBeLessThan(moveRun);
    expect(s.calls.indexOf("umount /run/initos/esp-a 2")).toBeLessThan(moveRun);
    expect(s.calls).not.toContain("umount /run/credentials 2");
    expect(s.mountPoints()).toContain("/sysroot/run/credentials");
    expect(s.mountPoints().filter((m) => m.includes("/run/initos"))).toEqual([]);
    expect(log.lines.filter((l) => l.startsWith("warn:"))).toEqual([
      "warn: switch_root: /run/initos/images/modules still mounted; detached, not moved into the OS",
      "warn: switch_root: /run/initos/esp-a still mounted; detached, not moved into the OS",
    ]);
  });

  it("/run/initos itself (a directory of the moved /run, not a mount) moves: the timeline goes with it", () => {
    const s = ready();
    const log = silentLog();
    expect(() => switchRoot(s, log, plan)).toThrow("execve reached");
    expect(s.calls.filter((c) => c.startsWith("umount /run"))).toEqual([]);
    expect(log.lines.filter((l) => l.startsWith("warn:"))).toEqual([]);
  });
});

describe("resolveInRoot / findInit", () => {
  it("follows absolute symlinks inside the new root, not the initramfs", () => {
    const s = new FakeSys()
      .add("/r/sbin", { kind: "dir" })
      .add("/r/sbin/init", { kind: "link", target: "/lib/systemd/systemd" })
      .add("/r/lib", { kind: "link", target: "usr/lib" })
      .add("/r/usr/lib/systemd/systemd", { kind: "file", mode: 0o755 })
      .add("/r/usr", { kind: "dir" })
      .add("/r/usr/lib", { kind: "dir" })
      .add("/r/usr/lib/systemd", { kind: "dir" });
    expect(resolveInRoot(s, "/r", "/sbin/init")).toBe("/usr/lib/systemd/systemd");
    expect(findInit(s, "/r", ["/nope", "/sbin/init"])).toBe("/sbin/init");
  });

  it("does not climb above the new root with ..", () => {
    const s = new FakeSys().add("/r/bin", { kind: "dir" }).add("/r/bin/sh", { kind: "link", target: "../../../bin/busybox" });
    s.add("/bin/busybox", { kind: "file", mode: 0o755 }); // exists in the initramfs only
    expect(resolveInRoot(s, "/r", "/bin/sh")).toBeNull();
  });

  it("gives up on symlink loops", () => {
    const s = new FakeSys().add("/r/a", { kind: "link", target: "/b" }).add("/r/b", { kind: "link", target: "/a" });
    expect(resolveInRoot(s, "/r", "/a")).toBeNull();
  });
});
