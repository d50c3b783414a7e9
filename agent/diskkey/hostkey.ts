// The recovery sidecar's ssh host key: one the operator pins once (printed at install), that
// only this machine's production boot can use. The dropbear key is sealed like the disk key but
// WITHOUT PCR 7: to the PCR signer's policy for PCR 11 (enter-initrd) and the latch at zero. So
// it still unseals after a firmware or dbx update moved PCR 7 — exactly when the operator has
// to send the recovery passphrase — while
//   - a copy of the ESP is useless elsewhere (the blob only loads under this TPM's SRK);
//   - another UKI signed with the same db key gets nothing (its PCR 11 is not signed);
//   - the booted OS gets nothing (PCR 11 is past leave-initrd, the latch is extended).
// The sealed file lies on the ESP: it is data (a blob only this TPM opens, in that state).
import type { Logger } from "../log.ts";
import type { TpmOps, Files } from "../sys/index.ts";
import { describe } from "../errors.ts";
import { type PcrSignature, sealObject, unsealObject } from "./diskkey.ts";
import { parseSealed, refusal, type Requirement, sealedJson } from "./token.ts";

export const HOSTKEY_TYPE = "initos-recovery-hostkey";
export const sealedHostKeyPath = (espMount: string, dir: string) => `${espMount}/${dir}/recovery-hostkey.json`;

/** The disk key's requirement without the PCRs bound by value (PCR 7): the signer and the latch. */
const hostKeyRequirement = (req: Requirement): Requirement => ({ ...req, pcrs: [] });

/**
 * Seals a dropbear host key file's bytes; the JSON to put on the ESP. Refused when the config
 * has no signed PCR policy: bound to the latch alone, the key would unseal for any UKI.
 */
export function sealHostKey(tpm: TpmOps, req: Requirement, secureBoot: string, key: Uint8Array): string {
  if (!req.signedPcrs.length) throw new Error("the config has no signed PCR policy: a sealed host key would unseal for any UKI");
  return sealedJson({ type: HOSTKEY_TYPE }, sealObject(tpm, hostKeyRequirement(req), secureBoot, key, [req.latchPcr]));
}

/**
 * The sealed host key from the booted ESP, unsealed; null (with one line) when there is none or
 * this boot may not have it. Before the latch only.
 */
export function unsealHostKey(sys: Files, log: Logger, tpm: TpmOps, req: Requirement, file: string, signature: () => PcrSignature): Uint8Array | null {
  const text = sys.readFile(file);
  if (text === null) {
    log.info("recovery: no sealed ssh host key on the ESP; the recovery sidecar would show a key made for this boot");
    return null;
  }
  try {
    const hostReq = hostKeyRequirement(req);
    const sealed = parseSealed("recovery host key", HOSTKEY_TYPE, text);
    const refused = refusal(sealed, hostReq, "recovery host key");
    if (refused) throw new Error(refused);
    const key = unsealObject(tpm, log, "recovery: ssh host key", hostReq, sealed, signature);
    log.info("recovery: ssh host key unsealed (the one pinned at install)");
    return key;
  } catch (e) {
    log.warn(`recovery: the sealed ssh host key was not released: ${describe(e)}; a key made for this boot instead`);
    return null;
  }
}
