// Build-side kernel module selection: the closure of the wanted modules over modules.dep, so
// the initrd carries exactly what reaching the root needs. libkmod does the loading at boot.
import { readFileSync } from "node:fs";

export interface ModuleIndex {
  /** Normalised module name (dashes as underscores) → path relative to /lib/modules/<release>. */
  paths: Map<string, string>;
  deps: Map<string, string[]>;
  builtin: Set<string>;
}

export const modName = (path: string) => path.replace(/^.*\//, "").replace(/\.ko(\.(xz|zst|gz))?$/, "").replace(/-/g, "_");

export function readModuleIndex(moddir: string): ModuleIndex {
  const paths = new Map<string, string>();
  const deps = new Map<string, string[]>();
  for (const line of readFileSync(`${moddir}/modules.dep`, "utf8").split("\n")) {
    const m = /^([^:]+):\s*(.*)$/.exec(line);
    if (!m) continue;
    const name = modName(m[1]!);
    paths.set(name, m[1]!);
    deps.set(name, m[2]!.split(/\s+/).filter(Boolean).map(modName));
  }
  let builtinText = "";
  try {
    builtinText = readFileSync(`${moddir}/modules.builtin`, "utf8");
  } catch {
    // older trees may lack it; then nothing counts as built in
  }
  const builtin = new Set(builtinText.split("\n").filter(Boolean).map(modName));
  return { paths, deps, builtin };
}

/** Module files (relative paths) for `wanted` and all their dependencies. Built-ins need none. */
export function moduleClosure(index: ModuleIndex, wanted: readonly string[]): string[] {
  const out = new Set<string>();
  const visit = (name: string, by: string) => {
    const n = name.replace(/-/g, "_");
    if (index.builtin.has(n)) return;
    const path = index.paths.get(n);
    if (!path) throw new Error(`kernel module ${name}${by ? ` (needed by ${by})` : ""} is neither a module nor built in`);
    if (out.has(path)) return;
    out.add(path);
    for (const d of index.deps.get(n) ?? []) visit(d, n);
  };
  for (const w of wanted) visit(w, "");
  return [...out].sort();
}
