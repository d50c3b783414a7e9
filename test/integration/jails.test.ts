// Jail mode under QEMU (TCG): an encrypted pool whose host config names no root but jails. The
// agent stays PID 1 with its admin sidecar, keeps the pool on /x, and runs container jails with
// crun from the verified tools image:
//  - an image pushed with `ssh ... image import web < web.tar` (an OCI archive) becomes a
//    read-only subvolume; hostile archives are refused with one line and leave nothing behind;
//  - `jail start web`: its init is PID 1 of its own pid namespace, uid 0 inside is an
//    unprivileged uid outside (from the host's /proc), it answers on the bridge (the host's
//    probe), its memory limit is enforced (the first run eats past it: the kernel's OOM killer
//    ends it in its cgroup), and its death gets it restarted;
//  - it sees neither the host's disks nor the pool's top level nor the other jail;
//  - after a reboot the jails the host config names start at boot;
//  - poweroff stops the jails first (their init gets SIGTERM).
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect } from "vitest";
import { startVm, stopAll, type Vm } from "../../qemu/harness.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";
import { idBase } from "../../agent/jailsconfig.ts";
import { writeDigestMismatch, writeEscape, writeTruncated, writeWebImage } from "../jails/web-image.ts";
import { chain } from "./chain.ts";
import { diskWithPool } from "./pool-disk.ts";
import { buildPoolImage, testRootfs } from "./pool-image.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
const PASS = "jail-mode-test";
const PROMPT = /Recovery passphrase \(attempt (\d) of 3\): $/;
/** The agent gave up (it then waits for ssh or reboots): no wait for a later step can succeed. */
const BOOT_FAILED = /initos: boot failed:/;
let dir: string;
let vm: Vm;
let port: number;

/*
 * Bounds at about 3x this file's measured times, at least 30 s (2026-12-07, TCG, the QEMU lock
 * held; the file 96 s, then 108 s with these bounds): the boot to the prompt 13.9 s, to "jails:
 * ready" 15.2 s; the steps 0-18 s (the memory limit's 31.5 s in the second run), the reboot step
 * 37-42 s. They were 120-600 s a step.
 */
const run = (command: string, inputFile?: string) => ssh(port, command, { key: KEY, knownHosts: `${dir}/known_hosts`, inputFile, timeoutMs: 60_000 });
/**
 * Jail mode starts its sshd again once the pool is open (with the pool's key instead of the one
 * the passphrase prompt presented): "jails: ready" can come before the new dropbear listens
 * (the merged run's first command and the poweroff were refused). status, retried while refused.
 */
const sshdUp = () => sshWhenUp(port, "status", { key: KEY, knownHosts: `${dir}/known_hosts`, timeoutMs: 30_000 });

const JAILS = {
  network: { address: "10.77.0.1/24" },
  jails: [
    { name: "web", kind: "container", image: "web", memory: "64M", address: "10.77.0.10", shares: [{ subvol: "@data", dir: "web", path: "/data" }], probe: 8080 },
    { name: "peer", kind: "container", image: "web", memory: "64M", address: "10.77.0.11", shares: [{ subvol: "@data", dir: "peer", path: "/data" }] },
    { name: "bad", kind: "container", image: "web", address: "10.78.0.12" },
    // This build's signed config has no vmhost image (QEMU, the VM kernel): one line, no start.
    { name: "vm1", kind: "vm", image: "web", memory: "384M", address: "10.77.0.13" },
  ],
};

let pool: string;
beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-jails-`);
  pool = buildPoolImage({ out: `${dir}/pool.img`, passphrase: PASS, rootfs: testRootfs(`${dir}/rootfs.tar`), subvolumes: ["@spare", "@data"], hostConfig: JAILS,
    // Each jail's data directory belongs to its root (the first id of its range, outside).
    dirs: { "@data/web": idBase("web"), "@data/peer": idBase("peer") },
  });
}, 300_000);
afterAll(async () => {
  await stopAll();
  rmSync(dir, { recursive: true, force: true });
});

/** One machine through every step: after a failed step the rest fail at once, naming it. */
const step = chain();

describe.sequential("jail mode", () => {
  // The boot is the chain's first step, not a hook: when it fails, the steps after it fail
  // naming it (a failed beforeAll reports them as skipped).
  step("boots in jail mode: the passphrase at the console opens the pool, the jails come up", async () => {
    vm = await startVm({
      name: "jails",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.reboot_delay=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" },
      disks: [{ file: diskWithPool(`${B}/boot.img`, pool, `${dir}/machine.img`) }],
      net: { forward: [{ guest: 15022 }] },
      memoryMiB: 1024,
      reboot: true, // the reboot step boots again in this QEMU
    });
    port = vm.hostPort(15022);
    const t = Date.now();
    await vm.waitFor(PROMPT, 50_000, { prompt: true, failOn: BOOT_FAILED });
    console.log(`jails: the passphrase prompt ${((Date.now() - t) / 1000).toFixed(1)} s after the start`);
    vm.send(`${PASS}\n`);
    await vm.waitFor(/initos: jails: ready/, 30_000, { failOn: BOOT_FAILED });
    console.log(`jails: ready ${((Date.now() - t) / 1000).toFixed(1)} s after the start`);
    expect((await sshdUp()).status).toBe(0);
  }, 90_000);

  step("no root in the host config: the pool stays on /x, a bad jail entry is one line, a jail whose image is missing is one line", () => {
    expect(vm.output).toMatch(/initos: pool: no root in the host config; jail mode with 3 jail\(s\), the pool on \/x/);
    expect(vm.output).toMatch(/initos: host config initos\.json: refused jails\.2 \{"name":"bad"[^\n]*: address: 10\.78\.0\.12 is not on the machine's \/24 \(10\.77\.0\.0\/24\); not started/);
    expect(vm.output).toMatch(/initos: jail web: not started: .*image web is not imported/);
    expect(vm.output).toMatch(/initos: jail vm1: not started: the signed config has no vmhost image \(QEMU and the VM kernel\): VM jails cannot run on this build/);
    // The sshd started at the passphrase prompt presented the key the initrd had then (the
    // recovery key on a production boot); jail mode's sshd is started again with the pool's own.
    expect(vm.output).toMatch(/initos: pool: ssh host key saved as initos\/ssh_host_ed25519 \(first boot\)/);
    expect(vm.output.match(/initos: sidecar: sshd on port 15022/g)).toHaveLength(2);
  });

  step("hostconfig over ssh: show gives the pool's file; set refuses a config the boot would refuse part of, and leaves the file", async () => {
    expect(JSON.parse((await run("hostconfig show")).stdout)).toEqual(JAILS);
    writeFileSync(`${dir}/bad.json`, JSON.stringify({ ...JAILS, jails: [JAILS.jails[0]] , network: { address: "10.77.0.1/16" } }));
    const r = await run("hostconfig set", `${dir}/bad.json`);
    expect(r.status).toBe(1);
    expect(r.stdout.trim()).toBe("hostconfig set: refused: host config initos.json: network.address: expected the host's address on the machine's /24, e.g. 10.77.0.1/24");
    expect(JSON.parse((await run("hostconfig show")).stdout)).toEqual(JAILS);
  });

  step("image import: hostile archives are refused with one line each and leave nothing behind", async () => {
    const cases: [string, string, RegExp][] = [
      ["truncated", writeTruncated(writeWebImage(`${dir}/good.tar`), `${dir}/truncated.tar`), /^image import bad1: refused: archive: .*(truncated|cut off|not a tar)/],
      ["digest", writeDigestMismatch(`${dir}/digest.tar`), /^image import bad2: refused: archive: blob sha256:[0-9a-f]{64} does not match its digest/],
      ["escape", writeEscape(`${dir}/escape.tar`), /^image import bad3: refused: .*goes through symlink "up", which points outside the image$/],
    ];
    for (const [i, [, file, why]] of cases.entries()) {
      const r = await run(`image import bad${i + 1}`, file);
      expect(r.status, `${file}: ${r.stdout}${r.stderr}`).toBe(1);
      const lines = r.stdout.trim().split("\n");
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(why);
    }
    const list = await run("image list");
    expect(list.stdout.trim()).toBe("no images");
  }, 60_000);

  step("image import web streams an OCI archive into a read-only subvolume; jail start runs it", async () => {
    const imported = await run("image import web", writeWebImage(`${dir}/web.tar`));
    expect(imported.status, imported.stdout + imported.stderr).toBe(0);
    expect(imported.stdout).toMatch(/^image web: /);
    expect((await run("image list")).stdout).toMatch(/^web {2}sha256:[0-9a-f]{12} /m);
    const from = vm.mark();
    const started = await run("jail start web");
    expect(started.stdout.trim()).toBe("jail web: started");
    await vm.waitFor(/JAIL-UP pid=1 uid=0 hostname=web/, 30_000, false, from);
  }, 60_000);

  step("its memory limit is enforced: the first run is killed by the OOM killer in its cgroup, and the jail is restarted", async () => {
    await vm.waitFor(/JAIL-HOG allocating/, 60_000);
    await vm.waitFor(/oom-kill:.*oom_memcg=\/initos\/web/, 60_000);
    await vm.waitFor(/initos: supervise: jail web (exited with \d+|killed by SIGKILL); restarting in 1s/, 60_000);
    await vm.waitFor(/JAIL-SERVING on 8080/, 60_000);
    expect(vm.output).not.toMatch(/JAIL-HOG survived/);
    expect(vm.output).toMatch(/JAIL-SHARE wrote \/data\/ran-once/);
  }, 100_000); // measured 17.8 and 31.5 s

  step("jails: its init is PID 1 of its own namespace with uid 0 mapped outside, the limit applies, the host reaches it over the bridge", async () => {
    const st = (await run("jails")).stdout;
    const base = idBase("web");
    expect(st).toMatch(/^web: container 10\.77\.0\.10, image web: running, pid \d+, up \d+s, restarts 1 /m);
    expect(st).toMatch(new RegExp(`^web: init pid \\d+ is pid 1 in its namespace; uid 0 inside is uid ${base} outside \\(65536 ids\\)$`, "m"));
    expect(st).toMatch(/^web: memory [\d.]+ MiB of 64\.0 MiB, oom kills [1-9]/m);
    expect(st).toMatch(/^web: probe 10\.77\.0\.10:8080 answered: "HTTP\/1\.[01] 200 OK"$/m);
  }, 30_000);

  step("it sees neither the host's disks nor the pool's top level nor the other jail", async () => {
    // The other jail runs beside it meanwhile (its first run eats past its limit too).
    const from = vm.mark();
    expect((await run("jail start peer")).stdout.trim()).toBe("jail peer: started");
    await vm.waitFor(/jail peer: JAIL-POOL /, 30_000, false, from);
    for (const name of ["web", "peer"]) {
      const devs = new RegExp(`jail ${name}: JAIL-DEV ([^\r\n]*)`).exec(vm.output)![1]!;
      expect(devs.split(" ")).toContain("null");
      expect(devs).not.toMatch(/\b(vd[a-z]|sd[a-z]|nvme|mapper|loop\d|dm-\d|tpm)/);
      // Its root and its own share are the only btrfs it has: no top level, no other jail.
      const pool = new RegExp(`jail ${name}: JAIL-POOL ([^\r\n]*)`).exec(vm.output)![1]!;
      expect(pool).toMatch(new RegExp(`\\| 2 btrfs mounts: /@jail-${name}->/ /@data/${name}->/data\\s*$`));
      // Its pid namespace: only its own few processes (the host has a hundred).
      expect(vm.output).toMatch(new RegExp(`jail ${name}: JAIL-UP pid=1 uid=0 hostname=${name} procs=[1-9]\\b`));
    }
  }, 30_000);

  step("after a reboot the jails start at boot: web and peer run from the image imported before, with no jail start", async () => {
    const from = vm.mark();
    await run("reboot"); // the reply may or may not beat the reboot: the console says what happened
    await vm.waitFor(/stopping the jails before the reboot/, 60_000, false, from);
    await vm.waitFor(PROMPT, 90_000, { prompt: true, from, failOn: BOOT_FAILED });
    const boot = vm.mark();
    vm.send(`${PASS}\n`);
    await vm.waitFor(/initos: jails: ready/, 30_000, false, boot);
    await vm.waitFor(/jail web: JAIL-UP pid=1 uid=0 hostname=web/, 30_000, false, boot);
    await vm.waitFor(/jail peer: JAIL-UP pid=1 uid=0 hostname=peer/, 30_000, false, boot);
    expect((await sshdUp()).status).toBe(0); // the same pool key as before the reboot (known_hosts)
    expect(vm.since(boot)).not.toMatch(/initos: ctl: jail\b/);
    expect(vm.since(boot)).not.toMatch(/jail (web|peer): not started/);
  }, 150_000); // measured 37 and 42 s

  step("poweroff stops the jails first: their init gets SIGTERM, then the machine powers off", async () => {
    const from = vm.mark();
    await run("poweroff");
    await vm.waitFor(/stopping the jails before the poweroff/, 30_000, false, from);
    await vm.waitFor(/JAIL-TERM/, 30_000, false, from);
    await vm.waitExit(30_000);
  }, 60_000);
});
