import { describe, expect, it } from "vitest";
import { boot, chooseInit, initArgs, rebootDelay, stage, startFailureSidecar, whyNoUnseal, type BootContext } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG, parseConfig } from "../../agent/config.ts";
import { applyFailurePolicy, DIAG_PATH } from "../../agent/failure.ts";
import { Timeline } from "../../agent/log.ts";
import { Coldplug, waitUntil } from "../../agent/stages/devices.ts";
import { mountApiFilesystems, readSecureBoot, secureBootFromBootParams, setupEarly } from "../../agent/stages/early.ts";
import { RecoverySidecar } from "../../agent/stages/recovery.ts";
import { FakeTpm } from "./faketpm.ts";
import { extendPcr } from "../../agent/diskkey/policy.ts";
import { LATCH_DIGEST } from "../../agent/diskkey/latch.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

function ctx(sys: FakeSys): BootContext & { log: ReturnType<typeof silentLog> } {
  return { sys, log: silentLog(), timeline: new Timeline("/nonexistent/boot.json") };
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
    const got = await waitUntil(s, silentLog(), new Coldplug(s, silentLog()), "root device LABEL=root", 10, () => s.resolveDevice("LABEL=root"), () => 0);
    expect(got).toBe("LABEL=root");
    expect(s.sleeps).toBe(3);
    expect(s.calls.filter((c) => c.startsWith("loadModule"))).toEqual(["loadModule virtio:d00000002v00001AF4"]);
  });

  it("gives up after the bound with a line naming what it waited for and how long", async () => {
    const s = new FakeSys();
    let t = 0;
    s.sleep = async () => void (t += 50);
    await expect(waitUntil(s, silentLog(), new Coldplug(s, silentLog()), "root device /dev/vdz", 2, () => null, () => t)).rejects.toThrow(
      "root device /dev/vdz did not appear within 2s",
    );
    expect(t).toBe(2000);
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

  const st = () => ({ sidecar: new RecoverySidecar() });

  it("runs early → modules → root → handoff and execs the init with the app args", async () => {
    const s = bootable("root=/dev/vda rootflags=subvol=@ -- x y");
    s.devices.add("/dev/vda");
    const c = ctx(s);
    await expect(boot(c, st())).rejects.toThrow("execve reached");
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
    ]);
  });

  it("a path that does not unseal (root= on the cmdline) latches before it mounts a root; PCR 11 leaves the initrd before the exec", async () => {
    const s = bootable("root=/dev/vda rootflags=subvol=@");
    s.devices.add("/dev/vda").add("/dev/tpmrm0");
    s.add("/sys/firmware/acpi/tables/TPM2", { kind: "file" });
    const tpm = (s.tpmFake = new FakeTpm());
    const c = ctx(s);
    await expect(boot(c, st())).rejects.toThrow("execve reached");
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
    const state = { sidecar: new RecoverySidecar(), config: keyed, cmdline: parseCmdline("initos.ip=10.0.2.15/24 initos.gw=10.0.2.2").cmdline };
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
    await expect(boot(ctx(s), st())).rejects.toThrow(/cannot extend|TPM_RC_LOCALITY/);
    expect(s.calls.some((x) => x.startsWith("mount /dev/vda") || x.startsWith("execve"))).toBe(false);
  });

  it("logs a malformed cmdline value and boots with the default", async () => {
    const s = bootable("root=/dev/vda initos.rootwait=soon");
    s.devices.add("/dev/vda");
    const c = ctx(s);
    await expect(boot(c, st())).rejects.toThrow("execve reached");
    expect(c.log.lines).toContain('err: cmdline: initos.rootwait="soon" is invalid (expected whole seconds 0-3600); using the default');
  });

  it("fails the root stage, recorded in the timeline, when the device never appears", async () => {
    const s = bootable("root=/dev/vdz initos.rootwait=0");
    const c = ctx(s);
    await expect(boot(c, st())).rejects.toThrow("root device /dev/vdz did not appear within 0s");
    const last = c.timeline.stages.at(-1)!;
    expect(last).toMatchObject({ name: "root", ok: false, error: "root device /dev/vdz did not appear within 0s" });
    expect(s.calls.some((x) => x.startsWith("execve"))).toBe(false);
  });

  it("refuses to boot without root=", async () => {
    await expect(boot(ctx(bootable("quiet")), st())).rejects.toThrow("no root= on the kernel command line");
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
