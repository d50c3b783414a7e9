// A container jail for real, as root on this host: the agent's rootfs, shares, spec and crun
// command with the host's crun (the Makefile installs it; the tools image carries the same
// build). The work runs in a private mount namespace (helpers/crunjail.ts); the network
// namespace it joins is made here as the agent's network code would (`ip netns add`).
// This host has cgroup v1, so crun runs with --cgroup-manager=disabled and the spec has no
// limits (cgroups: false): the limits are covered by the QEMU scenario, which has cgroup v2.
import { execFileSync } from "node:child_process";
import { chmodSync, existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const NETNS = `initos-crun-${process.pid}`;
const dir = mkdtempSync(`${tmpdir()}/initos-crun-`);
// The jail's root (host uid idBase) walks from / to its rootfs: as /x is on a jail host.
chmodSync(dir, 0o755);
let r: Record<string, any>;

beforeAll(() => {
  expect(process.getuid?.()).toBe(0);
  execFileSync("ip", ["netns", "add", NETNS]);
  const out = execFileSync("unshare", ["-m", "--propagation", "private", BUN, "test/system/helpers/crunjail.ts", dir, `/run/netns/${NETNS}`], { encoding: "utf8", timeout: 60_000 });
  r = JSON.parse(out);
}, 90_000);

afterAll(() => {
  try {
    execFileSync("ip", ["netns", "del", NETNS]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

describe("container jail under crun", () => {
  it("runs the jail's command to its end in the foreground", () => {
    expect(r.ready).toBe(true);
    expect(r.exit).toBe(0);
    expect(r.argv).toEqual(["crun", "--root", `${dir}/crun`, "--cgroup-manager=disabled", "run", "--bundle", `${dir}/run/tiny`, "tiny"]);
  });

  it("its process is PID 1 of its own pid namespace", () => {
    expect(r.inside.self).toBe("1");
  });

  it("uid 0 inside is the jail's idBase outside, as the host's /proc shows", () => {
    expect(r.inside.uid).toBe("0");
    expect(r.hostUidMap).toEqual([0, 3145728, 65536]);
    expect(r.hostUid).toBe("3145728");
  });

  it("the rootfs snapshot is owned by the range, setuid kept, symlinks shifted themselves, the image untouched", () => {
    const base = 3145728;
    expect(r.owners.root).toMatchObject({ uid: base, gid: base });
    expect(r.owners.busybox).toEqual({ uid: base, gid: base, mode: 0o755 });
    expect(r.owners.hardlink).toEqual({ uid: base, gid: base, mode: 0o755 });
    expect(r.owners.su).toEqual({ uid: base, gid: base, mode: 0o4755 });
    expect(r.owners.link).toMatchObject({ uid: base, gid: base });
    expect(r.owners.user1000).toMatchObject({ uid: base + 1000, gid: base + 1000 });
    expect(r.imageOwner).toBe(0);
    expect(r.inside.ownerInside).toBe("0");
  });

  it("sees no host device: /dev is crun's tmpfs with the standard nodes only", () => {
    expect(r.inside.dev.trim().split(" ").sort()).toEqual(["core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]);
    expect(r.inside.blockdevs).toMatch(/\/dev\/vda: No such file.*\/dev\/loop0: No such file.*\/dev\/loop-control: No such file/);
  });

  it("/sys is read-only down to every submount; runc's masked and read-only /proc paths apply", () => {
    expect(r.inside.sysmount).toMatch(/^sysfs \/sys sysfs ro,/);
    expect(r.inside.sysrw).toBe("0");
    expect(r.inside.timerlist).toBe("1,3"); // /dev/null bound over it
    expect(r.inside.procsys).toBe("ro");
  });

  it("a read-only share is there and cannot be written", () => {
    expect(r.inside.share).toBe("from the share");
    expect(r.inside.shareWrite).toBe("no");
  });

  it("seccomp is on and denies what the profile names: a nested user namespace (allowed on this host), swapoff", () => {
    execFileSync("unshare", ["-U", "true"]); // the host itself allows user namespaces
    expect(r.hostSeccomp).toBe("2");
    expect(r.inside["unshare:"]).toBe("unshare(0x10000000): Operation not permitted");
    expect(r.inside.unshareU).toBe("1");
    expect(r.inside["swapoff:"]).toBe("/dev/null: Operation not permitted");
  });

  it("removeContainer leaves nothing: no snapshot, no staged share, no crun state", () => {
    expect(r.snapshotLeft).toBe(false);
    // Also not the subvolumes the jail's root made inside its rootfs (a forged list line among
    // them), which would otherwise have stopped the snapshot's delete; the share is untouched.
    expect(r.subvolumesBefore).toBe(7); // 6 subvolumes; the forged name prints a 7th line
    expect(r.subvolumesAfter).toEqual(["@img-tiny", "@data"]);
    expect(r.shareAfter).toBe("from the share\n");
    expect(r.stagedLeft).toEqual([]);
    expect(existsSync(`${dir}/crun/tiny`)).toBe(false);
    expect(r.log[0]).toMatch(/^jail tiny: rootfs @jail-tiny from @img-tiny, \d+ inodes owned from uid\/gid 3145728 \(\d+ ms\)$/);
  });
});
