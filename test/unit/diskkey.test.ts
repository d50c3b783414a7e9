// The disk key's decisions with fakes: the systemd-tpm2 token format (against a token Debian 12's
// systemd-cryptenroll wrote, in fixtures/), what the signed config lets through, sealing,
// unsealing, resealing and the latch. The real TPM side is test/system/tss.test.ts (swtpm).
import { generateKeyPairSync, randomBytes, sign } from "node:crypto";
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { enroll, migrateLegacy, PCR_SIGNATURE, pcrSignatureOnce, readPcrSignature, requirement, reseal, sealKey, UNSEAL_SESSIONS, unsealTokens } from "../../agent/diskkey/diskkey.ts";
import { BootTpm, LATCH_DIGEST } from "../../agent/diskkey/latch.ts";
import { keyFingerprint, phaseDigest, policyPcr, sealPolicy, signedPcrPolicy, ZERO_DIGEST } from "../../agent/diskkey/policy.ts";
import { realUnlockOps } from "../../agent/stages/volumes.ts";
import { HOST_KEY } from "../../agent/stages/sidecar.ts";
import { sealHostKey, unsealHostKey } from "../../agent/diskkey/hostkey.ts";
import { parseToken, refusal, type Requirement, tokenJson } from "../../agent/diskkey/token.ts";
import { FakeSys, silentLog } from "./fakesys.ts";
import { extendPcr, FakeTpm } from "./faketpm.ts";

const SYSTEMD_TOKEN = readFileSync(new URL("./fixtures/systemd-252-token.json", import.meta.url), "utf8");
const SYSTEMD_PEM = readFileSync(new URL("./fixtures/systemd-252-token.pcr.pem", import.meta.url), "utf8");

const pcrKey = generateKeyPairSync("rsa", { modulusLength: 2048 });
const PEM = pcrKey.publicKey.export({ format: "pem", type: "spki" }).toString();
const REQ: Requirement = { bank: "sha256", pcrs: [7], latchPcr: 15, signedPcrs: [11], signer: PEM };
const DEV = "/dev/vda3";

describe("systemd-tpm2 tokens", () => {
  it("reads the token systemd-cryptenroll 252 wrote, field by field", () => {
    const t = parseToken(0, SYSTEMD_TOKEN)!;
    expect(t).toMatchObject({ id: 0, keyslot: 1, pcrs: [7], bank: "sha256", primaryAlg: "ecc", pin: false, signedPcrs: [11], signer: SYSTEMD_PEM });
    expect(Buffer.from(t.policyHash).toString("hex")).toBe("17ad93f9866869280b44e37c926648903a2448f278a680c8df0e0ad9da3463ab");
    // tpm2-blob: TPM2B_PRIVATE, then TPM2B_PUBLIC (a KEYEDHASH object, nameAlg sha256).
    const blob = Buffer.from(t.blob);
    const pub = blob.subarray(2 + blob.readUInt16BE(0));
    expect(pub.readUInt16BE(0)).toBe(pub.length - 2);
    expect(pub.readUInt16BE(2)).toBe(0x0008);
    expect(t.srk).toBeUndefined();
  });

  it("computes the policy hash systemd computed: PolicyAuthorize(signer) then PolicyPCR(7)", () => {
    // That swtpm had just started: PCR 7 was all zeros when systemd-cryptenroll sealed.
    const d = sealPolicy({ pcrs: [7], values: new Map([[7, new Uint8Array(32)]]), signer: SYSTEMD_PEM });
    expect(Buffer.from(d)).toEqual(Buffer.from(parseToken(0, SYSTEMD_TOKEN)!.policyHash));
  });

  it("writes the same field names and order systemd writes, and reads its own tokens back", () => {
    const t = parseToken(0, SYSTEMD_TOKEN)!;
    const ours = JSON.parse(tokenJson({ ...t, srk: Buffer.from("srk") }));
    const theirs = JSON.parse(SYSTEMD_TOKEN);
    expect(Object.keys(ours)).toEqual([...Object.keys(theirs), "tpm2_srk"]);
    for (const k of Object.keys(theirs)) expect(ours[k]).toEqual(theirs[k]);
    expect(parseToken(3, tokenJson(t))).toEqual({ ...t, id: 3 });
  });

  it("names the field when a token is malformed, and ignores other token types", () => {
    expect(parseToken(1, '{"type":"luks2-keyring","keyslots":["0"]}')).toBeNull();
    expect(() => parseToken(2, "{")).toThrow("token 2: not JSON");
    expect(() => parseToken(2, SYSTEMD_TOKEN.replace('"tpm2-pcrs":[7]', '"tpm2-pcrs":[99]'))).toThrow(/^token 2: tpm2-pcrs\.0: /);
    expect(() => parseToken(2, SYSTEMD_TOKEN.replace('"keyslots":["1"]', '"keyslots":["1","2"]'))).toThrow("token 2: names 2 keyslots, expected exactly one");
  });
});

describe("what the signed config lets through", () => {
  const systemd = parseToken(0, SYSTEMD_TOKEN)!;
  const req = { ...REQ, signer: SYSTEMD_PEM };

  it("accepts exactly the configured binding, with or without the latch", () => {
    expect(refusal(systemd, req)).toBeNull();
    expect(refusal({ ...systemd, pcrs: [7, 15] }, req)).toBeNull();
  });

  it("refuses a token bound to other PCRs, naming both bindings", () => {
    expect(refusal({ ...systemd, pcrs: [0] }, req)).toBe("token 0: bound to PCR 0 + signed 11; the config requires PCR 7 + signed 11 (latch 15 optional)");
    expect(refusal({ ...systemd, pcrs: [7, 14] }, req)).toMatch(/^token 0: bound to PCR 7,14 \+ signed 11; /);
  });

  it("refuses a token bound to less than the config requires (PCR 7 alone)", () => {
    expect(refusal({ ...systemd, signedPcrs: [], signer: undefined }, req)).toBe("token 0: bound to PCR 7; the config requires PCR 7 + signed 11 (latch 15 optional)");
  });

  it("a config that requires only PCR 7 accepts a PCR 7 token", () => {
    expect(refusal({ ...systemd, signedPcrs: [], signer: undefined }, { ...req, signedPcrs: [] })).toBeNull();
  });

  it("refuses another signer, a PIN, another bank, and a config with no signer", () => {
    expect(refusal(systemd, REQ)).toMatch(/^token 0: signed by another PCR key \([0-9a-f]{16}\.\.\.\), not the one in the signed config$/);
    expect(refusal({ ...systemd, pin: true }, req)).toBe("token 0: needs a TPM PIN, which an unattended boot cannot give");
    expect(refusal({ ...systemd, bank: "sha1" }, req)).toBe("token 0: PCR bank sha1, the config requires sha256");
    const { signer: _, ...noSigner } = req;
    expect(refusal(systemd, noSigner)).toMatch(/names no PCR signer/);
  });

  it("the default config requires PCR 7 + signed PCR 11 + the latch 15", () => {
    expect(requirement(DEFAULT_CONFIG)).toEqual({ bank: "sha256", pcrs: [7], latchPcr: 15, signedPcrs: [11] });
  });
});

/** A machine after install: PCR 7 as the firmware left it, PCR 11 as the stub + enter-initrd left it. */
function machine(opts: { signature?: "good" | "none" | "other-key" } = {}) {
  const sys = new FakeSys();
  const tpm = new FakeTpm();
  sys.tpmFake = tpm;
  tpm.pcrs.set(7, phaseDigest("secure boot on, snakeoil db"));
  tpm.pcrs.set(11, extendPcr(new Uint8Array(32), phaseDigest("production UKI sections"), phaseDigest("enter-initrd")));
  sys.luks.format(DEV, Buffer.from("tpm-slot-bootstrap"), { type: "pbkdf2", iterations: 1000 });
  sys.luks.addKey(DEV, Buffer.from("tpm-slot-bootstrap"), Buffer.from("recovery"), { type: "argon2id", iterations: 4 });
  const pol = signedPcrPolicy([11], tpm.pcrRead([11]));
  const signer = opts.signature === "other-key" ? generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey : pcrKey.privateKey;
  if (opts.signature !== "none") {
    const entry = { pcrs: [11], pkfp: keyFingerprint(PEM), pol: Buffer.from(pol).toString("hex"), sig: sign("sha256", pol, signer).toString("base64") };
    sys.add(PCR_SIGNATURE, { kind: "file", data: JSON.stringify({ sha256: [entry] }) });
  }
  return { sys, tpm };
}

describe("sealing and unsealing", () => {
  it("seals under the SRK to PCR 7 + latch + signed 11, as a token for the keyslot; unseals on the same boot state", () => {
    const { sys, tpm } = machine();
    const made = enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    expect(made).toEqual({ token: 0, keyslot: 2 });
    const t = parseToken(0, sys.luks.tokens(DEV)[0]!.json)!;
    expect(t).toMatchObject({ keyslot: 2, pcrs: [7, 15], signedPcrs: [11], signer: PEM });
    expect(t.srk).toBeDefined();
    const log = silentLog();
    const keys = unsealTokens(sys, log, tpm, REQ, [DEV]);
    expect(keys).toHaveLength(1);
    expect(tpm.calls).toContain("unseal srk authorize+pcr");
    // The unsealed bytes, as base64 (as systemd enrolls them), open exactly the token's keyslot.
    expect(sys.luks.open(DEV, "x", keys[0]!.key, 0, 2).slot).toBe(2);
    expect(Buffer.from(keys[0]!.key).toString()).toMatch(/^[A-Za-z0-9+/]{43}=$/);
    expect(log.lines).toContain("info: unlock: /dev/vda3 token 0 (PCR 7,15 + signed 11, keyslot 2): unsealed under the SRK 0x81000001");
  });

  it("another UKI (PCR 11 differs) gets nothing, even with the production signature", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    tpm.extend(11, phaseDigest("anything"));
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(log.lines.at(-1)).toMatch(/TPM did not release the key: PCR 11 is not what the PCR key signed \(another UKI, or another boot phase\)$/);
  });

  it("a UKI without a PCR signature gets nothing, and the line says why", () => {
    const { sys, tpm } = machine({ signature: "none" });
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(log.lines.at(-1)).toMatch(/no \/\.extra\/tpm2-pcr-signature\.json: this UKI carries no PCR signature/);
  });

  it("a forged signature entry (the configured key's fingerprint, another key's signature) is refused by the TPM", () => {
    const { sys, tpm } = machine({ signature: "other-key" });
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(log.lines.at(-1)).toMatch(/TPM_RC_SIGNATURE/);
  });

  it("PCR 7 changed: the token is not even tried, and the line names PCR 7", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    tpm.extend(7, phaseDigest("dbx update"));
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(log.lines.at(-1)).toMatch(/sealed for other values of PCR 7,15 than this boot's/);
    expect(tpm.calls.some((c) => c.startsWith("unseal"))).toBe(false);
  });

  it("a PCR extended during the policy session (a module load, measured into PCR 10): a new session unseals, and one line says so", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    tpm.measuredDuringSession = 3;
    const log = silentLog();
    const keys = unsealTokens(sys, log, tpm, REQ, [DEV]);
    expect(keys).toHaveLength(1);
    expect(sys.luks.open(DEV, "x", keys[0]!.key, 0, 2).slot).toBe(2);
    expect(tpm.calls.filter((c) => c.startsWith("unseal"))).toHaveLength(4);
    expect(log.lines).toContain("info: unlock: /dev/vda3 token 0 (PCR 7,15 + signed 11, keyslot 2): a PCR was extended during the policy session 3 time(s) (module loads are measured into PCR 10); unsealed in session 4");
  });

  it("PCRs extended during every session: bounded, the token is not released, and the line says why", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    tpm.measuredDuringSession = 1000;
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(tpm.calls.filter((c) => c.startsWith("unseal"))).toHaveLength(UNSEAL_SESSIONS);
    expect(log.lines.at(-1)).toMatch(/TPM did not release the key: Esys_Unseal: TPM_RC_PCR_CHANGED .* in each of 30 policy sessions: something keeps extending PCRs$/);
  });

  it("a refusal is not tried again in another session", () => {
    const { sys, tpm } = machine({ signature: "other-key" });
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    expect(unsealTokens(sys, silentLog(), tpm, REQ, [DEV])).toEqual([]);
    expect(tpm.calls.filter((c) => c.startsWith("unseal"))).toHaveLength(1);
  });

  it("after the latch nothing unseals", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    tpm.extend(15, LATCH_DIGEST);
    expect(unsealTokens(sys, silentLog(), tpm, REQ, [DEV])).toEqual([]);
  });

  it("a forged token naming other PCRs is refused before the TPM is asked", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    const json = sys.luks.tokens(DEV)[0]!.json.replace('"tpm2-pcrs":[7,15]', '"tpm2-pcrs":[14]');
    sys.luks.setToken(DEV, json, 0);
    const log = silentLog();
    expect(unsealTokens(sys, log, tpm, REQ, [DEV])).toEqual([]);
    expect(log.lines).toContain("err: unlock: /dev/vda3: refused token 0: bound to PCR 14 + signed 11; the config requires PCR 7 + signed 11 (latch 15 optional)");
  });

  it("Secure Boot off: refuses to seal, and the header is unchanged", () => {
    const { sys, tpm } = machine();
    expect(() => enroll(sys, tpm, REQ, "off", DEV, Buffer.from("recovery"))).toThrow("refusing to seal the disk key: Secure Boot is off, so PCR 7 would vouch for nothing");
    expect(() => sealKey(sys, tpm, REQ, "no-efi", DEV, Buffer.from("k"), 0)).toThrow(/Secure Boot is no-efi/);
    expect(sys.calls.filter((c) => c.startsWith("luks.addKey") || c.startsWith("luks.setToken"))).toHaveLength(1); // machine()'s own addKey
    expect(sys.luks.tokens(DEV)).toEqual([]);
  });
});

describe("reseal", () => {
  it("writes the new token first, removes only keyslots proven this boot, never the passphrase's", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery")); // token 0, keyslot 2
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery")); // token 1, keyslot 3
    sys.calls.length = 0;
    const r = reseal(sys, silentLog(), tpm, REQ, "on", Buffer.from("recovery"), { device: DEV, passphraseSlot: 1, provenTpmSlots: new Set([3]) });
    expect(r).toEqual({ token: 2, keyslot: 4, removed: [3], kept: [0], others: [] });
    const order = sys.calls.filter((c) => c.startsWith("luks."));
    expect(order.indexOf("luks.setToken /dev/vda3")).toBeLessThan(order.indexOf("luks.destroySlot /dev/vda3 3"));
    expect(order).not.toContain("luks.destroySlot /dev/vda3 1");
    expect(sys.luks.open(DEV, "x", Buffer.from("recovery"), 0).slot).toBe(1);
  });

  it("a forged token naming the recovery keyslot cannot make a reseal destroy it", () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    sys.luks.setToken(DEV, sys.luks.tokens(DEV)[0]!.json.replace('"keyslots":["2"]', '"keyslots":["1"]'), 0);
    // Even if something had "proven" slot 1, it is the passphrase's.
    const r = reseal(sys, silentLog(), tpm, REQ, "on", Buffer.from("recovery"), { device: DEV, passphraseSlot: 1, provenTpmSlots: new Set([1]) });
    expect(r.removed).toEqual([]);
    expect(sys.luks.open(DEV, "x", Buffer.from("recovery"), 0).slot).toBe(1);
  });
});

describe("the PCR signature from systemd-stub", () => {
  it("picks the entry for the configured PCRs and key; malformed files get a line", () => {
    const { sys } = machine();
    expect(typeof readPcrSignature(sys, REQ, keyFingerprint(PEM))).toBe("object");
    expect(readPcrSignature(sys, { ...REQ, signedPcrs: [11, 12] }, keyFingerprint(PEM))).toMatch(/has no signature for PCR 11,12 by the configured PCR key/);
    sys.add(PCR_SIGNATURE, { kind: "file", data: "{" });
    expect(readPcrSignature(sys, REQ, keyFingerprint(PEM))).toBe(`${PCR_SIGNATURE} is not JSON`);
  });
});

describe("the latch over one boot", () => {
  const tpmBoot = (o: { device?: boolean; acpi?: boolean; failExtend?: boolean } = {}) => {
    const sys = new FakeSys();
    const tpm = new FakeTpm();
    tpm.failExtend = o.failExtend ?? false;
    sys.tpmFake = tpm;
    if (o.device ?? true) sys.devices.add("/dev/tpmrm0");
    if (o.acpi ?? true) sys.add("/sys/firmware/acpi/tables/TPM2", { kind: "file" });
    return { sys, tpm, boot: new BootTpm(sys, silentLog(), { waitSeconds: 1, latchPcr: 15 }) };
  };

  it("extends the latch once, and PCR 11 with each phase once", async () => {
    const { tpm, boot } = tpmBoot();
    await boot.find();
    boot.measurePhase("enter-initrd");
    boot.latch("root= on the cmdline");
    boot.latch("again");
    await boot.leaveInitrd();
    expect(tpm.calls).toEqual(["extend 11", "extend 15", "extend 11"]);
    expect(Buffer.from(tpm.pcr(15))).toEqual(Buffer.from(extendPcr(new Uint8Array(32), LATCH_DIGEST)));
  });

  it("a TPM that cannot be extended stops the boot: fail closed", async () => {
    const { boot } = tpmBoot({ failExtend: true });
    await boot.find();
    expect(() => boot.latch("install mode")).toThrow("tpm: cannot extend the latch PCR 15: Esys_PCR_Extend: TPM_RC_LOCALITY; stopping, fail closed");
  });

  it("waits (bounded) only when the firmware announces a TPM, and then latches at the hand-off", async () => {
    const late = tpmBoot({ device: false });
    late.sys.appearAfterSleeps.set("/dev/tpmrm0", 3);
    await late.boot.leaveInitrd();
    expect(late.tpm.calls).toEqual(["extend 15", "extend 11"]);
    const none = tpmBoot({ device: false, acpi: false });
    expect(await none.boot.find()).toBeNull();
    expect(none.sys.sleeps).toBe(0);
    await none.boot.leaveInitrd();
  });

  it("a TPM the firmware announces that appears only after the bound: no hand-off, no jails (fail closed), one line", async () => {
    const hidden = tpmBoot({ device: false });
    hidden.sys.appearAfterSleeps.set("/dev/tpmrm0", 1000); // far past the 1 s bound (50 ms polls)
    expect(await hidden.boot.find()).toBeNull();
    expect(hidden.sys.devices.has("/dev/tpmrm0")).toBe(false);
    await expect(hidden.boot.leaveInitrd()).rejects.toThrow(
      "tpm: refusing to hand the machine to an OS or to jails: no /dev/tpmrm0 after 1s although the firmware announces a TPM2, so its latch PCR could not be extended",
    );
    expect(hidden.tpm.calls).toEqual([]);
  });

  it("a TPM device that is there but cannot be used fails closed the same way", async () => {
    const broken = tpmBoot();
    broken.sys.tpm = () => {
      throw new Error("Esys_Initialize: TPM_RC_FAILURE");
    };
    expect(await broken.boot.find()).toBeNull();
    await expect(broken.boot.leaveInitrd()).rejects.toThrow(/refusing to hand the machine to an OS or to jails: \/dev\/tpmrm0 is there but cannot be used: Esys_Initialize: TPM_RC_FAILURE/);
  });
});

describe("unlocking a machine with the real unlock operations (fakes underneath)", () => {
  const cfg = { ...DEFAULT_CONFIG, tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PEM } };
  const esp = { disk: "/dev/vda", slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true }] };
  async function opsFor(sys: FakeSys, secureBoot: "on" | "off" = "on") {
    sys.devices.add("/dev/tpmrm0");
    const boot = new BootTpm(sys, silentLog(), { waitSeconds: 0, latchPcr: 15 });
    await boot.find();
    const log = silentLog();
    const opened: { device: string; mapper: string }[] = [];
    return { log, opened, ops: realUnlockOps(sys, log, cfg, boot, secureBoot, esp, DEV, opened) };
  }

  it("opens with the token's key in its keyslot and records nothing to migrate", async () => {
    const { sys, tpm } = machine();
    enroll(sys, tpm, REQ, "on", DEV, Buffer.from("recovery"));
    const { ops, opened } = await opsFor(sys);
    const keys = ops.unsealKeys();
    ops.latch();
    expect(ops.openWithTpmKeys(keys)).toBe(true);
    expect(opened).toEqual([{ device: DEV, mapper: "/dev/mapper/initos-pool0" }]);
    expect(ops.latchHolds()).toBe(true);
  });

  /** A disk installed by the previous format: the key sealed to PCR 7 + 15 on the ESP, raw bytes in keyslot 0. */
  function legacyMachine() {
    const m = machine();
    const legacyKey = Buffer.alloc(32, 0x6b);
    m.sys.luksSlots.get(DEV)!.set(0, legacyKey.toString("latin1"));
    const blob = Buffer.from(m.tpm.seal(legacyKey, policyPcr(ZERO_DIGEST, [7, 15], m.tpm.pcrRead([7, 15])), { kind: "legacy-ecc" }));
    const dir = "/run/initos/esp-a/initos/tpm";
    m.sys.add(`${dir}/root.priv`, { kind: "file", data: blob.subarray(0, 2).toString("latin1") });
    m.sys.add(`${dir}/root.pub`, { kind: "file", data: blob.subarray(2).toString("latin1") });
    m.sys.add(`${dir}/root.json`, { kind: "file", data: '{"pcrs":[7],"latchPcr":15,"keyslot":0}' });
    return m;
  }

  it("migrates a disk sealed on the ESP by an older initos: a token for a new keyslot, the proven old keyslot destroyed", async () => {
    const { sys } = legacyMachine();
    const { ops, log } = await opsFor(sys);
    const keys = ops.unsealKeys();
    expect(keys.map((k) => [k.token, k.keyslot])).toEqual([[-1, 0]]);
    ops.latch();
    expect(ops.openWithTpmKeys(keys)).toBe(true);
    expect(log.lines).toContain("info: unlock: /dev/vda3: migrated to a systemd-tpm2 token (token 0, keyslot 2); the ESP-sealed keyslot 0 is destroyed");
    expect([...sys.luksSlots.get(DEV)!.keys()].sort()).toEqual([1, 2]);
    expect(parseToken(0, sys.luks.tokens(DEV)[0]!.json)).toMatchObject({ keyslot: 2, pcrs: [7, 15], signedPcrs: [11] });
    // Nothing on the ESP was removed: the files stay, their keyslot is gone.
    expect(sys.exists("/run/initos/esp-a/initos/tpm/root.priv")).toBe(true);
  });

  it("migrating a two-volume pool puts the one new key into the second volume too, and destroys its legacy keyslot", () => {
    const { sys, tpm } = legacyMachine();
    sys.randomBytes = (n) => new Uint8Array(randomBytes(n));
    const legacyKey = Buffer.alloc(32, 0x6b);
    const SECOND = "/dev/vdb1";
    sys.luks.format(SECOND, legacyKey, { type: "pbkdf2", iterations: 1000 });
    const log = silentLog();
    migrateLegacy(sys, log, tpm, REQ, "on", DEV, legacyKey, 0, [{ device: SECOND, slot: 0 }]);
    expect(log.lines).toContain(`info: unlock: ${DEV}: migrated to a systemd-tpm2 token (token 0, keyslot 2); the ESP-sealed keyslot 0 is destroyed; ${SECOND} take the same key`);
    const [k] = unsealTokens(sys, silentLog(), tpm, REQ, [DEV]);
    expect(sys.luks.open(SECOND, "check", k!.key, 0).slot).toBe(1);
    expect([...sys.luksSlots.get(SECOND)!.keys()]).toEqual([1]); // the legacy keyslot is gone
  });

  it("does not migrate with Secure Boot off (and still unlocks with the old key)", async () => {
    const { sys } = legacyMachine();
    const { ops, log } = await opsFor(sys, "off");
    const keys = ops.unsealKeys();
    ops.latch();
    expect(ops.openWithTpmKeys(keys)).toBe(true);
    expect(log.lines.some((l) => l.startsWith("err: unlock: /dev/vda3: not migrated off the ESP-sealed key: refusing to seal the disk key: Secure Boot is off"))).toBe(true);
    expect(sys.luksSlots.get(DEV)!.has(0)).toBe(true);
  });

  it("an ESP seal naming the recovery keyslot opens nothing and destroys nothing", async () => {
    const { sys } = legacyMachine();
    sys.add("/run/initos/esp-a/initos/tpm/root.json", { kind: "file", data: '{"pcrs":[7],"latchPcr":15,"keyslot":1}' });
    const { ops, log } = await opsFor(sys);
    const keys = ops.unsealKeys();
    ops.latch();
    expect(ops.openWithTpmKeys(keys)).toBe(false);
    expect(log.lines).toContain("err: unlock: /dev/vda3: the key of the ESP seal does not open keyslot 1, which it names");
    expect([...sys.luksSlots.get(DEV)!.keys()].sort()).toEqual([0, 1]);
  });
});

describe("the recovery sidecar's sealed ssh host key", () => {
  const FILE = "/run/initos/esp-a/initos/recovery-hostkey.json";
  const sealedOn = (m: ReturnType<typeof machine>) => {
    m.sys.add(FILE, { kind: "file", data: sealHostKey(m.tpm, REQ, "on", Buffer.from("dropbear-key-bytes")) });
    return m;
  };
  const unseal = (m: ReturnType<typeof machine>, log = silentLog()) => unsealHostKey(m.sys, log, m.tpm, REQ, FILE, pcrSignatureOnce(m.sys, REQ));

  it("is sealed to the signed PCR 11 policy and the latch, not to PCR 7: a firmware update does not lose it", () => {
    const m = sealedOn(machine());
    expect(JSON.parse(m.sys.readFile(FILE)!)).toMatchObject({ type: "initos-recovery-hostkey", "tpm2-pcrs": [15], tpm2_pubkey_pcrs: [11] });
    expect(Buffer.from(unseal(m)!).toString()).toBe("dropbear-key-bytes");
    m.tpm.extend(7, phaseDigest("dbx update"));
    expect(Buffer.from(unseal(m)!).toString()).toBe("dropbear-key-bytes");
  });

  it("another UKI (PCR 11 not signed), or after the latch: nothing, and one line", () => {
    const other = sealedOn(machine());
    other.tpm.extend(11, phaseDigest("another UKI"));
    const log = silentLog();
    expect(unseal(other, log)).toBeNull();
    expect(log.lines.at(-1)).toMatch(/^warn: recovery: the sealed ssh host key was not released: PCR 11 is not what the PCR key signed/);
    const latched = sealedOn(machine());
    latched.tpm.extend(15, LATCH_DIGEST);
    expect(unseal(latched)).toBeNull();
  });

  it("is not sealed at all without a signed PCR policy in the config", () => {
    const { tpm } = machine();
    expect(() => sealHostKey(tpm, { ...REQ, signedPcrs: [] }, "on", Buffer.from("k"))).toThrow(/would unseal for any UKI/);
  });

  it("the unlock path puts it where the recovery sidecar's sshd reads it, before the latch", async () => {
    const m = sealedOn(machine());
    enroll(m.sys, m.tpm, REQ, "on", DEV, Buffer.from("recovery"));
    m.sys.devices.add("/dev/tpmrm0");
    const boot = new BootTpm(m.sys, silentLog(), { waitSeconds: 0, latchPcr: 15 });
    await boot.find();
    const cfg = { ...DEFAULT_CONFIG, tpm: { ...DEFAULT_CONFIG.tpm, pcrPublicKey: PEM } };
    const esp = { disk: "/dev/vda", slots: [{ name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true }] };
    const ops = realUnlockOps(m.sys, silentLog(), cfg, boot, "on", esp, DEV, []);
    ops.unsealKeys();
    expect(m.sys.readFile(HOST_KEY)).toBe("dropbear-key-bytes");
  });
});
