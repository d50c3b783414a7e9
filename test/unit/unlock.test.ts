import { describe, expect, it } from "vitest";
import { parseCmdline } from "../../agent/cmdline.ts";
import { parseHostEnv, parseHostJson } from "../../agent/hostconfig.ts";
import { InstallConfigSchema, partition, recoveryPassphrase } from "../../agent/stages/install.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { UTAB } from "../../agent/stages/images.ts";
import { mountPool } from "../../agent/stages/pool.ts";
import { unlock, type UnlockOps } from "../../agent/stages/unlock.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const KEY = Buffer.from("k".repeat(32));
const PASS = "right-pass";

/** A scripted machine: what the TPM does, what the console answers, which secrets open the disk. */
function ops(o: { tpm?: boolean; latched?: boolean; unseal?: "ok" | "refused" | "wrong-key"; answers?: (string | null)[]; latchHolds?: boolean; latchFails?: boolean; resealRefusal?: string; driversFail?: string }) {
  const calls: string[] = [];
  const answers = [...(o.answers ?? [])];
  const released: Uint8Array[] = [];
  const u: UnlockOps = {
    hasTpm: o.tpm ?? true,
    alreadyLatched: o.latched ?? false,
    unsealKeys: () => {
      calls.push("unseal");
      if (o.unseal === "refused") return [];
      const key = Buffer.from(o.unseal === "wrong-key" ? "x".repeat(32) : KEY);
      released.push(key);
      return [{ device: "/dev/vda3", token: 0, keyslot: 0, key }];
    },
    latch: () => {
      calls.push("latch");
      if (o.latchFails) throw new Error("tpm: cannot extend the latch PCR 15: TPM_RC_LOCALITY; stopping, fail closed");
    },
    latchHolds: () => (calls.push("latchHolds"), o.latchHolds ?? true),
    beforeOpen: async () => {
      calls.push("drivers");
      if (o.driversFail) throw new Error(o.driversFail);
    },
    openWithTpmKeys: (keys) => {
      calls.push(`openTpm@${keys.map((k) => k.keyslot).join(",")}`);
      return keys.every((k) => Buffer.from(k.key).equals(KEY));
    },
    openWithPassphrase: (p) => (calls.push("open"), Buffer.from(p).toString() === PASS),
    readSecret: async () => (calls.push("prompt"), answers.shift() ?? null),
    confirm: async () => (calls.push("confirm"), answers.shift() === "y"),
    resealRefusal: () => o.resealRefusal ?? (o.tpm === false ? "no TPM" : null),
    reseal: (p) => void calls.push(`reseal:${Buffer.from(p).toString()}`),
  };
  return { u, calls, released };
}
const OPT = { tries: 3, checkLatch: false };

describe("unlock decisions", () => {
  it("TPM releases the key: latches, then opens in the token's keyslot, never prompts; the key is wiped", async () => {
    const { u, calls, released } = ops({});
    expect(await unlock(silentLog(), u, OPT)).toEqual({ method: "tpm", resealed: false });
    expect(calls).toEqual(["unseal", "latch", "drivers", "openTpm@0"]);
    expect(released[0]!.every((b) => b === 0)).toBe(true);
  });

  it("the drivers for opening (the modules image, checked through the unseal) fail: the released key is wiped, nothing is opened or asked", async () => {
    const { u, calls, released } = ops({ driversFail: "image modules: no copy matches root hash 5480c8de639a4d44... (slot a: dm-verity refused data block 732 of 4932 (EIO))" });
    await expect(unlock(silentLog(), u, OPT)).rejects.toThrow(/^image modules: no copy matches root hash/);
    expect(calls).toEqual(["unseal", "latch", "drivers"]);
    expect(released[0]!.every((b) => b === 0)).toBe(true);
  });

  it("latches even when the unseal fails, before asking a human", async () => {
    const { u, calls } = ops({ unseal: "refused", answers: [PASS, "n"] });
    expect(await unlock(silentLog(), u, OPT)).toEqual({ method: "passphrase", resealed: false });
    expect(calls).toEqual(["unseal", "latch", "drivers", "prompt", "open", "confirm"]);
  });

  it("a latch that cannot be extended stops the boot (fail closed) and wipes the released key", async () => {
    const { u, calls, released } = ops({ latchFails: true });
    await expect(unlock(silentLog(), u, OPT)).rejects.toThrow(/fail closed/);
    expect(calls).toEqual(["unseal", "latch"]);
    expect(released[0]!.every((b) => b === 0)).toBe(true);
  });

  it("latched earlier this boot (sidecar mode): no unseal attempt, straight to the passphrase", async () => {
    const { u, calls } = ops({ latched: true, answers: [PASS, "n"] });
    const log = silentLog();
    expect((await unlock(log, u, OPT)).method).toBe("passphrase");
    expect(calls[0]).toBe("latch");
    expect(calls).not.toContain("unseal");
    expect(log.lines).toContain("warn: unlock: the latch PCR was extended earlier this boot; the recovery passphrase is needed");
  });

  it("reseals with the passphrase when the operator says yes", async () => {
    const { u, calls } = ops({ unseal: "refused", answers: [PASS, "y"] });
    expect(await unlock(silentLog(), u, OPT)).toEqual({ method: "passphrase", resealed: true });
    expect(calls.at(-1)).toBe(`reseal:${PASS}`);
  });

  it("Secure Boot off: the passphrase unlocks, no reseal is offered, and the log says why", async () => {
    const { u, calls } = ops({ unseal: "refused", answers: [PASS, "y"], resealRefusal: "Secure Boot is off: PCR 7 would vouch for nothing" });
    const log = silentLog();
    expect(await unlock(log, u, OPT)).toEqual({ method: "passphrase", resealed: false });
    expect(calls).not.toContain("confirm");
    expect(log.lines).toContain("warn: unlock: no reseal: Secure Boot is off: PCR 7 would vouch for nothing");
  });

  it("no TPM: straight to the passphrase, and no reseal is offered", async () => {
    const { u, calls } = ops({ tpm: false, answers: [PASS] });
    expect(await unlock(silentLog(), u, OPT)).toEqual({ method: "passphrase", resealed: false });
    expect(calls).toEqual(["latch", "drivers", "prompt", "open"]);
  });

  it("three wrong passphrases end in a BootError; a fourth is never asked", async () => {
    const { u, calls } = ops({ unseal: "refused", answers: ["a", "b", "c", PASS] });
    const log = silentLog();
    await expect(unlock(log, u, OPT)).rejects.toThrow("unlock: 3 wrong recovery passphrases");
    expect(calls.filter((c) => c === "prompt")).toHaveLength(3);
    expect(log.lines.filter((l) => l.startsWith("err: unlock: wrong recovery passphrase"))).toHaveLength(3);
  });

  it("a key from the TPM that opens nothing falls back to the passphrase", async () => {
    const { u } = ops({ unseal: "wrong-key", answers: [PASS, "n"] });
    const log = silentLog();
    expect((await unlock(log, u, OPT)).method).toBe("passphrase");
    expect(log.lines).toContain("err: unlock: the keys from the TPM do not open the pool's volume");
  });

  it("no console to ask: a clear BootError instead of waiting forever", async () => {
    const { u } = ops({ tpm: false, answers: [] });
    await expect(unlock(silentLog(), u, OPT)).rejects.toThrow("unlock: no TPM key and no console to ask for the recovery passphrase");
  });

  it("with the latch check, says whether the latch holds", async () => {
    const held = silentLog();
    await unlock(held, ops({}).u, { ...OPT, checkLatch: true });
    expect(held.lines).toContain("info: unlock: latch holds: the key cannot be unsealed again this boot");
    const broken = silentLog();
    await unlock(broken, ops({ latchHolds: false }).u, { ...OPT, checkLatch: true });
    expect(broken.lines).toContain("err: unlock: LATCH FAILED: the key could be unsealed again this boot");
  });
});

describe("host config", () => {
  it("reads JSON with default binds", () => {
    expect(parseHostJson('{"root":"@root"}')).toEqual({
      root: "@root",
      binds: [
        { subvol: "@home", path: "/home" },
        { subvol: "@log", path: "/var/log" },
        { subvol: "@cache", path: "/var/cache" },
      ],
      refused: [],
    });
  });

  it("reads InitOS's initos.env without executing anything", () => {
    expect(parseHostEnv('# host\nexport INITOS_ROOT="@snap-2"\nOTHER=$(reboot)\n').root).toBe("@snap-2");
    expect(parseHostEnv("INITOS_ROOT=@r # comment").root).toBe("@r");
  });

  it("names what is wrong in malformed configs", () => {
    expect(() => parseHostJson("{")).toThrow(/host config initos.json: not JSON/);
    expect(() => parseHostJson('{"root":"../etc"}')).toThrow("host config initos.json: root: expected a subvolume name such as @root");
    expect(parseHostJson('{"root":"@r","binds":[{"subvol":"@h","path":"home"}]}').refused).toEqual([
      'host config initos.json: refused binds.0 {"subvol":"@h","path":"home"}: path: expected an absolute path; not mounted',
    ]);
    expect(() => parseHostJson('{"root":"@r","binds":{}}')).toThrow("host config initos.json: binds: ");
    expect(() => parseHostJson('{"root":"@r","extra":1}')).toThrow(/\(top level\)/);
    expect(() => parseHostEnv("INITOS_ROOT=@r; rm -rf /")).toThrow("host config initos.env: line 1: expected KEY=value");
    expect(() => parseHostEnv("FOO=1")).toThrow("host config initos.env: INITOS_ROOT is not set");
  });

  it("a root subvolume is a plain name: no ., .., / or leading dot (host config and cmdline alike)", () => {
    for (const bad of ["..", ".", "@..", ".hidden", "@root/..", "a/b", ""]) {
      expect(() => parseHostJson(JSON.stringify({ root: bad })), bad).toThrow("host config initos.json: root: expected a subvolume name such as @root");
      expect(() => parseHostEnv(`INITOS_ROOT=${bad}`), bad).toThrow("host config initos.env: root: expected a subvolume name such as @root");
    }
    expect(parseHostJson('{"root":"@snap-2024.01_a"}').root).toBe("@snap-2024.01_a");
    for (const bad of ["..", ".", "@..", ".x"]) {
      const { cmdline, errors } = parseCmdline(`initos.root=${bad}`);
      expect(cmdline.rootSubvolume).toBeUndefined();
      expect(errors).toEqual([`cmdline: initos.root=${JSON.stringify(bad)} is invalid (expected a subvolume name such as @root); using the default`]);
    }
    expect(parseCmdline("initos.root=@snap.1").cmdline.rootSubvolume).toBe("@snap.1");
  });

  it("refuses each hostile bind with one line naming it, keeps the others, and still parses the root", () => {
    const c = parseHostJson(
      JSON.stringify({
        root: "@root",
        binds: [
          { subvol: "@x", path: "/../usr/bin" },
          { subvol: "@x", path: "/home/../../run/initos/images/tools" },
          { subvol: "@x", path: "/./etc" },
          { subvol: "../x", path: "/srv" },
          { subvol: "@x", path: "/" },
          { subvol: "@x" },
          { subvol: "@ok", path: "/srv/data" },
        ],
      }),
    );
    expect(c.root).toBe("@root");
    expect(c.binds).toEqual([{ subvol: "@ok", path: "/srv/data" }]);
    expect(c.refused).toEqual([
      'host config initos.json: refused binds.0 {"subvol":"@x","path":"/../usr/bin"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'host config initos.json: refused binds.1 {"subvol":"@x","path":"/home/../../run/initos/images/tools"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'host config initos.json: refused binds.2 {"subvol":"@x","path":"/./etc"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'host config initos.json: refused binds.3 {"subvol":"../x","path":"/srv"}: subvol: expected a subvolume name such as @root; not mounted',
      'host config initos.json: refused binds.4 {"subvol":"@x","path":"/"}: path: expected a directory below the root, e.g. /home; not mounted',
      expect.stringMatching(/^host config initos.json: refused binds.5 \{"subvol":"@x"\}: path: .*; not mounted$/),
    ]);
  });
});

describe("mounting the pool", () => {
  function pool(rootExists: boolean): FakeSys {
    const s = new FakeSys().add("/run/initos/pool/initos.json", { kind: "file", data: '{"root":"@root"}' }).add("/run/initos/pool/@home", { kind: "dir" });
    if (rootExists) s.add("/run/initos/pool/@root", { kind: "dir" });
    s.add("/sysroot/home", { kind: "dir" });
    return s;
  }

  it("mounts every opened device into one pool, the root subvolume, and the binds that exist", () => {
    const s = pool(true);
    const r = mountPool(s, silentLog(), ["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"], true, undefined, DEFAULT_CONFIG);
    expect(r.config.root).toBe("@root");
    const dev = "device=/dev/mapper/initos-pool0,device=/dev/mapper/initos-pool1";
    // The bind target is resolved inside the root by the kernel and mounted by its fd.
    expect(s.calls.filter((c) => /^(mount|openDirInRoot|close)/.test(c))).toEqual([
      `mount /dev/mapper/initos-pool0 /run/initos/pool btrfs 0x7 subvolid=5,${dev}`,
      `mount /dev/mapper/initos-pool0 /sysroot btrfs 0x0 subvol=@root,${dev}`,
      "openDirInRoot /sysroot /home",
      `mount /dev/mapper/initos-pool0 /proc/self/fd/100 btrfs 0x4 subvol=@home,${dev}`, // @log, @cache absent: skipped
      "close 100",
    ]);
    expect(s.openedInRoot.get(100)).toBe("/sysroot/home");
    expect(s.calls.at(-1)).toBe("umount /run/initos/pool 2");
    // Marked as the initrd's mounts, by the path and subvolume the OS will see after the switch.
    expect(s.readFile(UTAB)).toBe("SRC=/dev/mapper/initos-pool0 TARGET=/home ROOT=/@home OPTS=x-initrd.mount\n");
  });

  /** A pool whose host config (written by the OS's root) asks for `binds`; @root, @home and @x exist. */
  function hostile(binds: unknown[]): FakeSys {
    return new FakeSys()
      .add("/run/initos/pool/initos.json", { kind: "file", data: JSON.stringify({ root: "@root", binds }) })
      .add("/run/initos/pool/@root", { kind: "dir" })
      .add("/run/initos/pool/@home", { kind: "dir" })
      .add("/run/initos/pool/@x", { kind: "dir" })
      .add("/sysroot/home", { kind: "dir" })
      .add("/usr/bin", { kind: "dir" })
      .add("/etc/initos", { kind: "dir" });
  }
  const mountsOfX = (s: FakeSys) => s.calls.filter((c) => c.startsWith("mount") && c.includes("subvol=@x"));

  it("a bind path with .. in the host config is refused with one line; nothing is mounted over the initramfs; the root boots", () => {
    const s = hostile([
      { subvol: "@x", path: "/../usr/bin" },
      { subvol: "@x", path: "/../etc/initos" },
      { subvol: "@home", path: "/home" },
    ]);
    const log = silentLog();
    const r = mountPool(s, log, ["/dev/mapper/initos-pool0"], true, undefined, DEFAULT_CONFIG);
    expect(r.path).toBe("/sysroot");
    expect(mountsOfX(s)).toEqual([]);
    expect(s.calls.some((c) => c.startsWith("openDirInRoot") && c.includes(".."))).toBe(false);
    expect(log.lines.filter((l) => l.startsWith("err:"))).toEqual([
      'err: host config initos.json: refused binds.0 {"subvol":"@x","path":"/../usr/bin"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'err: host config initos.json: refused binds.1 {"subvol":"@x","path":"/../etc/initos"}: path: "." and ".." are not allowed in a bind path; not mounted',
    ]);
    expect(log.lines).toContain("info: pool: root @root on /sysroot (rw), @home->/home");
  });

  it("a symlink in a bind path (inside the root subvolume) is refused, not followed out of the root", () => {
    const s = hostile([
      { subvol: "@x", path: "/home" },
      { subvol: "@x", path: "/var/log" },
      { subvol: "@x", path: "/sbin" },
    ]);
    s.files.delete("/sysroot/home");
    s.add("/sysroot/home", { kind: "link", target: "/../../usr/bin" }) // the OS's root made /home a symlink
      .add("/sysroot/var", { kind: "link", target: "/etc/initos" })
      .add("/sysroot/sbin", { kind: "file" });
    const log = silentLog();
    mountPool(s, log, ["/dev/mapper/initos-pool0"], false, undefined, DEFAULT_CONFIG);
    expect(mountsOfX(s)).toEqual([]);
    expect(log.lines.filter((l) => l.startsWith("err:"))).toEqual([
      "err: pool: refused bind @x on /home: a symlink in the path (a bind target must be a real directory of the root); not mounted",
      "err: pool: refused bind @x on /var/log: a symlink in the path (a bind target must be a real directory of the root); not mounted",
      "err: pool: refused bind @x on /sbin: not a directory; not mounted",
    ]);
    expect(log.lines).toContain("info: pool: root @root on /sysroot (ro)");
  });

  it("a bind target missing from the root is skipped with a warning, as before", () => {
    const s = hostile([{ subvol: "@home", path: "/srv/home" }]);
    const log = silentLog();
    mountPool(s, log, ["/dev/mapper/initos-pool0"], false, undefined, DEFAULT_CONFIG);
    expect(log.lines).toContain("warn: pool: /srv/home does not exist in @root; @home not mounted");
    expect(s.calls.filter((c) => c.startsWith("mount")).length).toBe(2); // the pool and the root
  });

  it("a host config that is a symlink is refused (it could point into the initramfs)", () => {
    const s = new FakeSys().add("/run/initos/pool/initos.json", { kind: "link", target: "/etc/initos/config.json" }).add("/run/initos/pool/@root", { kind: "dir" });
    expect(() => mountPool(s, silentLog(), ["/dev/mapper/initos-pool0"], false, undefined, DEFAULT_CONFIG)).toThrow("refused the host config initos.json at the top of the pool: a symlink, or a symlink on its path (links there are not followed)");
    expect(s.calls.at(-1)).toBe("umount /run/initos/pool 2");
  });

  it("a missing root subvolume is a clear error, and the pool is unmounted again", () => {
    const s = pool(false);
    expect(() => mountPool(s, silentLog(), ["/dev/mapper/initos-pool0"], false, undefined, DEFAULT_CONFIG)).toThrow("root subvolume @root (from the host config) is not in the pool");
    expect(s.calls.at(-1)).toBe("umount /run/initos/pool 2");
  });
});

// The sidecar's ssh host key on the pool (keepHostKey): test/unit/poolfiles.test.ts.

describe("install helpers", () => {
  it("names partitions like the kernel", () => {
    expect(partition("/dev/vdb", 3)).toBe("/dev/vdb3");
    expect(partition("/dev/nvme0n1", 1)).toBe("/dev/nvme0n1p1");
  });

  it("makes recovery passphrases of 8 groups of 5 unambiguous characters", () => {
    const p = recoveryPassphrase(Buffer.from(Array.from({ length: 40 }, (_, i) => i * 7)));
    expect(p).toMatch(/^([a-z2-9]{5}-){7}[a-z2-9]{5}$/);
    expect(p).not.toMatch(/[01ilo]/);
  });

  it("validates the install config and requires the root filesystem's checksum", () => {
    expect(InstallConfigSchema.safeParse({ target: "/dev/vdb", rootfs: { file: "r.tar", sha256: "a".repeat(64) } }).success).toBe(true);
    expect(InstallConfigSchema.safeParse({ target: "vdb", rootfs: { file: "r.tar", sha256: "a".repeat(64) } }).success).toBe(false);
    expect(InstallConfigSchema.safeParse({ target: "/dev/vdb", rootfs: { file: "r.tar" } }).success).toBe(false);
  });
});
