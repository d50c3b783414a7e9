// The sidecar beside a real OS: Debian 12 with systemd 252 as its init (build/debian.img, see
// initrd/debian.ts), booted directly with `initos.sidecar=1` and an address. What systemd does
// to a process it did not start is the question:
//   - at its start (`--switched-root`) it kills nothing it finds: the sidecar is still there,
//     and answers `status` over ssh, once multi-user.target is reached;
//   - `reboot` over ssh is a request to systemd (SIGRTMIN+5: reboot.target), which goes through
//     its whole shutdown;
//   - systemd-shutdown's killing spree spares '@' processes (argv[0] '@initos-sidecar'), but
//     stops and continues every process around it (kill(-1, SIGSTOP/SIGCONT)): the sidecar takes
//     that as its cue to stop sshd and let go of the verified tools image, so the "Detaching DM
//     devices" after it closes /dev/mapper/initos-tools like any other (see stages/beside.ts);
//     the sidecar itself is left alone to the end.
// The check unit holds (initos.test.hold) instead of powering off: the reboot comes over ssh.
import { existsSync } from "node:fs";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import { DEBIAN_LABEL, HOLD_WORD } from "../../initrd/debian.ts";
import { startVm, stopAll } from "../../qemu/harness.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
const ROOT = `root=LABEL=${DEBIAN_LABEL} rootfstype=btrfs rootflags=subvol=@ rw`;

beforeAll(() => {
  const missing = ["vmlinuz", "initrd.img", "boot.img", "debian.img", "test-ssh/id_ed25519"].map((f) => `${B}/${f}`).filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`missing build artifacts (run make all): ${missing.join(" ")}`);
});
afterEach(stopAll);

/** Seconds of the kernel's timestamp on the first console line matching `re` ("[   18.26] ..."). */
function stamp(out: string, re: RegExp): number | null {
  for (const line of out.split("\n")) {
    if (!re.test(line)) continue;
    const m = /\[\s*(\d+\.\d+)\]/.exec(line);
    if (m) return Number(m[1]);
  }
  return null;
}

describe("the sidecar beside Debian 12 + systemd", () => {
  it("survives systemd's start, answers after multi-user.target, asks systemd to reboot, and lets systemd-shutdown detach everything", async () => {
    const vm = await startVm({
      name: "debian-sidecar",
      direct: {
        kernel: `${B}/vmlinuz`,
        initrd: `${B}/initrd.img`,
        append: `console=ttyS0 initos.reboot_delay=1 initos.sidecar=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 ${HOLD_WORD} ${ROOT}`,
      },
      disks: [{ file: `${B}/boot.img` }, { file: `${B}/debian.img` }],
      net: { forward: [{ guest: 15022 }] },
    });
    const port = vm.hostPort(15022);
    const ready = await vm.waitFor(/initos: sidecar beside the OS: ready \(pid (\d+)\)/, 400_000);
    await vm.waitFor(/INITOS-DEBIAN state: running/, 400_000);
    await vm.waitFor(/INITOS-DEBIAN hold: staying up/, 120_000);
    expect(vm.output).toMatch(/initos: handoff: init \/sbin\/init is \/usr\/lib\/systemd\/systemd \(systemd: switched root\)/);
    expect(vm.output).toMatch(/INITOS-DEBIAN failed: none/);
    // Beside the OS: the modules image (the OS's /lib/modules) and the sidecar's (sshd runs from it).
    expect(vm.output).toMatch(/INITOS-DEBIAN dm: control initos-modules initos-tools\s*$/m);

    // After multi-user.target: still there, the same process systemd found, in its own root.
    const st = await sshWhenUp(port, "status", { key: KEY });
    expect(st.status).toBe(0);
    expect(st.stdout).toMatch(new RegExp(`^mode: sidecar beside the OS\nprocess: @initos-sidecar \\(pid ${ready[1]}\\)\n`));
    expect(st.stdout).toMatch(/\nmounts left outside its root: none\n/);
    // A direct kernel boot: no firmware variables, so of the update's fields only the version.
    expect(st.stdout).toMatch(/\nversion: \d+\n?$/);

    const t0 = performance.now();
    const r = await ssh(port, "reboot", { key: KEY });
    expect(r.stdout).toBe("reboot requested from the OS's init\n");
    expect(await vm.waitExit(300_000)).toBe(0); // -no-reboot: the reboot ends QEMU
    const seconds = (performance.now() - t0) / 1000;
    const out = vm.output;

    // systemd got reboot.target (not ctrl-alt-del.target, which an admin may have masked).
    expect(out).toMatch(/initos: sidecar beside the OS: asking init \(\/usr\/lib\/systemd\/systemd\) to reboot \(signal 39: SIGRTMIN\+5\)/);
    expect(out).toMatch(/Reached target [^\r\n]*System Reboot/);
    // systemd-shutdown's killing spree: the sidecar is spared, sees it, lets go of its image.
    expect(out).toMatch(/systemd-shutdown\[1\]: Sending SIGTERM to remaining processes/);
    expect(out).toMatch(/initos: sidecar beside the OS: the OS is going down \(PID 1 is \S*systemd-shutdown\); no more sshd, released the tools image/);
    expect(out).toMatch(/initos: supervise: sshd stopped/);
    const spree = out.slice(out.indexOf("Sending SIGTERM to remaining processes"));
    expect(spree).not.toMatch(/supervise: sshd started/); // not restarted from the image it let go
    expect(out).not.toMatch(/Sending SIGKILL to PID \d+ \((initos-agent|dropbear)\)/);
    // Every DM device closed at the first try, the sidecar's included. (systemd-shutdown detaches
    // loop devices before DM devices, so the loops under both verity devices are busy in its
    // first pass and go, with autoclear, once their DM device is removed: those lines say so.)
    expect(out).toMatch(/systemd-shutdown\[1\]: All DM devices detached/);
    expect(out).toMatch(/systemd-shutdown\[1\]: All loop devices detached/);
    expect(out).toMatch(/systemd-shutdown\[1\]: All filesystems, swaps, loop devices, MD devices and DM devices detached/);
    expect(out).not.toMatch(/Could not detach DM|Not all DM devices detached|Cannot finalize|Failed to finalize/);
    expect(out).not.toMatch(/Failed unmounting|Failed to unmount|Waiting for process/);
    expect(out).not.toMatch(/FAILED/);
    expect(out).not.toMatch(/Kernel panic|initos: boot failed/);
    expect(out).toMatch(/reboot: Restarting system/);

    // systemd-shutdown's SIGTERM round waits for what it signalled, and looks at dropbear (not
    // its child) again only when woken: without the sidecar's SIGCHLD it sleeps its full 10 s.
    const term = stamp(out, /Sending SIGTERM to remaining processes/);
    const kill = stamp(out, /Sending SIGKILL to remaining processes/);
    console.log(`debian-sidecar: reboot over ssh to QEMU exit ${seconds.toFixed(1)}s; SIGTERM round ${term !== null && kill !== null ? (kill - term).toFixed(2) : "?"}s`);
    expect(term).not.toBeNull();
    expect(kill! - term!).toBeLessThan(9);
  }, 900_000);
});
