// Kernel module loading through libkmod: it reads modules.dep/alias from /lib/modules/<release>,
// resolves dependencies and aliases, and inserts in the right order.
import { errnoName, load, opaque, type Ptr } from "./ffi.ts";

type Ctx = Ptr<"kmod_ctx">;
type List = Ptr<"kmod_list">;
type Module = Ptr<"kmod_module">;

// Loaded on first use: a missing library then fails the stage that needs it (and reaches the
// failure policy) instead of killing PID 1 at startup.
const bind = () => {
  const lib = load("libkmod.so.2");
  opaque("kmod_ctx");
  opaque("kmod_list");
  opaque("kmod_module");
  return {
    new: lib.fn<(dirname: string | null, configPaths: [null]) => Ctx | null>("kmod_ctx *kmod_new(const char *dirname, const char **config_paths)"),
    loadResources: lib.fn<(ctx: Ctx) => number>("int kmod_load_resources(kmod_ctx *ctx)"),
    lookup: lib.fn<(ctx: Ctx, alias: string, list: [List | null]) => number>("int kmod_module_new_from_lookup(kmod_ctx *ctx, const char *alias, _Out_ kmod_list **list)"),
    // NULL for the end of the list (libkmod also answers NULL when given NULL).
    listNext: lib.fn<(list: List | null, curr: List) => List | null>("kmod_list *kmod_list_next(const kmod_list *list, const kmod_list *curr)"),
    // A new reference to the entry's module (NULL only for a NULL entry).
    getModule: lib.fn<(entry: List) => Module>("kmod_module *kmod_module_get_module(const kmod_list *entry)"),
    getName: lib.fn<(mod: Module) => string>("const char *kmod_module_get_name(const kmod_module *mod)"),
    probe: lib.fn<(mod: Module, flags: number, extraOptions: null, runInstall: null, data: null, printAction: null) => number>(
      "int kmod_module_probe_insert_module(kmod_module *mod, unsigned int flags, const char *extra_options, void *run_install, void *data, void *print_action)",
    ),
    unref: lib.fn<(mod: Module) => Module | null>("kmod_module *kmod_module_unref(kmod_module *mod)"),
    unrefList: lib.fn<(list: List) => number>("int kmod_module_unref_list(kmod_list *list)"),
    unrefCtx: lib.fn<(ctx: Ctx) => Ctx | null>("kmod_ctx *kmod_unref(kmod_ctx *ctx)"),
    getDependencies: lib.fn<(mod: Module) => List | null>("kmod_list *kmod_module_get_dependencies(const kmod_module *mod)"),
  };
};
let api: ReturnType<typeof bind> | undefined;
const kmod = () => (api ??= bind());

const KMOD_PROBE_IGNORE_COMMAND = 0x4; // never run install/remove commands from modprobe.d: no shell
const KMOD_PROBE_FAIL_ON_LOADED = 0x20; // so that "already loaded" is told apart from "inserted now"
const KMOD_PROBE_APPLY_BLACKLIST = 0x20000;
const EEXIST = 17;

// kmod_ctx is created once; it caches the index files until reset.
let ctx: Ctx | null | undefined;

/** Forgets the cached indexes: needed after another modules tree is mounted over /lib/modules. */
export function resetModuleIndex(): void {
  if (ctx) kmod().unrefCtx(ctx);
  ctx = undefined;
}

function context(): Ctx {
  const k = kmod();
  if (!ctx) {
    // null config paths: no /etc/modprobe.d is read, so options come only from the initrd build.
    ctx = k.new(null, [null]);
    if (!ctx) throw new Error("kmod_new failed: no /lib/modules/<release>?");
    k.loadResources(ctx);
  }
  return ctx;
}

export interface LoadResult {
  /** Modules inserted by this call (not those already loaded or built in). */
  modules: string[];
  /** Module names the alias resolved to, loaded now or before (empty: nothing matches). */
  matched: string[];
}

/**
 * Loads the module(s) matching `nameOrAlias` with their dependencies. Already loaded and
 * built-in modules are not an error. Throws naming the module when the kernel refuses it.
 */
export function loadModule(nameOrAlias: string): LoadResult {
  const k = kmod();
  const c = context();
  const out: [List | null] = [null];
  const r = k.lookup(c, nameOrAlias, out);
  if (r < 0) throw new Error(`kmod lookup ${nameOrAlias}: error ${-r}`);
  const list = out[0];
  const modules: string[] = [];
  const matched: string[] = [];
  try {
    for (let e = list; e; e = k.listNext(list, e)) {
      const mod = k.getModule(e);
      const name = k.getName(mod);
      try {
        matched.push(name);
        const err = k.probe(mod, KMOD_PROBE_IGNORE_COMMAND | KMOD_PROBE_APPLY_BLACKLIST | KMOD_PROBE_FAIL_ON_LOADED, null, null, null, null);
        if (err === -EEXIST) continue;
        if (err < 0) throw new Error(`insert module ${name} (for ${nameOrAlias}): ${errnoName(-err)}`);
        modules.push(name);
      } finally {
        k.unref(mod);
      }
    }
  } finally {
    if (list) k.unrefList(list);
  }
  return { modules, matched };
}

/**
 * The names of `name` and everything it depends on, transitively, as libkmod resolves them from
 * the module tree in `dirname` (default: the running kernel's). Nothing is loaded. The agent
 * does not call it: tests check the build's own closure (initrd/kmods.ts) against libkmod with it.
 */
export function dependencyClosure(name: string, dirname: string | null = null): string[] {
  const k = kmod();
  const c = k.new(dirname, [null]);
  if (!c) throw new Error(`kmod_new(${dirname}) failed`);
  const seen = new Set<string>();
  const visit = (mod: Module) => {
    const n = k.getName(mod);
    if (seen.has(n)) return;
    seen.add(n);
    const deps = k.getDependencies(mod);
    for (let e = deps; e; e = k.listNext(deps, e)) {
      const d = k.getModule(e);
      visit(d);
      k.unref(d);
    }
    if (deps) k.unrefList(deps);
  };
  try {
    const out: [List | null] = [null];
    const r = k.lookup(c, name, out);
    const list = out[0];
    if (r < 0 || !list) throw new Error(`kmod: no module ${name} in ${dirname}`);
    for (let e: List | null = list; e; e = k.listNext(list, e)) {
      const m = k.getModule(e);
      visit(m);
      k.unref(m);
    }
    k.unrefList(list);
  } finally {
    k.unrefCtx(c);
  }
  return [...seen].sort();
}
