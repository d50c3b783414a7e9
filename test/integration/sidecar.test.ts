// Sidecar mode under QEMU with user networking (restrict=on: the guest reaches nothing outside
// QEMU) and a forward from 127.0.0.1 to the guest's sshd: a real OpenSSH client logs in.
import { spawnSync } from "node:child_process";
import { chain } from "./chain.ts";
import { variantInitrd } from "./images.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startVm, stopAll, type Vm } from "../../qemu/harness.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
let dir: string;
let vm: Vm;
let port: number;

const run = (key: string | null, command: string) => ssh(port, command, { key, knownHosts: `${dir}/known_hosts` });

/** A direct kernel boot with the boot disk and the guest's sshd forwarded to a free local port. */
async function bootWithSsh(name: string, append: string, initrd = `${B}/initrd.img`, extraDisks: string[] = []): Promise<{ vm: Vm; port: number }> {
  const vm = await startVm({
    name,
    direct: { kernel: `${B}/vmlinuz`, initrd, append: `console=ttyS0 ${append}` },
    disks: [{ file: `${B}/boot.img` }, ...extraDisks.map((file) => ({ file }))],
    net: { forward: [{ guest: 15022 }] },
  });
  return { vm, port: vm.hostPort(15022) };
}

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-ssh-`);
  spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", `${dir}/stranger`]);
});
afterAll(async () => {
  await stopAll();
  rmSync(dir, { recursive: true, force: true });
});
afterEach(() => {});

/** The first VM's steps, up to its poweroff: after a failed one the rest fail at once. */
const step = chain();

describe.sequential("sidecar", () => {
  // The boot is the chain's first step, not a hook: when it fails, its steps fail naming it,
  // and the scenarios with VMs of their own below still run.
  step("static address from initos.ip/initos.gw, sshd supervised on 15022", async () => {
    ({ vm, port } = await bootWithSsh("sidecar", "initos.mode=sidecar initos.ip=10.0.2.15/24 initos.gw=10.0.2.2"));
    await vm.waitFor(/initos: sidecar: ready/, 150_000, { failOn: /initos: boot failed:/ });
    expect(vm.output).toMatch(/initos: network: eth0 10\.0\.2\.15\/24 via 10\.0\.2\.2/);
    expect(vm.output).toMatch(/initos: supervise: sshd started \(pid \d+\)/);
    expect(vm.output).toMatch(/initos: sidecar: sshd on port 15022, 1 authorized key\(s\)/);
  }, 200_000);

  step("the key from the UKI logs in and runs status; the session is the command interface, not a shell", async () => {
    const r = await sshWhenUp(port, "status", { key: KEY, knownHosts: `${dir}/known_hosts` });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^mode: sidecar\nsecure boot: no-efi\nstages: early \d+ms, .*network \d+ms, sshd \d+ms\nversion: \d+\nslots: a v\d+, b v\d+\nzombies: 0\nagent rss: \d+ kB\nmemavailable: \d+ kB\n$/);
    const sh = await run(KEY, "cat /etc/passwd; id");
    expect(sh.status).toBe(2);
    expect(sh.stderr).toMatch(/initos: unknown command "cat"; try: status, log, unlock, reseal, switch-root, update, commit, jails, jail, image, hostconfig, reboot, poweroff/);
    expect(vm.output).toMatch(/initos: ctl: status/);
  }, 120_000);

  step("a key that is not in the UKI is refused", async () => {
    const r = await run(`${dir}/stranger`, "status");
    expect(r.status).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  }, 120_000);

  step("password login is refused (not even offered)", async () => {
    const r = await run(null, "status");
    expect(r.status).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  }, 120_000);

  step("ctl poweroff over ssh powers the machine off", async () => {
    const r = await run(KEY, "poweroff");
    expect(r.stdout).toBe("poweroff in progress\n");
    expect(await vm.waitExit(60_000)).toBe(0);
    expect(vm.output).toMatch(/initos: ctl: poweroff/);
  }, 120_000);

  it("a failed boot with keys and an address stays up for recovery over ssh instead of rebooting", async () => {
    const { vm: failed, port: p2 } = await bootWithSsh("failure-recovery", "root=/dev/vdz initos.rootwait=2 initos.reboot_delay=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2");
    await failed.waitFor(/initos: staying up for recovery over ssh/, 150_000);
    expect(failed.output).toMatch(/initos: boot failed: root device \/dev\/vdz did not appear within 2s/);
    const log = await sshWhenUp(p2, "log", { key: KEY });
    expect(log.status).toBe(0);
    expect(log.stdout).toMatch(/err boot failed: root device \/dev\/vdz did not appear within 2s/);
    expect(failed.running).toBe(true); // it did not reboot
    expect((await ssh(p2, "reboot", { key: KEY })).stdout).toBe("reboot in progress\n");
    expect(await failed.waitExit(60_000)).toBe(0);
    expect(failed.output).toMatch(/reboot: Restarting system/);
  }, 240_000);

  it("switch-root continues the boot; the sidecar stays beside the OS, in its own root, with the same host key", async () => {
    const root = "root=LABEL=initos-testroot rootfstype=btrfs rootflags=subvol=@";
    const { vm: bvm, port: p5 } = await bootWithSsh("sidecar-beside", `initos.mode=sidecar ${root} initos.sidecar=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 -- hold=120`, undefined, [`${B}/testroot.img`]);
    await bvm.waitFor(/initos: sidecar: ready/, 150_000);
    const known = { key: KEY, knownHosts: `${dir}/beside_known_hosts` };
    const sw = await sshWhenUp(p5, "switch-root", known);
    expect(sw.stdout).toBe("continuing the boot\n");
    await bvm.waitFor(/INITOS-TEST-ROOT pid=1 root=subvol=@ .*argv=\[hold=120\]/, 120_000);
    expect(bvm.output).toMatch(/initos: sidecar: switch-root requested; continuing the boot/);
    expect(bvm.output).toMatch(/initos: supervise: sshd stopped/); // the initrd's own sshd went before the switch
    // strict: the sidecar beside the OS must present the key this client saw in sidecar mode
    const st = await sshWhenUp(p5, "status", { ...known, strict: true });
    expect(st.stderr).not.toMatch(/IDENTIFICATION HAS CHANGED|verification failed/);
    expect(st.status).toBe(0);
    expect(st.stdout).toMatch(/^mode: sidecar beside the OS\nprocess: @initos-sidecar \(pid \d+\)\nboot stages: early \d+ms, .*root \d+ms, handoff-check \d+ms/);
    expect((await ssh(p5, "switch-root", known)).stdout).toBe("switch-root: not available beside the running OS\n");
    // reboot is a request to the OS's init (SIGINT): the test init stops holding and reboots
    expect((await ssh(p5, "reboot", known)).stdout).toBe("reboot requested from the OS's init\n");
    await bvm.waitFor(/INITOS-TEST-ROOT done holding: reboot/, 60_000);
    expect(await bvm.waitExit(60_000)).toBe(0);
  }, 360_000);

  it("supervision: orphans of a service are reaped (no zombies), and sshd killed is restarted; a shell when the config offers one", async () => {
    const busybox = "/run/initos/images/tools/usr/bin/busybox";
    const initrd = variantInitrd(dir, "services", (c) => {
      c.ssh = { shell: true };
      c.services = [
        // leaves an orphan every second: its exit must be reaped by PID 1
        { name: "orphans", argv: [busybox, "sh", "-c", "while :; do (sleep 0.2 &); sleep 1; done"] },
        // kills every dropbear once, after a while (busybox has no pkill)
        { name: "killer", argv: [busybox, "sh", "-c", 'sleep 4; for d in /proc/[0-9]*; do read -r c < $d/comm && [ "$c" = dropbear ] && kill ${d#/proc/}; done; exec sleep 100000'] },
      ];
    });
    const { vm: svm, port: p3 } = await bootWithSsh("sidecar-services", "initos.mode=sidecar initos.ip=10.0.2.15/24 initos.gw=10.0.2.2", initrd);
    // dropbear catches SIGTERM and exits with 1
    await svm.waitFor(/initos: supervise: sshd (killed by SIGTERM|exited with \d+); restarting in 1s/, 150_000);
    await svm.waitFor(/initos: supervise: sshd started \(pid \d+\)[\s\S]*initos: supervise: sshd started \(pid \d+\)/, 60_000);
    await new Promise((r) => setTimeout(r, 5000)); // a few more orphans come and go
    // A zombie may exist for the instant between an orphan's exit and PID 1's SIGCHLD; one that
    // stays is a leak. With a new orphan every second, three looks a second apart tell them apart.
    let r = await sshWhenUp(p3, "status", { key: KEY });
    for (let i = 0; i < 3 && !/\nzombies: 0\n/.test(r.stdout); i++) {
      await new Promise((res) => setTimeout(res, 1000));
      r = await ssh(p3, "status", { key: KEY });
    }
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/\nzombies: 0\nagent rss: \d+ kB\nmemavailable: \d+ kB\n$/);
    // The signed config offers a shell: busybox sh from the verified image runs other commands.
    const sh = await ssh(p3, "echo shell-$((6*7)); readlink /proc/$$/exe", { key: KEY });
    expect(sh.stdout).toBe("shell-42\n/run/initos/images/tools/usr/bin/busybox\n");
    await ssh(p3, "poweroff", { key: KEY });
    await svm.waitExit(60_000);
  }, 300_000);

  it("ip=dhcp: QEMU's DHCP server leases the address and the route; ssh answers on it", async () => {
    const { vm: dvm, port: p4 } = await bootWithSsh("sidecar-dhcp", "initos.mode=sidecar ip=dhcp");
    await dvm.waitFor(/initos: sidecar: ready/, 150_000);
    expect(dvm.output).toMatch(/initos: dhcp: eth0 leased 10\.0\.2\.15\/24 from 10\.0\.2\.2 for \d+s/);
    // With restrict=on QEMU's DHCP server offers no router: the address alone is applied.
    expect(dvm.output).toMatch(/initos: network: eth0 10\.0\.2\.15\/24/);
    const r = await sshWhenUp(p4, "status", { key: KEY });
    expect(r.status).toBe(0);
    await ssh(p4, "poweroff", { key: KEY });
    await dvm.waitExit(60_000);
  }, 240_000);
});
