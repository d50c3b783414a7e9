// The in-process TPM2 layer (agent/sys/tss.ts) against a real swtpm on loopback, including a
// token made by Debian's own systemd-cryptenroll: same blob format, same policy math, same
// primary template.
import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import { generateKeyPairSync, randomBytes, sign } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { freePortPair, waitForPort } from "../swtpm-ports.ts";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { openTpm, type PolicyStep, TpmError, type TpmDevice } from "../../agent/sys/tss.ts";
import { keyName, policyAuthorize, policyPcr as policyPcrOf, rsaPublicArea, sha256 as sha256Of, ZERO_DIGEST } from "../../agent/diskkey/policy.ts";
import { unsealInSessions } from "../../agent/diskkey/diskkey.ts";
import { silentLog } from "../unit/fakesys.ts";

// The policy math is agent/diskkey/policy.ts: the systemd test below checks it against the
// policy hash systemd-cryptenroll computed.
const ZERO32 = Buffer.from(ZERO_DIGEST);
const policyPcr = (prev: Uint8Array, pcrs: readonly number[], values: ReadonlyMap<number, Uint8Array>) => Buffer.from(policyPcrOf(prev, pcrs, values));
const sha256 = (...b: Uint8Array[]) => Buffer.from(sha256Of(...b));

// ---- swtpm ----------------------------------------------------------------------------------

const dir = mkdtempSync(`${tmpdir()}/initos-tss-`);
let swtpm: ChildProcess | undefined;
let port = 0;
let tcti = "";
let tpm: TpmDevice | undefined;


beforeAll(async () => {
  port = await freePortPair();
  tcti = `swtpm:host=127.0.0.1,port=${port}`;
  const state = `${dir}/state`;
  execFileSync("mkdir", ["-p", state]);
  swtpm = spawn(
    "swtpm",
    [
      "socket", "--tpm2", "--tpmstate", `dir=${state}`,
      "--server", `type=tcp,port=${port},bindaddr=127.0.0.1`,
      "--ctrl", `type=tcp,port=${port + 1},bindaddr=127.0.0.1`,
      "--flags", "not-need-init,startup-clear",
    ],
    { stdio: "ignore" },
  );
  await waitForPort(port + 1, 10_000);
});

afterAll(() => {
  tpm?.close();
  swtpm?.kill();
  rmSync(dir, { recursive: true, force: true });
});

/** swtpm has no resource manager: whatever we leave loaded stays. Nothing may be left. */
afterEach(() => {
  tpm?.close();
  tpm = undefined;
  for (const what of ["handles-transient", "handles-loaded-session", "handles-saved-session"]) {
    const r = spawnSync("tpm2_getcap", ["-T", tcti, what], { encoding: "utf8" });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim(), what).toBe("");
  }
});

const dev = (): TpmDevice => (tpm ??= openTpm(tcti));

function expectTpmError(fn: () => unknown): TpmError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(TpmError);
    return e as TpmError;
  }
  throw new Error("expected a TpmError");
}

// ---- tests ----------------------------------------------------------------------------------

describe("tss (ESYS via koffi) against swtpm", () => {
  it("extends and reads PCRs of the sha256 bank", () => {
    const before = dev().pcrRead([15]).get(15)!;
    expect(Buffer.from(before)).toEqual(ZERO32);
    const digest = sha256(Buffer.from("latch"));
    dev().extend(15, digest);
    const all = dev().pcrRead([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15]); // more than 8: two PCR_Reads
    expect(all.size).toBe(12);
    expect(Buffer.from(all.get(15)!)).toEqual(sha256(ZERO32, digest));
  });

  it("creates the SRK once and finds it afterwards", () => {
    const first = dev().ensureSrk();
    const second = dev().ensureSrk();
    expect(first.created).toBe(true);
    expect(second.created).toBe(false);
    expect(first.name.length).toBe(34);
    expect(Buffer.from(second.name)).toEqual(Buffer.from(first.name));
    expect(first.serialized.length).toBeGreaterThan(64);
  });

  it("seals to PolicyPCR(7,15) under the SRK, unseals, and refuses once PCR 15 moved", () => {
    const { serialized } = dev().ensureSrk();
    const secret = randomBytes(32);
    const policy = policyPcr(ZERO32, [7, 15], dev().pcrRead([7, 15]));
    const blob = dev().seal(secret, policy, { kind: "srk" });
    const steps: PolicyStep[] = [{ kind: "pcr", pcrs: [15, 7] }];

    const t0 = performance.now();
    const out = dev().unseal(blob, { kind: "srk" }, steps, serialized);
    console.log(`unseal (SRK, salted policy + encrypt session, PolicyPCR): ${(performance.now() - t0).toFixed(1)} ms`);
    expect(Buffer.from(out)).toEqual(secret);

    dev().extend(15, sha256(Buffer.from("moved")));
    const e = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, steps, serialized));
    expect(e.message).toMatch(/^Esys_Unseal: TPM_RC_POLICY_FAIL \(0x9\w\w\): /);
    expect(e.policyFailure).toBe(true);
  });

  it("unseals through a signed PCR 11 policy (PolicyAuthorize) and refuses once PCR 11 moved", () => {
    const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    const publicArea = rsaPublicArea(publicKey);
    const pcrs = dev().pcrRead([7, 11]);
    const approvedPolicy = policyPcr(ZERO32, [11], pcrs);
    const signature = sign("sha256", approvedPolicy, privateKey);
    const policy = policyPcr(policyAuthorize(keyName(publicArea)), [7], pcrs);
    const secret = randomBytes(32);
    const blob = dev().seal(secret, policy, { kind: "srk" });
    const steps = (sig: Uint8Array): PolicyStep[] => [
      { kind: "authorize", pcrs: [11], publicArea, approvedPolicy, signature: sig },
      { kind: "pcr", pcrs: [7] },
    ];

    const t0 = performance.now();
    expect(Buffer.from(dev().unseal(blob, { kind: "srk" }, steps(signature)))).toEqual(secret);
    console.log(`unseal (SRK, PolicyAuthorize + PolicyPCR): ${(performance.now() - t0).toFixed(1)} ms`);

    // A signature by another key: VerifySignature refuses.
    const other = generateKeyPairSync("rsa", { modulusLength: 2048 }).privateKey;
    const forged = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, steps(sign("sha256", approvedPolicy, other))));
    expect(forged.message).toMatch(/^Esys_VerifySignature: TPM_RC_SIGNATURE /);
    expect(forged.policyFailure).toBe(true);

    dev().extend(11, sha256(Buffer.from("another phase")));
    const e = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, steps(signature)));
    expect(e.message).toMatch(/^Esys_PolicyAuthorize: TPM_RC_VALUE /);
    expect(e.policyFailure).toBe(true);
  });

  it("unseals a token made by Debian's systemd-cryptenroll (legacy ECC primary) and opens its keyslot", () => {
    const img = `${dir}/luks.img`;
    writeFileSync(img, Buffer.alloc(32 << 20));
    writeFileSync(`${dir}/pass`, "initial passphrase");
    execFileSync("cryptsetup", ["luksFormat", "--type", "luks2", "-q", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", img, `${dir}/pass`]);
    const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    writeFileSync(`${dir}/pub.pem`, publicKey.export({ type: "spki", format: "pem" }));
    // systemd-cryptenroll talks to the same swtpm: our connection must be closed meanwhile.
    tpm?.close();
    tpm = undefined;
    execFileSync(
      "systemd-cryptenroll",
      [`--tpm2-device=${tcti}`, "--tpm2-pcrs=7", `--tpm2-public-key=${dir}/pub.pem`, "--tpm2-public-key-pcrs=11", img],
      { env: { ...process.env, PASSWORD: "initial passphrase" }, stdio: ["ignore", "ignore", "pipe"] },
    );
    const token = JSON.parse(execFileSync("cryptsetup", ["token", "export", "--token-id", "0", img], { encoding: "utf8" })) as Record<string, unknown>;
    expect(token).toMatchObject({ type: "systemd-tpm2", "tpm2-primary-alg": "ecc", "tpm2-pcrs": [7], tpm2_pubkey_pcrs: [11] });
    expect(token.tpm2_srk).toBeUndefined(); // systemd 252: a transient primary, hence "legacy-ecc"

    const publicArea = rsaPublicArea(publicKey);
    const pcrs = dev().pcrRead([7, 11]);
    // Our policy math and RSA public area agree with systemd's, byte for byte.
    expect(token["tpm2-policy-hash"]).toBe(policyPcr(policyAuthorize(keyName(publicArea)), [7], pcrs).toString("hex"));

    const blob = Buffer.from(token["tpm2-blob"] as string, "base64");
    const approvedPolicy = policyPcr(ZERO32, [11], pcrs);
    const steps: PolicyStep[] = [
      { kind: "authorize", pcrs: [11], publicArea, approvedPolicy, signature: sign("sha256", approvedPolicy, privateKey) },
      { kind: "pcr", pcrs: [7] },
    ];
    const t0 = performance.now();
    const secret = dev().unseal(blob, { kind: "legacy-ecc" }, steps);
    console.log(`unseal (legacy ECC primary created each time, PolicyAuthorize + PolicyPCR): ${(performance.now() - t0).toFixed(1)} ms`);

    // systemd's passphrase is the base64 of the unsealed bytes, without a newline.
    const open = spawnSync("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", img], { input: Buffer.from(secret).toString("base64") });
    expect(open.status, String(open.stderr)).toBe(0);

    // The primary matters: the SRK template (noDA) is a different key, and the blob does not load.
    dev().ensureSrk();
    const e = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, steps));
    expect(e.message).toMatch(/^Esys_Load: TPM_RC_/);
    expect(e.policyFailure).toBe(false);
  });

  it("keeps the secret off the bus: parameter-encrypted on seal and on unseal (tcti-pcap capture)", () => {
    const pcap = `${dir}/bus.pcap`;
    process.env.TCTI_PCAP_FILE = pcap; // read by libtss2-tcti-pcap when it initializes
    const { serialized } = dev().ensureSrk();
    tpm?.close();
    tpm = openTpm(`pcap:${tcti}`);
    const secret = randomBytes(32);
    const policy = policyPcr(ZERO32, [7], tpm.pcrRead([7]));
    const blob = tpm.seal(secret, policy, { kind: "srk" });
    expect(Buffer.from(tpm.unseal(blob, { kind: "srk" }, [{ kind: "pcr", pcrs: [7] }], serialized))).toEqual(secret);
    tpm.close();
    tpm = undefined;
    delete process.env.TCTI_PCAP_FILE;
    const bus = readFileSync(pcap);
    expect(bus.includes(policy)).toBe(true); // the capture works: the template's authPolicy is in clear
    expect(bus.includes(blob.subarray(0, 16))).toBe(true);
    expect(bus.includes(secret.subarray(0, 8))).toBe(false);
  });

  it("refuses an SRK that is not the one the token names", () => {
    const { serialized } = dev().ensureSrk();
    // Esys_TR_Serialize ends with the object's TPM2B_PUBLIC, whose last field is the ECC
    // point's y: another key there means another name (ESYS computes it from the public area).
    const other = Buffer.from(serialized);
    other[other.length - 1]! ^= 0xff;
    const blob = dev().seal(randomBytes(16), ZERO32, { kind: "srk" });
    const e = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, [], other));
    expect(e.message).toBe("srk: 0x81000001 is not the SRK the token was sealed under");
    expect(e.policyFailure).toBe(false);
  });

  it("a PCR extended inside the policy session (as IMA measures a module load): TPM_RC_PCR_CHANGED, and a new session unseals", async () => {
    // The proxy sends its own PCR 10 extend to swtpm just before each Unseal it is told to spoil.
    const proxyPort = await freePortPair();
    const count = `${dir}/interrupt`;
    writeFileSync(count, "0");
    const proxy = spawn(process.execPath, [new URL("./helpers/tpm-measuring-proxy.mjs", import.meta.url).pathname, String(port), String(proxyPort), count], { stdio: ["ignore", "pipe", "inherit"] });
    try {
      await new Promise<void>((resolve, reject) => {
        proxy.stdout!.once("data", () => resolve());
        proxy.once("exit", (c) => reject(new Error(`the proxy exited (${c})`)));
      });
      const through = openTpm(`swtpm:host=127.0.0.1,port=${proxyPort}`);
      try {
        const { serialized } = through.ensureSrk();
        const secret = randomBytes(32);
        const blob = through.seal(secret, policyPcr(ZERO32, [7], through.pcrRead([7])), { kind: "srk" });
        const steps: PolicyStep[] = [{ kind: "pcr", pcrs: [7] }];
        const before = Buffer.from(through.pcrRead([10]).get(10)!);

        writeFileSync(count, "1");
        const e = expectTpmError(() => through.unseal(blob, { kind: "srk" }, steps, serialized));
        expect(e.message).toMatch(/^Esys_Unseal: TPM_RC_PCR_CHANGED \(0x128\): tpm:error\(2\.0\): PCR have changed since checked/);
        expect(e.pcrChanged).toBe(true);
        expect(e.policyFailure).toBe(false);
        expect(Buffer.from(through.pcrRead([10]).get(10)!)).not.toEqual(before); // the proxy's extend happened

        writeFileSync(count, "2");
        const log = silentLog();
        expect(Buffer.from(unsealInSessions(through, log, "test", blob, { kind: "srk" }, steps, serialized))).toEqual(secret);
        expect(log.lines).toEqual(["info: test: a PCR was extended during the policy session 2 time(s) (module loads are measured into PCR 10); unsealed in session 3"]);
        expect(readFileSync(count, "utf8")).toBe("0");
      } finally {
        through.close();
      }
    } finally {
      proxy.kill();
    }
  });

  it("under Bun, as in the agent, ESYS prints nothing for a TPM error: the TpmError is the report", () => {
    const r = spawnSync("node_modules/@oven/bun-linux-x64-baseline/bin/bun", [new URL("./helpers/tss-quiet.ts", import.meta.url).pathname, tcti], { encoding: "utf8", timeout: 60_000, env: { ...process.env, TSS2_LOG: undefined } });
    expect(r.stdout).toMatch(/^Esys_Load: TPM_RC_INTEGRITY \(0x\w+\): tpm:/);
    expect(r.stderr).not.toMatch(/esys/i);
    expect(r.status).toBe(0);
  });

  it("decodes TPM errors with Tss2_RC_Decode and names the call", () => {
    const { serialized } = dev().ensureSrk();
    const blob = Buffer.from(dev().seal(randomBytes(16), ZERO32, { kind: "srk" }));
    blob[20]! ^= 0x01; // inside TPM2B_PRIVATE's integrity-protected, encrypted part
    const e = expectTpmError(() => dev().unseal(blob, { kind: "srk" }, [], serialized));
    expect(e.message).toMatch(/^Esys_Load: TPM_RC_INTEGRITY \(0x\w+\): tpm:/);
    expect(e.policyFailure).toBe(false);
    expect(e.rc & 0xbf).toBe(0x9f);

    // Framing errors in the token are ours, and say where.
    expect(() => dev().unseal(blob.subarray(0, 40), { kind: "srk" }, [])).toThrow(/tpm2-blob: truncated/);
  });
});
