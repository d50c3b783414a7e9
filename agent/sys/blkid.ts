// Block device identification through libblkid: resolve LABEL=/UUID=/PARTUUID= specs, probe
// filesystem types and read partition table entries without hand-written parsers.
import { cString, load, opaque, type Ptr } from "./ffi.ts";

type Probe = Ptr<"blkid_probe">;
/** A string libblkid malloc()ed for us: ours to free(). */
type Allocated = Ptr<"char">;

// Loaded on first use, so a missing library fails a stage rather than PID 1's startup.
const bind = () => {
  const lib = load("libblkid.so.1");
  opaque("blkid_struct_probe");
  return {
    evaluateSpec: lib.fn<(spec: string, cache: null) => Allocated | null>("void *blkid_evaluate_spec(const char *spec, void *cache)"),
    newProbe: lib.fn<(filename: string) => Probe | null>("blkid_struct_probe *blkid_new_probe_from_filename(const char *filename)"),
    freeProbe: lib.fn<(pr: Probe) => void>("void blkid_free_probe(blkid_struct_probe *pr)"),
    doSafeprobe: lib.fn<(pr: Probe) => number>("int blkid_do_safeprobe(blkid_struct_probe *pr)"),
    lookupValue: lib.fn<(pr: Probe, name: string, data: [string | null], len: [number]) => number>(
      "int blkid_probe_lookup_value(blkid_struct_probe *pr, const char *name, _Out_ const char **data, _Out_ size_t *len)",
    ),
    enableSuperblocks: lib.fn<(pr: Probe, enable: number) => number>("int blkid_probe_enable_superblocks(blkid_struct_probe *pr, int enable)"),
    enablePartitions: lib.fn<(pr: Probe, enable: number) => number>("int blkid_probe_enable_partitions(blkid_struct_probe *pr, int enable)"),
    setPartitionsFlags: lib.fn<(pr: Probe, flags: number) => number>("int blkid_probe_set_partitions_flags(blkid_struct_probe *pr, int flags)"),
    free: load("libc.so.6").fn<(ptr: Allocated) => void>("void free(void *ptr)"),
  };
};
let api: ReturnType<typeof bind> | undefined;
const blkid = () => (api ??= bind());

/**
 * The device path for a spec such as `LABEL=root`, `UUID=...` or `/dev/vda`; null when no
 * device currently matches (it may still appear later).
 */
export function resolveSpec(spec: string): string | null {
  const b = blkid();
  const p = b.evaluateSpec(spec, null);
  if (!p) return null;
  const s = cString(p);
  b.free(p);
  return s;
}

/** blkid.h: fill in PART_ENTRY_* for a partition, read from its disk's table. */
const BLKID_PARTS_ENTRY_DETAILS = 1 << 2;

function lookup(b: ReturnType<typeof bind>, pr: Probe, key: string): string | null {
  const data: [string | null] = [null];
  const len: [number] = [0];
  return b.lookupValue(pr, key, data, len) === 0 ? data[0] : null;
}

/**
 * `device`'s entry in the partition table of its disk (libblkid reads the disk's table for a
 * partition device): GPT name and partition UUID. Null when `device` is not a partition, or
 * cannot be opened (yet): callers poll for devices that are still appearing.
 */
export function partitionEntry(device: string): { uuid: string | null; name: string | null } | null {
  const b = blkid();
  const pr = b.newProbe(device);
  if (!pr) return null;
  try {
    // Only the partitions chain: a filesystem on the partition (or an ambiguous one) is not
    // what is asked, and must not make the entry unreadable.
    b.enableSuperblocks(pr, 0);
    b.enablePartitions(pr, 1);
    b.setPartitionsFlags(pr, BLKID_PARTS_ENTRY_DETAILS);
    if (b.doSafeprobe(pr) !== 0 || !lookup(b, pr, "PART_ENTRY_SCHEME")) return null;
    return { uuid: lookup(b, pr, "PART_ENTRY_UUID")?.toLowerCase() ?? null, name: lookup(b, pr, "PART_ENTRY_NAME") };
  } finally {
    b.freeProbe(pr);
  }
}

/** Superblock values of `device` (TYPE, LABEL, UUID, ...) or null when nothing was recognised. */
export function probe(device: string, keys: readonly string[] = ["TYPE", "LABEL", "UUID", "UUID_SUB"]): Record<string, string> | null {
  const b = blkid();
  const pr = b.newProbe(device);
  if (!pr) throw new Error(`blkid: cannot open ${device}`);
  try {
    const r = b.doSafeprobe(pr);
    if (r !== 0) return null; // 1: nothing found, -2: ambiguous; both mean "don't trust it"
    const out: Record<string, string> = {};
    for (const key of keys) {
      const value = lookup(b, pr, key);
      if (value) out[key] = value;
    }
    return out;
  } finally {
    b.freeProbe(pr);
  }
}
