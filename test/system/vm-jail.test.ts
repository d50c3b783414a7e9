// A VM jail's launcher run on this host, the same code jail mode runs as PID 1: a btrfs pool
// (a loop-mounted file) holds the image subvolume @img-app and a share subvolume; vmDisk makes
// the VM disk from the image; vmService's QEMU (the host's, under TCG, no network) is run by the
// supervisor, which logs its console as "<jail>: ..."; the VM kernel + initrd boot vm mode, the
// app prints its marker and the VM powers itself off. powerdownVm's QMP request reaches the
// app as SIGTERM (pod.c's power button). QEMU runs under flock /tmp/initos-qemu.lock (QEMU
// runs are serialized across test runs on this machine).
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Jail } from "../../agent/jailsconfig.ts";
import { openVmShares, powerdownVm, VM_DISKS, vmDisk, vmService } from "../../agent/jails/vm.ts";
import type { Logger } from "../../agent/log.ts";
import { supervise } from "../../agent/supervise.ts";
import type { Sys } from "../../agent/sys/index.ts";

const B = `${process.cwd()}/build`;
let dir: string;
let pool: string;
let sys: Sys;

/** A logger keeping every line, with a way to wait (bounded) for one. */
function recordingLog() {
  const lines: string[] = [];
  const push = (lvl: string) => (m: string) => void lines.push(`${lvl}: ${m}`);
  const log: Logger = { err: push("err"), warn: push("warn"), info: push("info"), debug: push("debug"), quiet: false, verbose: false, recent: () => [...lines] } as unknown as Logger;
  const waitFor = async (re: RegExp, ms: number): Promise<RegExpMatchArray> => {
    const until = Date.now() + ms;
    for (;;) {
      for (const l of lines) {
        const m = re.exec(l);
        if (m) return m;
      }
      if (Date.now() > until) throw new Error(`${re} not seen within ${ms}ms; last lines:\n${lines.slice(-30).join("\n")}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  };
  return { log, lines, waitFor };
}

const jail = (over: Partial<Jail> = {}): Jail => ({
  name: "app",
  kind: "vm",
  image: "app",
  cpus: 1,
  memoryMiB: 512,
  address: "10.77.0.10",
  shares: [{ subvol: "@data", path: "/z", readOnly: false }],
  env: {},
  idBase: 16 * 65536,
  ...over,
});

const launch = async (j: Jail) => ({
  qemu: ["flock", "/tmp/initos-qemu.lock", "qemu-system-x86_64"],
  kernel: `${B}/vm/vmlinuz`,
  initrd: `${B}/vm/initrd.img`,
  disk: await vmDisk(sys, recordingLog().log, { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] }, j, pool),
  shares: openVmShares(sys, j, pool).shares, // left open: the test process ends soon
  qmp: `${dir}/qmp-${j.name}.sock`,
  kvm: false,
});

beforeAll(async () => {
  sys = await (await import("../../agent/sys/index.ts")).realSys();
  dir = mkdtempSync(`${tmpdir()}/initos-vmjail-`);
  pool = `${dir}/x`;
  mkdirSync(pool);
  execFileSync("truncate", ["-s", "1G", `${dir}/pool.img`]);
  execFileSync("mkfs.btrfs", ["-q", "-f", `${dir}/pool.img`], { stdio: "ignore" });
  execFileSync("mount", ["-o", "loop", `${dir}/pool.img`, pool]);
  execFileSync("btrfs", ["-q", "subvolume", "create", `${pool}/@img-app`]);
  for (const d of ["bin", "dev", "proc", "sys", "run", "tmp", "z", "x"]) mkdirSync(`${pool}/@img-app/${d}`);
  copyFileSync(`${B}/app-under-test`, `${pool}/@img-app/bin/app-under-test`);
  execFileSync("chmod", ["755", `${pool}/@img-app/bin/app-under-test`]);
  execFileSync("btrfs", ["property", "set", "-ts", `${pool}/@img-app`, "ro", "true"]);
  execFileSync("btrfs", ["-q", "subvolume", "create", `${pool}/@data`]);
  writeFileSync(`${pool}/@data/hello.txt`, "written-by-host\n");
  symlinkSync("/", `${pool}/@data/escape`); // what a jail could leave in its share
}, 60_000);

afterAll(() => {
  if (pool) execFileSync("umount", ["-l", pool]);
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe.sequential("VM jail launcher on this host (TCG)", () => {
  it("vmDisk: the image's disk is made once per image subvolume and each start gets a reflinked copy", async () => {
    const j = jail();
    const d1 = await vmDisk(sys, recordingLog().log, { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] }, j, pool);
    const d2 = await vmDisk(sys, recordingLog().log, { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] }, j, pool);
    expect(d1).toBe(`${pool}/${VM_DISKS}/jail-app.img`);
    expect(d2).toBe(d1);
    const bases = sys.readdir(`${pool}/${VM_DISKS}`).filter((f) => f.startsWith("img-app."));
    expect(bases).toHaveLength(1);
    // The copy shares the base's extents: btrfs counts them as shared, not exclusive.
    const du = execFileSync("btrfs", ["filesystem", "du", "--raw", `${pool}/${VM_DISKS}/${bases[0]}`, d1], { encoding: "utf8" });
    const exclusive = du.split("\n").slice(1, 3).map((l) => Number(l.trim().split(/\s+/)[1]));
    expect(exclusive).toEqual([0, 0]);
    expect(statSync(d1).size).toBe(8192 * 2 ** 20);
  });

  it("vmDisk: a missing image is one line naming it, and nothing is left behind", async () => {
    const before = sys.readdir(`${pool}/${VM_DISKS}`).sort();
    await expect(vmDisk(sys, recordingLog().log, { btrfs: ["btrfs"], mkfs: ["mkfs.btrfs"] }, jail({ name: "nope", image: "nope" }), pool)).rejects.toThrow(
      `jail nope: image nope: ${pool}/@img-nope does not exist (image import nope)`,
    );
    expect(sys.readdir(`${pool}/${VM_DISKS}`).sort()).toEqual(before);
  });

  it("openVmShares: a share through a symlink the jail left is refused with one line, on the real openat2", () => {
    const j = jail({ shares: [{ subvol: "@data", dir: "escape/etc", path: "/z", readOnly: true }] });
    expect(() => openVmShares(sys, j, pool)).toThrow("jail app: share @data/escape/etc crosses a symlink in the pool");
  });

  it("boots the image under the supervisor: the app's marker in the log as 'app: ...', the share, then the VM powers itself off", async () => {
    const j = jail({ command: ["/bin/app-under-test", "arg 1", "arg2"] });
    const { log, lines, waitFor } = recordingLog();
    const t0 = Date.now();
    const svc = supervise(sys, log, vmService(j, await launch(j)));
    try {
      const m = await waitFor(/info: app: (APP-UNDER-TEST pid=\d+ argv=\[[^\]]*\].*)$/, 240_000);
      const tMarker = Date.now() - t0;
      expect(m[1]).toMatch(/^APP-UNDER-TEST pid=\d+ argv=\[arg 1 arg2\] share=written-by-host .*hostname=app eth0=none$/);
      await waitFor(/supervise: app exited with 0/, 120_000);
      console.log(`VM jail under TCG: app marker after ${(tMarker / 1000).toFixed(1)}s, QEMU exited after ${((Date.now() - t0) / 1000).toFixed(1)}s (wall, incl. waiting for the QEMU lock)`);
      expect(lines.some((l) => /info: app: .*initos: vm: share share0 \(9p\) on \/z/.test(l))).toBe(true);
      expect(lines.some((l) => /initos-pod: app exited with 7/.test(l))).toBe(true);
    } finally {
      await svc.stop(sys);
    }
  }, 420_000);

  it("powerdownVm: QMP system_powerdown reaches the app as SIGTERM and the VM powers off", async () => {
    const j = jail({ command: ["app-under-test", "wait"], shares: [] });
    const o = await launch(j);
    const { log, lines, waitFor } = recordingLog();
    const svc = supervise(sys, log, vmService(j, o));
    try {
      await waitFor(/app: APP-UNDER-TEST waiting for SIGTERM/, 240_000);
      const t0 = Date.now();
      expect(await powerdownVm(sys, log, o.qmp, 10_000)).toBe(true);
      await waitFor(/app: APP-UNDER-TEST got SIGTERM/, 60_000);
      await waitFor(/supervise: app exited with 0/, 60_000);
      console.log(`VM jail: powered off ${((Date.now() - t0) / 1000).toFixed(1)}s after system_powerdown`);
      expect(lines.some((l) => /initos-pod: power button: sending SIGTERM to the app/.test(l))).toBe(true);
    } finally {
      await svc.stop(sys);
    }
  }, 420_000);

  it("powerdownVm: no QMP socket is a logged failure, not a hang", async () => {
    const { log, lines } = recordingLog();
    expect(await powerdownVm(sys, log, `${dir}/none.sock`, 2000)).toBe(false);
    expect(lines.some((l) => l.startsWith(`warn: qmp ${dir}/none.sock: `))).toBe(true);
  });
});
