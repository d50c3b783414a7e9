// TPM2 policy digests, computed the way the TPM computes them (TPM 2.0 Part 3, "PolicyUpdate"),
// so the build can sign, install can seal and unlock can check without asking a TPM. The same
// bytes systemd-cryptenroll and systemd-measure produce: test/system/tss.test.ts and
// test/system/measure.test.ts compare them.
//
// All structures are in the TPM's wire format (big-endian, TPM 2.0 Part 2).
import { createHash, createPublicKey, type KeyObject } from "node:crypto";

export const SHA256_ALG = 0x000b;
const TPM_ALG_RSA = 0x0001;
const TPM_ALG_NULL = 0x0010;
const TPM_CC_POLICY_PCR = 0x0000017f;
const TPM_CC_POLICY_AUTHORIZE = 0x0000016a;
/**
 * The attributes systemd gives the PCR signer's public key when it loads it (decrypt | sign |
 * userWithAuth). They are part of the key's name, which is part of every policy that names the
 * key: another value here and no token systemd-cryptenroll wrote would match.
 */
const SIGNER_ATTRIBUTES = 0x00020000 | 0x00040000 | 0x00000040;

export const ZERO_DIGEST = new Uint8Array(32);

export const sha256 = (...parts: Uint8Array[]): Uint8Array => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return new Uint8Array(h.digest());
};

const u8 = (n: number) => Uint8Array.of(n & 0xff);
const u16 = (n: number) => Uint8Array.of((n >> 8) & 0xff, n & 0xff);
const u32 = (n: number) => Uint8Array.of((n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
/** A TPM2B: a 16-bit size, then the bytes. */
export const tpm2b = (data: Uint8Array) => cat(u16(data.length), data);

/** TPML_PCR_SELECTION for one bank (sha256): which of PCRs 0-23 a policy or a read covers. */
export function pcrSelection(pcrs: readonly number[]): Uint8Array {
  const bitmap = new Uint8Array(3);
  for (const p of pcrs) {
    if (!Number.isInteger(p) || p < 0 || p > 23) throw new RangeError(`PCR ${p} is not 0-23`);
    bitmap[p >> 3]! |= 1 << (p & 7);
  }
  return cat(u32(1), u16(SHA256_ALG), u8(3), bitmap);
}

/** PCRs in the order the TPM concatenates their values: ascending. */
export const sortedPcrs = (pcrs: Iterable<number>): number[] => [...new Set(pcrs)].sort((a, b) => a - b);

/**
 * TPM2_PolicyPCR: extends `prev` with the selection and the digest of the PCR values (in
 * ascending PCR order). `values` must hold every PCR of `pcrs`.
 */
export function policyPcr(prev: Uint8Array, pcrs: readonly number[], values: ReadonlyMap<number, Uint8Array>): Uint8Array {
  const sorted = sortedPcrs(pcrs);
  const pcrDigest = sha256(
    ...sorted.map((p) => {
      const v = values.get(p);
      if (!v || v.length !== 32) throw new Error(`policy: no sha256 value for PCR ${p}`);
      return v;
    }),
  );
  return sha256(prev, u32(TPM_CC_POLICY_PCR), pcrSelection(sorted), pcrDigest);
}

/**
 * TPM2_PolicyAuthorize: the TPM *resets* the digest and then names the key, so whatever came
 * before it is replaced by "anything this key signed". The policyRef is empty, as systemd's.
 */
export function policyAuthorize(keyName: Uint8Array): Uint8Array {
  return sha256(sha256(ZERO_DIGEST, u32(TPM_CC_POLICY_AUTHORIZE), keyName), new Uint8Array(0));
}

/** PEM text (or a KeyObject, public or private) to an RSA public KeyObject; anything else is refused. */
export function rsaKey(pem: string | Uint8Array | KeyObject): KeyObject {
  // A private KeyObject (the build's signing key) gives its public half.
  const key = typeof pem === "object" && "asymmetricKeyType" in pem ? (pem.type === "private" ? createPublicKey(pem) : pem) : createPublicKey(Buffer.from(pem as string | Uint8Array));
  if (key.asymmetricKeyType !== "rsa") throw new Error(`PCR signer: expected an RSA public key, got ${key.asymmetricKeyType}`);
  return key;
}

/**
 * The PCR signer's public key as a marshalled TPM2B_PUBLIC, exactly as systemd loads it with
 * TPM2_LoadExternal. Checked byte for byte against a policy hash systemd-cryptenroll wrote.
 */
export function rsaPublicArea(pem: string | Uint8Array | KeyObject): Uint8Array {
  const jwk = rsaKey(pem).export({ format: "jwk" });
  const n = Buffer.from(jwk.n!, "base64url");
  const eBytes = Buffer.from(jwk.e!, "base64url");
  const e = eBytes.readUIntBE(0, eBytes.length);
  const area = cat(
    u16(TPM_ALG_RSA),
    u16(SHA256_ALG),
    u32(SIGNER_ATTRIBUTES),
    tpm2b(new Uint8Array(0)), // authPolicy
    u16(TPM_ALG_NULL), // symmetric
    u16(TPM_ALG_NULL), // scheme
    u16(n.length * 8), // keyBits
    u32(e), // systemd 252 writes 65537 itself, not the spec's 0-for-default: the name differs
    tpm2b(n),
  );
  return tpm2b(area);
}

/** An object's name: nameAlg, then the hash of its public area (without the TPM2B size). */
export function keyName(tpm2bPublic: Uint8Array): Uint8Array {
  return cat(u16(SHA256_ALG), sha256(tpm2bPublic.subarray(2)));
}

/**
 * systemd's "pkfp": the sha256 of the key in PKCS#1 DER (OpenSSL's i2d_PublicKey), not of the
 * SubjectPublicKeyInfo, in hex. test/system/measure.test.ts compares with systemd-measure's.
 */
export function keyFingerprint(pem: string | Uint8Array | KeyObject): string {
  return Buffer.from(sha256(rsaKey(pem).export({ format: "der", type: "pkcs1" }))).toString("hex");
}

export interface SealPolicy {
  /** PCRs bound by value (e.g. 7, and the latch PCR at zero). */
  pcrs: readonly number[];
  values: ReadonlyMap<number, Uint8Array>;
  /** The PCR signer: when set, the object also requires a PCR policy this key signed. */
  signer?: string | Uint8Array | KeyObject;
}

/**
 * The policy a sealed key is bound to, in systemd's order: PolicyAuthorize (the signer) first,
 * because it resets the digest, then PolicyPCR over the PCRs bound by value.
 */
export function sealPolicy(p: SealPolicy): Uint8Array {
  const start = p.signer ? policyAuthorize(keyName(rsaPublicArea(p.signer))) : ZERO_DIGEST;
  return p.pcrs.length ? policyPcr(start, p.pcrs, p.values) : start;
}

/** The PCR 11 policy the build signs for one phase: PolicyPCR over the expected values, from zero. */
export function signedPcrPolicy(pcrs: readonly number[], values: ReadonlyMap<number, Uint8Array>): Uint8Array {
  return policyPcr(ZERO_DIGEST, pcrs, values);
}

/** systemd-pcrphase's measurement of a boot phase word into PCR 11: sha256 of the word. */
export const phaseDigest = (phase: string): Uint8Array => sha256(Buffer.from(phase, "utf8"));
