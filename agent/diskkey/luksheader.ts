// What a LUKS2 header says about how its volume is protected, checked before any key is tried.
//
// The header is data anyone with the disk can rewrite (its checksum is a plain sha256, not a
// signature). Two things in it decide what a key "opens", and neither is checked by
// libcryptsetup when a key is tried:
// - a null cipher. A keyslot whose area is `cipher_null` stores the volume key in the clear:
//   any passphrase "decrypts" it, and the digest check then passes. A data segment that is
//   `cipher_null` (or not of type "crypt") shows its plaintext through the mapper, so a copy of
//   this machine's header with its segment turned null opens with this machine's own key and
//   presents whatever the attacker wrote. Either way the opened volume proves nothing about who
//   holds the key; such a volume is never opened with a TPM key or a passphrase.
// - the KDF cost. Trying a key against a keyslot costs what its PBKDF says; argon2 with 4 GiB
//   and a high time cost would hold PID 1 (which the OOM killer spares: everything else dies
//   first) for minutes. Keyslots beyond the bounds below are not tried.
import { BootError } from "../errors.ts";

export interface LuksKdf {
  type: string;
  /** pbkdf2 */
  iterations?: number;
  /** argon2i/argon2id: passes, KiB, threads */
  time?: number;
  memory?: number;
  cpus?: number;
}

export interface LuksKeyslot {
  id: number;
  /** "luks2" for a key; "reencrypt" for an online reencryption's state (never tried). */
  type: string;
  /** The keyslot area's cipher spec, e.g. aes-xts-plain64. */
  encryption: string;
  kdf: LuksKdf;
}

export interface LuksSegment {
  id: number;
  /** "crypt" for an encrypted segment; "linear" is plaintext. */
  type: string;
  encryption: string;
}

export interface LuksMeta {
  keyslots: LuksKeyslot[];
  segments: LuksSegment[];
}

const num = (v: unknown): number | undefined => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
const str = (v: unknown): string => (typeof v === "string" ? v : "");
const obj = (v: unknown): Record<string, unknown> => (v && typeof v === "object" && !Array.isArray(v) ? (v as Record<string, unknown>) : {});

/** The keyslots and segments of crypt_dump_json's text; a header without them is refused. */
export function parseLuksHeader(device: string, json: string): LuksMeta {
  let top: Record<string, unknown>;
  try {
    top = obj(JSON.parse(json));
  } catch {
    throw new BootError(`${device}: the LUKS2 metadata is not JSON`);
  }
  const keyslots = Object.entries(obj(top.keyslots)).map(([id, v]) => {
    const k = obj(v);
    const kdf = obj(k.kdf);
    return { id: Number(id), type: str(k.type), encryption: str(obj(k.area).encryption), kdf: { type: str(kdf.type), iterations: num(kdf.iterations), time: num(kdf.time), memory: num(kdf.memory), cpus: num(kdf.cpus) } };
  });
  const segments = Object.entries(obj(top.segments)).map(([id, v]) => {
    const s = obj(v);
    return { id: Number(id), type: str(s.type), encryption: str(s.encryption) };
  });
  if (!segments.length) throw new BootError(`${device}: the LUKS2 metadata has no data segment`);
  return { keyslots, segments };
}

const isNull = (cipher: string) => cipher === "" || cipher.startsWith("cipher_null");

/** Why the volume must not be opened with any key: a null cipher or an unencrypted segment; null when none. */
export function unprotected(meta: LuksMeta): string | null {
  for (const s of meta.segments) {
    if (s.type !== "crypt") return `data segment ${s.id} is not encrypted (type ${JSON.stringify(s.type)})`;
    if (isNull(s.encryption)) return `cipher_null in data segment ${s.id}`;
  }
  for (const k of meta.keyslots) if (k.type === "luks2" && isNull(k.encryption)) return `cipher_null in keyslot ${k.id}`;
  return null;
}

/**
 * The most a keyslot's KDF may cost before a key is tried against it. A key the TPM released
 * is 32 random bytes: its keyslots use PBKDF2 at 1000 iterations (TPM_KDF; systemd-cryptenroll
 * the same), so a TPM key is only tried where PBKDF2 is cheap. A passphrase needs stretching:
 * the recovery keyslot is argon2id, 4 passes, 128 MiB (RECOVERY_KDF); cryptsetup's own default
 * benchmarks to ~2 s with at most 1 GiB, which the passphrase bounds still admit (a volume the
 * user made with cryptsetup), but not the 4 GiB LUKS2 allows.
 */
export const KEY_KDF_BOUND = { pbkdf2Iterations: 100_000, argon2: false } as const;
export const PASSPHRASE_KDF_BOUND = { pbkdf2Iterations: 10_000_000, argon2: { time: 32, memoryKiB: 1 << 20, cpus: 16 } } as const;
export type KdfBound = { pbkdf2Iterations: number; argon2: false | { time: number; memoryKiB: number; cpus: number } };

/** Why `slot` is not tried under `bound`; null when it may be. */
export function kdfRefusal(slot: LuksKeyslot, bound: KdfBound): string | null {
  const k = slot.kdf;
  if (slot.type !== "luks2") return `keyslot ${slot.id} is of type ${JSON.stringify(slot.type)}`;
  if (k.type === "pbkdf2") {
    if ((k.iterations ?? Infinity) > bound.pbkdf2Iterations) return `keyslot ${slot.id}: PBKDF2 with ${k.iterations} iterations (at most ${bound.pbkdf2Iterations} are tried)`;
    return null;
  }
  if (k.type === "argon2i" || k.type === "argon2id") {
    if (!bound.argon2) return `keyslot ${slot.id}: ${k.type} (a key from the TPM is only tried in PBKDF2 keyslots)`;
    const a = bound.argon2;
    if ((k.time ?? Infinity) > a.time || (k.memory ?? Infinity) > a.memoryKiB || (k.cpus ?? Infinity) > a.cpus) {
      return `keyslot ${slot.id}: ${k.type} with ${k.time} passes, ${k.memory} KiB, ${k.cpus} threads (beyond ${a.time}, ${a.memoryKiB} KiB, ${a.cpus})`;
    }
    return null;
  }
  return `keyslot ${slot.id}: unknown KDF ${JSON.stringify(k.type)}`;
}

/** The keyslots of `meta` a secret may be tried in (all within `bound`, or only `only`), in order. */
export function triableSlots(meta: LuksMeta, bound: KdfBound, only?: number): { slots: number[]; refused: string[] } {
  const slots: number[] = [];
  const refused: string[] = [];
  for (const k of [...meta.keyslots].sort((a, b) => a.id - b.id)) {
    if (only !== undefined && k.id !== only) continue;
    const why = kdfRefusal(k, bound);
    if (why) refused.push(why);
    else slots.push(k.id);
  }
  return { slots, refused };
}
