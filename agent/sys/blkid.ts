// Block device identification through libblkid: resolve LABEL=/UUID=/PARTUUID= specs and probe
// filesystem types without hand-written superblock parsers.
import { koffi } from "./ffi.ts";

// Loaded on first use, so a missing library fails a stage rather than PID 1's startup.
const bind = () => {
  const lib = koffi.load("libblkid.so.1");
  koffi.opaque("blkid_struct_probe");
  return {
    evaluateSpec: lib.func("void *blkid_evaluate_spec(const char *spec, void *cache)"),
    newProbe: lib.func("blkid_struct_probe *blkid_new_probe_from_filename(const char *filename)"),
    freeProbe: lib.func("void blkid_free_probe(blkid_struct_probe *pr)"),
    doSafeprobe: lib.func("int blkid_do_safeprobe(blkid_struct_probe *pr)"),
    lookupValue: lib.func("int blkid_probe_lookup_value(blkid_struct_probe *pr, const char *name, _Out_ const char **data, _Out_ size_t *len)"),
    free: koffi.load("libc.so.6").func("void free(void *ptr)"),
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
  const s = koffi.decode(p, "char", -1) as string;
  b.free(p);
  return s;
}

/** Superblock values of `device` (TYPE, LABEL, UUID, ...) or null when nothing was recognised. */
export function probe(device: string, keys: readonly string[] = ["TYPE", "LABEL", "UUID"]): Record<string, string> | null {
  const b = blkid();
  const pr = b.newProbe(device);
  if (!pr) throw new Error(`blkid: cannot open ${device}`);
  try {
    const r = b.doSafeprobe(pr);
    if (r !== 0) return null; // 1: nothing found, -2: ambiguous; both mean "don't trust it"
    const out: Record<string, string> = {};
    for (const key of keys) {
      const data: (string | null)[] = [null];
      const len = [0];
      const value = b.lookupValue(pr, key, data, len) === 0 ? data[0] : null;
      if (value) out[key] = value;
    }
    return out;
  } finally {
    b.freeProbe(pr);
  }
}
