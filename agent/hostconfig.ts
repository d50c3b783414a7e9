// The host config lives on the encrypted btrfs pool (top level): which subvolume is the root
// and which subvolumes are bound where. It is only readable once the disk is unlocked, but it is
// written by whoever is root in the booted OS, so it is input from a possible attacker (DESIGN
// §5): validated, with errors naming the key, and never allowed to name a path outside the root.
import { describe, zodIssue } from "./errors.ts";
import { z } from "zod";
import { type JailsConfig, parseJails, subvolumeName } from "./jailsconfig.ts";

export { subvolumeName };

export const HOST_CONFIG_JSON = "initos.json";
export const HOST_CONFIG_ENV = "initos.env";

/**
 * Where a subvolume is bound in the root: an absolute path below "/" without "." or ".."
 * components. Lexical only: symlinks are refused when the path is resolved (pool.ts).
 */
const bindPath = z
  .string()
  .regex(/^\/[\w./-]*$/, "expected an absolute path")
  .refine((p) => !p.split("/").some((c) => c === "." || c === ".."), '"." and ".." are not allowed in a bind path')
  .refine((p) => p.split("/").some(Boolean), "expected a directory below the root, e.g. /home");

const BindSchema = z.object({ subvol: subvolumeName, path: bindPath }).strict();
export type Bind = z.output<typeof BindSchema>;

const DEFAULT_BINDS: Bind[] = [
  { subvol: "@home", path: "/home" },
  { subvol: "@log", path: "/var/log" },
  { subvol: "@cache", path: "/var/cache" },
];

/** The file's shape; each bind entry is checked on its own (see checkBinds). */
const HostConfigSchema = z
  .object({
    /** The subvolume to switch_root into; without it (and with jails) the host runs jails. */
    root: subvolumeName.optional(),
    /** Subvolumes mounted into the root; a missing subvolume is skipped with a note. */
    binds: z.array(z.unknown()).optional(),
    /** Jail mode: the machine's /24, and the jails (each checked on its own: jailsconfig.ts). */
    network: z.unknown().optional(),
    jails: z.array(z.unknown()).optional(),
  })
  .strict()
  .refine((c) => c.root !== undefined || c.jails !== undefined, { message: "expected root (a subvolume to boot) or jails", path: ["root"] });

export interface HostConfig {
  /** The root subvolume; undefined in jail mode. */
  root?: string;
  /** Jail mode (no root): the bridge's /24 and the jails, as far as they parsed. */
  jails?: JailsConfig;
  binds: Bind[];
  /** One line per bind entry that was refused (already says it is not mounted), for the log. */
  refused: string[];
}

export class HostConfigError extends Error {}

function fail(file: string, e: z.ZodError): never {
  throw new HostConfigError(`host config ${file}: ${zodIssue(e)}`);
}

/**
 * A bad bind entry costs that bind, not the boot: the root the config names is still the one
 * the machine boots, and the entry's line in the log tells its admin what was ignored. Failing
 * the whole boot would hand whoever writes the config (root in the OS) a switch to keep the
 * machine in the initrd, with nothing gained: the refused mount is never made either way.
 */
function checkBinds(file: string, entries: readonly unknown[] | undefined): Pick<HostConfig, "binds" | "refused"> {
  if (entries === undefined) return { binds: DEFAULT_BINDS.map((b) => ({ ...b })), refused: [] };
  const binds: Bind[] = [];
  const refused: string[] = [];
  entries.forEach((entry, i) => {
    const r = BindSchema.safeParse(entry);
    if (r.success) return void binds.push(r.data);
    const shown = (JSON.stringify(entry) ?? String(entry)).slice(0, 120);
    refused.push(`host config ${file}: refused binds.${i} ${shown}: ${zodIssue(r.error, "(entry)")}; not mounted`);
  });
  return { binds, refused };
}

function parsed(file: string, input: unknown): HostConfig {
  const r = HostConfigSchema.safeParse(input);
  if (!r.success) fail(file, r.error);
  const jails = r.data.jails && parseJails(file, r.data.network, r.data.jails);
  return { root: r.data.root, ...checkBinds(file, r.data.binds), ...(jails ? { jails } : {}) };
}

export function parseHostJson(text: string, file = HOST_CONFIG_JSON): HostConfig {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new HostConfigError(`host config ${file}: not JSON (${describe(e)})`);
  }
  return parsed(file, json);
}

/**
 * InitOS's shell-style file: `INITOS_ROOT=<subvolume>` (quotes optional, # comments). Only the
 * keys we know are read; nothing is ever executed.
 */
export function parseHostEnv(text: string, file = HOST_CONFIG_ENV): HostConfig {
  const vars = new Map<string, string>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const m = /^(?:export\s+)?([A-Z_][A-Z0-9_]*)=(?:"([^"]*)"|'([^']*)'|([^\s"'#]*))\s*(#.*)?$/.exec(line);
    if (!m) throw new HostConfigError(`host config ${file}: line ${i + 1}: expected KEY=value`);
    vars.set(m[1]!, m[2] ?? m[3] ?? m[4] ?? "");
  });
  const root = vars.get("INITOS_ROOT");
  if (root === undefined) throw new HostConfigError(`host config ${file}: INITOS_ROOT is not set`);
  return parsed(file, { root });
}
