// Install mode reading its inputs from the installer's FAT stick (unauthenticated: DESIGN §5):
// the root filesystem is read once, hashed while busybox tar unpacks it from stdin, never held
// whole in memory, and refused at the end when its hash is not the signed config's; a target
// disk whose head cannot be read is not taken for blank. A NAME.tar.zst is hashed as stored and
// decompressed as it streams; the pool's bound subvolumes are mounted where the boot binds
// them before the unpack, so they get the root's content.
import { spawn, spawnSync } from "node:child_process";
import { createHash, generateKeyPairSync, randomBytes } from "node:crypto";
import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { BootTpm } from "../../agent/diskkey/latch.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { bindsToSeed, type Decompressor, install, parseInstallConfig, rootfsFormat, runtimeZstd } from "../../agent/stages/install.ts";
import { HOST_KEY } from "../../agent/stages/sidecar.ts";
import { FakeSys, silentLog, verifiedImages } from "./fakesys.ts";
import { FakeTpm } from "./faketpm.ts";

const MiB = 1 << 20;
const ESP = "/run/initos/esp-a";
const SRC = `${ESP}/initos/install`;
const ROOTFS = `${SRC}/rootfs.tar`;
/** The PCR signer's public key, as the build puts it into the signed config. */
const PCR_PUB = generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey.export({ type: "spki", format: "pem" }).toString();
const cfg = { ...DEFAULT_CONFIG, images: [], tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PCR_PUB } };
const esp: EspResult = { disk: "/dev/vda", slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: ESP, booted: true }] };
const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
/** 2.5 MiB of "tar": three chunks. */
const TAR = Buffer.alloc(2.5 * MiB, "t");

/**
 * The zstd tool as the decompressor: the unit tests run under Node 20, whose node:zlib has no
 * zstd (the agent's Bun has: runtimeZstd). Real zstd either way; chunks are fed as they come.
 */
const zstdTool: Decompressor = async function* (input) {
  const child = spawn("zstd", ["-d", "-q", "-c"], { stdio: ["pipe", "pipe", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => void (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.on("close", (code) => resolve(code)));
  let open = true;
  child.stdin.on("error", () => void (open = false));
  child.stdin.on("close", () => void (open = false));
  const fed = (async () => {
    for await (const c of input) {
      if (!open) break; // zstd gave up: stop feeding it (the installer reads the rest itself)
      if (!child.stdin.write(c)) await new Promise((r) => (child.stdin.once("drain", r), child.stdin.once("close", r)));
    }
    child.stdin.end();
  })().then(
    () => null,
    (e: unknown) => (child.kill("SIGKILL"), e),
  );
  for await (const c of child.stdout) yield c as Buffer;
  const err = await fed;
  if (err) throw err;
  const code = await exited;
  if (code !== 0) throw new Error(stderr.trim().split("\n").at(-1) || `zstd exit ${code}`);
};
const zstd = (b: Buffer) => spawnSync("zstd", ["-q", "-c", "-3"], { input: b, maxBuffer: 64 * MiB }).stdout;
/** 2.5 MiB that does not compress, so the .zst is read in three chunks too. */
const NOISE = randomBytes(2.5 * MiB);
const ZST = zstd(NOISE);

/** An installer with its stick mounted and a blank 2 MiB target; the rootfs is `data`. */
async function installer(data: Buffer, opts: { expect?: string; head?: "blank" | "data" | "unreadable"; file?: string; subvolumes?: string[]; unzstd?: Decompressor } = {}) {
  const file = opts.file ?? "rootfs.tar";
  const s = new FakeSys();
  s.mounts.push(ESP);
  s.add(`${SRC}/${file}`, { kind: "file", data: data.toString("latin1") }).add(`${SRC}/BOOTX64.EFI`, { kind: "file", data: "uki" });
  s.devices.add("/dev/vdb").add("/dev/vdb3").add("/dev/tpmrm0");
  const head = opts.head ?? "blank";
  if (head !== "unreadable") s.add("/dev/vdb", { kind: "file", data: (head === "blank" ? "\0" : "x").repeat(MiB) });
  s.tpmFake = new FakeTpm();
  // The recovery sidecar's ssh host key the installer makes (dropbearkey): already there, and its public half.
  s.add(HOST_KEY, { kind: "file", data: "host-key" });
  const realRun = s.run.bind(s);
  s.run = (argv: readonly string[]) => (argv.includes("-y") ? (realRun(argv), "Public key portion is:\nssh-ed25519 AAAAtest root@initos\n") : realRun(argv));
  const log = silentLog();
  const tpm = new BootTpm(s, log, cfg.tpm);
  await tpm.find();
  const ic = parseInstallConfig(JSON.stringify({ target: "/dev/vdb", rootfs: { file, sha256: opts.expect ?? sha(TAR) }, ...(opts.subvolumes ? { subvolumes: opts.subvolumes } : {}) }));
  // Every whole-file read of the stick is recorded: the rootfs must never be read whole.
  const readWhole: string[] = [];
  const readBytes = s.readBytes.bind(s);
  s.readBytes = (p: string, limit?: number) => (limit === undefined && p.startsWith(ESP) && readWhole.push(p), readBytes(p));
  const run = () => install(s, log, new Coldplug(s, log), cfg, ic, esp, verifiedImages(cfg), tpm, "on", opts.unzstd ?? zstdTool);
  return { s, log, run, readWhole };
}
const tarRuns = (s: FakeSys) => s.inputs.filter((i) => / tar -x -f - -C \/run\/initos\/target\/@root$/.test(i.argv));

describe("install: the root filesystem from the stick", () => {
  it("is read once, in chunks of at most 1 MiB, and tar unpacks exactly the bytes that were hashed", async () => {
    const { s, log, run, readWhole } = await installer(TAR);
    await run();
    expect(s.calls.filter((c) => c.startsWith(`readChunks ${ROOTFS}`))).toHaveLength(1);
    expect(readWhole).not.toContain(ROOTFS);
    expect(s.chunkSizes.get(ROOTFS)).toEqual([MiB, MiB, MiB / 2]);
    const runs = tarRuns(s);
    expect(runs).toHaveLength(1);
    expect(sha(runs[0]!.data)).toBe(sha(TAR));
    // tar does not read the stick by name (that would be a second, possibly different, read).
    expect(s.calls.some((c) => c.includes(ROOTFS) && c.includes(" tar "))).toBe(false);
    expect(log.lines.some((l) => l.startsWith("info: install: done: /dev/vdb has @root"))).toBe(true);
  });

  it("a rootfs that does not match the signed hash fails the install with one line after the unpack: no host config, nothing sealed, no ESP", async () => {
    const evil = Buffer.concat([TAR.subarray(0, MiB), Buffer.alloc(1.5 * MiB, "e")]);
    const { s, run } = await installer(evil);
    await expect(run()).rejects.toThrow(`install: rootfs.tar has sha256 ${sha(evil).slice(0, 16)}..., the signed config expects ${sha(TAR).slice(0, 16)}...`);
    expect(tarRuns(s)).toHaveLength(1); // one read: the hash is of what tar got
    expect(s.calls.filter((c) => /^(writeFile \/run\/initos\/target\/initos.json|luks.setToken|run .*mkfs.fat|copyFile)/.test(c))).toEqual([]);
    expect(s.calls).toContain("umount /run/initos/target 0"); // the pool is left unmounted
  });

  it("when tar chokes: the hash mismatch is the cause named if there is one, else tar's error", async () => {
    const evil = Buffer.alloc(TAR.length, "e");
    const bad = await installer(evil);
    bad.s.onRunWithInput = () => {
      throw new Error("busybox tar -x -f - -C /run/initos/target/@root: tar: invalid tar magic");
    };
    await expect(bad.run()).rejects.toThrow(`install: rootfs.tar has sha256 ${sha(evil).slice(0, 16)}...`);
    const good = await installer(TAR);
    good.s.onRunWithInput = () => {
      throw new Error("busybox tar -x -f - -C /run/initos/target/@root: tar: write error: No space left on device");
    };
    await expect(good.run()).rejects.toThrow("tar: write error: No space left on device");
  });

  it("a rootfs that is missing stops the install before the disk is touched", async () => {
    const { s, run } = await installer(TAR);
    s.files.delete(ROOTFS);
    await expect(run()).rejects.toThrow(`install: ${ROOTFS} is missing`);
    expect(s.calls.some((c) => c.includes("sfdisk") || c.startsWith("luks."))).toBe(false);
  });
});

describe("install: the blank check", () => {
  it("a target whose first MiB cannot be read is not blank: refused before partitioning", async () => {
    const { s, run } = await installer(TAR, { head: "unreadable" });
    await expect(run()).rejects.toThrow('install: cannot read the first MiB of /dev/vdb, so it cannot be shown blank; set "overwrite": true in the install config to destroy it');
    expect(s.calls.some((c) => c.includes("sfdisk") || c.startsWith("luks.") || c.startsWith("readChunks"))).toBe(false);
  });

  it("a target with data is refused, a zeroed one is taken", async () => {
    const dirty = await installer(TAR, { head: "data" });
    await expect(dirty.run()).rejects.toThrow('install: /dev/vdb is not blank (its first MiB has data); set "overwrite": true in the install config to destroy it');
    const blank = await installer(TAR);
    await blank.run();
    expect(blank.s.calls.some((c) => c.includes("sfdisk"))).toBe(true);
  });
});

describe("install: the root filesystem's format, from its name in the signed config", () => {
  const withFile = (file: string) => JSON.stringify({ target: "/dev/vdb", rootfs: { file, sha256: sha(TAR) } });
  it("NAME.tar and NAME.tar.zst are taken, as plain tar and zstd", () => {
    expect(rootfsFormat(parseInstallConfig(withFile("rootfs.tar")).rootfs.file)).toBe("tar");
    expect(rootfsFormat(parseInstallConfig(withFile("debian.tar.zst")).rootfs.file)).toBe("tar.zst");
  });
  it("any other name is refused at parse, with one line naming it", () => {
    for (const bad of ["root.tar.gz", "root.tgz", "root.zst", "root", ".tar", "root.tar.zst.sig", "root.TAR"]) {
      expect(() => parseInstallConfig(withFile(bad))).toThrow(`install: /etc/initos/install.json: rootfs.file: expected NAME.tar or NAME.tar.zst, not ${JSON.stringify(bad)}`);
    }
  });
  it("ESPs are 500 MiB unless the config says otherwise", () => {
    expect(parseInstallConfig(withFile("rootfs.tar")).espMiB).toBe(500);
    expect(parseInstallConfig(withFile("rootfs.tar").replace("{", '{"espMiB":256,')).espMiB).toBe(256);
  });
});

describe("install: a .tar.zst from the stick", () => {
  const ZROOT = `${SRC}/debian.tar.zst`;
  const zstRuns = (s: FakeSys) => s.inputs.filter((i) => / tar -x -f - -C \/run\/initos\/target\/@root$/.test(i.argv));

  it("is read once in chunks, hashed as stored (compressed), and tar gets what it decompresses to", async () => {
    const { s, log, run, readWhole } = await installer(ZST, { file: "debian.tar.zst", expect: sha(ZST) });
    await run();
    expect(ZST.length).toBeGreaterThan(2 * MiB); // three chunks: the decompressor gets them as they are read
    expect(s.calls.filter((c) => c.startsWith(`readChunks ${ZROOT}`))).toHaveLength(1);
    expect(readWhole).not.toContain(ZROOT);
    expect(s.chunkSizes.get(ZROOT)).toEqual([MiB, MiB, ZST.length - 2 * MiB]);
    const runs = zstRuns(s);
    expect(runs).toHaveLength(1);
    expect(sha(runs[0]!.data)).toBe(sha(NOISE));
    expect(log.lines).toContain("info: install: unpacking debian.tar.zst (zstd, streamed) into /run/initos/target/@root");
    expect(log.lines).toContain(`info: install: debian.tar.zst: ${(ZST.length / 1e6).toFixed(1)} MB read, sha256 as signed; ${(NOISE.length / 1e6).toFixed(1)} MB unpacked in 0.0s`);
    expect(log.lines.some((l) => l.startsWith("info: install: done: /dev/vdb has @root"))).toBe(true);
  });

  it("a .tar.zst whose sha256 is not the signed one is refused: the hash, of the compressed bytes, is the line", async () => {
    // A valid zstd stream of other content: it decompresses fine, only the hash tells.
    const other = zstd(Buffer.alloc(MiB, "x"));
    const { s, run } = await installer(other, { file: "debian.tar.zst", expect: sha(ZST) });
    await expect(run()).rejects.toThrow(`install: debian.tar.zst has sha256 ${sha(other).slice(0, 16)}..., the signed config expects ${sha(ZST).slice(0, 16)}...`);
    expect(s.calls.filter((c) => /^(writeFile \/run\/initos\/target\/initos.json|luks.setToken|run .*mkfs.fat|copyFile)/.test(c))).toEqual([]);
  });

  it("a corrupt stream: zstd gives up early, the rest is still read and hashed, and the mismatch is the cause named", async () => {
    const corrupt = Buffer.from(ZST);
    corrupt.fill(0x55, 100_000, 100_400); // inside the first chunk
    const { s, run } = await installer(corrupt, { file: "debian.tar.zst", expect: sha(ZST) });
    await expect(run()).rejects.toThrow(`install: debian.tar.zst has sha256 ${sha(corrupt).slice(0, 16)}..., the signed config expects ${sha(ZST).slice(0, 16)}...`);
    expect(s.chunkSizes.get(ZROOT)!.reduce((a, b) => a + b, 0)).toBe(corrupt.length);
    expect(s.calls).toContain("umount /run/initos/target 0");
  });

  it("a signed stream that zstd cannot read fails with one line naming the file and zstd's complaint", async () => {
    const junk = Buffer.alloc(3000, "j");
    const { run } = await installer(junk, { file: "debian.tar.zst", expect: sha(junk) });
    await expect(run()).rejects.toThrow(/^install: debian\.tar\.zst: zstd: .+/);
  });

  it("the agent's decompressor is the runtime's node:zlib zstd; where the runtime has none (Node 20) that is the line", async () => {
    const { run } = await installer(ZST, { file: "debian.tar.zst", expect: sha(ZST), unzstd: runtimeZstd });
    // Bun (the agent) has createZstdDecompress; this Node may or may not: either way the result is checked.
    if (typeof (await import("node:zlib")).createZstdDecompress === "function") await run();
    else await expect(run()).rejects.toThrow("install: debian.tar.zst: zstd: this runtime has no zstd (node:zlib createZstdDecompress)");
  });
});

describe("install: the pool's bound subvolumes get the root's content", () => {
  const T = "/run/initos/target";
  it("the host config's binds, limited to the subvolumes made, parents first", () => {
    const ic = parseInstallConfig(JSON.stringify({ target: "/dev/vdb", rootfs: { file: "r.tar", sha256: sha(TAR) } }));
    expect(bindsToSeed(ic, '{"root":"@root"}')).toEqual([
      { subvol: "@home", path: "/home" },
      { subvol: "@log", path: "/var/log" },
      { subvol: "@cache", path: "/var/cache" },
    ]);
    expect(bindsToSeed({ ...ic, subvolumes: ["@cache"] }, '{"root":"@root"}')).toEqual([{ subvol: "@cache", path: "/var/cache" }]);
    const nested = '{"root":"@root","binds":[{"subvol":"@log","path":"/var/log"},{"subvol":"@var","path":"/var"}]}';
    expect(bindsToSeed({ ...ic, subvolumes: ["@log", "@var"] }, nested).map((b) => b.path)).toEqual(["/var", "/var/log"]);
  });

  it("each is mounted on its path in the new @root before tar unpacks, and unmounted before the host config is written", async () => {
    const { s, run } = await installer(TAR);
    await run();
    const seq = s.calls.filter((c) => (c.startsWith("run ") ? c.includes("subvolume create") : /^(mkdirp \/run\/initos\/target\/@root|mount \/dev\/mapper|runWithInput|umount \/run\/initos\/target[/ ]|writeFile \/run\/initos\/target\/)/.test(c)));
    const short = seq.map((c) => c.replace(/^run \S+ --library-path \S+ \S+\/btrfs -q subvolume create /, "subvolume ").replace(/^runWithInput .*/, "tar"));
    expect(short).toEqual([
      "mount /dev/mapper/initos-install /run/initos/target btrfs 0x0 subvolid=5",
      `subvolume ${T}/@root`,
      `subvolume ${T}/@home`,
      `subvolume ${T}/@log`,
      `subvolume ${T}/@cache`,
      `mkdirp ${T}/@root/home`,
      `mount /dev/mapper/initos-install ${T}/@root/home btrfs 0x0 subvol=@home`,
      `mkdirp ${T}/@root/var/log`,
      `mount /dev/mapper/initos-install ${T}/@root/var/log btrfs 0x0 subvol=@log`,
      `mkdirp ${T}/@root/var/cache`,
      `mount /dev/mapper/initos-install ${T}/@root/var/cache btrfs 0x0 subvol=@cache`,
      "tar",
      `umount ${T}/@root/var/cache 0`,
      `umount ${T}/@root/var/log 0`,
      `umount ${T}/@root/home 0`,
      `writeFile ${T}/initos.json`,
      `umount ${T} 0`,
    ]);
  });

  it("only the subvolumes the config makes are mounted; a failed unpack still unmounts them, then the pool", async () => {
    const { s, run } = await installer(Buffer.alloc(TAR.length, "e"), { subvolumes: ["@log"] });
    await expect(run()).rejects.toThrow("install: rootfs.tar has sha256");
    expect(s.calls.filter((c) => c.startsWith("mount /dev/mapper/initos-install /run/initos/target/"))).toEqual([`mount /dev/mapper/initos-install ${T}/@root/var/log btrfs 0x0 subvol=@log`]);
    const tail = s.calls.filter((c) => /^umount \/run\/initos\/target[/ ]/.test(c));
    expect(tail).toEqual([`umount ${T}/@root/var/log 0`, `umount ${T} 0`]);
    expect(s.mounts.filter((m) => m.startsWith(T))).toEqual([]);
  });
});
