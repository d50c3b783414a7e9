// TPM2 in-process through tpm2-tss: ESYS (sessions, parameter encryption, salting) over a TCTI
// (/dev/tpmrm0, or swtpm in tests), bound with koffi.
//
// No C struct layouts here. Every TPM2B_/TPMT_/TPML_ argument is built in TPM wire format
// (big-endian, TPM 2.0 Part 2) and turned into the C struct by libtss2-mu's
// Tss2_MU_<TYPE>_Unmarshal into an over-sized zeroed buffer (ESYS only reads input structs);
// structs ESYS allocates for us go back to wire format with Tss2_MU_<TYPE>_Marshal, then
// Esys_Free. So the ABI surface is functions over opaque pointers, and everything at this
// module's boundary is a Uint8Array in wire format — the same bytes systemd stores in tokens.
import { createHash } from "node:crypto";
import { load, type Ptr, view } from "./ffi.ts";
import { setenvDefault } from "./libc.ts";

// ---- constants (TPM 2.0 Part 2, tss2_esys.h) ---------------------------------------------

const ESYS_TR_NONE = 0xfff;
const ESYS_TR_PASSWORD = 0x0ff;
const ESYS_TR_RH_OWNER = 0x101;
/** The TCG-reserved handle of the storage root key (what systemd >= 254 uses and creates). */
export const SRK_HANDLE = 0x81000001;

const ALG_KEYEDHASH = 0x0008;
const ALG_SHA256 = 0x000b;
const ALG_AES = 0x0006;
const ALG_NULL = 0x0010;
const ALG_RSASSA = 0x0014;
const ALG_ECC = 0x0023;
const ALG_CFB = 0x0043;
const ECC_NIST_P256 = 0x0003;

const SE_HMAC = 0x00;
const SE_POLICY = 0x01;
const CAP_HANDLES = 0x00000001;

const SESSION_CONTINUE = 0x01;
const SESSION_DECRYPT = 0x20; // first command parameter travels encrypted
const SESSION_ENCRYPT = 0x40; // first response parameter travels encrypted

// TPMA_OBJECT bits
const FIXED_TPM = 0x2;
const FIXED_PARENT = 0x10;
const SENSITIVE_DATA_ORIGIN = 0x20;
const USER_WITH_AUTH = 0x40;
const NO_DA = 0x400;
const RESTRICTED = 0x10000;
const DECRYPT = 0x20000;

/** systemd 252's primary (no "tpm2_srk" in the token): no noDA. 0x00030072. */
const LEGACY_ECC_ATTRS = RESTRICTED | DECRYPT | FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH;
/** The TCG SRK (Provisioning Guidance; systemd >= 254): the same plus noDA. 0x00030472. */
const SRK_ATTRS = LEGACY_ECC_ATTRS | NO_DA;
/** The sealed object: only the policy opens it (no userWithAuth), never leaves this TPM. 0x12. */
const SEALED_ATTRS = FIXED_TPM | FIXED_PARENT;

const PCR_SELECT_BYTES = 3; // PCRs 0-23
const SHA256_SIZE = 32;
/** MAX_SYM_DATA of the reference TPM: the most a sealed data object may hold. */
const MAX_SEALED = 128;
/** Larger than any TPM2B/TPMT/TPML struct tss2 3.2 declares (TPM2B_PUBLIC is ~620 bytes). */
const STRUCT_MAX = 8192;

// ---- errors --------------------------------------------------------------------------------

const FMT1: Record<number, string> = {
  0x01: "ASYMMETRIC", 0x02: "ATTRIBUTES", 0x03: "HASH", 0x04: "VALUE", 0x05: "HIERARCHY",
  0x07: "KEY_SIZE", 0x08: "MGF", 0x09: "MODE", 0x0a: "TYPE", 0x0b: "HANDLE", 0x0c: "KDF",
  0x0d: "RANGE", 0x0e: "AUTH_FAIL", 0x0f: "NONCE", 0x10: "PP", 0x12: "SCHEME", 0x15: "SIZE",
  0x16: "SYMMETRIC", 0x17: "TAG", 0x18: "SELECTOR", 0x1a: "INSUFFICIENT", 0x1b: "SIGNATURE",
  0x1c: "KEY", 0x1d: "POLICY_FAIL", 0x1f: "INTEGRITY", 0x20: "TICKET", 0x21: "RESERVED_BITS",
  0x22: "BAD_AUTH", 0x23: "EXPIRED", 0x24: "POLICY_CC", 0x25: "BINDING", 0x26: "CURVE", 0x27: "ECC_POINT",
};
const FMT0: Record<number, string> = {
  0x00: "INITIALIZE", 0x01: "FAILURE", 0x03: "SEQUENCE", 0x0b: "PRIVATE", 0x19: "HMAC", 0x20: "DISABLED",
  0x21: "EXCLUSIVE", 0x24: "AUTH_TYPE", 0x25: "AUTH_MISSING", 0x26: "POLICY", 0x27: "PCR",
  0x28: "PCR_CHANGED", 0x2d: "UPGRADE", 0x2e: "TOO_MANY_CONTEXTS", 0x2f: "AUTH_UNAVAILABLE",
  0x30: "REBOOT", 0x31: "UNBALANCED", 0x42: "COMMAND_SIZE", 0x43: "COMMAND_CODE", 0x44: "AUTHSIZE",
  0x45: "AUTH_CONTEXT", 0x46: "NV_RANGE", 0x47: "NV_SIZE", 0x48: "NV_LOCKED", 0x49: "NV_AUTHORIZATION",
  0x4a: "NV_UNINITIALIZED", 0x4b: "NV_SPACE", 0x4c: "NV_DEFINED", 0x50: "BAD_CONTEXT", 0x51: "CPHASH",
  0x52: "PARENT", 0x53: "NEEDS_TEST", 0x54: "NO_RESULT", 0x55: "SENSITIVE",
};
const WARN: Record<number, string> = {
  0x01: "CONTEXT_GAP", 0x02: "OBJECT_MEMORY", 0x03: "SESSION_MEMORY", 0x04: "MEMORY",
  0x05: "SESSION_HANDLES", 0x06: "OBJECT_HANDLES", 0x07: "LOCALITY", 0x08: "YIELDED", 0x09: "CANCELED",
  0x0a: "TESTING", 0x20: "NV_RATE", 0x21: "LOCKOUT", 0x22: "RETRY", 0x23: "NV_UNAVAILABLE",
};
const BASE = [
  "", "GENERAL_FAILURE", "NOT_IMPLEMENTED", "BAD_CONTEXT", "ABI_MISMATCH", "BAD_REFERENCE",
  "INSUFFICIENT_BUFFER", "BAD_SEQUENCE", "NO_CONNECTION", "TRY_AGAIN", "IO_ERROR", "BAD_VALUE",
  "NOT_PERMITTED", "INVALID_SESSIONS", "NO_DECRYPT_PARAM", "NO_ENCRYPT_PARAM", "BAD_SIZE",
  "MALFORMED_RESPONSE", "INSUFFICIENT_CONTEXT", "INSUFFICIENT_RESPONSE", "INCOMPATIBLE_TCTI",
  "NOT_SUPPORTED", "BAD_TCTI_STRUCTURE", "MEMORY", "BAD_TR", "MULTIPLE_DECRYPT_SESSIONS",
  "MULTIPLE_ENCRYPT_SESSIONS", "RSP_AUTH_FAILED",
];
const LAYERS: Record<number, string> = { 6: "FEATURE", 7: "ESYS", 8: "SYS", 9: "MU", 10: "TCTI", 11: "RESMGR" };

/**
 * The TPM's own code with the handle/parameter/session number bits masked off
 * (e.g. 0x1c4, "parameter 1: VALUE", gives 0x084), or undefined for a TSS-layer error.
 */
function tpmBase(rc: number): number | undefined {
  const layer = rc >>> 16;
  if (layer !== 0 && layer !== 12) return undefined; // 12: a TPM code relayed by a resource manager
  const c = rc & 0xffff;
  if (c & 0x80) return c & 0xbf; // format one: 0x80 + error number
  return c & 0xf7f; // format zero (0x100 + n) or warning (0x900 + n)
}

function rcName(rc: number): string {
  const base = tpmBase(rc);
  if (base === undefined) {
    const layer = LAYERS[rc >>> 16] ?? `LAYER${rc >>> 16}`;
    return `TSS2_${layer}_RC_${BASE[rc & 0xffff] ?? rc & 0xffff}`;
  }
  const n = base & 0x80 ? FMT1[base & 0x3f] : base & 0x800 ? WARN[base & 0x7f] : FMT0[base & 0x7f];
  return `TPM_RC_${n ?? `0x${base.toString(16)}`}`;
}

const RC_VALUE = 0x084;
const RC_SIGNATURE = 0x09b;
const RC_POLICY_FAIL = 0x09d;
const RC_PCR_CHANGED = 0x128;

export class TpmError extends Error {
  /** The TPM refused because the policy (PCR values, signed policy) does not match. */
  readonly policyFailure: boolean;
  /**
   * A PCR, any PCR, was extended after the policy session's PolicyPCR: the session is stale, not
   * refused (the TPM compares its PCR update counter). Another session may well succeed.
   */
  readonly pcrChanged: boolean;
  constructor(
    /** The failing call, e.g. "Esys_Unseal". */
    readonly call: string,
    /** The TSS2_RC (0 for a refusal of ours, such as an SRK that is not the sealed-to one). */
    readonly rc: number,
    detail?: string,
  ) {
    super(`${call}: ${detail ?? `${rcName(rc)} (0x${rc.toString(16)}): ${api().decode(rc)}`}`);
    this.name = "TpmError";
    const base = rc === 0 ? undefined : tpmBase(rc);
    this.policyFailure =
      base === RC_POLICY_FAIL ||
      ((base === RC_VALUE || base === RC_SIGNATURE) && (call === "Esys_PolicyAuthorize" || call === "Esys_VerifySignature"));
    this.pcrChanged = base === RC_PCR_CHANGED;
  }
}

// ---- bindings --------------------------------------------------------------------------------

// Loaded on first use, so a missing library fails the unlock stage rather than PID 1's startup.
// C typedefs as they are in tss2 3.2.1: ESYS_TR/TSS2_RC/TPM2_HANDLE uint32_t, TPM2_SE and
// TPMA_SESSION uint8_t, TPMI_ALG_HASH uint16_t. Struct arguments are `void *` (see the top).

type EsysContext = Ptr<"ESYS_CONTEXT">;
type TctiContext = Ptr<"TSS2_TCTI_CONTEXT">;
/** A struct ESYS allocated and handed to us: ours to Esys_Free. */
type EsysAlloc = Ptr<"esys-allocated">;
/** A struct argument: our C bytes (toC), one ESYS gave us, or NULL for an optional one. */
type In = Uint8Array | EsysAlloc | null;
/** TSS2_RC: 0 for success. */
type Rc = number;
/** An `_Out_`/`_Inout_` ESYS_TR or uint32_t: koffi reads and writes element 0. */
type Handle = [number];
/** An `_Out_ void **` ESYS fills with a struct it allocated. */
type Allocated = [EsysAlloc | null];

const bind = () => {
  // ESYS logs every TPM error (an expected policy mismatch, a PCR_CHANGED that unsealInSessions
  // retries) to stderr, i.e. the console of PID 1; errors reach the caller as TpmError instead.
  // The level is read from the C environment at the first log (through process.env, ESYS's
  // WARNING/ERROR lines were on the console of every boot with a TPM error: see setenvDefault).
  // A TSS2_LOG on the kernel cmdline (init's environment) still wins.
  setenvDefault("TSS2_LOG", "all+NONE");
  const esys = load("libtss2-esys.so.0");
  const mu = load("libtss2-mu.so.0");
  const rc = load("libtss2-rc.so.0");
  const ldr = load("libtss2-tctildr.so.0");
  // The three optional session handles (s1, s2, s3 in the TypeScript signatures too).
  const S3 = "uint32_t s1, uint32_t s2, uint32_t s3";
  return {
    mu,
    decode: rc.fn<(rc: Rc) => string>("const char *Tss2_RC_Decode(uint32_t rc)"),
    tctiInit: ldr.fn<(conf: string, tcti: [TctiContext | null]) => Rc>("uint32_t Tss2_TctiLdr_Initialize(const char *conf, _Out_ void **tcti)"),
    tctiFinalize: ldr.fn<(tcti: [TctiContext | null]) => void>("void Tss2_TctiLdr_Finalize(_Inout_ void **tcti)"),
    Esys_Initialize: esys.fn<(ctx: [EsysContext | null], tcti: TctiContext | null, abi: null) => Rc>("uint32_t Esys_Initialize(_Out_ void **ctx, void *tcti, void *abi)"),
    Esys_Finalize: esys.fn<(ctx: [EsysContext | null]) => void>("void Esys_Finalize(_Inout_ void **ctx)"),
    Esys_Free: esys.fn<(ptr: EsysAlloc | null) => void>("void Esys_Free(void *ptr)"),
    Esys_FlushContext: esys.fn<(ctx: EsysContext, handle: number) => Rc>("uint32_t Esys_FlushContext(void *ctx, uint32_t handle)"),
    Esys_TR_Close: esys.fn<(ctx: EsysContext, handle: Handle) => Rc>("uint32_t Esys_TR_Close(void *ctx, _Inout_ uint32_t *handle)"),
    Esys_TR_GetName: esys.fn<(ctx: EsysContext, handle: number, name: Allocated) => Rc>("uint32_t Esys_TR_GetName(void *ctx, uint32_t handle, _Out_ void **name)"),
    Esys_TR_FromTPMPublic: esys.fn<(ctx: EsysContext, tpmHandle: number, s1: number, s2: number, s3: number, object: Handle) => Rc>(
      `uint32_t Esys_TR_FromTPMPublic(void *ctx, uint32_t tpmHandle, ${S3}, _Out_ uint32_t *object)`,
    ),
    Esys_TR_Serialize: esys.fn<(ctx: EsysContext, object: number, buffer: Allocated, size: [number]) => Rc>(
      "uint32_t Esys_TR_Serialize(void *ctx, uint32_t object, _Out_ void **buffer, _Out_ size_t *size)",
    ),
    Esys_TR_Deserialize: esys.fn<(ctx: EsysContext, buffer: Uint8Array, size: number, object: Handle) => Rc>(
      "uint32_t Esys_TR_Deserialize(void *ctx, const uint8_t *buffer, size_t size, _Out_ uint32_t *object)",
    ),
    Esys_TRSess_SetAttributes: esys.fn<(ctx: EsysContext, session: number, flags: number, mask: number) => Rc>(
      "uint32_t Esys_TRSess_SetAttributes(void *ctx, uint32_t session, uint8_t flags, uint8_t mask)",
    ),
    Esys_GetCapability: esys.fn<(ctx: EsysContext, s1: number, s2: number, s3: number, cap: number, prop: number, count: number, more: [number], data: Allocated) => Rc>(
      `uint32_t Esys_GetCapability(void *ctx, ${S3}, uint32_t cap, uint32_t prop, uint32_t count, _Out_ uint8_t *more, _Out_ void **data)`,
    ),
    Esys_PCR_Read: esys.fn<(ctx: EsysContext, s1: number, s2: number, s3: number, sel: In, counter: [number], selOut: Allocated, values: Allocated) => Rc>(
      `uint32_t Esys_PCR_Read(void *ctx, ${S3}, const void *sel, _Out_ uint32_t *counter, _Out_ void **selOut, _Out_ void **values)`,
    ),
    Esys_PCR_Extend: esys.fn<(ctx: EsysContext, pcr: number, s1: number, s2: number, s3: number, digests: In) => Rc>(
      `uint32_t Esys_PCR_Extend(void *ctx, uint32_t pcr, ${S3}, const void *digests)`,
    ),
    Esys_CreatePrimary: esys.fn<
      (
        ctx: EsysContext, hierarchy: number, s1: number, s2: number, s3: number, sensitive: In, pub: In, outsideInfo: In, creationPcr: In,
        object: Handle, outPublic: null, creationData: null, creationHash: null, creationTicket: null,
      ) => Rc
    >(
      `uint32_t Esys_CreatePrimary(void *ctx, uint32_t hierarchy, ${S3}, const void *sensitive, const void *pub, const void *outsideInfo, const void *creationPcr, _Out_ uint32_t *object, void *outPublic, void *creationData, void *creationHash, void *creationTicket)`,
    ),
    Esys_EvictControl: esys.fn<(ctx: EsysContext, auth: number, object: number, s1: number, s2: number, s3: number, persistent: number, newObject: Handle) => Rc>(
      `uint32_t Esys_EvictControl(void *ctx, uint32_t auth, uint32_t object, ${S3}, uint32_t persistent, _Out_ uint32_t *newObject)`,
    ),
    Esys_Create: esys.fn<
      (
        ctx: EsysContext, parent: number, s1: number, s2: number, s3: number, sensitive: In, pub: In, outsideInfo: In, creationPcr: In,
        outPrivate: Allocated, outPublic: Allocated, creationData: null, creationHash: null, creationTicket: null,
      ) => Rc
    >(
      `uint32_t Esys_Create(void *ctx, uint32_t parent, ${S3}, const void *sensitive, const void *pub, const void *outsideInfo, const void *creationPcr, _Out_ void **outPrivate, _Out_ void **outPublic, void *creationData, void *creationHash, void *creationTicket)`,
    ),
    Esys_Load: esys.fn<(ctx: EsysContext, parent: number, s1: number, s2: number, s3: number, priv: In, pub: In, object: Handle) => Rc>(
      `uint32_t Esys_Load(void *ctx, uint32_t parent, ${S3}, const void *priv, const void *pub, _Out_ uint32_t *object)`,
    ),
    // tss2 >= 3.0 takes the hierarchy as an ESYS_TR (ESYS_TR_RH_OWNER), not TPM2_RH_OWNER.
    Esys_LoadExternal: esys.fn<(ctx: EsysContext, s1: number, s2: number, s3: number, priv: In, pub: In, hierarchy: number, object: Handle) => Rc>(
      `uint32_t Esys_LoadExternal(void *ctx, ${S3}, const void *priv, const void *pub, uint32_t hierarchy, _Out_ uint32_t *object)`,
    ),
    Esys_StartAuthSession: esys.fn<
      (
        ctx: EsysContext, tpmKey: number, bind: number, s1: number, s2: number, s3: number, nonceCaller: In, type: number, symmetric: In,
        authHash: number, session: Handle,
      ) => Rc
    >(
      `uint32_t Esys_StartAuthSession(void *ctx, uint32_t tpmKey, uint32_t bind, ${S3}, const void *nonceCaller, uint8_t type, const void *symmetric, uint16_t authHash, _Out_ uint32_t *session)`,
    ),
    Esys_PolicyPCR: esys.fn<(ctx: EsysContext, session: number, s1: number, s2: number, s3: number, pcrDigest: In, pcrs: In) => Rc>(
      `uint32_t Esys_PolicyPCR(void *ctx, uint32_t session, ${S3}, const void *pcrDigest, const void *pcrs)`,
    ),
    Esys_VerifySignature: esys.fn<(ctx: EsysContext, key: number, s1: number, s2: number, s3: number, digest: In, signature: In, validation: Allocated) => Rc>(
      `uint32_t Esys_VerifySignature(void *ctx, uint32_t key, ${S3}, const void *digest, const void *signature, _Out_ void **validation)`,
    ),
    Esys_PolicyAuthorize: esys.fn<
      (ctx: EsysContext, session: number, s1: number, s2: number, s3: number, approvedPolicy: In, policyRef: In, keySign: In, checkTicket: In) => Rc
    >(
      `uint32_t Esys_PolicyAuthorize(void *ctx, uint32_t session, ${S3}, const void *approvedPolicy, const void *policyRef, const void *keySign, const void *checkTicket)`,
    ),
    Esys_Unseal: esys.fn<(ctx: EsysContext, item: number, s1: number, s2: number, s3: number, outData: Allocated) => Rc>(
      `uint32_t Esys_Unseal(void *ctx, uint32_t item, ${S3}, _Out_ void **outData)`,
    ),
  };
};
type Api = ReturnType<typeof bind>;
let bound: Api | undefined;
const api = (): Api => (bound ??= bind());

/** The Esys_ calls that answer a TSS2_RC (not Esys_Finalize and Esys_Free). */
type EsysCall = { [K in keyof Api]: K extends `Esys_${string}` ? (Api[K] extends (...args: never[]) => Rc ? K : never) : never }[keyof Api];

/** Calls an Esys_ function; a non-zero TSS2_RC becomes a TpmError naming it. */
function esys<K extends EsysCall>(call: K, ...args: Parameters<Api[K]>): void {
  // tsc cannot see that Api[K] is callable with Parameters<Api[K]> for a generic K.
  const r = (api()[call] as (...a: Parameters<Api[K]>) => Rc)(...args);
  if (r !== 0) throw new TpmError(call, r >>> 0);
}

/** Tss2_MU_<TYPE>_Marshal: a C struct -> wire bytes at buffer[offset]. */
type Marshal = (src: EsysAlloc | null, buffer: Uint8Array, size: number, offset: [number]) => Rc;
/** Tss2_MU_<TYPE>_Unmarshal: wire bytes from buffer[offset] -> the C struct at dest. */
type Unmarshal = (buffer: Uint8Array, size: number, offset: [number], dest: Uint8Array) => Rc;
const marshals = new Map<string, Marshal>();
const unmarshals = new Map<string, Unmarshal>();
function marshal(type: string): Marshal {
  const name = `Tss2_MU_${type}_Marshal`;
  let fn = marshals.get(name);
  if (!fn) marshals.set(name, (fn = api().mu.fn<Marshal>(`uint32_t ${name}(const void *src, uint8_t *buffer, size_t size, _Inout_ size_t *offset)`)));
  return fn;
}
function unmarshal(type: string): Unmarshal {
  const name = `Tss2_MU_${type}_Unmarshal`;
  let fn = unmarshals.get(name);
  if (!fn) unmarshals.set(name, (fn = api().mu.fn<Unmarshal>(`uint32_t ${name}(const uint8_t *buffer, size_t size, _Inout_ size_t *offset, void *dest)`)));
  return fn;
}

/** Wire bytes -> the C struct ESYS wants, in a zeroed buffer larger than any such struct. */
function toC(type: string, wire: Uint8Array): Buffer {
  const dest = Buffer.alloc(STRUCT_MAX);
  const off: [number] = [0];
  const r = unmarshal(type)(wire, wire.length, off, dest);
  if (r !== 0) throw new TpmError(`Tss2_MU_${type}_Unmarshal`, r >>> 0);
  if (off[0] !== wire.length) throw new TpmError(`Tss2_MU_${type}_Unmarshal`, 0, `${wire.length - (off[0] ?? 0)} bytes left over`);
  return dest;
}

/** A struct ESYS allocated -> wire bytes; frees it (zeroing `secret` bytes first). */
function fromC(type: string, ptr: EsysAlloc | null, secret = false): Uint8Array {
  const buf = Buffer.alloc(STRUCT_MAX);
  const off: [number] = [0];
  try {
    const r = marshal(type)(ptr, buf, buf.length, off);
    if (r !== 0) throw new TpmError(`Tss2_MU_${type}_Marshal`, r >>> 0);
    const n = off[0] ?? 0;
    // A TPM2B marshals as its C layout's first bytes (u16 size, then the buffer), so zeroing
    // the marshalled length wipes every secret byte ESYS holds there.
    if (secret && ptr) new Uint8Array(view(ptr, n)).fill(0);
    return Uint8Array.from(buf.subarray(0, n));
  } finally {
    if (secret) buf.fill(0);
    api().Esys_Free(ptr);
  }
}

// ---- wire format ---------------------------------------------------------------------------

const u8 = (n: number) => Uint8Array.of(n & 0xff);
const u16 = (n: number) => Uint8Array.of((n >>> 8) & 0xff, n & 0xff);
const u32 = (n: number) => Uint8Array.of((n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
const cat = (...parts: Uint8Array[]) => new Uint8Array(Buffer.concat(parts));
/** TPM2B_*: u16 size, then the bytes. */
const tpm2b = (b: Uint8Array) => cat(u16(b.length), b);
const sha256 = (...parts: Uint8Array[]) => new Uint8Array(createHash("sha256").update(Buffer.concat(parts)).digest());

function checkPcrs(pcrs: readonly number[]): void {
  for (const p of pcrs) if (!Number.isInteger(p) || p < 0 || p >= PCR_SELECT_BYTES * 8) throw new RangeError(`PCR ${p} is not 0-23`);
}

/** TPML_PCR_SELECTION of the sha256 bank. */
function pcrSelection(pcrs: readonly number[]): Uint8Array {
  checkPcrs(pcrs);
  const bitmap = new Uint8Array(PCR_SELECT_BYTES);
  for (const p of pcrs) bitmap[p >> 3]! |= 1 << (p & 7);
  return cat(u32(1), u16(ALG_SHA256), u8(PCR_SELECT_BYTES), bitmap);
}

/** TPMT_SYM_DEF(_OBJECT) AES-128-CFB: the session cipher and the storage keys' cipher. */
const AES128CFB = cat(u16(ALG_AES), u16(128), u16(ALG_CFB));

/** TPM2B_PUBLIC of an ECC P-256 storage primary with empty unique and authPolicy. */
function eccPrimaryTemplate(attributes: number): Uint8Array {
  return tpm2b(
    cat(
      u16(ALG_ECC), u16(ALG_SHA256), u32(attributes), tpm2b(new Uint8Array()),
      AES128CFB, u16(ALG_NULL) /* scheme */, u16(ECC_NIST_P256), u16(ALG_NULL) /* kdf */,
      tpm2b(new Uint8Array()), tpm2b(new Uint8Array()) /* unique x, y */,
    ),
  );
}

/** Minimal reader of wire bytes ESYS gave back. */
class Reader {
  private off = 0;
  constructor(private readonly b: Uint8Array, private readonly what: string) {}
  private need(n: number): number {
    if (this.off + n > this.b.length) throw new TpmError(this.what, 0, "truncated");
    const o = this.off;
    this.off += n;
    return o;
  }
  u8(): number {
    return this.b[this.need(1)]!;
  }
  u16(): number {
    const o = this.need(2);
    return (this.b[o]! << 8) | this.b[o + 1]!;
  }
  u32(): number {
    const o = this.need(4);
    return ((this.b[o]! << 24) | (this.b[o + 1]! << 16) | (this.b[o + 2]! << 8) | this.b[o + 3]!) >>> 0;
  }
  bytes(n: number): Uint8Array {
    const o = this.need(n);
    return this.b.subarray(o, o + n);
  }
  tpm2b(): Uint8Array {
    return this.bytes(this.u16());
  }
  get rest(): number {
    return this.b.length - this.off;
  }
}

/** Splits systemd's tpm2-blob: marshalled TPM2B_PRIVATE then TPM2B_PUBLIC, nothing after. */
function splitBlob(blob: Uint8Array): { priv: Uint8Array; pub: Uint8Array } {
  const r = new Reader(blob, "tpm2-blob");
  const privEnd = 2 + r.tpm2b().length;
  r.tpm2b();
  if (r.rest !== 0) throw new TpmError("tpm2-blob", 0, `${r.rest} bytes after the public area`);
  return { priv: blob.subarray(0, privEnd), pub: blob.subarray(privEnd) };
}

// ---- the device ----------------------------------------------------------------------------

export type PolicyStep =
  /** TPM2_PolicyPCR over the sha256 bank with the TPM's current values. */
  | { kind: "pcr"; pcrs: readonly number[] }
  /**
   * The signed-PCR step, as systemd-cryptsetup does it: PolicyPCR(pcrs), after which the
   * session digest must equal `approvedPolicy`, which `signature` (RSASSA-PKCS1-v1_5, SHA-256,
   * over approvedPolicy) proves the holder of `publicArea` (marshalled TPM2B_PUBLIC) approved.
   */
  | {
      kind: "authorize";
      pcrs: readonly number[];
      publicArea: Uint8Array;
      approvedPolicy: Uint8Array;
      signature: Uint8Array;
    };

export type Primary =
  /** The persistent SRK at 0x81000001. */
  | { kind: "srk" }
  /** The transient primary systemd 252's systemd-cryptenroll seals under (no "tpm2_srk"). */
  | { kind: "legacy-ecc" };

export interface TpmDevice {
  /** Current values of the sha256 bank. */
  pcrRead(pcrs: readonly number[]): Map<number, Uint8Array>;
  /** PCR_Extend of the sha256 bank with a 32-byte digest. */
  extend(pcr: number, digest: Uint8Array): void;
  /**
   * Creates the TCG SRK at 0x81000001 when the handle is empty. `name` is its TPM name
   * (nameAlg || digest); `serialized` is Esys_TR_Serialize of it, what systemd stores
   * base64-encoded in the token's "tpm2_srk".
   */
  ensureSrk(): { created: boolean; name: Uint8Array; serialized: Uint8Array };
  /** Seals `secret` (1-128 bytes) to `policyDigest`; returns systemd's "tpm2-blob". */
  seal(secret: Uint8Array, policyDigest: Uint8Array, primary: Primary): Uint8Array;
  /** Runs `steps` in a salted policy session and unseals; the result is the caller's to zero. */
  unseal(blob: Uint8Array, primary: Primary, steps: readonly PolicyStep[], srkSerialized?: Uint8Array): Uint8Array;
  close(): void;
}

/** Undo actions run in reverse on every path; a failing undo must not hide the real error. */
class Scope {
  private readonly undo: (() => void)[] = [];
  defer(fn: () => void): void {
    this.undo.push(fn);
  }
  close(): void {
    for (const fn of this.undo.reverse()) {
      try {
        fn();
      } catch {
        // The resource manager drops what is left when our fd closes.
      }
    }
  }
}

class EsysDevice implements TpmDevice {
  constructor(
    private ctx: EsysContext | null,
    private tcti: TctiContext | null,
  ) {}

  private get c(): EsysContext {
    if (this.ctx === null) throw new TpmError("TpmDevice", 0, "closed");
    return this.ctx;
  }

  private flush(scope: Scope, handle: number): void {
    scope.defer(() => esys("Esys_FlushContext", this.c, handle));
  }

  /** Esys_TR_Close of an ESYS_TR at scope end: not Flush, the object it names is persistent. */
  private closeLater(scope: Scope, handle: number): void {
    scope.defer(() => esys("Esys_TR_Close", this.c, [handle]));
  }

  private name(handle: number): Uint8Array {
    const out: Allocated = [null];
    esys("Esys_TR_GetName", this.c, handle, out);
    return new Reader(fromC("TPM2B_NAME", out[0]), "TPM2B_NAME").tpm2b().slice();
  }

  private persistentExists(handle: number): boolean {
    const more: [number] = [0];
    const out: Allocated = [null];
    esys("Esys_GetCapability", this.c, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, CAP_HANDLES, handle, 1, more, out);
    const r = new Reader(fromC("TPMS_CAPABILITY_DATA", out[0]), "TPMS_CAPABILITY_DATA");
    if (r.u32() !== CAP_HANDLES) return false;
    const n = r.u32();
    for (let i = 0; i < n; i++) if (r.u32() === handle) return true;
    return false;
  }

  private createPrimary(scope: Scope, template: Uint8Array): number {
    const out: Handle = [0];
    esys(
      "Esys_CreatePrimary", this.c, ESYS_TR_RH_OWNER, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
      toC("TPM2B_SENSITIVE_CREATE", tpm2b(cat(u16(0), u16(0)))), toC("TPM2B_PUBLIC", template),
      toC("TPM2B_DATA", u16(0)), toC("TPML_PCR_SELECTION", u32(0)), out, null, null, null, null,
    );
    const handle = out[0];
    this.flush(scope, handle);
    return handle;
  }

  /** An ESYS_TR for the persistent TPM handle `tpmHandle`, closed (not flushed) at scope end. */
  private fromPublic(scope: Scope, tpmHandle: number): number {
    const out: Handle = [0];
    esys("Esys_TR_FromTPMPublic", this.c, tpmHandle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, out);
    this.closeLater(scope, out[0]);
    return out[0];
  }

  private primary(scope: Scope, p: Primary, srkSerialized?: Uint8Array): number {
    if (p.kind === "legacy-ecc") return this.createPrimary(scope, eccPrimaryTemplate(LEGACY_ECC_ATTRS));
    const present = this.fromPublic(scope, SRK_HANDLE);
    if (!srkSerialized) return present;
    // The serialized object carries the public key systemd salted against when sealing. Use
    // it (not what the TPM says is there now) as the salt key: a substituted SRK could not
    // decrypt the salt. And refuse outright when the names differ.
    const out: Handle = [0];
    esys("Esys_TR_Deserialize", this.c, srkSerialized, srkSerialized.length, out);
    this.closeLater(scope, out[0]);
    if (!Buffer.from(this.name(out[0])).equals(this.name(present))) {
      throw new TpmError("srk", 0, `0x${SRK_HANDLE.toString(16)} is not the SRK the token was sealed under`);
    }
    return out[0];
  }

  /** A session salted to `tpmKey` (its secret can only be recovered inside this TPM), unbound, AES-128-CFB. */
  private session(scope: Scope, tpmKey: number, type: number, attributes: number): number {
    const out: Handle = [0];
    esys(
      "Esys_StartAuthSession", this.c, tpmKey, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
      null, type, toC("TPMT_SYM_DEF", AES128CFB), ALG_SHA256, out,
    );
    const s = out[0];
    this.flush(scope, s);
    esys("Esys_TRSess_SetAttributes", this.c, s, attributes, 0xff);
    return s;
  }

  private policyPcr(session: number, pcrs: readonly number[]): void {
    // Empty pcrDigest: the TPM folds in its current values; a mismatch surfaces at Unseal.
    esys("Esys_PolicyPCR", this.c, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, toC("TPM2B_DIGEST", u16(0)), toC("TPML_PCR_SELECTION", pcrSelection(pcrs)));
  }

  private policyAuthorize(session: number, step: Extract<PolicyStep, { kind: "authorize" }>): void {
    if (step.approvedPolicy.length !== SHA256_SIZE) throw new RangeError(`approved policy is ${step.approvedPolicy.length} bytes, not 32`);
    this.policyPcr(session, step.pcrs);
    const scope = new Scope();
    try {
      const key: Handle = [0];
      esys("Esys_LoadExternal", this.c, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, null, toC("TPM2B_PUBLIC", step.publicArea), ESYS_TR_RH_OWNER, key);
      this.flush(scope, key[0]);
      // aHash = SHA256(approvedPolicy || policyRef), policyRef empty: what systemd-measure signs.
      const ticket: Allocated = [null];
      esys(
        "Esys_VerifySignature", this.c, key[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
        toC("TPM2B_DIGEST", tpm2b(sha256(step.approvedPolicy))),
        toC("TPMT_SIGNATURE", cat(u16(ALG_RSASSA), u16(ALG_SHA256), tpm2b(step.signature))), ticket,
      );
      scope.defer(() => api().Esys_Free(ticket[0]));
      const name: Allocated = [null];
      esys("Esys_TR_GetName", this.c, key[0], name);
      scope.defer(() => api().Esys_Free(name[0]));
      // ESYS-allocated TPM2B_NAME and TPMT_TK_VERIFIED go straight back in.
      esys(
        "Esys_PolicyAuthorize", this.c, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
        toC("TPM2B_DIGEST", tpm2b(step.approvedPolicy)), toC("TPM2B_NONCE", u16(0)), name[0], ticket[0],
      );
    } finally {
      scope.close();
    }
  }

  pcrRead(pcrs: readonly number[]): Map<number, Uint8Array> {
    checkPcrs(pcrs);
    const values = new Map<number, Uint8Array>();
    let left = [...new Set(pcrs)].sort((a, b) => a - b);
    // The TPM answers at most 8 digests per call and says which ones in pcrSelectionOut.
    while (left.length > 0) {
      const selOut: Allocated = [null];
      const digests: Allocated = [null];
      esys("Esys_PCR_Read", this.c, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, toC("TPML_PCR_SELECTION", pcrSelection(left)), [0], selOut, digests);
      const sel = new Reader(fromC("TPML_PCR_SELECTION", selOut[0]), "TPML_PCR_SELECTION");
      const dig = new Reader(fromC("TPML_DIGEST", digests[0]), "TPML_DIGEST");
      const got: number[] = [];
      for (let n = sel.u32(); n > 0; n--) {
        const alg = sel.u16();
        const bitmap = sel.bytes(sel.u8());
        if (alg !== ALG_SHA256) continue;
        for (let p = 0; p < bitmap.length * 8; p++) if (bitmap[p >> 3]! & (1 << (p & 7))) got.push(p);
      }
      const count = dig.u32();
      if (got.length === 0 || count !== got.length) throw new TpmError("Esys_PCR_Read", 0, `sha256 bank: asked for PCRs ${left.join(",")}, got ${count} digests`);
      for (const p of got) values.set(p, dig.tpm2b().slice());
      left = left.filter((p) => !values.has(p));
    }
    return values;
  }

  extend(pcr: number, digest: Uint8Array): void {
    checkPcrs([pcr]);
    if (digest.length !== SHA256_SIZE) throw new RangeError(`PCR ${pcr}: digest is ${digest.length} bytes, not 32`);
    // ESYS_TR_PCRn == n; PCR auth is the empty password.
    esys("Esys_PCR_Extend", this.c, pcr, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, toC("TPML_DIGEST_VALUES", cat(u32(1), u16(ALG_SHA256), digest)));
  }

  ensureSrk(): { created: boolean; name: Uint8Array; serialized: Uint8Array } {
    const scope = new Scope();
    try {
      let srk: number;
      const created = !this.persistentExists(SRK_HANDLE);
      if (created) {
        const transient = this.createPrimary(scope, eccPrimaryTemplate(SRK_ATTRS));
        const out: Handle = [0];
        esys("Esys_EvictControl", this.c, ESYS_TR_RH_OWNER, transient, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, SRK_HANDLE, out);
        srk = out[0];
        this.closeLater(scope, srk);
      } else {
        srk = this.fromPublic(scope, SRK_HANDLE);
      }
      const buf: Allocated = [null];
      const size: [number] = [0];
      esys("Esys_TR_Serialize", this.c, srk, buf, size);
      if (!buf[0]) throw new TpmError("Esys_TR_Serialize", 0, "no buffer");
      const serialized = new Uint8Array(view(buf[0], size[0]).slice(0));
      api().Esys_Free(buf[0]);
      return { created, name: this.name(srk), serialized };
    } finally {
      scope.close();
    }
  }

  seal(secret: Uint8Array, policyDigest: Uint8Array, primary: Primary): Uint8Array {
    if (secret.length < 1 || secret.length > MAX_SEALED) throw new RangeError(`secret is ${secret.length} bytes, not 1-${MAX_SEALED}`);
    if (policyDigest.length !== SHA256_SIZE) throw new RangeError(`policy digest is ${policyDigest.length} bytes, not 32`);
    const scope = new Scope();
    // TPM2B_SENSITIVE_CREATE { u16 size, userAuth: u16 0, data: u16 len + secret }, built in
    // one buffer so that zeroing it (and its C copy) below leaves no copy of ours behind.
    const wire = new Uint8Array(6 + secret.length);
    wire.set(u16(4 + secret.length), 0);
    wire.set(u16(secret.length), 4);
    wire.set(secret, 6);
    let sensitive: Buffer | undefined;
    try {
      const parent = this.primary(scope, primary);
      // Authorizes the parent and, with DECRYPT, carries inSensitive encrypted to the TPM.
      const hmac = this.session(scope, parent, SE_HMAC, SESSION_DECRYPT | SESSION_CONTINUE);
      const template = tpm2b(
        cat(
          u16(ALG_KEYEDHASH), u16(ALG_SHA256), u32(SEALED_ATTRS), tpm2b(policyDigest),
          u16(ALG_NULL) /* keyedhash scheme */, tpm2b(new Uint8Array()) /* unique: the TPM computes it */,
        ),
      );
      sensitive = toC("TPM2B_SENSITIVE_CREATE", wire);
      const priv: Allocated = [null];
      const pub: Allocated = [null];
      esys(
        "Esys_Create", this.c, parent, hmac, ESYS_TR_NONE, ESYS_TR_NONE, sensitive, toC("TPM2B_PUBLIC", template),
        toC("TPM2B_DATA", u16(0)), toC("TPML_PCR_SELECTION", u32(0)), priv, pub, null, null, null,
      );
      return cat(fromC("TPM2B_PRIVATE", priv[0]), fromC("TPM2B_PUBLIC", pub[0]));
    } finally {
      wire.fill(0);
      sensitive?.fill(0);
      scope.close();
    }
  }

  unseal(blob: Uint8Array, primary: Primary, steps: readonly PolicyStep[], srkSerialized?: Uint8Array): Uint8Array {
    const { priv, pub } = splitBlob(blob);
    const scope = new Scope();
    try {
      const parent = this.primary(scope, primary, srkSerialized);
      // Authorizes Load of the blob and, with ENCRYPT, brings the unsealed data back encrypted.
      const hmac = this.session(scope, parent, SE_HMAC, SESSION_ENCRYPT | SESSION_CONTINUE);
      const item: Handle = [0];
      esys("Esys_Load", this.c, parent, hmac, ESYS_TR_NONE, ESYS_TR_NONE, toC("TPM2B_PRIVATE", priv), toC("TPM2B_PUBLIC", pub), item);
      this.flush(scope, item[0]);
      const policy = this.session(scope, parent, SE_POLICY, SESSION_CONTINUE);
      for (const step of steps) {
        if (step.kind === "pcr") this.policyPcr(policy, step.pcrs);
        else this.policyAuthorize(policy, step);
      }
      const out: Allocated = [null];
      esys("Esys_Unseal", this.c, item[0], policy, hmac, ESYS_TR_NONE, out);
      const wire = fromC("TPM2B_SENSITIVE_DATA", out[0], true);
      try {
        return new Reader(wire, "TPM2B_SENSITIVE_DATA").tpm2b().slice();
      } finally {
        wire.fill(0);
      }
    } finally {
      scope.close();
    }
  }

  close(): void {
    if (this.ctx === null) return;
    api().Esys_Finalize([this.ctx]);
    api().tctiFinalize([this.tcti]);
    this.ctx = null;
    this.tcti = null;
  }
}

/** Opens the TPM through a TCTI: the kernel's resource manager by default, swtpm in tests. */
export function openTpm(tcti = "device:/dev/tpmrm0"): TpmDevice {
  const a = api();
  const t: [TctiContext | null] = [null];
  let r = a.tctiInit(tcti, t);
  if (r !== 0) throw new TpmError(`Tss2_TctiLdr_Initialize(${JSON.stringify(tcti)})`, r >>> 0);
  const ctx: [EsysContext | null] = [null];
  r = a.Esys_Initialize(ctx, t[0], null);
  if (r !== 0) {
    a.tctiFinalize(t);
    throw new TpmError("Esys_Initialize", r >>> 0);
  }
  return new EsysDevice(ctx[0], t[0]);
}
