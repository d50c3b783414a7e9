// What the OS's root can leave on the pool for the next boot's initrd to read (issue #23): the
// host config and the sidecar's host key. Decisions with the fake machine; regular.ts, which the
// real machine reads them with, with real files (a FIFO, a sparse 1 GiB file, links) through
// openat2 (koffi under Node, no root needed; as root under Bun: test/system/poolfiles.test.ts).
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { BootError } from "../../agent/errors.ts";
import { HOST_CONFIG_MAX, mountPool, POOL_HOST_KEY, POOL_KEY_MAX, readHostConfig } from "../../agent/stages/pool.ts";
import { dropbearPublicKey, HOST_KEY, sshPublicKey, wipeHostKey } from "../../agent/stages/sidecar.ts";
import { openBeneath } from "../../agent/sys/libc.ts";
import { readRegularBeneath, RefusedFile } from "../../agent/sys/regular.ts";
import { fakeDropbearKey, FakeSys, silentLog } from "./fakesys.ts";

const TOP = "/run/initos/pool";
const DEV = ["/dev/mapper/initos-pool0"];
const pool = () => new FakeSys().add(`${TOP}/@root`, { kind: "dir" });
const refusal = (f: () => unknown): string => {
  try {
    f();
  } catch (e) {
    return e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  }
  return "no error";
};

describe("the host config on the pool (readHostConfig)", () => {
  it("a regular initos.json is read and parsed", () => {
    const s = pool().add(`${TOP}/initos.json`, { kind: "file", data: '{"root":"@root"}' });
    expect(readHostConfig(s, TOP).root).toBe("@root");
    expect(s.calls).toEqual([`readRegular ${TOP} initos.json`]);
  });

  it("one of exactly the cap is read; one byte more is refused by its size, without a parse", () => {
    const json = '{"root":"@root"}';
    const s = pool().add(`${TOP}/initos.json`, { kind: "file", data: json + " ".repeat(HOST_CONFIG_MAX - json.length) });
    expect(readHostConfig(s, TOP).root).toBe("@root");
    s.add(`${TOP}/initos.json`, { kind: "file", data: json + " ".repeat(HOST_CONFIG_MAX + 1 - json.length) });
    expect(refusal(() => readHostConfig(s, TOP))).toBe("BootError: refused the host config initos.json at the top of the pool: 65537 bytes, more than the 65536 allowed");
  });

  for (const [what, node, why] of [
    ["a FIFO", { kind: "fifo" }, "a FIFO, not a regular file"],
    ["a directory", { kind: "dir" }, "a directory, not a regular file"],
    ["a symlink", { kind: "link", target: "/etc/initos/config.json" }, "a symlink, or a symlink on its path (links there are not followed)"],
  ] as const) {
    it(`initos.json as ${what}: the boot fails with one line naming it, and initos.env is not tried instead`, () => {
      const s = pool().add(`${TOP}/initos.json`, node).add(`${TOP}/initos.env`, { kind: "file", data: "INITOS_ROOT=@root\n" });
      expect(refusal(() => readHostConfig(s, TOP))).toBe(`BootError: refused the host config initos.json at the top of the pool: ${why}`);
      expect(s.calls).toEqual([`readRegular ${TOP} initos.json`]);
    });
  }

  it("initos.env is held to the same rules when there is no initos.json", () => {
    const s = pool().add(`${TOP}/initos.env`, { kind: "fifo" });
    expect(refusal(() => readHostConfig(s, TOP))).toBe("BootError: refused the host config initos.env at the top of the pool: a FIFO, not a regular file");
    s.add(`${TOP}/initos.env`, { kind: "file", data: "INITOS_ROOT=@root\n" });
    expect(readHostConfig(s, TOP).root).toBe("@root");
  });

  it("through mountPool: a refused host config is a BootError and the pool is unmounted again", () => {
    const s = pool().add(`${TOP}/initos.json`, { kind: "fifo" });
    let err: unknown;
    try {
      mountPool(s, silentLog(), DEV, false, undefined, DEFAULT_CONFIG);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(BootError);
    expect(s.calls.at(-1)).toBe(`umount ${TOP} 2`);
    expect(s.calls.some((c) => c.startsWith("mount") && c.includes("/sysroot"))).toBe(false);
  });
});

describe("the ssh host key once the pool is open (keepHostKey): the pinned recovery key stays out of the OS", () => {
  const keyed = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: ["ssh-ed25519 AAAA test"] } };
  const RECOVERY = fakeDropbearKey("recovery");
  const POOLKEY = fakeDropbearKey("pool");
  /** A pool with a host config, and in /run the recovery host key release.ts unsealed. */
  const machine = () =>
    pool()
      .add(`${TOP}/initos.json`, { kind: "file", data: '{"root":"@root"}' })
      .add(HOST_KEY, { kind: "file", data: RECOVERY.toString("latin1") });
  const bytes = (s: FakeSys, p: string) => Buffer.from(s.readFile(p) ?? "", "latin1");
  const writesToPool = (s: FakeSys) => s.calls.filter((c) => /^(writeFile|rename) /.test(c) && c.includes(TOP));

  it("the pool's own key replaces the recovery key in /run (overwritten in place, then unlinked); nothing is written to the pool", () => {
    const s = machine().add(`${TOP}/initos`, { kind: "dir" }).add(`${TOP}/${POOL_HOST_KEY}`, { kind: "file", data: POOLKEY.toString("latin1") });
    mountPool(s, silentLog(), DEV, false, undefined, keyed);
    expect(bytes(s, HOST_KEY).equals(POOLKEY)).toBe(true);
    const wipe = s.calls.indexOf(`writeOnce ${HOST_KEY}`);
    expect(wipe).toBeGreaterThan(-1);
    expect(s.calls[wipe + 1]).toBe(`unlink ${HOST_KEY}`);
    expect(writesToPool(s)).toEqual([]);
    expect(s.calls.some((c) => c.includes("0x20"))).toBe(false); // never remounted rw
  });

  it("a pool without a key gets a NEW one (not the recovery key), saved through a fresh name; the line says first boot", () => {
    const s = machine();
    const log = silentLog();
    mountPool(s, log, DEV, false, undefined, keyed);
    const saved = bytes(s, `${TOP}/${POOL_HOST_KEY}`);
    expect(saved.equals(fakeDropbearKey("made-1"))).toBe(true);
    expect(saved.equals(RECOVERY)).toBe(false);
    expect(bytes(s, HOST_KEY).equals(saved)).toBe(true);
    expect(writesToPool(s)).toEqual([`writeFile ${TOP}/${POOL_HOST_KEY}.new`, `rename ${TOP}/${POOL_HOST_KEY}.new ${TOP}/${POOL_HOST_KEY}`]);
    expect(s.calls.filter((c) => c.startsWith(`mount ${DEV[0]} ${TOP}`))).toEqual([
      `mount ${DEV[0]} ${TOP} btrfs 0x7 subvolid=5,device=${DEV[0]}`,
      `mount ${DEV[0]} ${TOP} btrfs 0x26`,
      `mount ${DEV[0]} ${TOP} btrfs 0x27`,
    ]);
    expect(log.lines).toContain(`info: pool: ssh host key saved as ${POOL_HOST_KEY} (first boot)`);
  });

  it("a pool holding a copy of the recovery key (an older version saved it): detected by the public half, replaced by a new key, one line", () => {
    const s = machine().add(`${TOP}/initos`, { kind: "dir" }).add(`${TOP}/${POOL_HOST_KEY}`, { kind: "file", data: RECOVERY.toString("latin1") });
    const log = silentLog();
    mountPool(s, log, DEV, false, undefined, keyed);
    const saved = bytes(s, `${TOP}/${POOL_HOST_KEY}`);
    expect(dropbearPublicKey(saved)!.equals(dropbearPublicKey(RECOVERY)!)).toBe(false);
    expect(bytes(s, HOST_KEY).equals(saved)).toBe(true);
    expect(log.lines.filter((l) => l.startsWith("warn:"))).toEqual([
      `warn: pool: ${POOL_HOST_KEY} is the pinned recovery host key (${sshPublicKey(dropbearPublicKey(RECOVERY)!)}), saved there by an older version; replaced with a new key for the sidecar beside the OS`,
    ]);
    expect(log.lines).toContain(`info: pool: ssh host key saved as ${POOL_HOST_KEY} (replaced)`);
  });

  it("a key file that is not a dropbear ed25519 key is replaced", () => {
    const s = machine().add(`${TOP}/initos`, { kind: "dir" }).add(`${TOP}/${POOL_HOST_KEY}`, { kind: "file", data: "saved-key" });
    const log = silentLog();
    mountPool(s, log, DEV, false, undefined, keyed);
    expect(dropbearPublicKey(bytes(s, `${TOP}/${POOL_HOST_KEY}`))).not.toBeNull();
    expect(log.lines).toContain(`warn: pool: ${POOL_HOST_KEY} is not a dropbear ed25519 key; replaced with a new one`);
  });

  for (const [what, node, why] of [
    ["a FIFO", { kind: "fifo" }, "a FIFO, not a regular file"],
    ["a directory", { kind: "dir" }, "a directory, not a regular file"],
    ["a symlink", { kind: "link", target: "/etc/initos/config.json" }, "a symlink, or a symlink on its path (links there are not followed)"],
    ["too big", { kind: "file", data: "k".repeat(POOL_KEY_MAX + 1) }, "16385 bytes, more than the 16384 allowed"],
  ] as const) {
    it(`a key file that is ${what}: refused with one line, the pool untouched, the sidecar gets a key made for this boot (never the recovery key)`, () => {
      const s = machine().add(`${TOP}/initos`, { kind: "dir" }).add(`${TOP}/${POOL_HOST_KEY}`, node);
      const log = silentLog();
      mountPool(s, log, DEV, false, undefined, keyed);
      expect(log.lines.filter((l) => l.startsWith("warn:"))).toEqual([`warn: pool: ssh host key not kept on the pool: refused ${POOL_HOST_KEY} on the pool: ${why}; the sidecar uses a key made for this boot`]);
      expect(writesToPool(s)).toEqual([]);
      expect(bytes(s, HOST_KEY).equals(fakeDropbearKey("made-1"))).toBe(true);
    });
  }

  it("the directory initos a symlink: nothing is read or written through it; a key made for this boot", () => {
    const s = machine().add(`${TOP}/initos`, { kind: "link", target: "/etc/initos" });
    const log = silentLog();
    mountPool(s, log, DEV, false, undefined, keyed);
    expect(writesToPool(s)).toEqual([]);
    expect(s.calls.some((c) => c.startsWith("writeFile /etc/initos"))).toBe(false);
    expect(log.lines.filter((l) => l.startsWith("warn:"))).toEqual([
      `warn: pool: ssh host key not kept on the pool: refused ${POOL_HOST_KEY} on the pool: a symlink, or a symlink on its path (links there are not followed); the sidecar uses a key made for this boot`,
    ]);
    expect(bytes(s, HOST_KEY).equals(fakeDropbearKey("made-1"))).toBe(true);
  });

  it("no ssh keys configured: mountPool leaves /run alone, and the boot wipes the recovery key (wipeHostKey)", () => {
    const s = machine();
    mountPool(s, silentLog(), DEV, false, undefined, DEFAULT_CONFIG);
    expect(s.exists(`${TOP}/${POOL_HOST_KEY}`)).toBe(false);
    expect(s.calls.some((c) => c.startsWith("run"))).toBe(false);
    wipeHostKey(s);
    expect(s.exists(HOST_KEY)).toBe(false);
    expect(s.calls.slice(-2)).toEqual([`writeOnce ${HOST_KEY}`, `unlink ${HOST_KEY}`]);
  });
});

describe("dropbear key files", () => {
  it("the public half as dropbearkey -y prints it, from a key dropbearkey made", () => {
    const dir = mkdtempSync(`${tmpdir()}/initos-dbkey-`);
    try {
      execFileSync("dropbearkey", ["-t", "ed25519", "-f", `${dir}/k`], { stdio: "ignore" });
      const printed = /^(ssh-ed25519 \S+)/m.exec(execFileSync("dropbearkey", ["-y", "-f", `${dir}/k`], { encoding: "utf8" }))![1];
      expect(sshPublicKey(dropbearPublicKey(readFileSync(`${dir}/k`))!)).toBe(printed);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("anything else has no public half", () => {
    expect(dropbearPublicKey(Buffer.from("saved-key"))).toBeNull();
    expect(dropbearPublicKey(fakeDropbearKey("x").subarray(0, 82))).toBeNull();
    const rsa = Buffer.from(fakeDropbearKey("x"));
    rsa.write("ssh-rsa\0\0\0\0", 4, "latin1");
    expect(dropbearPublicKey(rsa)).toBeNull();
  });
});

describe("regular.ts on real files (openat2 through koffi)", () => {
  const dir = mkdtempSync(`${tmpdir()}/initos-regular-`);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(`${dir}/top/initos`, { recursive: true });
  mkdirSync(`${dir}/elsewhere`);
  writeFileSync(`${dir}/top/initos.json`, '{"root":"@root"}');
  writeFileSync(`${dir}/elsewhere/secret`, "initramfs file");
  execFileSync("mkfifo", [`${dir}/top/fifo`]);
  execFileSync("truncate", ["-s", "1G", `${dir}/top/big`]);
  symlinkSync(`${dir}/elsewhere/secret`, `${dir}/top/link`);
  symlinkSync(`${dir}/elsewhere`, `${dir}/top/linkdir`);
  const read = (path: string, max = 64 * 1024) => {
    const t = performance.now();
    try {
      const b = readRegularBeneath(openBeneath, `${dir}/top`, path, max);
      return { result: b === null ? "none" : Buffer.from(b).toString(), ms: performance.now() - t };
    } catch (e) {
      return { result: e instanceof RefusedFile ? `refused: ${e.why}` : `error: ${(e as Error).message}`, ms: performance.now() - t };
    }
  };

  it("a regular file is read; a missing one is null", () => {
    expect(read("initos.json").result).toBe('{"root":"@root"}');
    expect(read("initos.env").result).toBe("none");
  });

  it("a FIFO with no writer and a sparse 1 GiB file are refused at once, neither waited for nor read", () => {
    const fifo = read("fifo");
    const big = read("big");
    expect(fifo.result).toBe("refused: a FIFO, not a regular file");
    expect(big.result).toBe("refused: 1073741824 bytes, more than the 65536 allowed");
    expect(fifo.ms).toBeLessThan(1000);
    expect(big.ms).toBeLessThan(1000);
  });

  it("symlinks (the last name or one on the way), directories, and names that leave the directory are refused", () => {
    expect(read("link").result).toBe("refused: a symlink, or a symlink on its path (links there are not followed)");
    expect(read("linkdir/secret").result).toBe("refused: a symlink, or a symlink on its path (links there are not followed)");
    expect(read("initos").result).toBe("refused: a directory, not a regular file");
    expect(read("initos.json/x").result).toBe("refused: something on its path is not a directory");
    expect(read("../elsewhere/secret").result).toBe("refused: its path leaves the directory it must be in");
  });
});
