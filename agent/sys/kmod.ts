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

/** The modules `nameOrAlias` matches in context `c`, as new references; the caller unrefs each. */
function lookup(c: Ctx, nameOrAlias: string): Module[] {
  const k = kmod();
  const out: [List | null] = [null];
  const r = k.lookup(c, nameOrAlias, out);
  if (r < 0) throw new Error(`kmod lookup ${nameOrAlias}: error ${-r}`);
  const list = out[0];
  const mods: Module[] = [];
  for (let e = list; e; e = k.listNext(list, e)) mods.push(k.getModule(e));
  if (list) k.unrefList(list);
  return mods;
}

const PROBE_FLAGS = KMOD_PROBE_IGNORE_COMMAND | KMOD_PROBE_APPLY_BLACKLIST | KMOD_PROBE_FAIL_ON_LOADED;

/** One module's probe result into `out`: inserted now, already there, or an error naming it. */
function verdict(out: LoadResult, name: string, nameOrAlias: string, err: number): void {
  out.matched.push(name);
  if (err === -EEXIST) return;
  if (err < 0) throw new Error(`insert module ${name} (for ${nameOrAlias}): ${errnoName(-err)}`);
  out.modules.push(name);
}

/**
 * Loads the module(s) matching `nameOrAlias` with their dependencies. Already loaded and
 * built-in modules are not an error. Throws naming the module when the kernel refuses it.
 */
export function loadModule(nameOrAlias: string): LoadResult {
  const k = kmod();
  const out: LoadResult = { modules: [], matched: [] };
  const mods = lookup(context(), nameOrAlias);
  try {
    for (const mod of mods) verdict(out, k.getName(mod), nameOrAlias, k.probe(mod, PROBE_FLAGS, null, null, null, null));
  } finally {
    for (const mod of mods) k.unref(mod);
  }
  return out;
}

/**
 * loadModule on koffi's worker thread: the insertion (finit_module: the signature check, the
 * relocations and the module's init, all kernel time in the calling thread) runs on the other
 * CPU while the event loop goes on. For btrfs that is ~1 s under TCG, most of it raid6_pq
 * benchmarking its algorithms at load. Its own kmod context, made and dropped here: libkmod's
 * contexts are not thread-safe and the main thread keeps using the shared one. libkmod logs to
 * stderr (no log function is set), so nothing calls back into JS from the worker thread, which
 * koffi does not allow. Loading what another thread loads at the same time is safe: the kernel
 * lets one insertion finish and answers the other "already loaded".
 */
export async function loadModuleAsync(nameOrAlias: string): Promise<LoadResult> {
  const k = kmod();
  const c = k.new(null, [null]);
  if (!c) throw new Error("kmod_new failed: no /lib/modules/<release>?");
  const out: LoadResult = { modules: [], matched: [] };
  let mods: Module[] = [];
  try {
    k.loadResources(c);
    mods = lookup(c, nameOrAlias);
    for (const mod of mods) {
      const err = await new Promise<number>((resolve, reject) =>
        k.probe.async(mod, PROBE_FLAGS, null, null, null, null, (e: unknown, r: number) => (e ? reject(e instanceof Error ? e : new Error(String(e))) : resolve(r))),
      );
      verdict(out, k.getName(mod), nameOrAlias, err);
    }
  } finally {
    for (const mod of mods) k.unref(mod);
    k.unrefCtx(c);
  }
  return out;
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
