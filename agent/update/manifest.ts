// An update bundle (issue #15): one tar file (ustar or pax) the control plane pushes with
// `ssh <host> update < bundle`. Its first entry is manifest.json; then every file the manifest
// lists, in the manifest's order, under the path it has on an ESP slot; nothing else. The
// manifest is data, not trust: the UKI's Authenticode signature and the root hashes in the
// UKI's own signed config are what make a bundle acceptable, and its version must match the
// one in that config. The sizes and hashes let the agent refuse a truncated or altered file
// before it looks any further.
import { z } from "zod";
import { zodIssue } from "../errors.ts";

export const MANIFEST_NAME = "manifest.json";
/** Where a slot's UKI lives (the removable-media path: it boots without a boot entry too). */
export const UKI_PATH = "EFI/BOOT/BOOTX64.EFI";
/** The longest manifest accepted (it lists a handful of files). */
export const MANIFEST_MAX = 64 * 1024;

const sha256 = z.string().regex(/^[0-9a-f]{64}$/, "expected a sha256 (64 hex digits)");
const BundlePath = z
  .string()
  .regex(/^(EFI\/BOOT\/BOOTX64\.EFI|initos\/[a-z][a-z0-9-]*\.(sqfs|verity))$/, `expected ${UKI_PATH} or initos/<image>.sqfs|.verity`);

export const ManifestSchema = z
  .object({
    format: z.literal(1),
    /** The build's version; the UKI's signed config must say the same. */
    version: z.number().int().min(1).max(2 ** 53 - 1),
    /** The host it was built for (hosts/<name>), if any: shown, not trusted. */
    host: z.string().regex(/^[a-z0-9][a-z0-9-]{0,62}$/).optional(),
    files: z
      .array(z.object({ path: BundlePath, size: z.number().int().min(1).max(2 ** 40), sha256 }).strict())
      .min(1)
      .max(32),
  })
  .strict()
  .refine((m) => new Set(m.files.map((f) => f.path)).size === m.files.length, "files: a path is listed twice")
  .refine((m) => m.files.some((f) => f.path === UKI_PATH), `files: no ${UKI_PATH}`);

export type Manifest = z.output<typeof ManifestSchema>;
export type ManifestFile = Manifest["files"][number];

/** Parses manifest.json's text; a one-line error naming what was wrong otherwise. */
export function parseManifest(text: string): Manifest | string {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return "bundle: manifest.json is not JSON";
  }
  const r = ManifestSchema.safeParse(json);
  return r.success ? r.data : `bundle: manifest.json: ${zodIssue(r.error)}`;
}
