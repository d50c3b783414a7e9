// Stage "early": the API filesystems every later step and the real OS expect, and the
// Secure Boot state, which decides what the rest of the boot is allowed to trust.
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS, RB } from "../sys/consts.ts";
import type { Clock, Files, Modules, Mounts, Processes } from "../sys/index.ts";

export type SecureBoot = "on" | "off" | "no-efi";

export interface EarlyResult {
  secureBoot: SecureBoot;
  /** printk_devkmsg before we lifted the kmsg rate limit; restored before the handoff. */
  devkmsg?: string;
  /** Settles when efivarfs is mounted (true) or known not to be (false): the esp stage waits. */
  efivars: Promise<boolean>;
}

interface ApiMount {
  target: string;
  fstype: string;
  flags: number;
  data?: string;
  mode?: number;
}

// preinit already mounted /proc, /sys and /dev (Bun cannot start without /proc); mounting is
// skipped for whatever is already a mount point, so this list is the complete contract.
const API_MOUNTS: ApiMount[] = [
  { target: "/proc", fstype: "proc", flags: MS.NOSUID | MS.NODEV | MS.NOEXEC },
  { target: "/sys", fstype: "sysfs", flags: MS.NOSUID | MS.NODEV | MS.NOEXEC },
  { target: "/dev", fstype: "devtmpfs", flags: MS.NOSUID, data: "mode=0755" },
  { target: "/dev/pts", fstype: "devpts", flags: MS.NOSUID | MS.NOEXEC, data: "gid=5,mode=620,ptmxmode=000" },
  { target: "/dev/shm", fstype: "tmpfs", flags: MS.NOSUID | MS.NODEV, data: "mode=1777" },
  { target: "/run", fstype: "tmpfs", flags: MS.NOSUID | MS.NODEV, data: "mode=0755", mode: 0o755 },
];

const DEVKMSG = "/proc/sys/kernel/printk_devkmsg";

/**
 * The kernel rate-limits writes to /dev/kmsg (10 lines per 5 s by default) and would drop the
 * agent's boot lines. Lift the limit while the initrd runs; returns the value to restore.
 * Fails harmlessly when `printk.devkmsg=` on the cmdline locked the setting.
 */
export function unthrottleKmsg(sys: Files): string | undefined {
  const before = sys.readFile(DEVKMSG)?.trim();
  if (before === undefined || before === "on") return undefined;
  try {
    sys.writeFile(DEVKMSG, "on\n");
    return before;
  } catch {
    return undefined;
  }
}

export function restoreKmsgThrottle(sys: Files, before: string | undefined): void {
  if (before === undefined) return;
  try {
    sys.writeFile(DEVKMSG, `${before}\n`);
  } catch {
    // locked or gone: the OS keeps "on", which only means more of its lines reach the log
  }
}

const EFIVARS = "/sys/firmware/efi/efivars";
const SECURE_BOOT_VAR = `${EFIVARS}/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c`;

export function mountApiFilesystems(sys: Files & Mounts, log: Logger): void {
  const mounted = new Set(sys.mountPoints());
  for (const m of API_MOUNTS) {
    if (mounted.has(m.target)) continue;
    sys.mkdirp(m.target, m.mode);
    sys.mount(m.fstype, m.target, m.fstype, m.flags, m.data ?? null);
    log.debug(`mounted ${m.fstype} on ${m.target}`);
  }
}

/**
 * Mounts efivarfs when booted through UEFI; false on a BIOS or direct-kernel boot. The mount
 * enumerates every EFI variable through the firmware (under QEMU/TCG with SMM, 0.1-2.3 s
 * measured), so it runs on a background thread while the next stages go on.
 */
export function mountEfivars(sys: Mounts & Modules & Clock, log: Logger, efi: boolean): Promise<boolean> {
  if (!efi) return Promise.resolve(false);
  if (sys.mountPoints().includes(EFIVARS)) return Promise.resolve(true);
  const start = sys.now();
  try {
    sys.loadModule("efivarfs"); // =m in the Debian kernel
  } catch (e) {
    log.warn(`efivarfs unavailable (${describe(e)})`);
    return Promise.resolve(true);
  }
  return sys.mountInBackground("efivarfs", EFIVARS, "efivarfs", MS.NOSUID | MS.NODEV | MS.NOEXEC).then(
    () => (log.info(`efivarfs: mounted in ${(sys.now() - start).toFixed(0)}ms`), true),
    (e: unknown) => (log.warn(`efivarfs unavailable (${describe(e)})`), true),
  );
}

const BOOT_PARAMS = "/sys/kernel/boot_params/data";
/** struct boot_params.secure_boot, which the kernel's EFI stub fills from the firmware. */
const BOOT_PARAMS_SECURE_BOOT = 0x1ec;

/**
 * The Secure Boot state as the kernel's EFI stub saw it (enum efi_secureboot_mode: 2 disabled,
 * 3 enabled; 0 and 1 say nothing): no efivarfs needed. null when it does not say.
 */
export function secureBootFromBootParams(sys: Files): SecureBoot | null {
  const b = sys.readBytes(BOOT_PARAMS, BOOT_PARAMS_SECURE_BOOT + 1);
  if (!b || b.length <= BOOT_PARAMS_SECURE_BOOT) return null;
  const mode = b[BOOT_PARAMS_SECURE_BOOT];
  return mode === 3 ? "on" : mode === 2 ? "off" : null;
}

/**
 * The SecureBoot variable is 4 bytes of attributes then one byte: 1 = enforcing. With EFI but
 * an unreadable variable we answer "on": the stricter assumption is the safe one.
 */
export function readSecureBoot(sys: Files, efi: boolean): SecureBoot {
  if (!efi) return "no-efi";
  const v = sys.readBytes(SECURE_BOOT_VAR);
  if (!v || v.length < 5) return "on";
  return v[4] === 1 ? "on" : "off";
}

export async function setupEarly(sys: Files & Mounts & Modules & Processes & Clock, log: Logger): Promise<EarlyResult> {
  mountApiFilesystems(sys, log);
  const devkmsg = unthrottleKmsg(sys);
  sys.mkdirp("/run/initos", 0o700);
  // With CAD disabled the kernel sends SIGINT to PID 1 on ctrl-alt-del instead of rebooting
  // on the spot, so we get to sync first.
  try {
    sys.reboot(RB.DISABLE_CAD);
  } catch (e) {
    log.warn(`cannot disable ctrl-alt-del: ${describe(e)}`);
  }
  const efi = sys.exists("/sys/firmware/efi");
  const efivars = mountEfivars(sys, log, efi);
  // Only when the EFI stub did not record the state is the variable itself read (and waited for).
  const secureBoot = (efi && secureBootFromBootParams(sys)) || readSecureBoot(sys, efi && (await efivars));
  log.info(`secureboot: ${secureBoot}`);
  return { secureBoot, devkmsg, efivars };
}
