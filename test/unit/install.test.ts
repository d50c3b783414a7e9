// Install mode reading its inputs from the installer's FAT stick (unauthenticated: DESIGN §5):
// the root filesystem is read once, hashed while busybox tar unpacks it from stdin, never held
// whole in memory, and refused at the end when its hash is not the signed config's; a target
// disk whose head cannot be read is not taken for blank.
import { createHash, generateKeyPairSync } from "node:crypto";
import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { BootTpm } from "../../agent/diskkey/latch.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { install, parseInstallConfig } from "../../agent/stages/install.ts";
import { HOST_KEY } from "../../agent/stages/sidecar.ts";
import { FakeSys, silentLog } from "./fakesys.ts";
import { FakeTpm } from "./faketpm.ts";

const MiB = 1 << 20;
const ESP = "/run/initos/esp-a";
const SRC = `${ESP}/initos/install`;
const ROOTFS = `${SRC}/rootfs.tar`;
/** The PCR signer's public key, as the build puts it into the signed config. */
const PCR_PUB = generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey.export({ type: "spki", format: "pem" }).toString();
const cfg = { ...DEFAULT_CONFIG, images: [], tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PCR_PUB } };
const esp: EspResult = { slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: ESP, booted: true }] };
const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");
/** 2.5 MiB of "tar": three chunks. */
const TAR = Buffer.alloc(2.5 * MiB, "t");

/** An installer with its stick mounted and a blank 2 MiB target; the rootfs is `data`. */
async function installer(data: Buffer, opts: { expect?: string; head?: "blank" | "data" | "unreadable" } = {}) {
  const s = new FakeSys();
  s.mounts.push(ESP);
  s.add(ROOTFS, { kind: "file", data: data.toString("latin1") }).add(`${SRC}/BOOTX64.EFI`, { kind: "file", data: "uki" });
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
  const ic = parseInstallConfig(JSON.stringify({ target: "/dev/vdb", rootfs: { file: "rootfs.tar", sha256: opts.expect ?? sha(TAR) } }));
  // Every whole-file read of the stick is recorded: the rootfs must never be read whole.
  const readWhole: string[] = [];
  const readBytes = s.readBytes.bind(s);
  s.readBytes = (p: string, limit?: number) => (limit === undefined && p.startsWith(ESP) && readWhole.push(p), readBytes(p));
  const run = () => install(s, log, new Coldplug(s, log), cfg, ic, esp, tpm, "on");
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
