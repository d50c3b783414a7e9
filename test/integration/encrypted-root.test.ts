// The encrypted root end to end, under OVMF with Secure Boot and one swtpm state shared by all
// boots, in order: install onto a blank disk, unattended unlock, changed PCR 7 → recovery
// passphrase → reseal → unattended again, wrong passphrases, no TPM, missing root subvolume.
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { PLAINTEXT_CANARY } from "../../initrd/build.ts";
import { freePort, OVMF, startVm, stopAll, type Vm } from "../../qemu/harness.ts";
import { ssh, sshWhenUp } from "../../qemu/ssh.ts";

const B = "build";
let dir: string;
let target: string;
let tpmState: string;
let recovery = "";

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-luks-`);
  target = `${dir}/target.img`;
  tpmState = `${dir}/tpm`;
  mkdirSync(tpmState);
  execFileSync("truncate", ["-s", "1G", target]);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

/** The installed disk booted through the firmware; `secure` picks the vars (PCR 7 follows). */
function bootTarget(name: string, secure: boolean, tpm = true): Promise<Vm> {
  return startVm({
    name,
    firmware: { vars: secure ? OVMF.varsSecure : OVMF.varsPlain },
    disks: [{ file: target, snapshot: false }],
    tpm: tpm ? { stateDir: tpmState } : false,
    memoryMiB: 2048,
  });
}

const MARKER = /INITOS-TEST-ROOT pid=1 root=subvol=@root home=mounted /;
const PROMPT = /Recovery passphrase \(attempt (\d) of 3\): $/;
const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

describe.sequential("encrypted btrfs root unlocked by the TPM", () => {
  it("installs onto a blank disk from the installer image, prints the recovery passphrase once, powers off", async () => {
    const vm = await startVm({
      name: "luks-install",
      firmware: { vars: OVMF.varsSecure },
      disks: [{ file: `${B}/installer.img` }, { file: target, snapshot: false }],
      tpm: { stateDir: tpmState },
      memoryMiB: 2048,
    });
    expect(await vm.waitExit(300_000)).toBe(0);
    const m = /RECOVERY PASSPHRASE \(shown once, write it down\): ([a-z0-9-]+)/.exec(vm.output);
    expect(m).not.toBeNull();
    recovery = m![1]!;
    expect(recovery).toMatch(/^([a-z2-9]{5}-){7}[a-z2-9]{5}$/);
    expect(vm.output).toMatch(/initos: install: done: \/dev\/vdb has @root and @home @log @cache, sealed to PCR 7 \+ latch 15/);
    expect(vm.output).toMatch(/initos: install finished: poweroff/);
    // Never in the kernel log, which the installed OS would keep.
    expect(vm.output).not.toMatch(new RegExp(`initos: .*${recovery}`));
    // The root filesystem went into the encrypted partition: its canary is nowhere in plaintext.
    expect(spawnSync("grep", ["-c", "-a", PLAINTEXT_CANARY, target]).status).toBe(1);
    const parts = execFileSync("sfdisk", ["--dump", target], { encoding: "utf8" });
    expect(parts).toMatch(/name="initos-a"/);
    expect(parts).toMatch(/name="initos-b"/);
    expect(parts).toMatch(/name="initos-luks"/);
    const luksStart = Number(/start=\s*(\d+),[^\n]*name="initos-luks"/.exec(parts)![1]) * 512;
    const probe = execFileSync("blkid", ["-p", "-O", String(luksStart), "-s", "TYPE", "-s", "VERSION", "-o", "export", target], { encoding: "utf8" });
    expect(probe).toMatch(/^TYPE=crypto_LUKS$/m);
    expect(probe).toMatch(/^VERSION=2$/m);
  }, 360_000);

  it("boots unattended: TPM unseal, latch proven, root subvolume with /home bound", async () => {
    const vm = await bootTarget("luks-unattended", true);
    await vm.waitFor(MARKER, 240_000);
    const out = vm.output;
    expect(out).toMatch(/initos: secureboot: on/);
    expect(out).toMatch(/initos: unlock: opened \/dev\/vda3 with keyslot 0 in \d+ms/);
    expect(out).toMatch(/initos: unlock: latch holds: the key cannot be unsealed again this boot/);
    expect(out).toMatch(/initos: unlock: unlocked with the TPM/);
    expect(out).toMatch(/initos: pool: root @root on \/sysroot \(rw\), @home->\/home @log->\/var\/log @cache->\/var\/cache/);
    // The first boot keeps the sidecar's ssh host key on the pool, for every later boot.
    expect(out).toMatch(/initos: pool: ssh host key saved as initos\/ssh_host_ed25519 \(first boot\)/);
    expect(out).not.toMatch(/Recovery passphrase/);
    await vm.waitExit(60_000);
  }, 300_000);

  it("PCR 7 changed (Secure Boot off): the TPM refuses, the recovery passphrase on the console unlocks, reseal", async () => {
    const vm = await bootTarget("luks-pcr7-changed", false);
    await vm.waitFor(PROMPT, 240_000, true);
    expect(vm.output).toMatch(/initos: unlock: TPM did not release the key: tpm2 unseal: PCR values differ from the sealed policy \(TPM_RC_POLICY_FAIL\)/);
    vm.send(`${recovery}\n`);
    await vm.waitFor(/Reseal the disk key to this machine's current TPM state\? \[y\/N\] $/, 120_000, true);
    vm.send("y\n");
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).toMatch(/initos: unlock: unlocked with the recovery passphrase/);
    expect(vm.output).toMatch(/initos: unlock: resealed; the next boot unlocks unattended/);
    // The passphrase was typed with echo off: it never appears in the output.
    expect(vm.output).not.toContain(recovery);
    await vm.waitExit(60_000);
  }, 360_000);

  it("after the reseal the same state boots unattended again", async () => {
    const vm = await bootTarget("luks-after-reseal", false);
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).toMatch(/initos: unlock: unlocked with the TPM/);
    expect(vm.output).not.toMatch(/Recovery passphrase/);
    await vm.waitExit(60_000);
  }, 300_000);

  it("three wrong passphrases: failure policy, and nothing on the disk changed", async () => {
    const before = sha(target);
    const vm = await bootTarget("luks-wrong-passphrase", true); // sealed for Secure Boot off now
    for (let i = 1; i <= 3; i++) {
      await vm.waitFor(new RegExp(`Recovery passphrase \\(attempt ${i} of 3\\): $`), 240_000, true);
      vm.send(`not-the-passphrase-${i}\n`);
    }
    expect(await vm.waitExit(180_000)).toBe(0);
    expect(vm.output).toMatch(/initos: unlock: wrong recovery passphrase \(attempt 3 of 3\)/);
    expect(vm.output).toMatch(/initos: boot failed: unlock: 3 wrong recovery passphrases/);
    expect(vm.output).toMatch(/reboot: Restarting system/);
    expect(vm.output).not.toMatch(/INITOS-TEST-ROOT|Reseal/);
    expect(sha(target)).toBe(before);
  }, 400_000);

  it("no TPM at all: straight to the passphrase, no reseal offered", async () => {
    const vm = await bootTarget("luks-no-tpm", true, false);
    await vm.waitFor(PROMPT, 240_000, true);
    expect(vm.output).toMatch(/initos: unlock: no TPM; the recovery passphrase is needed/);
    vm.send(`${recovery}\n`);
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).not.toMatch(/Reseal/);
    await vm.waitExit(60_000);
  }, 360_000);

  it("a root subvolume that is not in the pool: one clear line, failure policy", async () => {
    // Direct kernel boot (no firmware: PCR 7 differs, so the passphrase) with initos.root.
    const vm = await startVm({
      name: "luks-missing-subvolume",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.reboot_delay=1 initos.root=@nope" },
      disks: [{ file: target }],
      memoryMiB: 2048,
    });
    await vm.waitFor(PROMPT, 240_000, true);
    vm.send(`${recovery}\n`);
    expect(await vm.waitExit(240_000)).toBe(0);
    expect(vm.output).toMatch(/initos: boot failed: root subvolume @nope \(from initos.root on the cmdline\) is not in the pool/);
    expect(vm.output).not.toMatch(/INITOS-TEST-ROOT|Kernel panic/);
  }, 300_000);

  /** Direct kernel boot (no firmware: PCR 7 differs from the sealed state) with ssh forwarded. */
  async function bootRemote(name: string, append: string): Promise<{ vm: Vm; port: number }> {
    const port = await freePort();
    const vm = await startVm({
      name,
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: `console=ttyS0 rw initos.reboot_delay=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 ${append}` },
      disks: [{ file: target, snapshot: false }],
      tpm: { stateDir: tpmState },
      net: { forward: [{ host: port, guest: 15022 }] },
      memoryMiB: 2048,
    });
    return { vm, port };
  }
  const KEY = `${B}/test-ssh/id_ed25519`;

  it("remote unlock: the TPM refuses, the recovery sidecar takes the passphrase over ssh, the boot continues; the host key is kept on the pool", async () => {
    const { vm, port } = await bootRemote("luks-remote-unlock", "initos.sidecar=1 -- hold=120");
    await vm.waitFor(/initos: recovery: the passphrase is also accepted over ssh/, 240_000);
    // Before the unlock the recovery sidecar cannot read the pool: a key made for this boot.
    const known = { key: KEY, knownHosts: `${dir}/known_hosts_recovery` };
    const unlock = (input: string) => sshWhenUp(port, "unlock", { ...known, input });
    const wrong = await unlock("not-it\n");
    expect(wrong.stdout).toBe("wrong passphrase\n");
    expect(wrong.status).toBe(1);
    const right = await unlock(`${recovery}\n`);
    expect(right.stdout).toBe("unlocked; the boot continues\n");
    expect(right.status).toBe(0);
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).toMatch(/initos: unlock: wrong recovery passphrase \(attempt 1 of 3\)/);
    expect(vm.output).toMatch(/initos: unlock: unlocked with the recovery passphrase/);
    expect(vm.output).toMatch(/initos: supervise: sshd stopped/);
    // The key saved on the pool at the first boot is kept, not replaced; the sidecar beside the
    // OS presents it (recorded here, checked strictly by the next boot's test).
    expect(vm.output).not.toMatch(/ssh host key saved/);
    const pool = { key: KEY, knownHosts: `${dir}/known_hosts_pool`, alias: "initos-pool" };
    const st = await sshWhenUp(port, "status", pool);
    expect(st.status).toBe(0);
    expect(st.stdout).toMatch(/^mode: sidecar beside the OS\n/);
    expect(vm.output).not.toContain(recovery);
    await ssh(port, "reboot", pool);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 400_000);

  it("remote reseal: one ssh command unlocks and seals to the current PCRs; the sidecar beside the OS keeps the pool's host key", async () => {
    const { vm, port } = await bootRemote("luks-remote-reseal", "initos.sidecar=1 -- hold=120");
    await vm.waitFor(/initos: recovery: the passphrase is also accepted over ssh/, 240_000);
    // Before the unlock the recovery sidecar cannot read the pool: a key of this boot only.
    const r = await sshWhenUp(port, "reseal", { key: KEY, knownHosts: `${dir}/known_hosts_recovery2`, input: `${recovery}\n` });
    expect(r.stdout).toBe("unlocked and resealed to the current TPM state; the boot continues\n");
    expect(r.status).toBe(0);
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).toMatch(/initos: unlock: resealed; the next boot unlocks unattended/);
    expect(vm.output).not.toMatch(/Reseal the disk key/); // nobody was asked on the console
    // The same host key as at the last boot, from the pool (strict: known_hosts must hold it).
    const pool = { key: KEY, knownHosts: `${dir}/known_hosts_pool`, alias: "initos-pool" };
    const st = await sshWhenUp(port, "status", { ...pool, strict: true });
    expect(st.stderr).not.toMatch(/IDENTIFICATION HAS CHANGED|verification failed/);
    expect(st.status).toBe(0);
    expect(st.stdout).toMatch(/^mode: sidecar beside the OS\n/);
    await ssh(port, "poweroff", pool);
    expect(await vm.waitExit(60_000)).toBe(0);
  }, 400_000);

  it("after the remote reseal the same (direct boot) state unlocks with the TPM", async () => {
    const { vm } = await bootRemote("luks-after-remote-reseal", "");
    await vm.waitFor(MARKER, 240_000);
    expect(vm.output).toMatch(/initos: unlock: unlocked with the TPM/);
    await vm.waitExit(60_000);
  }, 300_000);
});
