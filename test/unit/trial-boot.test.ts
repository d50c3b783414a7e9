// The trial stage at boot and the failure policy during a trial, on FakeSys with the update
// record as the firmware would hold it (efivarfs: 4 attribute bytes, then the JSON).
import { describe, expect, it } from "vitest";
import { failBoot, type BootContext, type BootState } from "../../agent/boot.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { EFIVARS_DIR, INITOS_GUID } from "../../agent/efi/vars.ts";
import { Timeline } from "../../agent/log.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { startTrial } from "../../agent/stages/trial.ts";
import { UPDATE_VAR } from "../../agent/update/firmware.ts";
import type { UpdateState } from "../../agent/update/trial.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const RECORD = `${EFIVARS_DIR}/${UPDATE_VAR}-${INITOS_GUID}`;
const BOOT_NEXT = `${EFIVARS_DIR}/BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c`;
const esp = (booted: "a" | "b"): EspResult => ({
  disk: "/dev/vda",
  slots: ["a", "b"].map((n, i) => ({ name: n, partLabel: `initos-${n}`, device: `/dev/vda${i + 1}`, mountPoint: `/run/initos/esp-${n}`, booted: n === booted })),
});
const trial = { slot: "b", entry: 2, version: 7, from: { slot: "a", version: 6 }, started: false };

function machine(state: UpdateState): FakeSys {
  const s = new FakeSys();
  s.add(EFIVARS_DIR, { kind: "dir" });
  s.add(RECORD, { kind: "file", data: `\x07\x00\x00\x00${JSON.stringify(state)}` });
  s.add("/proc/uptime", { kind: "file", data: "30.0 1.0\n" });
  // softdog, once loaded: the only watchdog of the UKI's kernel
  s.add("/sys/class/watchdog/watchdog0/identity", { kind: "file", data: "Software Watchdog\n" });
  s.watchdogDevices.set("/dev/watchdog0", { identity: "Software Watchdog" });
  return s;
}
/** The images, as the boot's promise of them: already there. */
const ready = async () => {};
const record = (s: FakeSys): UpdateState => JSON.parse((s.readFile(RECORD) ?? "").slice(4)) as UpdateState;

describe("the trial stage", () => {
  it("the trial boot marks the trial started and arms the watchdog with the config's timeout", async () => {
    const s = machine({ failed: [], trial });
    const log = silentLog();
    const u = await startTrial(s, log, new Coldplug(s, log), { ...DEFAULT_CONFIG, version: 7, update: { ...DEFAULT_CONFIG.update, watchdogSeconds: 20 } }, esp("b"), ready);
    expect(u.run?.trial.version).toBe(7);
    expect(record(s).trial?.started).toBe(true);
    expect(s.calls).toContain("openWatchdog /dev/watchdog0 20");
    expect(s.watchdogState.get("/dev/watchdog0")).toMatchObject({ state: "armed", pets: 1 });
    expect(log.lines.join("\n")).toMatch(/this boot is the trial of version 7 in slot b/);
  });

  it("a boot that is no trial does not wait for the images; a trial waits for them before it arms the watchdog", async () => {
    const never = () => new Promise<never>(() => {});
    const plain = machine({ failed: [] });
    expect((await startTrial(plain, silentLog(), new Coldplug(plain, silentLog()), { ...DEFAULT_CONFIG, version: 6 }, esp("a"), never)).run).toBeUndefined();
    const s = machine({ failed: [], trial });
    let imagesIn!: () => void;
    const images = new Promise<void>((res) => (imagesIn = res));
    const started = startTrial(s, silentLog(), new Coldplug(s, silentLog()), { ...DEFAULT_CONFIG, version: 7 }, esp("b"), () => images);
    await new Promise((r) => setTimeout(r, 0));
    expect(s.calls.some((c) => c.startsWith("openWatchdog"))).toBe(false); // softdog is in the modules image
    imagesIn();
    expect((await started).run?.trial.version).toBe(7);
    expect(s.calls.some((c) => c.startsWith("openWatchdog"))).toBe(true);
  });

  it("the old slot after BootNext was used: the version is recorded failed, no watchdog", async () => {
    const s = machine({ failed: [], trial });
    const log = silentLog();
    const u = await startTrial(s, log, new Coldplug(s, log), { ...DEFAULT_CONFIG, version: 6 }, esp("a"), ready);
    expect(u.run).toBeUndefined();
    expect(record(s)).toMatchObject({ failed: [7], last: { version: 7, outcome: "failed" } });
    expect(record(s).trial).toBeUndefined();
    expect(s.calls.some((c) => c.startsWith("openWatchdog"))).toBe(false);
    expect(log.lines.join("\n")).toMatch(/err: update: the trial of version 7 in slot b did not commit .*back on slot a \(version 6\)/);
  });

  it("BootNext still pending: nothing changes, nothing armed", async () => {
    const s = machine({ failed: [], trial });
    s.add(BOOT_NEXT, { kind: "file", data: "\x07\x00\x00\x00\x02\x00" });
    const log = silentLog();
    await startTrial(s, log, new Coldplug(s, log), { ...DEFAULT_CONFIG, version: 6 }, esp("a"), ready);
    expect(record(s).trial).toEqual(trial);
    expect(s.calls.some((c) => c.startsWith("writeOnce"))).toBe(false);
  });

  it("an unreadable record does not stop the boot", async () => {
    const s = machine({ failed: [] });
    s.add(RECORD, { kind: "file", data: "\x07\x00" }); // shorter than its attribute bytes
    const log = silentLog();
    expect((await startTrial(s, log, new Coldplug(s, log), DEFAULT_CONFIG, esp("a"), ready)).run).toBeUndefined();
    expect(log.lines.join("\n")).toMatch(/cannot read the update record/);
  });

  it("no EFI variables (a direct kernel boot): no firmware, no trial", async () => {
    const s = new FakeSys();
    const log = silentLog();
    expect(await startTrial(s, log, new Coldplug(s, log), DEFAULT_CONFIG, esp("a"), ready)).toEqual({ firmware: null });
  });
});

describe("a failure during a trial", () => {
  it("reboots into the old slot at once: no recovery sidecar, whatever the config offers", async () => {
    const s = machine({ failed: [], trial });
    const log = silentLog();
    const ctx: BootContext = { sys: s, log, timeline: new Timeline("/nonexistent/boot.json") };
    const config = { ...DEFAULT_CONFIG, version: 7, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: ["ssh-ed25519 AAAA test"] } };
    const cmdline = parseCmdline("initos.ip=10.0.2.15/24 initos.reboot_delay=1").cmdline;
    const state: BootState = { remote: new RemoteAdmin(s, log), inputs: { cmdline, config, early: { secureBoot: "on", efivars: Promise.resolve(true) } } };
    state.update = await startTrial(s, log, new Coldplug(s, log), config, esp("b"), ready);
    let slept = 0;
    s.sleep = async (ms: number) => {
      slept += ms;
      if (slept > 5_000) throw new Error("stop");
    };
    await expect(failBoot(ctx, state, new Error("root device did not appear"))).rejects.toThrow("stop");
    expect(log.lines).toContain("err: update: the trial of version 7 failed; rebooting into slot a");
    expect(s.calls).toContain("reboot 0x1234567");
    // Without the trial the same failure brings the network up for the recovery sidecar (seen).
    expect(s.calls.some((c) => c.startsWith("net.") || c.startsWith("serveLines"))).toBe(false);
  });
});
