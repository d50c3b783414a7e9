import { describe, expect, it } from "vitest";
import { boot, rebootDelay, stage, startFailureSidecar, whyNoUnseal, type BootContext, type BootState } from "../../agent/boot.ts";
import { chooseInit, handOverMounts, handoffTarget, initArgs, initrdState } from "../../agent/handoff.ts";
import { isSystemd } from "../../agent/switchroot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { AgentConfigSchema, DEFAULT_CONFIG, parseConfig } from "../../agent/config.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { UTAB } from "../../agent/stages/images.ts";
import { applyFailurePolicy, DIAG_PATH } from "../../agent/failure.ts";
import { Timeline } from "../../agent/log.ts";
import { Coldplug, waitUntil } from "../../agent/stages/devices.ts";
import { mountApiFilesystems, readSecureBoot, secureBootFromBootParams, setupEarly } from "../../agent/stages/early.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { extendPcr, FakeTpm } from "./faketpm.ts";
import { LATCH_DIGEST } from "../../agent/diskkey/latch.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

function ctx(sys: FakeSys): BootContext & { log: ReturnType<typeof silentLog> } {
  return { sys, log: silentLog(), timeline: new Timeline("/nonexistent/boot.json") };
}

/** A fresh boot state for `c`, as main.ts makes one. */
function stateFor(c: BootContext, inputs?: Partial<NonNullable<BootState["inputs"]>>): BootState {
  return { remote: new RemoteAdmin(c.sys, c.log), ...(inputs ? { inputs: { early: { secureBoot: "off", efivars: Promise.resolve(false) }, cmdline: parseCmdline("").cmdline, config: DEFAULT_CONFIG, ...inputs } } : {}) };
}

describe("early stage", () => {
  it("mounts only what is not mounted yet, /dev/pts after /dev", () => {
    const s = new FakeSys();
    mountApiFilesystems(s, silentLog());
    const mounts = s.calls.filter((c) => c.startsWith("mount"));
    expect(mounts).toEqual([
      "mount devpts /dev/pts devpts 0xa gid=5,mode=620,ptmxmode=000",
      "mount tmpfs /dev/shm tmpfs 0x6 mode=1777",
      "mount tmpfs /run tmpfs 0x6 mode=0755",
    ]);
  });

  it("reads the SecureBoot variable; an unreadable one on EFI counts as on", () => {
    const s = new FakeSys();
    const v = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c";
    expect(readSecureBoot(s, false)).toBe("no-efi");
    expect(readSecureBoot(s, true)).toBe("on");
    s.add(v, { kind: "file", data: "\x06\x00\x00\x00\x01" });
    expect(readSecureBoot(s, true)).toBe("on");
    s.add(v, { kind: "file", data: "\x06\x00\x00\x00\x00" });
    expect(readSecureBoot(s, true)).toBe("off");
  });

  it("takes the Secure Boot state from boot_params (the EFI stub's), not waiting for efivarfs", async () => {
    const params = (mode: number) => "\0".repeat(0x1ec) + String.fromCharCode(mode);
    const s = new FakeSys().add("/sys/firmware/efi", { kind: "dir" }).add("/sys/kernel/boot_params/data", { kind: "file", data: params(3) });
    expect(secureBootFromBootParams(s)).toBe("on");
    s.add("/sys/kernel/boot_params/data", { kind: "file", data: params(2) });
    expect(secureBootFromBootParams(s)).toBe("off");
    s.add("/sys/kernel/boot_params/data", { kind: "file", data: params(1) }); // "unknown": ask the variable
    expect(secureBootFromBootParams(s)).toBeNull();
    const r = await setupEarly(s, silentLog());
    expect(r.secureBoot).toBe("on"); // variable unreadable on EFI: the strict answer
    expect(await r.efivars).toBe(true);
    expect(s.calls).toContain("mount efivarfs /sys/firmware/efi/efivars efivarfs 0xe");
  });

  it("lifts the kmsg rate limit and disables ctrl-alt-del", async () => {
    const s = new FakeSys().add("/proc/sys/kernel/printk_devkmsg", { kind: "file", data: "ratelimit\n" });
    const r = await setupEarly(s, silentLog());
    expect(r).toEqual({ secureBoot: "no-efi", devkmsg: "ratelimit", efivars: expect.any(Promise) });
    expect(s.readFile("/proc/sys/kernel/printk_devkmsg")).toBe("on\n");
    expect(s.calls).toContain("reboot 0x0");
  });
});

describe("waitUntil", () => {
  it("returns a device that appears while waiting, loading drivers for hotplugged devices", async () => {
    const s = new FakeSys();
    s.appearAfterSleeps.set("LABEL=root", 3);
    s.uevents.push({ ACTION: "add", MODALIAS: "virtio:d00000002v00001AF4" }, { ACTION: "remove", MODALIAS: "pci:x" });
    const got = await waitUntil(s, silentLog(), new Coldplug(s, silentLog()), "root device LABEL=root", 10, () => s.resolveDevice("LABEL=root"));
    expect(got).toBe("LABEL=root");
    expect(s.sleeps).toBe(3);
    expect(s.calls.filter((c) => c.startsWith("loadModule"))).toEqual(["loadModule virtio:d00000002v00001AF4"]);
  });

  it("gives up after the bound with a line naming what it waited for and how long", async () => {
    const s = new FakeSys();
    await expect(waitUntil(s, silentLog(), new Coldplug(s, silentLog()), "root device /dev/vdz", 2, () => null)).rejects.toThrow(
      "root device /dev/vdz did not appear within 2s",
    );
    expect(s.now()).toBe(2000);
  });
});

describe("boot plan", () => {
  function bootable(cmdline: string): FakeSys {
    return new FakeSys()
      .add("/proc/cmdline", { kind: "file", data: cmdline })
      .add("/etc/initos/config.json", { kind: "file", data: JSON.stringify({ modules: ["virtio_blk", "btrfs"] }) })
      .add("/sysroot", { kind: "dir", dev: 2 })
      .add("/sysroot/sbin", { kind: "dir", dev: 2 })
      .add("/sysroot/sbin/init", { kind: "file", mode: 0o755, dev: 2 });
  }


  it("runs early → modules → root → handoff and execs the init with the app args", async () => {
    const s = bootable("root=/dev/vda rootflags=subvol=@ -- x y");
    s.devices.add("/dev/vda");
    const c = ctx(s);
    await expect(boot(c, stateFor(c))).rejects.toThrow("execve reached");
    expect(s.calls.filter((x) => /^(loadModule|mount \/dev\/vda|execve)/.test(x))).toEqual([
      "loadModule virtio_blk",
      "loadModule btrfs",
      "loadModule btrfs", // the root stage asks for its filesystem driver again: it may come from an image
      "mount /dev/vda /sysroot btrfs 0x1 subvol=@",
      "execve /sbin/init /sbin/init x y",
    ]);
    expect(c.timeline.stages.map((x) => [x.name, x.ok])).toEqual([
      ["early", true],
      ["modules", true],
      ["tpm", true],
      ["root", true],
      ["handoff-check", true],
      ["os-mounts", true],
    ]);
  });

  it("a path that does not unseal (root= on the cmdline) latches before it mounts a root; PCR 11 leaves the initrd before the exec", async () => {
    const s = bootable("root=/dev/vda rootflags=subvol=@");
    s.devices.add("/dev/vda").add("/dev/tpmrm0");
    s.add("/sys/firmware/acpi/tables/TPM2", { kind: "file" });
    const tpm = (s.tpmFake = new FakeTpm());
    const c = ctx(s);
    await expect(boot(c, stateFor(c))).rejects.toThrow("execve reached");
    expect(tpm.calls).toEqual(["extend 11", "extend 15", "extend 11", "close"]);
    const order = s.calls.filter((x) => x === "tpm" || /^(mount \/dev\/vda|execve)/.test(x));
    expect(order).toEqual(["tpm", "mount /dev/vda /sysroot btrfs 0x1 subvol=@", "execve /sbin/init /sbin/init"]);
    expect(c.log.lines).toContain("info: tpm: latch PCR 15 extended (root= on the cmdline)");
    expect(Buffer.from(tpm.pcr(15))).toEqual(Buffer.from(extendPcr(new Uint8Array(32), LATCH_DIGEST)));
  });

  it("only the host mode with no root= and an ESP unseals; every other path latches at once", () => {
    expect(whyNoUnseal({}, true)).toBeNull();
    expect(whyNoUnseal({ mode: "host" }, true)).toBeNull();
    expect(whyNoUnseal({ root: "LABEL=x" }, true)).toBe("root= on the cmdline");
    expect(whyNoUnseal({ mode: "sidecar" }, true)).toBe("sidecar mode");
    expect(whyNoUnseal({ mode: "install" }, true)).toBe("install mode");
    expect(whyNoUnseal({ mode: "vm" }, false)).toBe("vm mode");
    expect(whyNoUnseal({}, false)).toBe("no ESP");
  });

  it("the failure policy's recovery sidecar starts only after the latch; a latch that fails means no sidecar", async () => {
    const s = new FakeSys();
    s.devices.add("/dev/tpmrm0");
    const tpm = (s.tpmFake = new FakeTpm());
    tpm.failExtend = true;
    const keyed = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: ["ssh-ed25519 AAAA test"] } };
    const c = ctx(s);
    const state = stateFor(c, { config: keyed, cmdline: parseCmdline("initos.ip=10.0.2.15/24 initos.gw=10.0.2.2").cmdline });
    expect(await startFailureSidecar(c, state)).toBe(false);
    expect(tpm.calls).toEqual(["extend 15"]);
    expect(s.calls.some((x) => x.startsWith("net."))).toBe(false);
    expect(c.log.lines).toContain("err: tpm: cannot extend the latch PCR 15: Esys_PCR_Extend: TPM_RC_LOCALITY; stopping, fail closed");
  });

  it("a latch that cannot be extended stops a root= boot before the root is mounted", async () => {
    const s = bootable("root=/dev/vda");
    s.devices.add("/dev/vda").add("/dev/tpmrm0");
    const tpm = (s.tpmFake = new FakeTpm());
    tpm.failExtend = true;
    const c = ctx(s);
    await expect(boot(c, stateFor(c))).rejects.toThrow(/cannot extend|TPM_RC_LOCALITY/);
    expect(s.calls.some((x) => x.startsWith("mount /dev/vda") || x.startsWith("execve"))).toBe(false);
  });

  it("logs a malformed cmdline value and boots with the default", async () => {
    const s = bootable("root=/dev/vda initos.rootwait=soon");
    s.devices.add("/dev/vda");
    const c = ctx(s);
    await expect(boot(c, stateFor(c))).rejects.toThrow("execve reached");
    expect(c.log.lines).toContain('err: cmdline: initos.rootwait="soon" is invalid (expected whole seconds 0-3600); using the default');
  });

  it("fails the root stage, recorded in the timeline, when the device never appears", async () => {
    const s = bootable("root=/dev/vdz initos.rootwait=0");
    const c = ctx(s);
    await expect(boot(c, stateFor(c))).rejects.toThrow("root device /dev/vdz did not appear within 0s");
    const last = c.timeline.stages.at(-1)!;
    expect(last).toMatchObject({ name: "root", ok: false, error: "root device /dev/vdz did not appear within 0s" });
    expect(s.calls.some((x) => x.startsWith("execve"))).toBe(false);
  });

  it("refuses to boot without root=", async () => {
    const c = ctx(bootable("quiet"));
    await expect(boot(c, stateFor(c))).rejects.toThrow("no root= on the kernel command line");
  });

  it("stage() records failures with their cause and rethrows", async () => {
    const c = ctx(new FakeSys());
    await expect(stage(c, "x", () => Promise.reject(new Error("boom")))).rejects.toThrow("boom");
    expect(c.timeline.stages[0]).toMatchObject({ name: "x", ok: false, error: "boom" });
    expect(c.log.lines.at(-1)).toMatch(/^err: stage x: failed after \d+ms$/);
  });
});

describe("init choice", () => {
  it("uses init= when given, else the first existing candidate, and names what it tried", () => {
    const s = new FakeSys().add("/sysroot", { kind: "dir" }).add("/sysroot/bin", { kind: "dir" }).add("/sysroot/bin/init", { kind: "file", mode: 0o755 });
    expect(chooseInit(s, parseCmdline("").cmdline, DEFAULT_CONFIG)).toBe("/bin/init");
    expect(() => chooseInit(s, parseCmdline("init=/sbin/other").cmdline, DEFAULT_CONFIG)).toThrow("no init in the root: tried /sbin/other");
  });

  it("tells systemd it was switched to from an initrd", () => {
    expect(initArgs("/lib/systemd/systemd", [])).toEqual(["--switched-root", "--system"]);
    expect(initArgs("/sbin/init", ["a"])).toEqual(["a"]);
  });
});

/** A merged-/usr Debian root on /sysroot: /sbin -> usr/sbin, /lib -> usr/lib, /usr/sbin/init -> /lib/systemd/systemd. */
function debianRoot(s = new FakeSys()): FakeSys {
  const dir = { kind: "dir" as const, dev: 2 };
  return s
    .add("/sysroot", dir)
    .add("/sysroot/sbin", { kind: "link", target: "usr/sbin", dev: 2 })
    .add("/sysroot/lib", { kind: "link", target: "usr/lib", dev: 2 })
    .add("/sysroot/bin", { kind: "link", target: "usr/bin", dev: 2 })
    .add("/sysroot/usr", dir)
    .add("/sysroot/usr/sbin", dir)
    .add("/sysroot/usr/bin", dir)
    .add("/sysroot/usr/sbin/init", { kind: "link", target: "/lib/systemd/systemd", dev: 2 })
    .add("/sysroot/usr/lib", dir)
    .add("/sysroot/usr/lib/systemd", dir)
    .add("/sysroot/usr/lib/systemd/systemd", { kind: "file", mode: 0o755, dev: 2 })
    .add("/sysroot/usr/bin/busybox", { kind: "file", mode: 0o755, dev: 2 });
}

describe("hand-off: the init is resolved inside the new root, then judged", () => {
  const cmd = (c: string) => parseCmdline(c).cmdline;

  it("/sbin/init that leads to /usr/lib/systemd/systemd is systemd: exec'd by its name, told it was switched", () => {
    const log = silentLog();
    const t = handoffTarget(debianRoot(), log, cmd("-- x"), DEFAULT_CONFIG);
    expect(t).toEqual({ init: "/sbin/init", resolved: "/usr/lib/systemd/systemd", app: ["x"] });
    expect(initArgs(t.resolved, t.app, 3)).toEqual(["--switched-root", "--system", "--deserialize", "3", "x"]);
    expect(log.lines).toContain("info: handoff: init /sbin/init is /usr/lib/systemd/systemd (systemd: switched root)");
  });

  it("a symlink that climbs out of the root resolves inside it, as exec will after the chroot", () => {
    // In the initramfs the same path would be the agent's own tree; in the root it is systemd.
    const s = debianRoot().add("/sysroot/usr/sbin/init", { kind: "link", target: "../../../../../usr/lib/systemd/systemd", dev: 2 });
    s.add("/usr/lib/systemd/systemd", { kind: "file", mode: 0o755 }); // the initramfs', never chosen
    expect(handoffTarget(s, silentLog(), cmd(""), DEFAULT_CONFIG).resolved).toBe("/usr/lib/systemd/systemd");
    const out = debianRoot().add("/sysroot/usr/sbin/init", { kind: "link", target: "/../../bin/agent-in-initramfs", dev: 2 }).add("/bin/agent-in-initramfs", { kind: "file", mode: 0o755 });
    expect(() => handoffTarget(out, silentLog(), cmd("init=/sbin/init"), DEFAULT_CONFIG)).toThrow("no init in the root: tried /sbin/init");
  });

  it("the name decides nothing: busybox linked as /lib/systemd/systemd gets no systemd arguments", () => {
    const s = debianRoot().add("/sysroot/usr/lib/systemd/systemd", { kind: "link", target: "/bin/busybox", dev: 2 });
    const t = handoffTarget(s, silentLog(), cmd("init=/lib/systemd/systemd -- a"), DEFAULT_CONFIG);
    expect(t).toEqual({ init: "/lib/systemd/systemd", resolved: "/usr/bin/busybox", app: ["a"] });
    expect(isSystemd(t.resolved)).toBe(false);
    expect(initArgs(t.resolved, t.app, 3)).toEqual(["a"]);
  });

  it("RD_TIMESTAMP becomes systemd's serialized initrd-timestamp; anything else none", () => {
    expect(initrdState("1700000000123456 4567890")).toBe("initrd-timestamp=1700000000123456 4567890\n");
    expect(initrdState(" 1 2\n")).toBe("initrd-timestamp=1 2\n");
    for (const bad of [undefined, "", "1", "1 2 3", "-1 2", "1 x", "1\n2", `1 2\ninitrd-timestamp=9 9`]) expect(initrdState(bad)).toBeNull();
  });

  it("a boot into a systemd root: exec /sbin/init --switched-root --system --deserialize FD, the fd holding the initrd's start", async () => {
    const s = debianRoot()
      .add("/proc/cmdline", { kind: "file", data: "root=/dev/vda rw" })
      .add("/etc/initos/config.json", { kind: "file", data: JSON.stringify({ modules: ["btrfs"] }) });
    s.devices.add("/dev/vda");
    const saved = process.env.RD_TIMESTAMP;
    process.env.RD_TIMESTAMP = "1700000000123456 4567890";
    try {
      const c = ctx(s);
      await expect(boot(c, stateFor(c))).rejects.toThrow("execve reached");
    } finally {
      if (saved === undefined) delete process.env.RD_TIMESTAMP;
      else process.env.RD_TIMESTAMP = saved;
    }
    expect(s.calls.at(-1)).toBe("execve /sbin/init /sbin/init --switched-root --system --deserialize 3");
    expect(s.inherited.get(3)).toEqual(["initrd-state", "initrd-timestamp=1700000000123456 4567890\n"]);
    // Made last, right before the switch (after the sidecar beside the OS and the services): only the exec inherits it.
    expect(s.calls[s.calls.indexOf("sync") - 1]).toBe("inheritableData initrd-state");
  });

  it("without RD_TIMESTAMP systemd is still told it was switched, and the log says what it lacks", async () => {
    const s = debianRoot().add("/proc/cmdline", { kind: "file", data: "root=/dev/vda" }).add("/etc/initos/config.json", { kind: "file", data: "{}" });
    s.devices.add("/dev/vda");
    const saved = process.env.RD_TIMESTAMP;
    delete process.env.RD_TIMESTAMP;
    const c = ctx(s);
    try {
      await expect(boot(c, stateFor(c))).rejects.toThrow("execve reached");
    } finally {
      if (saved !== undefined) process.env.RD_TIMESTAMP = saved;
    }
    expect(s.calls.at(-1)).toBe("execve /sbin/init /sbin/init --switched-root --system");
    expect(c.log.lines).toContain("warn: handoff: no RD_TIMESTAMP; systemd will not show the initrd's time");
  });
});

describe("hand-off: what the OS keeps of the initrd's mounts", () => {
  const HASH = "ab".repeat(32);
  const VERITY = { hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks: 25000, salt: "" };
  const cfg = AgentConfigSchema.parse({
    images: [
      { name: "modules", rootHash: HASH, verity: VERITY, binds: [{ from: "modules", to: "/lib/modules" }, { from: "firmware", to: "/lib/firmware" }] },
      { name: "tools", rootHash: HASH, verity: VERITY },
    ],
  });
  const REL = "6.1.0-57-cloud-amd64";
  const esp: EspResult = {
    disk: "/dev/vda",
    slots: [
      { name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true },
      { name: "b", partLabel: "initos-b", device: "/dev/vda2", mountPoint: "/run/initos/esp-b", booted: false },
    ],
  };
  /** Before the switch: both images verified and mounted, their binds in the initramfs, slot a's ESP mounted. */
  function machine(): FakeSys {
    const s = debianRoot()
      .add("/proc/sys/kernel/osrelease", { kind: "file", data: `${REL}\n` })
      .add("/run/initos/images/modules/modules", { kind: "dir" })
      .add(`/run/initos/images/modules/modules/${REL}`, { kind: "dir" })
      .add("/run/initos/images/modules/firmware", { kind: "dir" })
      .add("/run/initos/images/tools/usr", { kind: "dir" });
    s.mounts.push("/run", "/run/initos/esp-a", "/run/initos/images/modules", "/run/initos/images/tools", "/usr/lib/modules", "/usr/lib/firmware", "/sysroot");
    return s;
  }
  const MOUNTISH = /^(mkdirp|openDirInRoot|mount|umount|luks|close)/;

  it("binds the release's modules and the firmware read-only through the root's own /lib link, then lets go of the images and the ESP", () => {
    const s = machine();
    const log = silentLog();
    handOverMounts(s, log, cfg, esp);
    expect(s.calls.filter((c) => MOUNTISH.test(c))).toEqual([
      "mkdirp /sysroot/usr/lib/modules",
      `mkdirp /sysroot/usr/lib/modules/${REL}`,
      `openDirInRoot /sysroot /usr/lib/modules/${REL}`,
      `mount /run/initos/images/modules/modules/${REL} /proc/self/fd/100 null 0x1000`,
      "close 100",
      `mount null /sysroot/usr/lib/modules/${REL} null 0x1027`, // bind remount: read-only, nosuid, nodev
      "mkdirp /sysroot/usr/lib/firmware",
      "openDirInRoot /sysroot /usr/lib/firmware",
      "mount /run/initos/images/modules/firmware /proc/self/fd/101 null 0x1000",
      "close 101",
      "mount null /sysroot/usr/lib/firmware null 0x1027",
      "mkdirp /run/mount",
      "umount /run/initos/images/modules 2", // lazily: the binds keep the verity device open
      "umount /run/initos/images/tools 2",
      "luks.close initos-tools", // nothing uses it any more
      "umount /run/initos/esp-a 2", // slot b was never mounted
    ]);
    expect(s.mountPoints().filter((m) => m.startsWith("/run/initos"))).toEqual([]);
    // systemd leaves them to systemd-shutdown (x-initrd.mount): unmounted last, before the DM devices go.
    expect(s.readFile(UTAB)).toBe(
      [
        `SRC=/dev/mapper/initos-modules TARGET=/usr/lib/modules/${REL} ROOT=/modules/${REL} OPTS=x-initrd.mount`,
        "SRC=/dev/mapper/initos-modules TARGET=/usr/lib/firmware ROOT=/firmware OPTS=x-initrd.mount",
        "",
      ].join("\n"),
    );
    expect(log.lines).toContain(`info: image modules: modules/${REL} bound read-only on the OS's /lib/modules/${REL} (/usr/lib/modules/${REL})`);
    expect(log.lines).toContain("info: image tools: unmounted and closed");
    expect(log.lines).toContain("info: esp: unmounted /run/initos/esp-a");
  });

  it("an image the sidecar beside the OS runs from is unmounted here but not closed (no retried removal)", () => {
    const s = machine();
    const log = silentLog();
    handOverMounts(s, log, cfg, esp, ["tools"]);
    expect(s.calls).toContain("umount /run/initos/images/tools 2");
    expect(s.calls.some((c) => c.startsWith("luks.close initos-tools"))).toBe(false);
    expect(log.lines).toContain("info: image tools: unmounted from /run/initos/images/tools; open for the sidecar beside the OS");
  });

  it("an image something else still holds is unmounted and left open, with the reason", () => {
    const s = machine();
    s.failOn.set("luks.close initos-tools", new Error("close initos-tools: Device or resource busy"));
    const log = silentLog();
    handOverMounts(s, log, cfg, esp);
    expect(log.lines).toContain("info: image tools: unmounted from /run/initos/images/tools; still open (close initos-tools: Device or resource busy)");
  });

  it("existing mount points are used as they are (a root that has /lib/modules/<release> and /lib/firmware)", () => {
    const s = machine().add("/sysroot/usr/lib/modules", { kind: "dir", dev: 2 }).add(`/sysroot/usr/lib/modules/${REL}`, { kind: "dir", dev: 2 }).add("/sysroot/usr/lib/firmware", { kind: "dir", dev: 2 });
    handOverMounts(s, silentLog(), cfg, esp);
    expect(s.calls.filter((c) => c.startsWith("mkdirp /sysroot"))).toEqual([]);
  });

  it("a read-only root without /lib/modules/<release>: the image's whole tree over its /lib/modules, said in one line", () => {
    const s = machine().add("/sysroot/usr/lib/modules", { kind: "dir", dev: 2 });
    const erofs = (p: string) => Object.assign(new Error(`EROFS: read-only file system, mkdir '${p}'`), { code: "EROFS" });
    s.failOn.set(`mkdirp /sysroot/usr/lib/modules/${REL}`, erofs(`/sysroot/usr/lib/modules/${REL}`));
    s.failOn.set("mkdirp /sysroot/usr/lib/firmware", erofs("/sysroot/usr/lib/firmware"));
    const log = silentLog();
    handOverMounts(s, log, cfg, esp);
    expect(s.calls.filter((c) => c.startsWith("mount /run/initos/images"))).toEqual(["mount /run/initos/images/modules/modules /proc/self/fd/100 null 0x1000"]);
    expect(log.lines.filter((l) => /^(warn|err):/.test(l))).toEqual([
      `warn: image modules: read-only root has no /lib/modules/${REL}; its /lib/modules is hidden under the image's`,
      "warn: image modules: /lib/firmware not bound for the OS: EROFS: read-only file system, mkdir '/sysroot/usr/lib/firmware'",
    ]);
    expect(s.readFile(UTAB)).toBe("SRC=/dev/mapper/initos-modules TARGET=/usr/lib/modules ROOT=/modules OPTS=x-initrd.mount\n");
  });

  it("a read-only root with no /lib at all (the tiny test root): a warning per bind, nothing bound or marked", () => {
    const s = machine();
    for (const p of ["/sysroot/lib", "/sysroot/usr/lib", "/sysroot/usr/lib/systemd", "/sysroot/usr/lib/systemd/systemd"]) s.files.delete(p);
    s.failOn.set("mkdirp /sysroot/lib", Object.assign(new Error("EROFS: read-only file system, mkdir '/sysroot/lib'"), { code: "EROFS" }));
    const log = silentLog();
    handOverMounts(s, log, cfg, esp);
    expect(log.lines.filter((l) => /^(warn|err):/.test(l))).toEqual([
      `warn: image modules: /lib/modules/${REL} not bound for the OS: EROFS: read-only file system, mkdir '/sysroot/lib'`,
      "warn: image modules: /lib/firmware not bound for the OS: EROFS: read-only file system, mkdir '/sysroot/lib'",
    ]);
    expect(s.calls.filter((c) => c.startsWith("mount "))).toEqual([]);
    expect(s.readFile(UTAB)).toBeNull();
    expect(s.calls).toContain("umount /run/initos/esp-a 2");
  });

  it("a root whose /lib leads out of it: the mount point is made and bound inside the root, never in the initramfs", () => {
    const s = machine().add("/sysroot/lib", { kind: "link", target: "../../../../run/initos/images/tools", dev: 2 });
    handOverMounts(s, silentLog(), cfg, esp);
    const targets = [...s.openedInRoot.values()];
    expect(targets).toEqual([`/sysroot/run/initos/images/tools/modules/${REL}`, "/sysroot/run/initos/images/tools/firmware"]);
    expect(s.calls.filter((c) => c.startsWith("mkdirp ") && !c.startsWith("mkdirp /sysroot/") && c !== "mkdirp /run/mount")).toEqual([]);
  });

  it("a file in the way: one line, that bind skipped, the rest goes on", () => {
    const s = machine().add("/sysroot/usr/lib/firmware", { kind: "file", dev: 2 });
    const log = silentLog();
    handOverMounts(s, log, cfg, esp);
    expect(log.lines.filter((l) => l.startsWith("err:"))).toEqual(["err: image modules: /lib/firmware not bound for the OS: /lib/firmware: /usr/lib/firmware is not a directory in the root"]);
    expect(s.calls).toContain(`mount null /sysroot/usr/lib/modules/${REL} null 0x1027`);
    expect(s.calls).toContain("umount /run/initos/esp-a 2");
  });

  it("VMs (no images, no ESP): nothing to keep, nothing to let go", () => {
    const s = debianRoot();
    handOverMounts(s, silentLog(), DEFAULT_CONFIG);
    expect(s.calls.filter((c) => MOUNTISH.test(c))).toEqual([]);
  });
});

describe("failure policy", () => {
  it("logs the cause, writes diagnostics, waits, syncs and reboots", async () => {
    const s = new FakeSys().add("/proc/cmdline", { kind: "file", data: "root=/dev/vdz\n" });
    const log = silentLog();
    let slept = 0;
    s.sleep = async (ms: number) => {
      slept += ms;
      if (slept > 10_000) throw new Error("stop"); // the loop after a refused reboot
    };
    s.failOn.set("reboot", new Error("EPERM"));
    await expect(applyFailurePolicy(s, log, new Timeline("/x/boot.json"), new Error("root device /dev/vdz did not appear within 3s"), 2)).rejects.toThrow("stop");
    expect(log.lines[0]).toBe("err: boot failed: root device /dev/vdz did not appear within 3s");
    expect(s.readFile(DIAG_PATH)).toMatch(/^reason: root device \/dev\/vdz did not appear within 3s\n[\s\S]*## cmdline \(\/proc\/cmdline\)\nroot=\/dev\/vdz/);
    expect(log.lines).toContain("err: rebooting in 2s");
    expect(s.calls.slice(-2)).toEqual(["sync", "reboot 0x1234567"]);
    expect(log.lines).toContain("err: reboot failed: EPERM; halting here");
  });

  it("picks the delay: initos.reboot_delay, then panic=, then the config", () => {
    const cfg = { ...DEFAULT_CONFIG, rebootDelaySeconds: 17 };
    expect(rebootDelay({ cmdline: parseCmdline("initos.reboot_delay=4 panic=9").cmdline, config: cfg })).toBe(4);
    expect(rebootDelay({ cmdline: parseCmdline("panic=9").cmdline, config: cfg })).toBe(9);
    expect(rebootDelay({ cmdline: parseCmdline("panic=-1").cmdline, config: cfg })).toBe(17);
    expect(rebootDelay({})).toBe(30);
  });
});

describe("agent config", () => {
  it("fills defaults and rejects unknown keys and bad values with the path", () => {
    expect(parseConfig('{"modules":["btrfs"]}').config).toEqual({ ...DEFAULT_CONFIG, modules: ["btrfs"] });
    expect(parseConfig('{"modulez":[]}').error).toMatch(/config: \/etc\/initos\/config.json: \(top level\): .*modulez/);
    expect(parseConfig('{"rootWaitSeconds":-1}').error).toMatch(/rootWaitSeconds: /);
    expect(parseConfig('{"modules":["a b"]}').error).toMatch(/modules\.0: expected a module name/);
    expect(parseConfig("{").error).toMatch(/is not JSON/);
    expect(parseConfig(null)).toEqual({ config: DEFAULT_CONFIG, error: "config: /etc/initos/config.json missing; using defaults" });
  });
});
