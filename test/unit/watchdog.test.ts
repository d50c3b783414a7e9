// Arming the trial's watchdog on the fake machine: a hardware one when a driver bound it, else
// softdog, said in one line with what it covers; petting from the clock. softdog resetting a
// real guest is measured in test/integration/watchdog.test.ts.
import { describe, expect, it } from "vitest";
import { Coldplug } from "../../agent/stages/devices.ts";
import { armWatchdog, keepPetting, SOFTDOG_IDENTITY } from "../../agent/stages/watchdog.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

function watchdogDevice(sys: FakeSys, n: number, identity: string, maxTimeout?: number): void {
  sys.add(`/sys/class/watchdog/watchdog${n}/identity`, { kind: "file", data: `${identity}\n` });
  sys.watchdogDevices.set(`/dev/watchdog${n}`, { identity, maxTimeout });
}

describe("armWatchdog", () => {
  it("uses a hardware watchdog a driver bound, even when softdog is there too", () => {
    const sys = new FakeSys();
    watchdogDevice(sys, 0, SOFTDOG_IDENTITY);
    watchdogDevice(sys, 1, "i6300ESB timer");
    const log = silentLog();
    const dog = armWatchdog(sys, log, new Coldplug(sys, log), 60)!;
    expect(dog.kind).toBe("hardware");
    expect(dog.handle.path).toBe("/dev/watchdog1");
    expect(sys.calls).not.toContain("loadModule softdog");
    expect(log.lines).toContain("info: watchdog: i6300ESB timer (hardware) on /dev/watchdog1, 60s: resets the machine on any hang, the kernel's too");
  });

  it("loads softdog when there is no watchdog, and says what it does not cover", () => {
    const sys = new FakeSys();
    sys.loadModule = (name: string) => {
      sys.calls.push(`loadModule ${name}`);
      if (name === "softdog") watchdogDevice(sys, 0, SOFTDOG_IDENTITY);
      return { modules: [name], matched: [name] };
    };
    const log = silentLog();
    const dog = armWatchdog(sys, log, new Coldplug(sys, log), 30)!;
    expect(dog.kind).toBe("softdog");
    expect(sys.calls).toEqual(["loadModule softdog", "openWatchdog /dev/watchdog0 30"]);
    expect(sys.watchdogState.get("/dev/watchdog0")?.state).toBe("armed");
    expect(log.lines).toEqual(["info: watchdog: softdog on /dev/watchdog0, 30s: catches hangs of the agent and of userspace, not of the kernel"]);
  });

  it("says when the driver did not take the timeout asked", () => {
    const sys = new FakeSys();
    watchdogDevice(sys, 0, "iTCO_wdt", 10);
    const log = silentLog();
    expect(armWatchdog(sys, log, new Coldplug(sys, log), 60)!.handle.timeout).toBe(10);
    expect(log.lines[0]).toBe("info: watchdog: iTCO_wdt (hardware) on /dev/watchdog0, 10s (asked 60s): resets the machine on any hang, the kernel's too");
  });

  it("arms none, and says why, when there is no softdog module or the device cannot be opened", () => {
    const sys = new FakeSys();
    sys.loadModule = () => ({ modules: [], matched: [] });
    const log = silentLog();
    expect(armWatchdog(sys, log, new Coldplug(sys, log), 60)).toBeNull();
    expect(log.lines).toEqual(["warn: watchdog: no hardware watchdog and no softdog module: none armed"]);

    const sys2 = new FakeSys();
    sys2.add("/sys/class/watchdog/watchdog0/identity", { kind: "file", data: "wdat_wdt\n" }); // no device node
    const log2 = silentLog();
    expect(armWatchdog(sys2, log2, new Coldplug(sys2, log2), 60)).toBeNull();
    expect(log2.lines).toEqual(["warn: watchdog: open /dev/watchdog0: ENOENT: none armed"]);
  });
});

describe("keepPetting", () => {
  it("pets every third of the timeout until stopped; the watchdog stays armed", () => {
    const sys = new FakeSys();
    watchdogDevice(sys, 0, SOFTDOG_IDENTITY);
    const dog = sys.openWatchdog("/dev/watchdog0", 30);
    const stop = keepPetting(sys, silentLog(), dog);
    expect(sys.watchdogState.get("/dev/watchdog0")!.pets).toBe(1);
    sys.advance(30_000);
    expect(sys.watchdogState.get("/dev/watchdog0")!.pets).toBe(4);
    stop();
    sys.advance(60_000);
    expect(sys.watchdogState.get("/dev/watchdog0")).toEqual({ state: "armed", pets: 4, timeout: 30 });
    dog.release();
    expect(sys.watchdogState.get("/dev/watchdog0")!.state).toBe("released");
  });

  it("logs a failing pet once and stops", () => {
    const sys = new FakeSys();
    watchdogDevice(sys, 0, SOFTDOG_IDENTITY);
    const dog = sys.openWatchdog("/dev/watchdog0", 3);
    const log = silentLog();
    keepPetting(sys, log, dog);
    dog.disarm();
    sys.advance(10_000);
    expect(log.lines).toEqual(["err: watchdog: pet failed: /dev/watchdog0: already closed"]);
    expect(sys.timers).toEqual([]);
  });
});
