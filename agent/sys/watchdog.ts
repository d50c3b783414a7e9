// The Linux watchdog device API (linux/watchdog.h, Documentation/watchdog/watchdog-api.rst):
// opening /dev/watchdogN starts the countdown; WDIOC_KEEPALIVE restarts it; writing 'V' before
// the close stops it (WDIOF_MAGICCLOSE), closing without it leaves it running, so a process
// that dies without saying goodbye still gets the machine reset.
import { closeSync, constants, fstatSync, openSync, writeSync } from "node:fs";
import { BootError } from "../errors.ts";
import { check, errno, errnoName } from "./ffi.ts";
import type { WatchdogHandle } from "./index.ts";
import { libcCalls as c } from "./libc.ts";

// _IOR('W', n, T) = 0x80000000 | sizeof(T) << 16 | 'W' << 8 | n; _IOWR adds 0x40000000.
const WDIOC_GETSUPPORT = 0x80285700; // struct watchdog_info (40 bytes)
const WDIOC_KEEPALIVE = 0x80045705;
const WDIOC_SETTIMEOUT = 0xc0045706;
const WDIOC_GETTIMEOUT = 0x80045707;
const WDIOC_GETTIMELEFT = 0x8004570a;

export const WDIOF_SETTIMEOUT = 0x0080;
export const WDIOF_MAGICCLOSE = 0x0100;
const EOPNOTSUPP = 95;
const ENOTTY = 25;

function intArg(n = 0): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setInt32(0, n, true);
  return b;
}
const intOf = (b: Uint8Array) => new DataView(b.buffer).getInt32(0, true);

/**
 * Opens the watchdog at `path` (its countdown starts now) and asks for `timeoutSeconds`; the
 * handle's `timeout` is what the driver then reports. The fd is close-on-exec: an exec (the
 * switch_root into the OS) closes it without the magic 'V', so the countdown goes on.
 */
export function openWatchdog(path: string, timeoutSeconds: number): WatchdogHandle {
  if (!Number.isInteger(timeoutSeconds) || timeoutSeconds < 1) throw new BootError(`watchdog timeout ${timeoutSeconds}: not a whole number of seconds >= 1`);
  // libuv opens every file close-on-exec (O_CLOEXEC) by itself.
  const fd = openSync(path, constants.O_WRONLY);
  let open = true;
  const fail = (what: string): never => {
    throw new BootError(`${path}: ${what}`);
  };
  try {
    if (!fstatSync(fd).isCharacterDevice()) fail("not a character device");
    const info = new Uint8Array(40);
    check("ioctl", [path, "WDIOC_GETSUPPORT"], c.ioctl(fd, WDIOC_GETSUPPORT, "uint8_t *", info));
    const options = new DataView(info.buffer).getUint32(0, true);
    const raw = Buffer.from(info.subarray(8));
    const identity = raw.subarray(0, raw.indexOf(0) >= 0 ? raw.indexOf(0) : raw.length).toString("latin1");
    const t = intArg(timeoutSeconds);
    if (options & WDIOF_SETTIMEOUT) {
      check("ioctl", [path, "WDIOC_SETTIMEOUT", timeoutSeconds], c.ioctl(fd, WDIOC_SETTIMEOUT, "uint8_t *", t));
    }
    check("ioctl", [path, "WDIOC_GETTIMEOUT"], c.ioctl(fd, WDIOC_GETTIMEOUT, "uint8_t *", t));
    const timeout = intOf(t);
    const closed = (): never => fail("already closed");
    const handle: WatchdogHandle = {
      path,
      identity,
      options,
      timeout,
      pet: () => {
        if (!open) closed();
        if (c.ioctl(fd, WDIOC_KEEPALIVE, "uint8_t *", intArg()) < 0) {
          const e = errno();
          if (e !== ENOTTY && e !== EOPNOTSUPP) fail(`WDIOC_KEEPALIVE: ${errnoName(e)}`);
          writeSync(fd, "\0"); // any write is a keepalive too
        }
      },
      timeLeft: () => {
        if (!open) closed();
        const left = intArg();
        return c.ioctl(fd, WDIOC_GETTIMELEFT, "uint8_t *", left) < 0 ? null : intOf(left);
      },
      disarm: () => {
        if (!open) closed();
        open = false;
        try {
          writeSync(fd, "V");
        } finally {
          closeSync(fd);
        }
      },
      release: () => {
        if (!open) closed();
        open = false;
        closeSync(fd);
      },
    };
    return handle;
  } catch (e) {
    // Not set up: stop it again (magic close), or it would reset the machine with a timeout
    // nobody asked for and nobody pets.
    try {
      writeSync(fd, "V");
    } catch {
      // a driver without a write path: the close below is all there is
    }
    closeSync(fd);
    throw e;
  }
}
