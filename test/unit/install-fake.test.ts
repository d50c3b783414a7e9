// install() (agent/stages/install.ts) on the fake machine with a fake TPM: what it refuses before
// it writes anything, and the whole happy path in order: partitions, LUKS2 with the recovery
// keyslot, btrfs and subvolumes, the root filesystem through busybox tar with its hash checked,
// the host config, the key sealed as a token, both ESPs, and the recovery passphrase on the
// console only. (install.test.ts covers the rootfs streaming and the blank check in depth.)
import type { MountedImage } from "../../agent/stages/images.ts";
import { createHash, generateKeyPairSync, sign } from "node:crypto";
import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { PCR_SIGNATURE, requirement, unsealTokens } from "../../agent/diskkey/diskkey.ts";
import { BootTpm } from "../../agent/diskkey/latch.ts";
import { keyFingerprint, phaseDigest, signedPcrPolicy } from "../../agent/diskkey/policy.ts";
import { parseToken } from "../../agent/diskkey/token.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import type { SecureBoot } from "../../agent/stages/early.ts";
import type { EspResult } from "../../agent/stages/esp.ts";
import { install, parseInstallConfig } from "../../agent/stages/install.ts";
import { BUSYBOX, HOST_KEY } from "../../agent/stages/sidecar.ts";
import { RECOVERY_KDF, TPM_KDF, type Kdf } from "../../agent/sys/cryptsetup.ts";
import { FakeSys, silentLog, verifiedImages } from "./fakesys.ts";
import { extendPcr, FakeTpm } from "./faketpm.ts";

const MiB = 1 << 20;
const ESP = "/run/initos/esp-a";
const SRC = `${ESP}/initos/install`;
const ROOTFS = `${SRC}/rootfs.tar`;
const UKI = `${SRC}/BOOTX64.EFI`;
const TARGET_ESP = "/run/initos/target-esp";
const ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const pcrKey = generateKeyPairSync("rsa", { modulusLength: 2048 });
const PEM = pcrKey.publicKey.export({ type: "spki", format: "pem" }).toString();
const verity = { hashType: 1 as const, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks: 8, salt: "" };
const cfg = {
  ...DEFAULT_CONFIG,
  images: [{ name: "modules", rootHash: "ab".repeat(32), verity, binds: [] }],
  tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PEM },
};
const esp: EspResult = { disk: "/dev/vda", slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: ESP, booted: true }] };
const TAR = Buffer.from("a root filesystem as a tar stream ".repeat(1000));
const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

/**
 * The installer booted from its stick (ESP mounted, the UKI, the images and the rootfs on it), a
 * blank /dev/vdb, a TPM in the state the production UKI measures. `head` is the target's first MiB.
 */
async function installer(o: { head?: "blank" | "data"; overwrite?: boolean; tpm?: boolean; signer?: boolean; sha256?: string; esp?: EspResult; images?: MountedImage[] } = {}) {
  const s = new FakeSys();
  s.mounts.push(ESP);
  s.add(ROOTFS, { kind: "file", data: TAR.toString("latin1") })
    .add(UKI, { kind: "file", data: "the target's UKI" })
    .add(`${ESP}/initos/modules.sqfs`, { kind: "file", data: "squashfs" })
    .add(`${ESP}/initos/modules.verity`, { kind: "file", data: "hash tree" })
    .add("/dev/vdb", { kind: "file", data: (o.head === "data" ? "x" : "\0").repeat(MiB) })
    .add(HOST_KEY, { kind: "file", data: "dropbear-host-key" });
  s.devices.add("/dev/vdb").add("/dev/vdb3");
  const tpm = new FakeTpm();
  s.tpmFake = tpm;
  tpm.pcrs.set(7, phaseDigest("secure boot on"));
  tpm.pcrs.set(11, extendPcr(new Uint8Array(32), phaseDigest("production UKI"), phaseDigest("enter-initrd")));
  if (o.tpm ?? true) s.devices.add("/dev/tpmrm0");

  // What each tool got on stdin; dropbearkey -y prints the public half.
  const stdin = new Map<string, string>();
  const run = s.run.bind(s);
  s.run = (argv: readonly string[], input?: Uint8Array) => {
    const out = run(argv);
    if (input) stdin.set(argv.join(" "), Buffer.from(input).toString());
    return argv.includes("-y") ? "Public key portion is:\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5pub root@initos\nFingerprint: sha1!! ...\n" : out;
  };
  const kdfs: [string, Kdf][] = [];
  const { format, addKey } = s.luks;
  s.luks.format = (d, k, kdf) => (kdfs.push(["format", kdf]), format(d, k, kdf));
  s.luks.addKey = (d, e, k, kdf) => (kdfs.push(["addKey", kdf]), addKey(d, e, k, kdf));
  const toConsole = s.toConsole.bind(s);
  s.toConsole = (t: string) => (s.calls.push("toConsole"), toConsole(t));

  const log = silentLog();
  const boot = new BootTpm(s, log, cfg.tpm);
  await boot.find();
  const ic = parseInstallConfig(JSON.stringify({ target: "/dev/vdb", overwrite: o.overwrite ?? false, rootfs: { file: "rootfs.tar", sha256: o.sha256 ?? sha(TAR) } }));
  const c = o.signer === false ? { ...cfg, tpm: { ...cfg.tpm, pcrPublicKey: undefined } } : cfg;
  const go = (secureBoot: SecureBoot = "on") => install(s, log, new Coldplug(s, log), c, ic, o.esp ?? esp, o.images ?? verifiedImages(c), boot, secureBoot);
  return { s, tpm, log, go, stdin, kdfs };
}

/** Nothing was written: no tool ran, no LUKS header, no file, nothing read of the rootfs, nothing shown. */
function nothingWritten(s: FakeSys) {
  expect(s.calls.filter((c) => /^(run |runWithInput|luks\.|writeFile|copyFile|readChunks|toConsole)/.test(c))).toEqual([]);
  expect(s.luksSlots.size).toBe(0);
}

describe("install: refusals, before anything is written", () => {
  it("with Secure Boot off (or no EFI): the key could not be sealed to anything that protects it", async () => {
    for (const sb of ["off", "no-efi"] as const) {
      const { s, go } = await installer();
      await expect(go(sb)).rejects.toThrow(`install: refusing to install: Secure Boot is ${sb}, so the disk key could not be sealed to anything that protects it`);
      nothingWritten(s);
    }
  });

  it("without a TPM", async () => {
    const { s, go } = await installer({ tpm: false });
    await expect(go()).rejects.toThrow("install: refusing to install: no TPM to seal the disk key to");
    nothingWritten(s);
  });

  it("without a PCR signer in the signed config", async () => {
    const { s, go } = await installer({ signer: false });
    await expect(go()).rejects.toThrow("install: refusing to install: the signed config names no PCR signer (tpm.pcrPublicKey)");
    nothingWritten(s);
  });

  it("with the rootfs or the UKI missing on the installer's ESP", async () => {
    for (const gone of [ROOTFS, UKI]) {
      const { s, go } = await installer();
      s.files.delete(gone);
      await expect(go()).rejects.toThrow(`install: ${gone} is missing`);
      nothingWritten(s);
    }
  });

  it("with an image file missing on the installer's ESP", async () => {
    // "Inputs first: nothing is touched until everything we will copy is present" (install.ts):
    // a missing image file found only at the final copy would fail after the disk was
    // partitioned, formatted and its key sealed.
    const { s, go } = await installer();
    s.files.delete(`${ESP}/initos/modules.verity`);
    await expect(go()).rejects.toThrow(/modules\.verity/);
    nothingWritten(s);
  });

  it("with a target disk that is not blank, unless the install config says to overwrite it", async () => {
    const dirty = await installer({ head: "data" });
    await expect(dirty.go()).rejects.toThrow('install: /dev/vdb is not blank (its first MiB has data); set "overwrite": true in the install config to destroy it');
    nothingWritten(dirty.s);
    const overwrite = await installer({ head: "data", overwrite: true });
    await overwrite.go();
    expect(overwrite.s.calls.some((c) => c.startsWith("run ") && c.includes("sfdisk"))).toBe(true);
  });
});

describe("install: the happy path", () => {
  it("partitions, formats, fills, seals and writes both ESPs, in that order", async () => {
    const { s, go } = await installer();
    await go();
    const at = (re: RegExp, from = 0) => {
      const i = s.calls.findIndex((c, n) => n >= from && re.test(c));
      expect(i, `no call matching ${re} after ${from}`).toBeGreaterThanOrEqual(0);
      return i;
    };
    const steps = [
      at(/^run .*\/sfdisk -q --wipe always \/dev\/vdb$/),
      at(/^luks\.format \/dev\/vdb3$/),
      at(/^luks\.addKey \/dev\/vdb3$/),
      at(/^luks\.open \/dev\/vdb3 initos-install$/),
      at(/^run .*\/mkfs\.btrfs .*\/dev\/mapper\/initos-install$/),
      at(/^mount \/dev\/mapper\/initos-install \/run\/initos\/target btrfs /),
      at(/^run .*\/btrfs -q subvolume create \/run\/initos\/target\/@root$/),
      at(/^runWithInput .* tar .*-C \/run\/initos\/target\/@root$/),
      at(/^writeFile \/run\/initos\/target\/initos\.json$/),
      at(/^umount \/run\/initos\/target 0$/),
      at(/^luks\.close initos-install$/),
      at(/^luks\.setToken \/dev\/vdb3$/),
      at(/^run .*\/mkfs\.fat .*\/dev\/vdb1$/),
      at(/^run .*\/mkfs\.fat .*\/dev\/vdb2$/),
      at(/^toConsole$/),
    ];
    expect([...steps].sort((a, b) => a - b)).toEqual(steps);
    for (const sv of ["@home", "@log", "@cache"]) at(new RegExp(`^run .*/btrfs -q subvolume create /run/initos/target/${sv}$`));
    expect(s.readFile("/run/initos/target/initos.json")).toMatch(/"root": ?"@root"/);
    expect(s.mounts).not.toContain("/run/initos/target");
    expect(s.mounts).not.toContain(TARGET_ESP);
  });

  it("the partition table: GPT with two ESPs named for the A/B slots, then the LUKS partition", async () => {
    const { s, go, stdin } = await installer();
    await go();
    const [argv, table] = [...stdin].find(([a]) => a.includes("sfdisk"))!;
    expect(argv.endsWith("/dev/vdb")).toBe(true);
    const lines = table.trim().split("\n");
    expect(lines[0]).toBe("label: gpt");
    expect(lines.slice(1).map((l) => [/type=([0-9A-F-]+)/.exec(l)?.[1], /name="([^"]+)"/.exec(l)?.[1]])).toEqual([
      [ESP_TYPE, "initos-a"],
      [ESP_TYPE, "initos-b"],
      [LINUX_TYPE, "initos-luks"],
    ]);
    expect(lines[3]).not.toMatch(/size=/); // the LUKS partition takes the rest of the disk
    expect(s.calls.filter((c) => c.includes("sfdisk"))).toHaveLength(1);
  });

  it("LUKS2: the TPM key in keyslot 0 (PBKDF2, minimal), the recovery passphrase in keyslot 1 (argon2id); the key sealed as a token for keyslot 0", async () => {
    const { s, tpm, go, kdfs } = await installer();
    await go();
    expect(kdfs).toEqual([["format", TPM_KDF], ["addKey", RECOVERY_KDF]]);
    const recovery = /RECOVERY PASSPHRASE \(shown once, write it down\): (\S+)/.exec(s.consoleOutput)![1]!;
    expect(s.luks.open("/dev/vdb3", "check", Buffer.from(recovery), 0).slot).toBe(1);
    const tokens = s.luks.tokens("/dev/vdb3");
    expect(tokens).toHaveLength(1);
    expect(parseToken(tokens[0]!.id, tokens[0]!.json)).toMatchObject({ keyslot: 0, pcrs: [7, 15], signedPcrs: [11], signer: PEM });
    // The installed machine's first boot (same TPM state, the stub's signature for its PCR 11) unseals it, and it opens keyslot 0.
    const pol = signedPcrPolicy([11], tpm.pcrRead([11]));
    const entry = { pcrs: [11], pkfp: keyFingerprint(PEM), pol: Buffer.from(pol).toString("hex"), sig: sign("sha256", pol, pcrKey.privateKey).toString("base64") };
    s.add(PCR_SIGNATURE, { kind: "file", data: JSON.stringify({ sha256: [entry] }) });
    const keys = unsealTokens(s, silentLog(), tpm, requirement(cfg), ["/dev/vdb3"]);
    expect(keys.map((k) => k.keyslot)).toEqual([0]);
    expect(s.luks.open("/dev/vdb3", "check", keys[0]!.key, 0, 0).slot).toBe(0);
  });

  it("the rootfs goes through busybox tar from the verified tools image, with exactly the bytes hashed", async () => {
    const { s, go } = await installer();
    await go();
    const tar = s.inputs.filter((i) => i.argv.startsWith(`${BUSYBOX} tar `));
    expect(tar).toHaveLength(1);
    expect(sha(tar[0]!.data)).toBe(sha(TAR));
  });

  it("a rootfs whose sha256 is not the signed config's fails the install, naming the file; nothing is sealed and no ESP written", async () => {
    const { s, log, go } = await installer({ sha256: "0".repeat(64) });
    await expect(go()).rejects.toThrow(/^install: rootfs\.tar has sha256 [0-9a-f]{16}\.\.\., the signed config expects 0000000000000000\.\.\.$/);
    expect(s.calls.filter((c) => /^(writeFile \/run\/initos\/target\/initos\.json|luks\.setToken|run .*mkfs\.fat|copyFile|toConsole)/.test(c))).toEqual([]);
    expect(log.lines.some((l) => l.startsWith("info: install: done"))).toBe(false);
  });

  it("both ESPs get the UKI at the removable-media path, the images and the sealed ssh host key", async () => {
    const { s, log, go } = await installer();
    await go();
    const espCalls = (dev: string) => {
      const from = s.calls.findIndex((c) => c.startsWith(`mount ${dev} ${TARGET_ESP} vfat`));
      expect(from, `${dev} not mounted`).toBeGreaterThanOrEqual(0);
      const to = s.calls.findIndex((c, n) => n > from && c.startsWith(`umount ${TARGET_ESP}`));
      return s.calls.slice(from, to);
    };
    for (const dev of ["/dev/vdb1", "/dev/vdb2"]) {
      const c = espCalls(dev);
      expect(c).toContain(`copyFile ${UKI} ${TARGET_ESP}/EFI/BOOT/BOOTX64.EFI`);
      expect(c).toContain(`copyFile ${ESP}/initos/modules.sqfs ${TARGET_ESP}/initos/modules.sqfs`);
      expect(c).toContain(`copyFile ${ESP}/initos/modules.verity ${TARGET_ESP}/initos/modules.verity`);
      expect(c).toContain(`writeFile ${TARGET_ESP}/initos/recovery-hostkey.json`);
    }
    expect(s.calls.some((c) => /^run .*mkfs\.fat .*-n INITOS_A \/dev\/vdb1$/.test(c))).toBe(true);
    expect(s.calls.some((c) => /^run .*mkfs\.fat .*-n INITOS_B \/dev\/vdb2$/.test(c))).toBe(true);
    // The host key is sealed (a blob only this TPM opens), never copied as it is.
    const sealed = JSON.parse(s.readFile(`${TARGET_ESP}/initos/recovery-hostkey.json`)!);
    expect(sealed).toMatchObject({ type: "initos-recovery-hostkey", "tpm2-pcrs": [15], tpm2_pubkey_pcrs: [11] });
    expect(JSON.stringify(sealed)).not.toContain(Buffer.from("dropbear-host-key").toString("base64"));
    expect(log.lines).toContain("info: install: recovery ssh host key (pin it): ssh-ed25519 AAAAC3NzaC1lZDI1NTE5pub");
    // Nothing secret and nothing that carries policy on the ESPs: no disk key, no passphrase.
    const recovery = /RECOVERY PASSPHRASE \(shown once, write it down\): (\S+)/.exec(s.consoleOutput)![1]!;
    const diskKey = s.luksSlots.get("/dev/vdb3")!.get(0)!;
    const onEsp = [...s.files].filter(([path]) => path.startsWith(`${TARGET_ESP}/`));
    expect(onEsp.length).toBeGreaterThan(0);
    for (const [, node] of onEsp) {
      expect(node.data ?? "").not.toContain(recovery);
      expect(node.data ?? "").not.toContain(diskKey);
    }
  });

  it("copies each image from the slot whose copy was verified, and refuses an image not verified this boot", async () => {
    const ESP_B = "/run/initos/esp-b";
    const two: EspResult = { disk: "/dev/vda", slots: [...esp.slots, { name: "b", partLabel: "initos-b", device: "/dev/vda2", mountPoint: ESP_B, booted: false }] };
    const fromB = await installer({ esp: two, images: verifiedImages(cfg, "b") });
    fromB.s.mounts.push(ESP_B);
    fromB.s.add(`${ESP_B}/initos/modules.sqfs`, { kind: "file", data: "squashfs" }).add(`${ESP_B}/initos/modules.verity`, { kind: "file", data: "hash tree" });
    await fromB.go();
    const copies = fromB.s.calls.filter((c) => /^copyFile .*modules\.(sqfs|verity) /.test(c));
    expect(copies.length).toBe(4); // two files, two target ESPs
    for (const c of copies) expect(c).toMatch(/^copyFile \/run\/initos\/esp-b\/initos\/modules\./);

    const unverified = await installer({ images: verifiedImages(cfg).map((m) => ({ ...m, verified: false })) });
    await expect(unverified.go()).rejects.toThrow("install: image modules was not verified this boot; refusing to install it");
    nothingWritten(unverified.s);
  });

  it("the recovery passphrase is shown on the console once, and never in the log", async () => {
    const { s, log, go } = await installer();
    await go();
    const shown = [...s.consoleOutput.matchAll(/RECOVERY PASSPHRASE \(shown once, write it down\): (\S+)/g)].map((m) => m[1]!);
    expect(shown).toHaveLength(1);
    expect(shown[0]).toMatch(/^([a-z2-9]{5}-){7}[a-z2-9]{5}$/);
    expect(log.lines.some((l) => l.includes(shown[0]!))).toBe(false);
    expect(log.lines.some((l) => l.startsWith("info: install: done: /dev/vdb has @root and @home @log @cache, sealed to PCR 7,15 + signed 11"))).toBe(true);
  });
});
