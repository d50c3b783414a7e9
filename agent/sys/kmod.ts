// Kernel module loading through libkmod: it reads modules.dep/alias from /lib/modules/<release>,
// resolves dependencies and aliases, and inserts in the right order.
import { koffi } from "./ffi.ts";

const lib = koffi.load("libkmod.so.2");
const ctxT = koffi.opaque("kmod_ctx");
const listT = koffi.opaque("kmod_list");
const modT = koffi.opaque("kmod_module");

const k = {
  new: lib.func("kmod_ctx *kmod_new(const char *dirname, const char **config_paths)"),
  loadResources: lib.func("int kmod_load_resources(kmod_ctx *ctx)"),
  lookup: lib.func("int kmod_module_new_from_lookup(kmod_ctx *ctx, const char *alias, _Out_ kmod_list **list)"),
  listNext: lib.func("kmod_list *kmod_list_next(const kmod_list *list, const kmod_list *curr)"),
  getModule: lib.func("kmod_module *kmod_module_get_module(const kmod_list *entry)"),
  getName: lib.func("const char *kmod_module_get_name(const kmod_module *mod)"),
  probe: lib.func(
    "int kmod_module_probe_insert_module(kmod_module *mod, unsigned int flags, const char *extra_options, void *run_install, void *data, void *print_action)",
  ),
  unref: lib.func("kmod_module *kmod_module_unref(kmod_module *mod)"),
  unrefList: lib.func("int kmod_module_unref_list(kmod_list *list)"),
};

const KMOD_PROBE_IGNORE_COMMAND = 0x4; // never run install/remove commands from modprobe.d: no shell
const KMOD_PROBE_APPLY_BLACKLIST = 0x20000;

// kmod_ctx is created once; it caches the index files.
void ctxT;
let ctx: unknown;
function context(): unknown {
  if (!ctx) {
    // null config paths: no /etc/modprobe.d is read, so options come only from the initrd build.
    ctx = k.new(null, [null]);
    if (!ctx) throw new Error("kmod_new failed: no /lib/modules/<release>?");
    k.loadResources(ctx);
  }
  return ctx;
}

export interface LoadResult {
  /** Module names the alias resolved to (empty: nothing matches). */
  modules: string[];
}

/**
 * Loads the module(s) matching `nameOrAlias` with their dependencies. Already loaded and
 * built-in modules are not an error. Throws naming the module when the kernel refuses it.
 */
export function loadModule(nameOrAlias: string): LoadResult {
  const c = context();
  const out: unknown[] = [null];
  const r = k.lookup(c, nameOrAlias, out);
  if (r < 0) throw new Error(`kmod lookup ${nameOrAlias}: error ${-r}`);
  const list = out[0];
  const modules: string[] = [];
  try {
    for (let e = list; e; e = k.listNext(list, e)) {
      const mod = k.getModule(e);
      const name = k.getName(mod) as string;
      try {
        const err = k.probe(mod, KMOD_PROBE_IGNORE_COMMAND | KMOD_PROBE_APPLY_BLACKLIST, null, null, null, null);
        if (err < 0) throw new Error(`insert module ${name} (for ${nameOrAlias}): errno ${-err}`);
        modules.push(name);
      } finally {
        k.unref(mod);
      }
    }
  } finally {
    if (list) k.unrefList(list);
  }
  return { modules };
}
