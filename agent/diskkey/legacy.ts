// Disks installed before the systemd-tpm2 token: the key was sealed with tpm2-tools to PCR 7 +
// the latch PCR only (no signed PCR 11), and the blob lay on the ESP with a root.json naming
// its keyslot. Any UKI signed with the same db key could unseal it, so such a disk is migrated
// at its next unlock by a production boot: the old key is unsealed (it opens its keyslot: that
// proves what the slot holds), a new key is sealed as a token to the config's binding, and the
// old keyslot is destroyed. The ESP files stay (nothing is deleted on a user's disk); without
// their keyslot they open nothing.
import type { Files } from "../sys/index.ts";

export interface LegacySeal {
  /** tpm2-tools' TPM2B_PRIVATE then TPM2B_PUBLIC: the same layout as a token's tpm2-blob. */
  blob: Uint8Array;
  /** The keyslot root.json names: data, used only as the one slot the key is tried in. */
  keyslot: number;
}

export const legacyPaths = (espMount: string, dir: string) => ({
  pub: `${espMount}/${dir}/tpm/root.pub`,
  priv: `${espMount}/${dir}/tpm/root.priv`,
  info: `${espMount}/${dir}/tpm/root.json`,
});

/** The old sealed key on the booted ESP, or null. Its PCRs are not read: the config's are used. */
export function readLegacySeal(sys: Files, espMount: string, dir: string): LegacySeal | null {
  const p = legacyPaths(espMount, dir);
  const pub = sys.readBytes(p.pub);
  const priv = sys.readBytes(p.priv);
  const info = sys.readFile(p.info);
  if (!pub || !priv || info === null) return null;
  let keyslot: unknown;
  try {
    keyslot = (JSON.parse(info) as { keyslot?: unknown }).keyslot;
  } catch {
    return null;
  }
  if (typeof keyslot !== "number" || !Number.isInteger(keyslot) || keyslot < 0 || keyslot > 31) return null;
  return { blob: new Uint8Array(Buffer.concat([priv, pub])), keyslot };
}
