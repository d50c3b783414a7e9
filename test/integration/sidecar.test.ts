// Sidecar mode under QEMU with user networking (restrict=on: the guest reaches nothing outside
// QEMU) and a forward from 127.0.0.1 to the guest's sshd: a real OpenSSH client logs in.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { freePort, startVm, stopAll, type Vm } from "../../qemu/harness.ts";

const B = "build";
const KEY = `${B}/test-ssh/id_ed25519`;
let dir: string;
let vm: Vm;
let port: number;

function ssh(key: string | null, command: string, extra: string[] = []) {
  const auth = key ? ["-i", key, "-o", "IdentitiesOnly=yes", "-o", "PreferredAuthentications=publickey"] : ["-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1"];
  return spawnSync(
    "ssh",
    [...auth, ...extra, "-p", String(port), "-o", "StrictHostKeyChecking=no", "-o", `UserKnownHostsFile=${dir}/known_hosts`, "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "root@127.0.0.1", command],
    { encoding: "utf8", timeout: 90_000 },
  );
}

/** sshd comes up a moment after the agent says ready; retry the connection, bounded. */
async function sshWhenUp(key: string, command: string) {
  for (let i = 0; i < 30; i++) {
    const r = ssh(key, command);
    if (!/kex_exchange_identification|Connection (reset|refused|closed)/.test(r.stderr)) return r;
    await new Promise((res) => setTimeout(res, 2000));
  }
  throw new Error("sshd never answered");
}

beforeAll(async () => {
  dir = mkdtempSync(`${tmpdir()}/initos-ssh-`);
  spawnSync("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", `${dir}/stranger`]);
  port = await freePort();
  vm = await startVm({
    name: "sidecar",
    direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.mode=sidecar initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" },
    disks: [{ file: `${B}/boot.img` }],
    net: { forward: [{ host: port, guest: 15022 }] },
  });
  await vm.waitFor(/initos: sidecar: ready/, 150_000);
}, 200_000);
afterAll(async () => {
  await stopAll();
  rmSync(dir, { recursive: true, force: true });
});
afterEach(() => {});

describe.sequential("sidecar", () => {
  it("static address from initos.ip/initos.gw, sshd supervised on 15022", () => {
    expect(vm.output).toMatch(/initos: network: eth0 10\.0\.2\.15\/24 via 10\.0\.2\.2/);
    expect(vm.output).toMatch(/initos: supervise: sshd started \(pid \d+\)/);
    expect(vm.output).toMatch(/initos: sidecar: sshd on port 15022, 1 authorized key\(s\)/);
  });

  it("the key from the UKI logs in and runs status; the session is the command interface, not a shell", async () => {
    const r = await sshWhenUp(KEY, "status");
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^mode: sidecar\nsecure boot: no-efi\nstages: early \d+ms, .*network \d+ms, sshd \d+ms\n$/);
    const sh = ssh(KEY, "cat /etc/passwd; id");
    expect(sh.status).toBe(2);
    expect(sh.stderr).toMatch(/initos: unknown command "cat"; try: status, log, unlock, reboot, poweroff/);
    expect(vm.output).toMatch(/initos: ctl: status/);
  }, 120_000);

  it("a key that is not in the UKI is refused", async () => {
    const r = ssh(`${dir}/stranger`, "status");
    expect(r.status).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  }, 120_000);

  it("password login is refused (not even offered)", async () => {
    const r = ssh(null, "status");
    expect(r.status).toBe(255);
    expect(r.stderr).toMatch(/Permission denied \(publickey\)/);
  }, 120_000);

  it("ctl poweroff over ssh powers the machine off", async () => {
    const r = ssh(KEY, "poweroff");
    expect(r.stdout).toBe("poweroff in progress\n");
    expect(await vm.waitExit(60_000)).toBe(0);
    expect(vm.output).toMatch(/initos: ctl: poweroff/);
  }, 120_000);
});
