// What the unlock path asks of the TPM, in one place and before the latch: the recovery
// sidecar's pinned host key (hostkey.ts), then the disk keys of every volume (their tokens, or
// the ESP seal of a disk installed before tokens, legacy.ts).
import type { Logger } from "../log.ts";
import type { TpmOps, Crypt, Files } from "../sys/index.ts";
import { HOST_KEY, SSH_DIR } from "../stages/sidecar.ts";
import { pcrSignatureOnce, readTokens, unsealLegacy, unsealTokens, type UnsealedKey } from "./diskkey.ts";
import { sealedHostKeyPath, unsealHostKey } from "./hostkey.ts";
import { readLegacySeal } from "./legacy.ts";
import type { Requirement } from "./token.ts";

export function releaseKeys(sys: Files & Crypt, log: Logger, tpm: TpmOps, req: Requirement, espMount: string, espDir: string, volumes: readonly string[]): UnsealedKey[] {
  // The host key first: after the latch nothing unseals it, and the recovery sidecar needs it.
  const signature = pcrSignatureOnce(sys, req); // /.extra read once, when first needed
  const hostKey = unsealHostKey(sys, log, tpm, req, sealedHostKeyPath(espMount, espDir), signature);
  if (hostKey) {
    sys.mkdirp(SSH_DIR, 0o700);
    sys.writeBytes(HOST_KEY, hostKey, 0o600);
    hostKey.fill(0);
  }
  const keys = unsealTokens(sys, log, tpm, req, volumes, signature);
  // Only a volume with no token at all may be sealed in the format before tokens.
  const bare = volumes.filter((d) => !keys.some((k) => k.device === d) && readTokens(sys, log, d).length === 0);
  const seal = bare.length ? readLegacySeal(sys, espMount, espDir) : null;
  for (const d of seal ? bare : []) {
    const k = unsealLegacy(log, tpm, req, d, seal!);
    if (k) keys.push(k);
  }
  return keys;
}
