// The disk key: sealing, unsealing and resealing, used by install, unlock and reseal. One place
// decides what a key is bound to (the signed config), how a token is checked before the TPM
// sees it, and which keyslots a reseal may remove.
//
//   seal:   32 random bytes → a new LUKS2 keyslot (PBKDF2, minimal: the secret is random) whose
//           passphrase is their base64 (as systemd's) → sealed under the persistent SRK to
//           PolicyAuthorize(PCR signer) + PolicyPCR(PCR 7 now, latch PCR at zero) → a
//           `systemd-tpm2` token in the same header.
//   unseal: for each token that meets the config: a salted, encrypted policy session replays
//           the binding (the signature for PCR 11 comes from systemd-stub via /.extra).
import { BootError, describe } from "../errors.ts";
import type { AgentConfig } from "../config.ts";
import type { Logger } from "../log.ts";
import { TPM_KDF } from "../sys/cryptsetup.ts";
import type { TpmOps, Crypt, Files } from "../sys/index.ts";
import { type PolicyStep, type Primary, TpmError } from "../sys/tss.ts";
import { keyFingerprint, policyPcr, rsaPublicArea, sealPolicy, ZERO_DIGEST } from "./policy.ts";
import type { LegacySeal } from "./legacy.ts";
import { describeBinding, parseToken, refusal, type Requirement, type Sealed, tokenJson, type Tpm2Token } from "./token.ts";

/** Where systemd-stub puts the UKI's .pcrsig section for the initrd. */
export const PCR_SIGNATURE = "/.extra/tpm2-pcr-signature.json";
/** The persistent SRK handle (TCG provisioning guidance; systemd >= 254 uses the same). */
export const SRK_HANDLE = "0x81000001";

export function requirement(cfg: AgentConfig): Requirement {
  const t = cfg.tpm;
  return { bank: t.bank, pcrs: t.pcrs, latchPcr: t.latchPcr, signedPcrs: t.signedPcrs, ...(t.pcrPublicKey ? { signer: t.pcrPublicKey } : {}) };
}

/** The key as the LUKS2 keyslot sees it: base64 text, as systemd-cryptenroll enrolls it. */
export const keyslotPassphrase = (key: Uint8Array): Buffer => Buffer.from(Buffer.from(key).toString("base64"), "ascii");

export interface PcrSignature {
  pol: Uint8Array;
  sig: Uint8Array;
}

/**
 * The signed PCR policy for this UKI, from the file systemd-stub wrote. It is data: the TPM
 * checks the signature; here only the entry for the config's PCRs and signer is picked.
 */
export function readPcrSignature(sys: Files, req: Requirement, fingerprint: string): PcrSignature | string {
  const text = sys.readFile(PCR_SIGNATURE);
  if (text === null) return `no ${PCR_SIGNATURE}: this UKI carries no PCR signature (not a production build)`;
  let entries: unknown;
  try {
    entries = (JSON.parse(text) as Record<string, unknown>)[req.bank];
  } catch {
    return `${PCR_SIGNATURE} is not JSON`;
  }
  if (!Array.isArray(entries)) return `${PCR_SIGNATURE} has no ${req.bank} entries`;
  const want = [...req.signedPcrs].sort((a, b) => a - b).join(",");
  for (const e of entries as Record<string, unknown>[]) {
    const pcrs = Array.isArray(e.pcrs) ? [...(e.pcrs as number[])].sort((a, b) => a - b).join(",") : "";
    if (pcrs !== want || e.pkfp !== fingerprint) continue;
    if (typeof e.pol !== "string" || !/^[0-9a-f]{64}$/.test(e.pol) || typeof e.sig !== "string") return `${PCR_SIGNATURE}: malformed entry for PCR ${want}`;
    return { pol: new Uint8Array(Buffer.from(e.pol, "hex")), sig: new Uint8Array(Buffer.from(e.sig, "base64")) };
  }
  return `${PCR_SIGNATURE} has no signature for PCR ${want} by the configured PCR key`;
}

/** The `systemd-tpm2` tokens of a volume; malformed ones are logged and skipped. */
export function readTokens(sys: Crypt, log: Logger, device: string): Tpm2Token[] {
  const out: Tpm2Token[] = [];
  for (const { id, json } of sys.luks.tokens(device)) {
    try {
      const t = parseToken(id, json);
      if (t) out.push(t);
    } catch (e) {
      log.err(`unlock: ${device}: ${describe(e)}; ignored`);
    }
  }
  return out;
}

export interface UnsealedKey {
  device: string;
  /** The token id; -1 for a key sealed in the format before tokens (legacy.ts). */
  token: number;
  keyslot: number;
  /** What the keyslot takes: the base64 of the unsealed bytes (raw bytes for a legacy seal). */
  key: Uint8Array;
}

/** The signature for this UKI's PCR 11, read once and only when a sealed object needs it. */
export function pcrSignatureOnce(sys: Files, req: Requirement): () => PcrSignature {
  let got: PcrSignature | string | undefined;
  return () => {
    got ??= req.signer ? readPcrSignature(sys, req, keyFingerprint(req.signer)) : "the signed config names no PCR signer";
    if (typeof got === "string") throw new Error(got);
    return got;
  };
}

/**
 * How many policy sessions an unseal may start before a stream of PCR extends counts as a
 * failure. systemd's tpm2-util allows 30 as well; each one costs ~0.5 s under TCG.
 */
export const UNSEAL_SESSIONS = 30;

/**
 * tpm.unseal, started again in a new session while the TPM answers TPM_RC_PCR_CHANGED.
 *
 * Why: under Secure Boot the kernel's IMA arch policy (CONFIG_IMA_ARCH_POLICY, on in Debian's
 * kernels) measures every module it loads into PCR 10, and any extend moves the TPM's PCR
 * update counter. A session that straddles one fails at Unseal though no PCR it binds moved.
 * Seen: btrfs loading in the background during a trial boot's unseal, which then fell to the
 * passphrase. A new session replays the whole policy against the PCRs as they are now, so
 * nothing is trusted that the TPM did not check again.
 */
export function unsealInSessions(tpm: TpmOps, log: Logger, what: string, blob: Uint8Array, primary: Primary, steps: readonly PolicyStep[], srk?: Uint8Array): Uint8Array {
  for (let session = 1; ; session++) {
    try {
      const secret = tpm.unseal(blob, primary, steps, srk);
      if (session > 1) log.info(`${what}: a PCR was extended during the policy session ${session - 1} time(s) (module loads are measured into PCR 10); unsealed in session ${session}`);
      return secret;
    } catch (e) {
      if (!(e instanceof TpmError && e.pcrChanged)) throw e;
      if (session >= UNSEAL_SESSIONS) throw new Error(`${describe(e)} in each of ${UNSEAL_SESSIONS} policy sessions: something keeps extending PCRs`);
    }
  }
}

/**
 * Replays what `t` is bound to in a policy session and unseals it; throws with the cause. The
 * object must have passed refusal() against `req` (so its signer is the config's).
 */
export function unsealObject(tpm: TpmOps, log: Logger, what: string, req: Requirement, t: Sealed, signature: () => PcrSignature): Uint8Array {
  const steps: PolicyStep[] = [];
  if (t.signedPcrs.length) {
    const sig = signature();
    // The TPM decides; this only names the cause when the signature is for another UKI.
    const now = policyPcr(ZERO_DIGEST, t.signedPcrs, tpm.pcrRead(t.signedPcrs));
    if (!Buffer.from(now).equals(sig.pol)) throw new Error(`PCR ${t.signedPcrs.join(",")} is not what the PCR key signed (another UKI, or another boot phase)`);
    steps.push({ kind: "authorize", pcrs: t.signedPcrs, publicArea: rsaPublicArea(req.signer!), approvedPolicy: sig.pol, signature: sig.sig });
  }
  if (t.pcrs.length) {
    const expected = sealPolicy({ pcrs: t.pcrs, values: tpm.pcrRead(t.pcrs), ...(t.signedPcrs.length ? { signer: req.signer! } : {}) });
    if (!Buffer.from(expected).equals(t.policyHash)) throw new Error(`sealed for other values of PCR ${t.pcrs.join(",")} than this boot's (firmware, Secure Boot keys or dbx changed, or the latch is already extended)`);
    steps.push({ kind: "pcr", pcrs: t.pcrs });
  }
  return unsealInSessions(tpm, log, what, t.blob, t.srk ? { kind: "srk" } : { kind: "legacy-ecc" }, steps, t.srk);
}

/**
 * Unseals every usable token of every volume. Never throws: a token that does not meet the
 * config, or that the TPM refuses, is one line in the log. The caller latches right after.
 */
export function unsealTokens(sys: Crypt & Files, log: Logger, tpm: TpmOps, req: Requirement, volumes: readonly string[], signature = pcrSignatureOnce(sys, req)): UnsealedKey[] {
  const keys: UnsealedKey[] = [];
  for (const device of volumes) {
    const tokens = readTokens(sys, log, device);
    if (!tokens.length) log.warn(`unlock: ${device}: no systemd-tpm2 token in the LUKS2 header`);
    for (const t of tokens) {
      const name = `${device} token ${t.id} (${describeBinding(t.pcrs, t.signedPcrs)}, keyslot ${t.keyslot})`;
      const refused = refusal(t, req);
      if (refused) {
        log.err(`unlock: ${device}: refused ${refused}`);
        continue;
      }
      try {
        const secret = unsealObject(tpm, log, `unlock: ${name}`, req, t, signature);
        log.info(`unlock: ${name}: unsealed${t.srk ? ` under the SRK ${SRK_HANDLE}` : ""}`);
        keys.push({ device, token: t.id, keyslot: t.keyslot, key: keyslotPassphrase(secret) });
        secret.fill(0);
      } catch (e) {
        log.err(`unlock: ${name}: TPM did not release the key: ${describe(e)}`);
      }
    }
  }
  return keys;
}

/**
 * The key of a disk sealed before tokens existed (legacy.ts): PolicyPCR over the config's PCRs
 * and the latch, under the transient ECC primary tpm2-tools made (the same template as
 * systemd 252's). Null (with a line) when the TPM refuses.
 */
export function unsealLegacy(log: Logger, tpm: TpmOps, req: Requirement, device: string, seal: LegacySeal): UnsealedKey | null {
  try {
    const key = unsealInSessions(tpm, log, `unlock: ${device}: the ESP seal`, seal.blob, { kind: "legacy-ecc" }, [{ kind: "pcr", pcrs: [...req.pcrs, req.latchPcr] }]);
    log.info(`unlock: ${device}: unsealed the key sealed on the ESP by an older initos (keyslot ${seal.keyslot})`);
    return { device, token: -1, keyslot: seal.keyslot, key };
  } catch (e) {
    log.err(`unlock: ${device}: the key sealed on the ESP by an older initos was not released: ${describe(e)}`);
    return null;
  }
}

/** A further volume of the pool (beyond the first), as this boot opened it. */
export interface PoolMember {
  device: string;
  /** The keyslot the secret that opened the pool's first volume opened here too. */
  slot: number;
}

/**
 * Moves a pool off the legacy seal: a new key sealed as a token of the first volume
 * (authorised by the legacy key, which opened `provenSlot` this boot), the same key added to
 * every other volume of the pool (one secret per pool), then the legacy keyslots destroyed.
 */
export function migrateLegacy(sys: Crypt, log: Logger, tpm: TpmOps, req: Requirement, secureBoot: string, device: string, legacyKey: Uint8Array, provenSlot: number, others: readonly PoolMember[] = []): void {
  try {
    const key = sys.randomBytes(32);
    try {
      const made = enroll(sys, tpm, req, secureBoot, device, legacyKey, key);
      for (const o of others) sys.luks.addKey(o.device, legacyKey, keyslotPassphrase(key), TPM_KDF);
      sys.luks.destroySlot(device, provenSlot);
      for (const o of others) sys.luks.destroySlot(o.device, o.slot);
      log.info(`unlock: ${device}: migrated to a systemd-tpm2 token (token ${made.token}, keyslot ${made.keyslot}); the ESP-sealed keyslot ${provenSlot} is destroyed` + (others.length ? `; ${others.map((o) => o.device).join(" ")} take the same key` : ""));
    } finally {
      key.fill(0);
    }
  } catch (e) {
    log.err(`unlock: ${device}: not migrated off the ESP-sealed key: ${describe(e)}`);
  }
}

export interface Enrolled {
  token: number;
  keyslot: number;
}

/** Refuses to seal where a seal would not protect the key; one line saying why. */
function checkSealable(req: Requirement, secureBoot: string): void {
  if (secureBoot !== "on") throw new BootError(`refusing to seal the disk key: Secure Boot is ${secureBoot}, so PCR 7 would vouch for nothing`);
  if (req.signedPcrs.length && !req.signer) throw new BootError("refusing to seal the disk key: the signed config names no PCR signer (tpm.pcrPublicKey)");
}

/**
 * Seals `secret` under the persistent SRK to `pcrs` (by value: the config's PCRs as they are now,
 * the latch PCR at zero) and, when the config names a signer, its signed PCR policy. Refuses
 * where a seal would protect nothing (checkSealable).
 */
export function sealObject(tpm: TpmOps, req: Requirement, secureBoot: string, secret: Uint8Array, pcrs: readonly number[]): Sealed {
  checkSealable(req, secureBoot);
  const srk = tpm.ensureSrk();
  const values = tpm.pcrRead(pcrs.filter((p) => p !== req.latchPcr));
  if (pcrs.includes(req.latchPcr)) values.set(req.latchPcr, new Uint8Array(32)); // zero until the boot path latches
  const signer = req.signedPcrs.length ? { signer: req.signer! } : {};
  const policyHash = sealPolicy({ pcrs, values, ...signer });
  const blob = tpm.seal(secret, policyHash, { kind: "srk" });
  return { blob, pcrs: [...pcrs], bank: req.bank, primaryAlg: "ecc", policyHash, pin: false, signedPcrs: [...req.signedPcrs], ...signer, srk: srk.serialized };
}

/**
 * Seals `key`, which opens `keyslot` of `device` (as keyslotPassphrase), to the config's
 * binding (its PCRs, the latch at zero, the signed policy) and writes the token. Only with
 * Secure Boot on: with it off, PCR 7 vouches for nothing, and a key sealed to it would unseal
 * for any kernel.
 */
export function sealKey(sys: Crypt, tpm: TpmOps, req: Requirement, secureBoot: string, device: string, key: Uint8Array, keyslot: number): Enrolled {
  const sealed = sealObject(tpm, req, secureBoot, key, [...req.pcrs, req.latchPcr]);
  return { token: sys.luks.setToken(device, tokenJson({ keyslot, ...sealed })), keyslot };
}

/**
 * A new random key (or `given`, which the caller wipes) in a new keyslot of `device`
 * (authorised by `existing`), sealed (sealKey).
 */
export function enroll(sys: Crypt, tpm: TpmOps, req: Requirement, secureBoot: string, device: string, existing: Uint8Array, given?: Uint8Array): Enrolled {
  checkSealable(req, secureBoot); // before the keyslot: a refused seal leaves the header as it was
  const key = given ?? sys.randomBytes(32);
  const passphrase = keyslotPassphrase(key);
  try {
    const keyslot = sys.luks.addKey(device, existing, passphrase, TPM_KDF);
    return sealKey(sys, tpm, req, secureBoot, device, key, keyslot);
  } finally {
    if (!given) key.fill(0);
    passphrase.fill(0);
  }
}

export interface ResealResult extends Enrolled {
  /** Keyslots (and their tokens) removed: each proven this boot to hold a TPM key. */
  removed: number[];
  /** Old TPM tokens kept because nothing proved what their keyslot holds. */
  kept: number[];
}

/** A volume the recovery passphrase opened this boot, for a reseal. */
export interface ResealVolume {
  device: string;
  /** The keyslot the passphrase opened (never removed). */
  passphraseSlot: number;
  /** Keyslots a key the TPM released opened this boot (the only ones a reseal may remove). */
  provenTpmSlots: ReadonlySet<number>;
}

/**
 * Removes the keyslots this boot proved to hold a TPM key (never `keep` or the passphrase's),
 * and their tokens; tokens whose keyslot nothing proved stay.
 */
function dropProven(sys: Crypt, log: Logger, v: ResealVolume, keep: number): { removed: number[]; kept: number[] } {
  const removed: number[] = [];
  const kept: number[] = [];
  for (const t of readTokens(sys, log, v.device)) {
    if (t.keyslot === keep) continue;
    if (t.keyslot !== v.passphraseSlot && v.provenTpmSlots.has(t.keyslot)) {
      sys.luks.destroySlot(v.device, t.keyslot);
      sys.luks.removeToken(v.device, t.id);
      removed.push(t.keyslot);
    } else {
      kept.push(t.id);
    }
  }
  // A further volume's TPM keyslot has no token (the first volume's token carries the key).
  for (const slot of v.provenTpmSlots) {
    if (slot === keep || slot === v.passphraseSlot || removed.includes(slot)) continue;
    sys.luks.destroySlot(v.device, slot);
    removed.push(slot);
  }
  return { removed, kept };
}

/**
 * A new seal after a passphrase unlock (PCR 7 moved, or the old seal is unusable). One new
 * key for the whole pool: sealed as a token of the first volume (written first), and added to
 * every other volume the passphrase opened, so the next boot's one secret opens them all. Then
 * only keyslots this boot *proved* to hold a TPM key (a key the TPM released opened them) are
 * removed, never the one the passphrase opened. Old tokens whose keyslot nothing proved stay:
 * the disk loses nothing, and they can only unseal in the measured state they were sealed to.
 */
export function reseal(sys: Crypt, log: Logger, tpm: TpmOps, req: Requirement, secureBoot: string, passphrase: Uint8Array, first: ResealVolume, others: readonly ResealVolume[] = []): ResealResult & { others: { device: string; keyslot: number; removed: number[] }[] } {
  const key = sys.randomBytes(32);
  const pass = keyslotPassphrase(key);
  try {
    const made = enroll(sys, tpm, req, secureBoot, first.device, passphrase, key);
    const added = others.map((o) => ({ o, keyslot: sys.luks.addKey(o.device, passphrase, pass, TPM_KDF) }));
    const mine = dropProven(sys, log, first, made.keyslot);
    const rest = added.map(({ o, keyslot }) => ({ device: o.device, keyslot, removed: dropProven(sys, log, o, keyslot).removed }));
    return { ...made, ...mine, others: rest };
  } finally {
    key.fill(0);
    pass.fill(0);
  }
}
