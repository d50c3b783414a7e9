// After switch_root has chrooted into the OS (the point of no return), a failure only logs and
// reboots: the failure policy must not write diagnostics or start the recovery sidecar, whose
// setup writes /etc/passwd, /etc/group, /etc/shells and /root/.ssh into whatever "/" is.
import { describe, expect, it } from "vitest";
import { boot, type BootContext, type BootState, failBoot, startFailureSidecar } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { applyFailurePolicy } from "../../agent/failure.ts";
import { Timeline } from "../../agent/log.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const KEYS = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBn0test initos-test"];
/** What must never happen once "/" may be the OS: writes, the network, sshd, the TPM. */
const TOUCHES_THE_OS = /^(writeFile|mkdirp|copyFile|symlink|unlink|spawnDetached|net\.|tpm|runWithInput|run )/;

function ctx(sys: FakeSys): BootContext & { log: ReturnType<typeof silentLog> } {
  return { sys, log: silentLog(), timeline: new Timeline("/nonexistent/boot.json") };
}

/** sleep() as the policy uses it: short waits pass, the endless wait after reboot stops the test. */
function stopAtTheEnd(s: FakeSys): void {
  s.sleep = async (ms: number) => {
    if (ms >= 3_600_000) throw new Error("stop");
  };
}

/** The early stage's facts, for a state the boot did not fill in itself. */
const EARLY = { secureBoot: "off" as const, efivars: Promise.resolve(false) };

describe("failure policy past the point of no return", () => {
  it("only logs and reboots: no diagnostics written, no recovery sidecar", async () => {
    const s = new FakeSys();
    stopAtTheEnd(s);
    const log = silentLog();
    let recoveryAsked = false;
    const recovery = async () => ((recoveryAsked = true), true);
    await expect(applyFailurePolicy(s, log, new Timeline("/x/boot.json"), new Error('execve("/sbin/init"): ENOENT'), 2, recovery, true)).rejects.toThrow("stop");
    expect(recoveryAsked).toBe(false);
    expect(s.calls.filter((c) => TOUCHES_THE_OS.test(c))).toEqual([]);
    expect(s.calls.slice(-2)).toEqual(["sync", "reboot 0x1234567"]);
    expect(log.lines).toEqual([
      'err: boot failed: execve("/sbin/init"): ENOENT',
      "err: past switch_root: / is the OS now; nothing is written into it and no recovery sidecar starts",
      "err: rebooting in 2s",
    ]);
  });

  it("the recovery sidecar refuses to start, touching nothing (not even the TPM)", async () => {
    const s = new FakeSys();
    const c = ctx(s);
    const config = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: KEYS } };
    const state: BootState = { remote: new RemoteAdmin(s, c.log), inputs: { config, cmdline: parseCmdline("initos.ip=10.0.2.15/24 initos.gw=10.0.2.2").cmdline, early: EARLY }, pastPointOfNoReturn: true };
    expect(await startFailureSidecar(c, state)).toBe(false);
    expect(state.tpm).toBeUndefined();
    expect(s.calls).toEqual([]);
    expect(c.log.lines).toEqual([]);
  });

  it("end to end: the init's execve fails after the chroot; the boot state says so, and the failure only reboots", async () => {
    const s = new FakeSys()
      .add("/proc/cmdline", { kind: "file", data: "root=/dev/vda rootflags=subvol=@ rw initos.reboot_delay=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" })
      .add("/etc/initos/config.json", { kind: "file", data: JSON.stringify({ modules: [], ssh: { authorizedKeys: KEYS } }) })
      .add("/sysroot", { kind: "dir", dev: 2 })
      .add("/sysroot/sbin", { kind: "dir", dev: 2 })
      .add("/sysroot/sbin/init", { kind: "file", mode: 0o755, dev: 2 }); // a script whose interpreter is missing
    s.devices.add("/dev/vda");
    s.failOn.set("execve", Object.assign(new Error('execve("/sbin/init", "/sbin/init"): ENOENT'), { errno: 2 }));
    const c = ctx(s);
    const state: BootState = { remote: new RemoteAdmin(s, c.log) };
    const error = await boot(c, state).catch((e: unknown) => e);
    expect((error as Error).message).toBe('execve("/sbin/init", "/sbin/init"): ENOENT');
    expect(state.pastPointOfNoReturn).toBe(true);
    const chroot = s.calls.indexOf("chroot .") >= 0 ? s.calls.indexOf("chroot .") : s.calls.indexOf("pivotRoot . .");
    expect(chroot).toBeGreaterThan(0);

    stopAtTheEnd(s);
    await expect(failBoot(c, state, error)).rejects.toThrow("stop");
    const after = s.calls.slice(chroot + 1);
    expect(after.filter((x) => TOUCHES_THE_OS.test(x))).toEqual([]);
    expect(after.slice(-2)).toEqual(["sync", "reboot 0x1234567"]);
    expect(c.log.lines.filter((l) => l.startsWith("err:")).slice(-3)).toEqual([
      'err: boot failed: execve("/sbin/init", "/sbin/init"): ENOENT',
      "err: past switch_root: / is the OS now; nothing is written into it and no recovery sidecar starts",
      "err: rebooting in 1s",
    ]);
  });

  it("before the point of no return the policy is unchanged: diagnostics, then the recovery sidecar is asked", async () => {
    const s = new FakeSys();
    stopAtTheEnd(s);
    const c = ctx(s);
    const state: BootState = { remote: new RemoteAdmin(s, c.log), inputs: { config: DEFAULT_CONFIG, cmdline: parseCmdline("root=/dev/vdz").cmdline, early: EARLY } };
    await expect(failBoot(c, state, new Error("root device /dev/vdz did not appear within 3s"))).rejects.toThrow("stop");
    expect(s.calls).toContain("writeFile /run/initos/failure.txt");
    expect(c.log.lines).toContain("warn: tpm: none (the firmware announces no TPM2)"); // the sidecar's latch step ran
    expect(s.calls.slice(-2)).toEqual(["sync", "reboot 0x1234567"]);
  });
});
