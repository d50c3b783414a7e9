// The `systemd-tpm2` LUKS2 token: the sealed disk key in the volume's own header, in the JSON
// systemd-cryptenroll writes (systemd 252 field names, checked against its real output in
// test/unit/diskkey.test.ts). A token is data: anyone with the disk can rewrite it. What it must
// be bound to comes from the signed config (`requirement`), and a token bound to anything else
// is refused before the TPM is asked.
import { z } from "zod";
import { zodIssue, describe } from "../errors.ts";
import { keyFingerprint, sortedPcrs } from "./policy.ts";

export const TOKEN_TYPE = "systemd-tpm2";

const pcrList = z.array(z.number().int().min(0).max(23)).max(24);
const base64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/, "expected base64");

/** The sealed object's fields; others (newer systemd's) are kept but not trusted for anything. */
const SealedSchema = z
  .object({
    "tpm2-blob": base64,
    "tpm2-pcrs": pcrList,
    "tpm2-pcr-bank": z.string().default("sha256"),
    "tpm2-primary-alg": z.string().default("ecc"),
    "tpm2-policy-hash": z.string().regex(/^([0-9a-f]{2})+$/),
    "tpm2-pin": z.boolean().default(false),
    tpm2_pubkey_pcrs: pcrList.default([]),
    tpm2_pubkey: base64.optional(),
    /** systemd >= 254: the parent is the persistent SRK (its ESYS serialization). */
    tpm2_srk: base64.optional(),
  })
  .passthrough();
const TokenSchema = SealedSchema.extend({ type: z.literal(TOKEN_TYPE), keyslots: z.array(z.string().regex(/^\d{1,2}$/)) });

/** A secret sealed in the TPM, and what it is bound to: a token's content, or a sealed file's. */
export interface Sealed {
  blob: Uint8Array;
  pcrs: number[];
  bank: string;
  primaryAlg: string;
  policyHash: Uint8Array;
  pin: boolean;
  signedPcrs: number[];
  /** The PCR signer's public key (PEM text), when the object has a signed PCR policy. */
  signer?: string;
  /** The persistent SRK's serialization; absent: a transient ECC primary (systemd 252). */
  srk?: Uint8Array;
}

/** A LUKS2 `systemd-tpm2` token: a sealed key and the one keyslot it opens. */
export interface Tpm2Token extends Sealed {
  /** The LUKS2 token id in the header. */
  id: number;
  keyslot: number;
}

const b64 = (s: string) => new Uint8Array(Buffer.from(s, "base64"));

function fromSchema(t: z.output<typeof SealedSchema>): Sealed {
  return {
    blob: b64(t["tpm2-blob"]),
    pcrs: [...t["tpm2-pcrs"]],
    bank: t["tpm2-pcr-bank"],
    primaryAlg: t["tpm2-primary-alg"],
    policyHash: new Uint8Array(Buffer.from(t["tpm2-policy-hash"], "hex")),
    pin: t["tpm2-pin"],
    signedPcrs: [...t.tpm2_pubkey_pcrs],
    ...(t.tpm2_pubkey !== undefined ? { signer: Buffer.from(t.tpm2_pubkey, "base64").toString("utf8") } : {}),
    ...(t.tpm2_srk !== undefined ? { srk: b64(t.tpm2_srk) } : {}),
  };
}

function parseJson(what: string, json: string): unknown {
  try {
    return JSON.parse(json);
  } catch {
    throw new Error(`${what}: not JSON`);
  }
}

/** Parses one token's JSON; null when it is another type; throws (naming the field) when malformed. */
export function parseToken(id: number, json: string): Tpm2Token | null {
  const raw = parseJson(`token ${id}`, json);
  if ((raw as { type?: unknown } | null)?.type !== TOKEN_TYPE) return null;
  const r = TokenSchema.safeParse(raw);
  if (!r.success) throw new Error(`token ${id}: ${zodIssue(r.error)}`);
  if (r.data.keyslots.length !== 1) throw new Error(`token ${id}: names ${r.data.keyslots.length} keyslots, expected exactly one`);
  return { id, keyslot: Number(r.data.keyslots[0]), ...fromSchema(r.data) };
}

/** A sealed object kept in a file of its own (`what` names it in errors), with `type`. */
export function parseSealed(what: string, type: string, json: string): Sealed {
  const raw = parseJson(what, json);
  if ((raw as { type?: unknown } | null)?.type !== type) throw new Error(`${what}: not an ${type} object`);
  const r = SealedSchema.safeParse(raw);
  if (!r.success) throw new Error(`${what}: ${zodIssue(r.error)}`);
  return fromSchema(r.data);
}

/** The JSON of a sealed object with systemd's field names and order (`head` goes first). */
export function sealedJson(head: Record<string, unknown>, t: Sealed): string {
  const b = (u: Uint8Array) => Buffer.from(u).toString("base64");
  return JSON.stringify({
    ...head,
    "tpm2-blob": b(t.blob),
    "tpm2-pcrs": t.pcrs,
    "tpm2-pcr-bank": t.bank,
    "tpm2-primary-alg": t.primaryAlg,
    "tpm2-policy-hash": Buffer.from(t.policyHash).toString("hex"),
    "tpm2-pin": t.pin,
    ...(t.signer !== undefined ? { tpm2_pubkey_pcrs: t.signedPcrs, tpm2_pubkey: Buffer.from(t.signer, "utf8").toString("base64") } : {}),
    ...(t.srk !== undefined ? { tpm2_srk: b(t.srk) } : {}),
  });
}

/** The token JSON for the header, as systemd-cryptenroll writes it. */
export function tokenJson(t: Omit<Tpm2Token, "id">): string {
  return sealedJson({ type: TOKEN_TYPE, keyslots: [String(t.keyslot)] }, t);
}

/** What the signed config requires of a token before its blob goes to the TPM. */
export interface Requirement {
  bank: "sha256";
  /** PCRs bound by value. */
  pcrs: readonly number[];
  /** The latch PCR: a token may also bind it (at zero), as initos's own tokens do. */
  latchPcr: number;
  /** PCRs bound through the signer's policy; empty: the config asks for PCR values only. */
  signedPcrs: readonly number[];
  /** The signer's public key (PEM); required when signedPcrs is not empty. */
  signer?: string;
}

const list = (p: readonly number[]) => (p.length ? sortedPcrs(p).join(",") : "none");
const same = (a: readonly number[], b: readonly number[]) => list(a) === list(b);

/** "PCR 7 + signed 11", for log lines. */
export function describeBinding(pcrs: readonly number[], signedPcrs: readonly number[]): string {
  return `PCR ${list(pcrs)}${signedPcrs.length ? ` + signed ${list(signedPcrs)}` : ""}`;
}

/**
 * Why the token does not meet the config's requirement, or null when it does. Exactly the
 * required binding (the latch optional): a token bound to less is weaker than the config
 * allows, and one bound to other PCRs would need a policy session the config did not choose.
 */
export function refusal(t: Sealed & { id?: number }, req: Requirement, name = `token ${t.id}`): string | null {
  const wanted = `${describeBinding(req.pcrs, req.signedPcrs)} (latch ${req.latchPcr} optional)`;
  if (t.bank !== req.bank) return `${name}: PCR bank ${t.bank}, the config requires ${req.bank}`;
  if (t.pin) return `${name}: needs a TPM PIN, which an unattended boot cannot give`;
  if (t.primaryAlg !== "ecc") return `${name}: primary key algorithm ${t.primaryAlg}, only ecc is supported`;
  if (!same(t.pcrs, req.pcrs) && !same(t.pcrs, [...req.pcrs, req.latchPcr])) {
    return `${name}: bound to ${describeBinding(t.pcrs, t.signedPcrs)}; the config requires ${wanted}`;
  }
  if (!same(t.signedPcrs, req.signedPcrs)) return `${name}: bound to ${describeBinding(t.pcrs, t.signedPcrs)}; the config requires ${wanted}`;
  if (req.signedPcrs.length) {
    if (!req.signer) return `${name}: the config names no PCR signer (tpm.pcrPublicKey), so no signed policy can be checked`;
    let fp: string;
    try {
      fp = t.signer ? keyFingerprint(t.signer) : "";
    } catch (e) {
      return `${name}: its PCR signer key is not an RSA public key (${describe(e)})`;
    }
    if (fp !== keyFingerprint(req.signer)) return `${name}: signed by another PCR key (${fp ? fp.slice(0, 16) : "none"}...), not the one in the signed config`;
  }
  return null;
}
