// dm-verity (and later LUKS2) through libcryptsetup: one library for verity superblocks, loop
// devices for image files, and device-mapper activation.
import { errnoName, koffi } from "./ffi.ts";

// Loaded on first use, so a missing library fails a stage rather than PID 1's startup.
const bind = () => {
  const lib = koffi.load("libcryptsetup.so.12");
  koffi.opaque("crypt_device");
  koffi.struct("crypt_params_verity", {
    hash_name: "const char *",
    data_device: "const char *",
    hash_device: "const char *",
    fec_device: "const char *",
    salt: "const char *",
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
  const LogCallback = koffi.proto("void crypt_log_cb(int level, const char *msg, void *usrptr)");
  const c = {
    setLogCallback: lib.func("void crypt_set_log_callback(crypt_device *cd, crypt_log_cb *log, void *usrptr)"),
    initDataDevice: lib.func("int crypt_init_data_device(_Out_ crypt_device **cd, const char *device, const char *data_device)"),
    load: lib.func("int crypt_load(crypt_device *cd, const char *type, crypt_params_verity *params)"),
    activate: lib.func("int crypt_activate_by_volume_key(crypt_device *cd, const char *name, const uint8_t *key, size_t size, uint32_t flags)"),
    free: lib.func("void crypt_free(crypt_device *cd)"),
  };
  // libcryptsetup explains failures in log messages ("Verification failed at position N");
  // keep them for our one-line errors instead of letting them go to stderr.
  const logCallback = koffi.register((level: number, msg: string) => {
    if (level === CRYPT_LOG_ERROR) messages.push(msg.trim().replace(/\.$/, ""));
  }, koffi.pointer(LogCallback));
  c.setLogCallback(null, logCallback, null);
  return c;
};
let api: ReturnType<typeof bind> | undefined;
const cryptsetup = () => (api ??= bind());

const CRYPT_VERITY = "VERITY";
const CRYPT_VERITY_CHECK_HASH = 1 << 1;
const CRYPT_ACTIVATE_READONLY = 1 << 0;

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

function withVerity<T>(data: string, hash: string, check: boolean, fn: (cd: unknown) => T): T {
  const c = cryptsetup();
  const out: unknown[] = [null];
  takeMessages();
  let r = c.initDataDevice(out, hash, data) as number;
  if (r < 0) throw new VerityError(`cannot open ${hash} / ${data}: ${takeMessages() || errnoName(-r)}`, -r);
  const cd = out[0];
  try {
    // CHECK_HASH makes activation read and hash every data block first: a flipped byte
    // anywhere is caught before anything is mounted, not on some later read.
    r = c.load(cd, CRYPT_VERITY, { hash_area_offset: 0, flags: check ? CRYPT_VERITY_CHECK_HASH : 0 }) as number;
    if (r < 0) throw new VerityError(`${hash}: no valid verity superblock (${takeMessages() || errnoName(-r)})`, -r);
    return fn(cd);
  } finally {
    c.free(cd);
  }
}

/**
 * Verifies every block of `data` against the hash tree in `hash` and `rootHash`, in userspace
 * (no device-mapper needed). Throws VerityError when anything does not match.
 */
export function verityVerify(data: string, hash: string, rootHash: string): void {
  const key = rootHashBytes(rootHash);
  withVerity(data, hash, true, (cd) => {
    const r = cryptsetup().activate(cd, null, key, key.length, 0) as number;
    if (r < 0) throw new VerityError(takeMessages() || `does not match the root hash (${errnoName(-r)})`, -r);
  });
}

/**
 * Opens a dm-verity device /dev/mapper/<name> over image files (loop devices are set up by
 * libcryptsetup). With `check`, all data is verified before activation.
 */
export function verityOpen(name: string, data: string, hash: string, rootHash: string, check: boolean): string {
  const key = rootHashBytes(rootHash);
  return withVerity(data, hash, check, (cd) => {
    const r = cryptsetup().activate(cd, name, key, key.length, CRYPT_ACTIVATE_READONLY) as number;
    if (r < 0) throw new VerityError(takeMessages() || `does not match the root hash (${errnoName(-r)})`, -r);
    return `/dev/mapper/${name}`;
  });
}
