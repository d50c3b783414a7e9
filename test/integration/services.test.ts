// Nothing the initrd started may outlive it: before switch_root every service and ssh session
// is stopped with all it started (children, orphans that left their session, processes that
// ignore SIGTERM), SIGKILLed after a bound, and waited for. The test root's init (`-- ps`) lists
// every process that is not a kernel thread once it runs as PID 1: it must be alone.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { startVm, stopAll } from "../../qemu/harness.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";
import { variantInitrd } from "./images.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
const BUSYBOX = "/run/initos/images/tools/usr/bin/busybox";
let dir: string;

afterAll(async () => {
  await stopAll();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** An ssh session the test keeps open (its stdin never ends) until the guest closes it. */
function openSession(port: number, command: string, tty = false): { child: ChildProcess; closed: Promise<number | null> } {
  const args = [
    ...(tty ? ["-tt"] : []),
    "-i", KEY, "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey", "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=30",
    "-p", String(port), "root@127.0.0.1", command,
  ];
  const child = spawn("ssh", args, { stdio: ["pipe", "ignore", "ignore"] });
  const closed = new Promise<number | null>((res) => child.on("close", (code) => res(code)));
  return { child, closed };
}

const within = <T>(p: Promise<T>, ms: number, what: string) =>
  Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`${what}: not within ${ms} ms`)), ms))]);

describe("stopping before switch_root", () => {
  it("services and ssh sessions, with their children and escaped orphans, are gone when the OS's init starts", async () => {
    dir = mkdtempSync(`${tmpdir()}/initos-services-`);
    const initrd = variantInitrd(dir, "stop", (c) => {
      c.ssh = { shell: true };
      c.services = [
        // Ignores SIGTERM (and so do its children, SIG_IGN survives exec); one child leaves the
        // session and is orphaned at once: only SIGKILL, and a search beyond the service's
        // tree, end them.
        { name: "stubborn", argv: [BUSYBOX, "sh", "-c", `trap "" TERM; (setsid ${BUSYBOX} sleep 100003 &); ${BUSYBOX} sleep 100001 & exec ${BUSYBOX} sleep 100002`] },
      ];
    });
    const root = "root=LABEL=initos-testroot rootfstype=btrfs rootflags=subvol=@";
    const vm = await startVm({
      name: "services-stop",
      direct: { kernel: `${B}/vmlinuz`, initrd, append: `console=ttyS0 initos.mode=sidecar ${root} initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 -- ps` },
      disks: [{ file: `${B}/boot.img` }, { file: `${B}/testroot.img` }],
      net: { forward: [{ guest: 15022 }] },
    });
    const port = vm.hostPort(15022);
    await vm.waitFor(/initos: sidecar: ready/, 150_000);
    expect((await sshWhenUp(port, "status", { key: KEY })).status).toBe(0);

    const sessions = [
      openSession(port, "unlock"), // the agent as the session's shell, reading a passphrase that never ends
      openSession(port, `${BUSYBOX} sleep 100004`), // a long command under the shell
      openSession(port, `${BUSYBOX} sleep 100005`, true), // the same with a pty: its own session
    ];
    // returns at once, leaving an orphan in a session of its own
    expect((await ssh(port, `(setsid ${BUSYBOX} sleep 100006 </dev/null >/dev/null 2>&1 &)`, { key: KEY })).status).toBe(0);
    // Everything is up once all the marked sleeps run, and the agent reading for `unlock`.
    const want = ["100001", "100002", "100003", "100004", "100005", "100006", "unlock"];
    let missing = want;
    for (let i = 0; i < 30 && missing.length; i++) {
      if (i) await new Promise((res) => setTimeout(res, 2000));
      const seen = (await ssh(port, "cat /proc/[0-9]*/cmdline", { key: KEY })).stdout.split("\0");
      missing = want.filter((w) => !seen.includes(w));
    }
    expect(missing).toEqual([]);

    const switched = ssh(port, "switch-root", { key: KEY });
    const end = await vm.waitFor(/INITOS-TEST-ROOT ps end count=(\d+)/, 150_000);
    const ps = [...vm.output.matchAll(/INITOS-TEST-ROOT ps (pid=\d+ ppid=\d+ state=\S comm=.*?)\r?\n/g)].map((m) => m[1]);
    // The OS's init, alone: no dropbear, no agent, no sleep, no zombie.
    expect(ps).toEqual([expect.stringMatching(/^pid=1 ppid=0 state=[RS] comm=init$/)]);
    expect(end[1]).toBe("1");
    // The client that asked for the switch still got its answer before its session ended.
    expect((await switched).stdout).toBe("continuing the boot\n");
    // The sessions ended with the initrd (the clients see their connection closed).
    await within(Promise.all(sessions.map((s) => s.closed)), 60_000, "ssh sessions closed");
    // What ignored SIGTERM got SIGKILL after the bound; the escaped orphans were found too.
    expect(vm.output).toMatch(/initos: stop stubborn: SIGKILL to \d+ left after \d+s/);
    expect(vm.output).toMatch(/initos: supervise: sshd stopped/);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 400_000);
});
