// PID 1 of the guest in test/integration/watchdog.test.ts (compiled with bun build --compile,
// started by preinit): the agent's watchdog and EFI code on a real kernel. The scenario comes
// from the cmdline (initos.wdtest=...); lines starting with WDTEST are for the test, with the
// guest's uptime so the test can compare them with the kernel's timestamps.
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { bootCurrent, bootNext, bootOrder, clearBootNext, ensureBootEntry, listBootEntries, setBootNext, setBootOrder } from "../../agent/efi/bootentries.ts";
import { formatDevicePath } from "../../agent/efi/loadopt.ts";
import { deleteVar, EFIVARS_DIR, INITOS_GUID, readVar, varPath, writeVar } from "../../agent/efi/vars.ts";
import { KmsgLogger } from "../../agent/log.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { armWatchdog, keepPetting } from "../../agent/stages/watchdog.ts";
import { RB } from "../../agent/sys/consts.ts";
import { realSys } from "../../agent/sys/index.ts";

const up = () => Number(readFileSync("/proc/uptime", "utf8").split(" ")[0]);
const say = (msg: string) => console.log(`WDTEST ${msg} @${up().toFixed(2)}`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const scenario = /initos\.wdtest=(\S+)/.exec(readFileSync("/proc/cmdline", "utf8"))?.[1] ?? "none";
const sys = await realSys();
const log = new KmsgLogger();

/** O_CLOEXEC of the fd open on `dev`, from /proc/self/fdinfo (flags are octal). */
function cloexec(dev: string): boolean | null {
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) !== dev) continue;
      const flags = /flags:\s+(\d+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, "utf8"))![1]!;
      return (parseInt(flags, 8) & 0o2000000) !== 0;
    } catch {
      // the fd of readdir itself, gone by now
    }
  }
  return null;
}

/** Keeps the event loop (and PID 1) alive until the watchdog resets the machine. */
async function aliveUntilReset(): Promise<never> {
  for (;;) {
    say("alive");
    await sleep(1000);
  }
}

async function main(): Promise<void> {
  say(`scenario ${scenario}`);
  if (scenario === "magic-then-hang" || scenario === "release") {
    const dog = armWatchdog(sys, log, new Coldplug(sys, log), 5);
    if (!dog) throw new Error("no watchdog armed");
    say(`armed ${dog.kind} ${dog.handle.path} identity="${dog.handle.identity}" timeout=${dog.handle.timeout} options=0x${dog.handle.options.toString(16)} cloexec=${cloexec(dog.handle.path)} timeleft=${dog.handle.timeLeft()}`);
    say(`nowayout=${readFileSync("/sys/class/watchdog/watchdog0/nowayout", "utf8").trim()}`);
    // Petted from the event loop for twice the timeout: no reset.
    const stop = keepPetting(sys, log, dog.handle);
    await sleep(10_000);
    stop();
    say("petted for 10s");
    if (scenario === "release") {
      dog.handle.release();
      say("released");
      return aliveUntilReset();
    }
    dog.handle.disarm();
    say("disarmed");
    await sleep(15_000);
    say("survived magic close");
    const again = sys.openWatchdog(dog.handle.path, 5);
    // The uptime just before the pet too: the pet is between the two readings, however long the
    // guest stalls (TCG on a loaded host), so the test bounds the interval from both sides.
    const before = up();
    again.pet();
    say(`last pet after ${before.toFixed(2)}`);
    return aliveUntilReset();
  }
  if (scenario === "efi") {
    sys.loadModule("efivarfs"); // a module in this kernel, as the early stage knows
    sys.mount("efivarfs", EFIVARS_DIR, "efivarfs", 0);
    // Our own variable: created, then (efivarfs marks it immutable once it exists) rewritten and deleted.
    writeVar(sys, "InitosTest", INITOS_GUID, Buffer.from("one"));
    const p = varPath("InitosTest", INITOS_GUID);
    say(`created immutable=${sys.setImmutable(p, true)}`);
    writeVar(sys, "InitosTest", INITOS_GUID, Buffer.from("two"));
    say(`rewritten value=${Buffer.from(readVar(sys, "InitosTest", INITOS_GUID)!.data).toString()} immutable-after=${sys.setImmutable(p, true)}`);
    say(`deleted=${deleteVar(sys, "InitosTest", INITOS_GUID)} gone=${readVar(sys, "InitosTest", INITOS_GUID) === null}`);
    for (const e of listBootEntries(sys)) say(`entry ${e.name} ${e.option ? `"${e.option.description}" ${formatDevicePath(e.option.filePaths[0]!)}` : e.error}`);
    new Coldplug(sys, log).scan();
    const num = ensureBootEntry(sys, log, { description: "initos test", partition: "/dev/vda2", path: "\\EFI\\BOOT\\BOOTX64.EFI" });
    say(`ensured Boot${num.toString(16).toUpperCase().padStart(4, "0")}`);
    say(`ensured again ${ensureBootEntry(sys, log, { description: "other name", partition: "/dev/vda2", path: "/efi/boot/bootx64.efi" }) === num}`);
    setBootNext(sys, num);
    say(`BootNext=${bootNext(sys)}`);
    clearBootNext(sys);
    say(`BootNext after clear=${bootNext(sys)}`);
    say("done");
    sys.sync();
    sys.reboot(RB.POWER_OFF);
  }
  if (scenario === "efi-next" || scenario === "booted") {
    sys.loadModule("efivarfs");
    sys.mount("efivarfs", EFIVARS_DIR, "efivarfs", 0);
    new Coldplug(sys, log).scan();
    if (scenario === "efi-next") {
      // The trial: an entry for slot B's loader, BootNext to it, BootOrder left alone.
      const num = ensureBootEntry(sys, log, { description: "initos B", partition: "/dev/vda2", path: "\\EFI\\initos\\b.efi" });
      setBootNext(sys, num);
      say(`next ${num} order=${JSON.stringify(bootOrder(sys))}`);
    } else {
      const current = bootCurrent(sys);
      const order = bootOrder(sys) ?? [];
      say(`booted current=${current} next=${bootNext(sys)} order=${JSON.stringify(order)}`);
      // The commit: this entry first in BootOrder, unless it already is.
      if (current !== null && order[0] !== current) {
        setBootOrder(sys, [current, ...order.filter((n) => n !== current)]);
        say(`committed order=${JSON.stringify(bootOrder(sys))}`);
      }
    }
    for (const e of listBootEntries(sys)) say(`entry ${e.name} ${e.option ? `"${e.option.description}" ${formatDevicePath(e.option.filePaths[0]!)}` : e.error}`);
    say("done");
    sys.sync();
    sys.reboot(RB.POWER_OFF);
  }
  say("unknown scenario");
  sys.reboot(RB.POWER_OFF);
}

main().catch((e: unknown) => {
  say(`failed: ${e instanceof Error ? e.message : String(e)}`);
  sys.reboot(RB.POWER_OFF);
});
