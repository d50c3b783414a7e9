// The production boot opens only this machine's own pool (issue #23), decided on the fake
// machine: the boot disk's LUKS2 partition is the pool's first volume and the only one whose
// tokens are unsealed (before the latch nothing else is read); one secret opens the whole pool;
// other LUKS2 volumes are ignored with a line (another machine's volume sealed on this TPM, a
// backup drive, a copy of this machine's token); null ciphers are refused; the mounted btrfs is
// exactly the opened set.
import { generateKeyPairSync, randomBytes, sign } from "node:crypto";
import { describe, expect, it } from "vitest";
import type { AdminCaps } from "../../agent/admin.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { enroll, PCR_SIGNATURE, requirement, unsealTokens } from "../../agent/diskkey/diskkey.ts";
import { BootTpm } from "../../agent/diskkey/latch.ts";
import { keyFingerprint, phaseDigest, signedPcrPolicy } from "../../agent/diskkey/policy.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { checkAssembled, mountPool } from "../../agent/stages/pool.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { unlockPool } from "../../agent/stages/volumes.ts";
import { FakeSys, silentLog } from "./fakesys.ts";
import { extendPcr, FakeTpm } from "./faketpm.ts";

const VICTIM = "/dev/vda3";
const RECOVERY = "the victim's recovery passphrase";
const FSID = "0f5e7a1d-0000-4000-8000-000000000001";
const pcrKey = generateKeyPairSync("rsa", { modulusLength: 2048 });
const PEM = pcrKey.publicKey.export({ format: "pem", type: "spki" }).toString();
const cfg = { ...DEFAULT_CONFIG, tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PEM } };
const REQ = requirement(cfg);
const esp: EspResult = { disk: "/dev/vda", slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true }] };
const noNetwork = parseCmdline("").cmdline;
const admin: AdminCaps = {
  status: () => [],
  log: () => [],
  power: (a) => a,
  passphrase: { refused: "no" },
  switchRoot: { refused: "no" },
  update: { refused: "no" },
  commit: { refused: "no" },
  jails: { refused: "no" },
};

/** A btrfs superblock as the first 64 KiB + 256 bytes of a device: magic and num_devices. */
function superblock(devices: number): string {
  const b = Buffer.alloc(0x10000 + 0x100);
  b.write("_BHRfS_M", 0x10040, "latin1");
  b.writeBigUInt64LE(BigInt(devices), 0x10088);
  return b.toString("latin1");
}

interface Disk {
  /** Partition device, e.g. /dev/vda3, and its disk. */
  dev: string;
  disk: string;
  /** What the volume holds once opened (libblkid), and its btrfs device count. */
  fs?: { TYPE: string; UUID?: string; UUID_SUB?: string; devices?: number };
}

/**
 * The victim's installed machine (the boot disk /dev/vda: ESP + LUKS2 with the recovery
 * passphrase and a TPM token), the TPM in the production state, and `extra` LUKS2 volumes.
 * `events` records TPM calls, libblkid probes and LUKS opens in order.
 */
async function machine(o: { extra?: Disk[]; victimFs?: Disk["fs"]; tpm?: boolean; answers?: string[]; pcr7Moved?: boolean } = {}) {
  const s = new FakeSys();
  s.randomBytes = (n) => new Uint8Array(randomBytes(n)); // each key its own: a reseal must not hand back the old one
  const tpm = new FakeTpm();
  s.tpmFake = tpm;
  tpm.pcrs.set(7, phaseDigest("secure boot on, snakeoil db"));
  tpm.pcrs.set(11, extendPcr(new Uint8Array(32), phaseDigest("production UKI sections"), phaseDigest("enter-initrd")));
  s.addPartition("vda", "vda1", { uuid: "u1", name: "initos-a" }).addPartition("vda", "vda3", { uuid: "u3", name: "initos-luks" });
  const luks = new Set([VICTIM]);
  s.luks.format(VICTIM, Buffer.from("bootstrap"), { type: "pbkdf2", iterations: 1000 });
  s.luks.addKey(VICTIM, Buffer.from("bootstrap"), Buffer.from(RECOVERY), { type: "argon2id", iterations: 4 });
  s.luks.destroySlot(VICTIM, 0);
  enroll(s, tpm, REQ, "on", VICTIM, Buffer.from(RECOVERY)); // token 0, keyslot 0
  const pol = signedPcrPolicy([11], tpm.pcrRead([11]));
  const entry = { pcrs: [11], pkfp: keyFingerprint(PEM), pol: Buffer.from(pol).toString("hex"), sig: sign("sha256", pol, pcrKey.privateKey).toString("base64") };
  s.add(PCR_SIGNATURE, { kind: "file", data: JSON.stringify({ sha256: [entry] }) });
  const opened = new Map<string, Disk["fs"]>([["/dev/mapper/initos-pool0", o.victimFs ?? { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-1", devices: 1 }]]);
  const contents = new Map<string, Disk["fs"]>([[VICTIM, o.victimFs ?? { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-1", devices: 1 }]]);
  for (const d of o.extra ?? []) {
    const part = d.dev.slice(5);
    const disk = d.disk.slice(5);
    if (part !== disk) s.addPartition(disk, part, { uuid: `u-${part}`, name: null });
    else s.add(`/sys/class/block/${disk}`, { kind: "link", target: `../../devices/pci0000:00/block/${disk}` });
    luks.add(d.dev);
    contents.set(d.dev, d.fs);
  }
  const events: string[] = [];
  // libblkid: the LUKS2 devices, and what an opened mapper holds (the volume behind it).
  s.probe = ((dev: string) => {
    events.push(`probe ${dev}`);
    if (luks.has(dev)) return { TYPE: "crypto_LUKS" };
    const fs = opened.get(dev);
    return fs ? ({ ...fs, devices: undefined } as unknown as Record<string, string>) : { TYPE: "vfat" };
  }) as FakeSys["probe"];
  const open = s.luks.open;
  s.luks.open = (dev, name, key, flags, slot) => {
    events.push(`open ${dev}`);
    const r = open(dev, name, key, flags, slot);
    const fs = contents.get(dev);
    opened.set(r.path, fs);
    if (fs?.TYPE === "btrfs") s.add(r.path, { kind: "file", data: superblock(fs.devices ?? 1) });
    return r;
  };
  const unseal = tpm.unseal.bind(tpm);
  tpm.unseal = (...a) => (events.push("unseal"), unseal(...a));
  const extend = tpm.extend.bind(tpm);
  tpm.extend = (pcr, d) => (events.push(`extend ${pcr}`), extend(pcr, d));
  if (o.pcr7Moved) tpm.extend(7, phaseDigest("dbx update"));
  if (o.tpm ?? true) s.devices.add("/dev/tpmrm0");
  const answers = [...(o.answers ?? [])];
  s.readLine = (prompt: string) => (events.push(`prompt ${prompt.trim()}`), Promise.resolve(answers.length ? answers.shift()! : null));
  const log = silentLog();
  const boot = new BootTpm(s, log, { waitSeconds: 0, latchPcr: 15 });
  await boot.find();
  s.calls.length = 0;
  tpm.calls.length = 0;
  events.length = 0;
  const run = () => unlockPool(s, log, new Coldplug(s, log), cfg, noNetwork, boot, "on", esp, new RemoteAdmin(s, log), admin, async () => {});
  return { s, tpm, log, run, events };
}

/** A LUKS2 volume of `dev` that `key` opens in keyslot 0 (PBKDF2) and, optionally, carries `token`. */
function volume(s: FakeSys, dev: string, key: Uint8Array, token?: string): void {
  s.luks.format(dev, key, { type: "pbkdf2", iterations: 1000 });
  if (token) s.luks.setToken(dev, token);
}

describe("the pool's first volume is on the boot disk; nothing else is read before the latch", () => {
  it("her volume, sealed on this TPM to the production policy by the fleet's installer, on a disk that sorts first: never unsealed, never opened, one line", async () => {
    const her: Disk = { dev: "/dev/nvme0n1p3", disk: "/dev/nvme0n1", fs: { TYPE: "btrfs", UUID: "her-fsid", UUID_SUB: "her-dev", devices: 1 } };
    const m = await machine({ extra: [her] });
    // What the installer does on the victim's TPM for her: a new key, sealed to the same policy.
    volume(m.s, her.dev, Buffer.from("her bootstrap"));
    enroll(m.s, m.tpm, REQ, "on", her.dev, Buffer.from("her bootstrap"));
    m.events.length = 0;
    const { devices, result } = await m.run();
    expect(result.method).toBe("tpm");
    expect(devices).toEqual(["/dev/mapper/initos-pool0"]);
    expect(m.events.filter((e) => e === "unseal")).toHaveLength(1); // the victim's token only
    expect(m.events.filter((e) => e.startsWith("open "))).toEqual([`open ${VICTIM}`]);
    // Her header was not even probed before the latch.
    expect(m.events.indexOf(`probe ${her.dev}`)).toBeGreaterThan(m.events.indexOf("extend 15"));
    expect(m.log.lines).toContain(`info: unlock: pool volume ${VICTIM} on the boot disk /dev/vda`);
    expect(m.log.lines).toContain(`info: unlock: ignored ${her.dev}: not this pool's (btrfs ${FSID} has 1 device(s), all open)`);
    // Positive control: the same volume IS one this TPM releases a key for, the moment its tokens are read.
    m.tpm.pcrs.delete(15);
    expect(unsealTokens(m.s, silentLog(), m.tpm, REQ, [her.dev])).toHaveLength(1);
  });

  it("a LUKS2 backup drive and a drive carrying a copy of the victim's token: the unattended boot goes on, one line each, no prompt", async () => {
    const backup: Disk = { dev: "/dev/sda", disk: "/dev/sda" };
    const copy: Disk = { dev: "/dev/sdb1", disk: "/dev/sdb" };
    const m = await machine({ extra: [backup, copy] });
    volume(m.s, backup.dev, Buffer.from("backup passphrase"));
    volume(m.s, copy.dev, Buffer.from("her key"), m.s.luks.tokens(VICTIM)[0]!.json);
    const { result } = await m.run();
    expect(result.method).toBe("tpm");
    expect(m.events.some((e) => e.startsWith("prompt"))).toBe(false);
    expect(m.log.lines.filter((l) => l.includes("unlock: ignored"))).toEqual([
      `info: unlock: ignored /dev/sda: not this pool's (btrfs ${FSID} has 1 device(s), all open)`,
      `info: unlock: ignored /dev/sdb1: not this pool's (btrfs ${FSID} has 1 device(s), all open)`,
    ]);
  });

  it("two LUKS2 partitions on the boot disk: refused by name before anything is unsealed", async () => {
    const m = await machine({ extra: [{ dev: "/dev/vda4", disk: "/dev/vda" }] });
    volume(m.s, "/dev/vda4", Buffer.from("x"));
    await expect(m.run()).rejects.toThrow("unlock: the boot disk /dev/vda has several LUKS2 partitions (/dev/vda3, /dev/vda4); the pool's first volume must be the only one");
    expect(m.events).not.toContain("unseal");
  });
});

describe("null ciphers are never opened with a TPM key or a passphrase", () => {
  it("the boot disk's volume with a cipher_null segment: refused with one line, nothing opened, no prompt", async () => {
    const m = await machine();
    m.s.luksCipher.set(VICTIM, "cipher_null-ecb");
    await expect(m.run()).rejects.toThrow(`unlock: refused ${VICTIM}: cipher_null in data segment 0: a null cipher opens with any key; nothing opened`);
    expect(m.events.filter((e) => e.startsWith("open ") || e.startsWith("prompt"))).toEqual([]);
  });

  it("a cipher_null volume on another disk of a two-device pool, with the victim's key in it: ignored, the real second device joins", async () => {
    const key = (m: Awaited<ReturnType<typeof machine>>) => m.s.luksSlots.get(VICTIM)!.get(0)!;
    const nul: Disk = { dev: "/dev/sda1", disk: "/dev/sda", fs: { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-2", devices: 2 } };
    const real: Disk = { dev: "/dev/vdb1", disk: "/dev/vdb", fs: { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-2", devices: 2 } };
    const m = await machine({ victimFs: { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-1", devices: 2 }, extra: [nul, real] });
    volume(m.s, nul.dev, Buffer.from(key(m), "latin1"));
    m.s.luksCipher.set(nul.dev, "cipher_null-ecb");
    volume(m.s, real.dev, Buffer.from(key(m), "latin1"));
    const { devices } = await m.run();
    expect(devices).toEqual(["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"]);
    expect(m.events.filter((e) => e.startsWith("open "))).toEqual([`open ${VICTIM}`, "open /dev/vdb1"]);
    expect(m.log.lines).toContain("warn: unlock: ignored /dev/sda1: cipher_null in data segment 0: a null cipher opens with any key");
    expect(m.log.lines).toContain(`info: unlock: /dev/vdb1 joins the pool (btrfs ${FSID}, device 2 of 2)`);
  });
});

describe("one secret per pool", () => {
  const twoDevices = { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-1", devices: 2 };
  const second: Disk = { dev: "/dev/vdb1", disk: "/dev/vdb", fs: { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-2", devices: 2 } };

  it("a two-volume pool opens unattended with the key sealed on the first; with the passphrase too; a reseal puts one new key in both", async () => {
    const m = await machine({ victimFs: twoDevices, extra: [second] });
    const tpmKey = Buffer.from(m.s.luksSlots.get(VICTIM)!.get(0)!, "latin1");
    volume(m.s, second.dev, tpmKey);
    m.s.luks.addKey(second.dev, tpmKey, Buffer.from(RECOVERY), { type: "argon2id", iterations: 4 });
    expect((await m.run()).devices).toEqual(["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"]);

    const p = await machine({ victimFs: twoDevices, extra: [second], pcr7Moved: true, answers: [RECOVERY, "y"] });
    const oldKey = Buffer.from(p.s.luksSlots.get(VICTIM)!.get(0)!, "latin1");
    volume(p.s, second.dev, oldKey);
    p.s.luks.addKey(second.dev, oldKey, Buffer.from(RECOVERY), { type: "argon2id", iterations: 4 });
    const r = await p.run();
    expect(r.result).toEqual({ method: "passphrase", resealed: true });
    expect(r.devices).toEqual(["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"]);
    // The new token's key opens the second volume too: the next boot needs one secret.
    p.tpm.pcrs.delete(15);
    const keys = unsealTokens(p.s, silentLog(), p.tpm, REQ, [VICTIM]);
    const fresh = keys.find((k) => k.token === 1)!;
    expect(p.s.luks.open(second.dev, "check", fresh.key, 0).slot).toBe(2);
    expect(() => p.s.luks.open(second.dev, "check", fresh.key, 0, 0)).toThrow(); // not the old key's slot
    expect(p.log.lines.some((l) => /^info: unlock: \/dev\/vdb1: the same key in keyslot \d+$/.test(l))).toBe(true);
  });

  it("her passphrase-only volume on another disk is never tried when the TPM opened the pool; without the TPM, her passphrase opens nothing", async () => {
    const her: Disk = { dev: "/dev/sda3", disk: "/dev/sda", fs: { TYPE: "btrfs", UUID: "her-fsid", UUID_SUB: "her", devices: 1 } };
    const m = await machine({ extra: [her] });
    volume(m.s, her.dev, Buffer.from("her passphrase"));
    expect((await m.run()).result.method).toBe("tpm");
    expect(m.events.filter((e) => e.startsWith("open ") || e.startsWith("prompt"))).toEqual([`open ${VICTIM}`]);

    const n = await machine({ extra: [her], tpm: false, answers: ["her passphrase", "her passphrase", "her passphrase"] });
    volume(n.s, her.dev, Buffer.from("her passphrase"));
    await expect(n.run()).rejects.toThrow("unlock: 3 wrong recovery passphrases");
    expect(n.events.filter((e) => e.startsWith("open "))).toEqual([`open ${VICTIM}`, `open ${VICTIM}`, `open ${VICTIM}`]);
  });

  it("a volume the key opens that holds another filesystem, or a second copy of a pool device, is closed again with a line", async () => {
    const other: Disk = { dev: "/dev/sda1", disk: "/dev/sda", fs: { TYPE: "btrfs", UUID: "another-fsid", UUID_SUB: "x", devices: 1 } };
    const clone: Disk = { dev: "/dev/sdb1", disk: "/dev/sdb", fs: { TYPE: "btrfs", UUID: FSID, UUID_SUB: "dev-1", devices: 2 } };
    const m = await machine({ victimFs: twoDevices, extra: [other, clone, second] });
    const key = Buffer.from(m.s.luksSlots.get(VICTIM)!.get(0)!, "latin1");
    for (const d of [other, clone, second]) volume(m.s, d.dev, key);
    expect((await m.run()).devices).toEqual(["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"]);
    expect(m.log.lines).toContain(`warn: unlock: ignored /dev/sda1: it holds btrfs another-fsid, not the pool's btrfs ${FSID}; closed`);
    expect(m.log.lines).toContain("warn: unlock: ignored /dev/sdb1: it is a second copy of pool device dev-1; closed");
    expect(m.s.calls.filter((c) => c.startsWith("luks.close"))).toEqual(["luks.close initos-pool1", "luks.close initos-pool1"]);
  });
});

describe("the mounted filesystem is exactly the opened set", () => {
  it("a device the kernel had from elsewhere in the mounted btrfs: every volume closed, the boot fails with one line", () => {
    const s = new FakeSys();
    s.btrfsStray = ["/dev/sdc"];
    s.add("/run/initos/pool/initos.json", { kind: "file", data: '{"root":"@root"}' });
    expect(() => mountPool(s, silentLog(), ["/dev/mapper/initos-pool0"], true, undefined, cfg)).toThrow(
      `pool: the mounted btrfs ${FSID} has 2 device(s) (/dev/mapper/initos-pool0, /dev/sdc), but the volumes opened are /dev/mapper/initos-pool0; closing every volume`,
    );
    expect(s.calls).toContain("luks.close initos-pool0");
    expect(s.calls.some((c) => c.includes("/sysroot"))).toBe(false);
  });

  it("the exact set passes with one line naming the filesystem", () => {
    const s = new FakeSys();
    const log = silentLog();
    s.mount("/dev/mapper/initos-pool0", "/p", "btrfs", 0, "device=/dev/mapper/initos-pool0,device=/dev/mapper/initos-pool1");
    checkAssembled(s, log, "/p", ["/dev/mapper/initos-pool0", "/dev/mapper/initos-pool1"]);
    expect(log.lines).toEqual([`info: pool: btrfs ${FSID} on 2 device(s): /dev/mapper/initos-pool0 /dev/mapper/initos-pool1`]);
    expect(() => checkAssembled(s, log, "/p", ["/dev/mapper/initos-pool0"])).toThrow(/has 2 device\(s\)/);
  });
});
