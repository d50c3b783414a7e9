// EFI variables through efivarfs (Documentation/filesystems/efivarfs.rst): the file
// <Name>-<vendor guid> holds 4 bytes of attributes (u32 little-endian) and then the value.
// A variable is set by one write(2) of attributes + value, deleted by unlinking it. Variables
// efivarfs does not know to be safe to delete (everything but a list of standard ones, so all of
// initos's own) are immutable files: the flag is cleared for the write or the unlink and set
// again after a write, as libefivar does. Measured under OVMF with the 6.1 cloud kernel
// (test/integration/watchdog.test.ts): a variable of INITOS_GUID is immutable right after its
// creation; the creating open's single write still sets it, and rewriting and deleting it work
// through the flag. efibootmgr writes byte for byte the Boot#### we encode
// (test/system/efibootmgr.test.ts).
import { BootError, describe } from "../errors.ts";
import type { Files } from "../sys/index.ts";

export const EFIVARS_DIR = "/sys/firmware/efi/efivars";

/** EFI_GLOBAL_VARIABLE: BootOrder, BootNext, BootCurrent, Boot####, SecureBoot... */
export const EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/**
 * initos's vendor GUID, for its own variables (trial/commit state and the like): a fixed random
 * GUID (uuid4, generated once for initos in issue #15). Never change it: variables written by
 * older agents carry it.
 */
export const INITOS_GUID = "0a8242e4-7494-40fb-a7fa-19e79d5d23b6";

export const EFI_VARIABLE_NON_VOLATILE = 0x1;
export const EFI_VARIABLE_BOOTSERVICE_ACCESS = 0x2;
export const EFI_VARIABLE_RUNTIME_ACCESS = 0x4;
/** NV | BS | RT: what Boot####, BootOrder and BootNext have. */
export const DEFAULT_ATTRIBUTES = EFI_VARIABLE_NON_VOLATILE | EFI_VARIABLE_BOOTSERVICE_ACCESS | EFI_VARIABLE_RUNTIME_ACCESS;

/** What reading and writing variables needs of the machine. */
export type VarFiles = Pick<Files, "readBytes" | "exists" | "readdir" | "unlink" | "writeOnce" | "setImmutable">;

export interface EfiVariable {
  attributes: number;
  data: Uint8Array;
}

const NAME_RE = /^[A-Za-z0-9_]{1,128}$/;
const GUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** The efivarfs file of a variable. Names are limited to what initos uses (no "/", no "..", no dots). */
export function varPath(name: string, guid: string, dir = EFIVARS_DIR): string {
  if (!NAME_RE.test(name)) throw new BootError(`EFI variable name ${JSON.stringify(name)}: only letters, digits and _ (1-128)`);
  if (!GUID_RE.test(guid)) throw new BootError(`EFI vendor GUID ${JSON.stringify(guid)}: not a lower-case GUID`);
  return `${dir}/${name}-${guid}`;
}

/** A variable's attributes and value; null when it does not exist. */
export function readVar(sys: VarFiles, name: string, guid: string, dir = EFIVARS_DIR): EfiVariable | null {
  const path = varPath(name, guid, dir);
  const bytes = sys.readBytes(path);
  if (bytes === null) {
    if (sys.exists(path)) throw new BootError(`EFI variable ${name}: ${path} cannot be read`);
    return null;
  }
  if (bytes.length < 4) throw new BootError(`EFI variable ${name}: ${bytes.length} bytes, too short for its 4 attribute bytes`);
  const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return { attributes: b.readUInt32LE(0), data: Uint8Array.from(b.subarray(4)) };
}

/** Sets a variable (created if missing) with one write of attributes + value. */
export function writeVar(sys: VarFiles, name: string, guid: string, data: Uint8Array, attributes = DEFAULT_ATTRIBUTES, dir = EFIVARS_DIR): void {
  const path = varPath(name, guid, dir);
  if (!Number.isInteger(attributes) || attributes < 0 || attributes > 0xffffffff) throw new BootError(`EFI variable ${name}: attributes ${attributes} out of range`);
  const buf = Buffer.alloc(4 + data.length);
  buf.writeUInt32LE(attributes, 0);
  buf.set(data, 4);
  const wasImmutable = sys.exists(path) ? clearImmutable(sys, path, name) : false;
  try {
    sys.writeOnce(path, buf, 0o644);
  } catch (e) {
    throw new BootError(`EFI variable ${name}: write failed: ${describe(e)}`);
  } finally {
    if (wasImmutable) {
      try {
        sys.setImmutable(path, true);
      } catch {
        // the protection is a courtesy of efivarfs; the write is what mattered
      }
    }
  }
}

/** Deletes a variable; false when it did not exist. */
export function deleteVar(sys: VarFiles, name: string, guid: string, dir = EFIVARS_DIR): boolean {
  const path = varPath(name, guid, dir);
  if (!sys.exists(path)) return false;
  clearImmutable(sys, path, name);
  try {
    sys.unlink(path);
  } catch (e) {
    throw new BootError(`EFI variable ${name}: delete failed: ${describe(e)}`);
  }
  return true;
}

/** Names of the variables of vendor `guid` (without the GUID suffix). */
export function listVars(sys: VarFiles, guid: string, dir = EFIVARS_DIR): string[] {
  const suffix = `-${guid}`;
  return sys
    .readdir(dir)
    .filter((f) => f.endsWith(suffix))
    .map((f) => f.slice(0, -suffix.length))
    .filter((n) => NAME_RE.test(n))
    .sort();
}

function clearImmutable(sys: VarFiles, path: string, name: string): boolean {
  try {
    return sys.setImmutable(path, false);
  } catch (e) {
    // ENOTTY: a filesystem without inode flags (a plain directory standing in for efivarfs).
    if ((e as { code?: string }).code === "ENOTTY") return false;
    throw new BootError(`EFI variable ${name}: cannot clear its immutable flag: ${describe(e)}`);
  }
}
