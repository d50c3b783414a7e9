// The host config lives on the encrypted btrfs pool (top level): which subvolume is the root
// and which subvolumes are bound where. It is only readable once the disk is unlocked, so it is
// as trusted as the disk, but it is still input: validated, with errors naming the key.
import { z } from "zod";

export const HOST_CONFIG_JSON = "initos.json";
export const HOST_CONFIG_ENV = "initos.env";

const subvol = z.string().regex(/^@?[\w.-]+$/, "expected a subvolume name such as @root");

export const HostConfigSchema = z
  .object({
    root: subvol,
    /** Subvolumes mounted into the root; a missing subvolume is skipped with a note. */
    binds: z
      .array(z.object({ subvol, path: z.string().regex(/^\/[\w./-]*$/, "expected an absolute path") }).strict())
      .default([
        { subvol: "@home", path: "/home" },
        { subvol: "@log", path: "/var/log" },
        { subvol: "@cache", path: "/var/cache" },
      ]),
  })
  .strict();

export type HostConfig = z.output<typeof HostConfigSchema>;

export class HostConfigError extends Error {}

function fail(file: string, e: z.ZodError): never {
  const issue = e.issues[0]!;
  throw new HostConfigError(`host config ${file}: ${issue.path.join(".") || "(top level)"}: ${issue.message}`);
}

export function parseHostJson(text: string, file = HOST_CONFIG_JSON): HostConfig {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new HostConfigError(`host config ${file}: not JSON (${(e as Error).message})`);
  }
  const r = HostConfigSchema.safeParse(json);
  return r.success ? r.data : fail(file, r.error);
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
  const r = HostConfigSchema.safeParse({ root });
  return r.success ? r.data : fail(file, r.error);
}
