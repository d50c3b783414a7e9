// dm-verity and LUKS2 through libcryptsetup: one library for verity superblocks, loop devices
// for image files, LUKS2 keyslots and tokens, and device-mapper activation.
import { closeSync, openSync, readSync } from "node:fs";
import { bytesAt, callback, errnoName, load, opaque, type Ptr, struct } from "./ffi.ts";
import { drainAsync } from "./libc.ts";

type CryptDevice = Ptr<"crypt_device">;

/** struct crypt_params_verity, as koffi converts it to and from a JS object. */
interface CryptParamsVerity {
  hash_name: string | null;
  data_device: string | null;
  hash_device: string | null;
  fec_device: string | null;
  salt: Ptr<"salt"> | null;
  salt_size: number;
  hash_type: number;
  data_block_size: number;
  hash_block_size: number;
  data_size: number | bigint;
  hash_area_offset: number | bigint;
  fec_area_offset: number | bigint;
  fec_roots: number;
  flags: number;
}

/** struct crypt_pbkdf_type. */
interface CryptPbkdfType {
  type: string;
  hash: string;
  time_ms: number;
  iterations: number;
  max_memory_kb: number;
  parallel_threads: number;
  flags: number;
}

// Loaded on first use, so a missing library fails a stage rather than PID 1's startup.
// `_Out_ crypt_device **` and `_Out_ const char **` take a one-element array koffi fills.
const bind = () => {
  const lib = load("libcryptsetup.so.12");
  opaque("crypt_device");
  struct("crypt_params_verity", {
    hash_name: "const char *",
    data_device: "const char *",
    hash_device: "const char *",
    fec_device: "const char *",
    // Bytes, not a string: crypt_get_verity_info points it at the superblock's binary salt.
    salt: "const void *",
    salt_size: "uint32_t",
    hash_type: "uint32_t",
    data_block_size: "uint32_t",
    hash_block_size: "uint32_t",
    data_size: "uint64_t",
    hash_area_offset: "uint64_t",
    fec_area_offset: "uint64_t",
    fec_roots: "uint32_t",
    flags: "uint32_t",
  });
  struct("crypt_pbkdf_type", {
    type: "const char *",
    hash: "const char *",
    time_ms: "uint32_t",
    iterations: "uint32_t",
    max_memory_kb: "uint32_t",
    parallel_threads: "uint32_t",
    flags: "uint32_t",
  });
  // libcryptsetup explains failures in log messages ("Verification failed at position N");
  // keep them for our one-line errors instead of letting them go to stderr. Declared before
  // the prototypes below, which name crypt_log_cb.
  const logCallback = callback<(level: number, msg: string, usrptr: bigint | null) => void>(
    "void crypt_log_cb(int level, const char *msg, void *usrptr)",
    (level, msg) => {
      if (level === CRYPT_LOG_ERROR) messages.push(msg.trim().replace(/\.$/, ""));
    },
  );
  type Cd = CryptDevice;
  const c = {
    setLogCallback: lib.fn<(cd: Cd | null, log: Ptr<"callback">, usrptr: null) => void>("void crypt_set_log_callback(crypt_device *cd, crypt_log_cb *log, void *usrptr)"),
    initDataDevice: lib.fn<(cd: [Cd | null], device: string, dataDevice: string) => number>(
      "int crypt_init_data_device(_Out_ crypt_device **cd, const char *device, const char *data_device)",
    ),
    load: lib.fn<(cd: Cd, type: string, params: Partial<CryptParamsVerity>) => number>("int crypt_load(crypt_device *cd, const char *type, crypt_params_verity *params)"),
    // Filled in by the call: every member is there afterwards.
    getVerityInfo: lib.fn<(cd: Cd, vp: Partial<CryptParamsVerity>) => number>("int crypt_get_verity_info(crypt_device *cd, _Out_ crypt_params_verity *vp)"),
    activate: lib.fn<(cd: Cd, name: string | null, key: Uint8Array, size: number, flags: number) => number>(
      "int crypt_activate_by_volume_key(crypt_device *cd, const char *name, const uint8_t *key, size_t size, uint32_t flags)",
    ),
    free: lib.fn<(cd: Cd) => void>("void crypt_free(crypt_device *cd)"),
    init: lib.fn<(cd: [Cd | null], device: string) => number>("int crypt_init(_Out_ crypt_device **cd, const char *device)"),
    loadAny: lib.fn<(cd: Cd, type: string, params: null) => number>("int crypt_load(crypt_device *cd, const char *type, void *params)"),
    setPbkdf: lib.fn<(cd: Cd, pbkdf: CryptPbkdfType) => number>("int crypt_set_pbkdf_type(crypt_device *cd, const crypt_pbkdf_type *pbkdf)"),
    format: lib.fn<(cd: Cd, type: string, cipher: string, mode: string, uuid: null, key: null, keySize: number, params: null) => number>(
      "int crypt_format(crypt_device *cd, const char *type, const char *cipher, const char *mode, const char *uuid, const uint8_t *key, size_t key_size, void *params)",
    ),
    addByVolumeKey: lib.fn<(cd: Cd, slot: number, key: null, keySize: number, pass: Uint8Array, passSize: number) => number>(
      "int crypt_keyslot_add_by_volume_key(crypt_device *cd, int slot, const uint8_t *key, size_t key_size, const uint8_t *pass, size_t pass_size)",
    ),
    addByPassphrase: lib.fn<(cd: Cd, slot: number, pass: Uint8Array, passSize: number, newPass: Uint8Array, newSize: number) => number>(
      "int crypt_keyslot_add_by_passphrase(crypt_device *cd, int slot, const uint8_t *pass, size_t pass_size, const uint8_t *new_pass, size_t new_size)",
    ),
    destroySlot: lib.fn<(cd: Cd, slot: number) => number>("int crypt_keyslot_destroy(crypt_device *cd, int slot)"),
    activateByPassphrase: lib.fn<(cd: Cd, name: string | null, slot: number, pass: Uint8Array, size: number, flags: number) => number>(
      "int crypt_activate_by_passphrase(crypt_device *cd, const char *name, int slot, const uint8_t *pass, size_t size, uint32_t flags)",
    ),
    initByName: lib.fn<(cd: [Cd | null], name: string) => number>("int crypt_init_by_name(_Out_ crypt_device **cd, const char *name)"),
    deactivate: lib.fn<(cd: Cd, name: string) => number>("int crypt_deactivate(crypt_device *cd, const char *name)"),
    tokenStatus: lib.fn<(cd: Cd, token: number, type: [string | null]) => number>("int crypt_token_status(crypt_device *cd, int token, _Out_ const char **type)"),
    tokenJsonGet: lib.fn<(cd: Cd, token: number, json: [string | null]) => number>("int crypt_token_json_get(crypt_device *cd, int token, _Out_ const char **json)"),
    // A null JSON removes the token.
    tokenJsonSet: lib.fn<(cd: Cd, token: number, json: string | null) => number>("int crypt_token_json_set(crypt_device *cd, int token, const char *json)"),
    // libcryptsetup >= 2.4 (Debian 12: 2.6.1). The text belongs to cd: copy it before crypt_free.
    dumpJson: lib.fn<(cd: Cd, json: [string | null], flags: number) => number>("int crypt_dump_json(crypt_device *cd, _Out_ const char **json, uint32_t flags)"),
  };
  c.setLogCallback(null, logCallback, null);
  return c;
};
let api: ReturnType<typeof bind> | undefined;
const cryptsetup = () => (api ??= bind());

const CRYPT_VERITY = "VERITY";
const CRYPT_VERITY_CHECK_HASH = 1 << 1;
const CRYPT_ACTIVATE_READONLY = 1 << 0;
const EPERM = 1;
const EIO = 5;

export class VerityError extends Error {
  constructor(
    message: string,
    readonly errno: number,
  ) {
    super(message);
    this.name = "VerityError";
  }
}

const CRYPT_LOG_ERROR = 1;
let messages: string[] = [];

/** The library's error messages since the last call, joined for a log line ("" if none). */
function takeMessages(): string {
  const m = messages.join(", ");
  messages = [];
  return m;
}

function rootHashBytes(hex: string): Buffer {
  if (!/^([0-9a-f]{2}){16,64}$/i.test(hex)) throw new VerityError(`root hash ${JSON.stringify(hex)} is not hex`, 22);
  return Buffer.from(hex, "hex");
}

/**
 * The dm-verity parameters an image was formatted with (`veritysetup format`), as the signed
 * config pins them. The hash area offset and FEC are not among them: they are never read from
 * the superblock (the agent passes offset 0 and no FEC device).
 */
export interface VerityParams {
  /** 1: normal; 0: Chrome OS (salt after the data). */
  hashType: number;
  hashAlgorithm: string;
  dataBlockSize: number;
  hashBlockSize: number;
  /** How many data blocks the tree covers: the device-mapper device's size. */
  dataBlocks: number;
  /** Hex; "" for none. */
  salt: string;
}

/** Compared in this order; the first difference is reported. */
const VERITY_FIELDS = ["hashAlgorithm", "hashType", "dataBlockSize", "hashBlockSize", "dataBlocks", "salt"] as const;

/** "field is <superblock's>, the signed config pins <pinned>" for the first field that differs; null if none. */
export function verityMismatch(superblock: VerityParams, pinned: VerityParams): string | null {
  const show = (v: string | number) => (v === "" ? "(none)" : String(v));
  for (const f of VERITY_FIELDS) {
    if (superblock[f] !== pinned[f]) return `${f} is ${show(superblock[f])}, the signed config pins ${show(pinned[f])}`;
  }
  return null;
}

/** The parameters libcryptsetup loaded from the superblock (crypt_get_verity_info). */
function loadedParams(cd: CryptDevice): VerityParams {
  const v: Partial<CryptParamsVerity> = {};
  const r = cryptsetup().getVerityInfo(cd, v);
  if (r < 0) throw new VerityError(`cannot read the verity parameters (${takeMessages() || errnoName(-r)})`, -r);
  const saltSize = Number(v.salt_size);
  const salt = saltSize && v.salt ? Buffer.from(bytesAt(v.salt, saltSize)).toString("hex") : "";
  return {
    hashType: Number(v.hash_type),
    hashAlgorithm: String(v.hash_name),
    dataBlockSize: Number(v.data_block_size),
    hashBlockSize: Number(v.hash_block_size),
    dataBlocks: Number(v.data_size),
    salt,
  };
}

function withVerity<T>(data: string, hash: string, check: boolean, pinned: VerityParams | undefined, fn: (cd: CryptDevice) => T): T {
  const c = cryptsetup();
  const out: [CryptDevice | null] = [null];
  takeMessages();
  let r = c.initDataDevice(out, hash, data);
  if (r < 0) throw new VerityError(`cannot open ${hash} / ${data}: ${takeMessages() || errnoName(-r)}`, -r);
  const cd = out[0]!; // set when the call succeeds
  try {
    // CHECK_HASH makes activation read and hash every data block first: a flipped byte
    // anywhere is caught before anything is mounted, not on some later read.
    r = c.load(cd, CRYPT_VERITY, { hash_area_offset: 0, flags: check ? CRYPT_VERITY_CHECK_HASH : 0 });
    if (r < 0) throw new VerityError(`${hash}: no valid verity superblock (${takeMessages() || errnoName(-r)})`, -r);
    // The superblock is unsigned: it must say what the signed config pins, before any of its
    // parameters are used (and before the slow full check reads every block).
    const wrong = pinned && verityMismatch(loadedParams(cd), pinned);
    if (wrong) throw new VerityError(`verity superblock: ${wrong}`, EPERM);
    return fn(cd);
  } finally {
    c.free(cd);
  }
}

/**
 * What the superblock of `hash` says. The agent does not need it (withVerity compares while
 * opening); tests compare what the build pinned with it.
 */
export function veritySuperblock(data: string, hash: string): VerityParams {
  return withVerity(data, hash, false, undefined, loadedParams);
}

/**
 * Verifies every block of `data` against the hash tree in `hash` and `rootHash`, in userspace
 * (no device-mapper needed), after checking the superblock against `pinned` when given. Throws
 * VerityError when anything does not match. Boot opens images with verityOpen; this twin runs
 * the same code on a host without device-mapper, which is where the unit tests run it.
 */
export function verityVerify(data: string, hash: string, rootHash: string, pinned?: VerityParams): void {
  const key = rootHashBytes(rootHash);
  withVerity(data, hash, true, pinned, (cd) => {
    const r = cryptsetup().activate(cd, null, key, key.length, 0);
    if (r < 0) throw new VerityError(takeMessages() || `does not match the root hash (${errnoName(-r)})`, -r);
  });
}

/**
 * Opens a dm-verity device /dev/mapper/<name> over image files (loop devices are set up by
 * libcryptsetup). With `pinned`, a superblock that says anything else is refused; with `check`,
 * all data is verified before activation.
 */
export function verityOpen(name: string, data: string, hash: string, rootHash: string, check: boolean, pinned?: VerityParams): string {
  const key = rootHashBytes(rootHash);
  return withVerity(data, hash, check, pinned, (cd) => {
    const r = cryptsetup().activate(cd, name, key, key.length, CRYPT_ACTIVATE_READONLY);
    if (r < 0) throw new VerityError(takeMessages() || `does not match the root hash (${errnoName(-r)})`, -r);
    return `/dev/mapper/${name}`;
  });
}

/**
 * verityOpen with the full check done by the kernel instead of libcryptsetup: the device is
 * opened without CHECK_HASH, then every data block is read through it on a worker thread, and
 * dm-verity checks each against the tree under `rootHash` as it comes. The guarantee is the
 * same (every block proven before the caller mounts anything), but the check leaves the event
 * loop and the calling thread free, so two images check at once, one per CPU. libcryptsetup's
 * CHECK_HASH could not move there: its log callback would then run JS on the worker thread,
 * which koffi does not allow. The blocks stay in the device's page cache, proven, for the mount.
 * A block that does not verify closes the device again; the error names the block.
 */
export async function verityOpenChecked(name: string, data: string, hash: string, rootHash: string, pinned: VerityParams): Promise<string> {
  const device = verityOpen(name, data, hash, rootHash, false, pinned);
  try {
    await readThrough(device, pinned.dataBlockSize, pinned.dataBlocks);
  } catch (e) {
    luksClose(name);
    throw e;
  }
  return device;
}

/**
 * Reads `blocks` blocks of `device` through the kernel (libc drainAsync: sendfile to /dev/null
 * on a worker thread, nothing copied out). A read stops short at a block dm-verity refuses, so
 * the next one starts at that block and fails; a read of that one block on this thread then
 * names its error.
 */
async function readThrough(device: string, blockSize: number, blocks: number): Promise<void> {
  const fd = openSync(device, "r");
  try {
    const total = blockSize * blocks;
    for (let at = 0; at < total; ) {
      const n = await drainAsync(fd, total - at);
      if (n > 0) {
        at += n;
        continue;
      }
      const block = Math.floor(at / blockSize);
      if (n === 0) throw new VerityError(`the device ends at data block ${block} of ${blocks}`, EIO);
      let code = "failed";
      try {
        readSync(fd, Buffer.alloc(blockSize), 0, blockSize, at);
      } catch (e) {
        code = (e as NodeJS.ErrnoException).code ?? String(e);
      }
      throw new VerityError(`dm-verity refused data block ${block} of ${blocks} (${code}): the block or the hash tree above it does not match the root hash`, EIO);
    }
  } finally {
    closeSync(fd);
  }
}

// ---- LUKS2 -----------------------------------------------------------------------------

export class LuksError extends Error {
  constructor(
    message: string,
    readonly errno: number,
  ) {
    super(message);
    this.name = "LuksError";
  }
}

/** How a keyslot turns its secret into a key. */
export interface Kdf {
  type: "pbkdf2" | "argon2id";
  /** PBKDF2 iterations, or the argon2 time cost. */
  iterations: number;
  memoryKb?: number;
  threads?: number;
}

/**
 * The TPM's secret is 32 random bytes: stretching it adds boot time and no strength, so the
 * TPM keyslot uses PBKDF2 at the minimum iterations LUKS2 accepts.
 */
export const TPM_KDF: Kdf = { type: "pbkdf2", iterations: 1000 };
/** A human passphrase does need stretching: argon2id, memory-hard, fixed cost (no benchmark). */
export const RECOVERY_KDF: Kdf = { type: "argon2id", iterations: 4, memoryKb: 131072, threads: 2 };

const CRYPT_ANY_SLOT = -1;
const CRYPT_PBKDF_NO_BENCHMARK = 1 << 1;
export const CRYPT_ACTIVATE_ALLOW_DISCARDS = 1 << 3;
export const CRYPT_ACTIVATE_NO_READ_WORKQUEUE = 1 << 24;
export const CRYPT_ACTIVATE_NO_WRITE_WORKQUEUE = 1 << 25;

function luksFail(what: string, r: number): never {
  throw new LuksError(`${what}: ${takeMessages() || errnoName(-r)}`, -r);
}

function withLuks<T>(device: string, fn: (cd: CryptDevice, c: ReturnType<typeof bind>) => T, load = true): T {
  const c = cryptsetup();
  takeMessages();
  const out: [CryptDevice | null] = [null];
  let r = c.init(out, device);
  if (r < 0) luksFail(`cannot open ${device}`, r);
  const cd = out[0]!; // set when the call succeeds
  try {
    if (load) {
      r = c.loadAny(cd, "LUKS2", null);
      if (r < 0) luksFail(`${device}: not a LUKS2 volume`, r);
    }
    return fn(cd, c);
  } finally {
    c.free(cd);
  }
}

function setKdf(c: ReturnType<typeof bind>, cd: CryptDevice, kdf: Kdf): void {
  const r = c.setPbkdf(cd, {
    type: kdf.type,
    hash: "sha256",
    time_ms: 0,
    iterations: kdf.iterations,
    max_memory_kb: kdf.memoryKb ?? 0,
    parallel_threads: kdf.threads ?? 0,
    flags: CRYPT_PBKDF_NO_BENCHMARK,
  });
  if (r < 0) luksFail(`pbkdf ${kdf.type}`, r);
}

/**
 * Formats `device` as LUKS2 (aes-xts, random 512-bit volume key) with `key` in its first
 * keyslot. Destroys whatever the device held: install mode only.
 */
export function luksFormat(device: string, key: Uint8Array, kdf: Kdf): number {
  return withLuks(
    device,
    (cd, c) => {
      setKdf(c, cd, kdf);
      let r = c.format(cd, "LUKS2", "aes", "xts-plain64", null, null, 64, null);
      if (r < 0) luksFail(`luksFormat ${device}`, r);
      r = c.addByVolumeKey(cd, CRYPT_ANY_SLOT, null, 0, key, key.length);
      if (r < 0) luksFail(`${device}: add first keyslot`, r);
      return r;
    },
    false,
  );
}

/** Adds `newKey` in a new keyslot, authorised by `existingKey`; returns the slot. */
export function luksAddKey(device: string, existingKey: Uint8Array, newKey: Uint8Array, kdf: Kdf): number {
  return withLuks(device, (cd, c) => {
    setKdf(c, cd, kdf);
    const r = c.addByPassphrase(cd, CRYPT_ANY_SLOT, existingKey, existingKey.length, newKey, newKey.length);
    if (r < 0) luksFail(`${device}: add keyslot`, r);
    return r;
  });
}

export function luksDestroySlot(device: string, slot: number): void {
  withLuks(device, (cd, c) => {
    const r = c.destroySlot(cd, slot);
    if (r < 0) luksFail(`${device}: destroy keyslot ${slot}`, r);
  });
}

/**
 * Which keyslot `key` opens (no device-mapper needed); throws when none does. Boot uses
 * luksOpen; this twin lets tests check keyslots on a host without device-mapper.
 */
export function luksCheckKey(device: string, key: Uint8Array): number {
  return withLuks(device, (cd, c) => {
    const r = c.activateByPassphrase(cd, null, CRYPT_ANY_SLOT, key, key.length, 0);
    if (r < 0) luksFail(`${device}: no keyslot opens with this key`, r);
    return r;
  });
}

/** Opens the volume as /dev/mapper/<name>; returns the path and the keyslot that matched. */
export function luksOpen(device: string, name: string, key: Uint8Array, flags: number, slot = CRYPT_ANY_SLOT): { path: string; slot: number } {
  return withLuks(device, (cd, c) => {
    const r = c.activateByPassphrase(cd, name, slot, key, key.length, flags);
    if (r < 0) luksFail(`${device}: cannot unlock`, r);
    return { path: `/dev/mapper/${name}`, slot: r };
  });
}

/** LUKS2 has 32 token slots (LUKS2_TOKENS_MAX). */
const LUKS2_TOKENS_MAX = 32;
const CRYPT_ANY_TOKEN = -1;
/** crypt_token_status: INVALID and INACTIVE mean "no token in this slot". */
const CRYPT_TOKEN_INACTIVE = 1;

/** Every token in the LUKS2 header, as the JSON text the header holds (data, never policy). */
export function luksTokens(device: string): { id: number; json: string }[] {
  return withLuks(device, (cd, c) => {
    const out: { id: number; json: string }[] = [];
    for (let id = 0; id < LUKS2_TOKENS_MAX; id++) {
      const type: [string | null] = [null];
      if (c.tokenStatus(cd, id, type) <= CRYPT_TOKEN_INACTIVE) continue;
      const json: [string | null] = [null];
      const r = c.tokenJsonGet(cd, id, json);
      if (r < 0) luksFail(`${device}: read token ${id}`, r);
      out.push({ id, json: String(json[0]) });
    }
    return out;
  });
}

/**
 * Writes a token (its JSON names its keyslots; libcryptsetup checks they exist) in a free token
 * slot, or in `id`; returns the token id. The header write is atomic in libcryptsetup (both
 * header copies, sequence number).
 */
export function luksSetToken(device: string, json: string, id = CRYPT_ANY_TOKEN): number {
  return withLuks(device, (cd, c) => {
    const r = c.tokenJsonSet(cd, id, json);
    if (r < 0) luksFail(`${device}: write token`, r);
    return r;
  });
}

export function luksRemoveToken(device: string, id: number): void {
  withLuks(device, (cd, c) => {
    const r = c.tokenJsonSet(cd, id, null);
    if (r < 0) luksFail(`${device}: remove token ${id}`, r);
  });
}

/**
 * The LUKS2 header's JSON metadata (keyslots, segments, digests, tokens) as libcryptsetup
 * loaded and checksummed it: data to check before any key is tried (a null cipher, a KDF that
 * would stall PID 1), never policy.
 */
export function luksHeader(device: string): string {
  return withLuks(device, (cd, c) => {
    const json: [string | null] = [null];
    const r = c.dumpJson(cd, json, 0);
    if (r < 0) luksFail(`${device}: read the LUKS2 metadata`, r);
    return String(json[0]);
  });
}

/** Closes /dev/mapper/<name>. */
export function luksClose(name: string): void {
  const c = cryptsetup();
  takeMessages();
  const out: [CryptDevice | null] = [null];
  let r = c.initByName(out, name);
  if (r < 0) luksFail(`no active volume ${name}`, r);
  const cd = out[0]!; // set when the call succeeds
  try {
    r = c.deactivate(cd, name);
    if (r < 0) luksFail(`close ${name}`, r);
  } finally {
    c.free(cd);
  }
}
