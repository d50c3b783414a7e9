// Stage "unlock": get the key of the encrypted pool. Unattended from the TPM when the machine is
// in the measured state it was sealed in; otherwise from a human with the recovery passphrase,
// on the console (and, later, over ssh). Never a shell.
//
// The latch: right after the unseal attempt, a PCR that was zero at boot is extended, so the
// sealed key cannot be unsealed again until the next reboot, whatever runs later.
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";

/** The side effects unlock needs, so the decisions below can be tested with fakes. */
export interface UnlockOps {
  /** Waits (bounded) for the TPM; false when there is none. */
  waitForTpm(): Promise<boolean>;
  /** Unseals the disk key and names its keyslot; throws when the TPM refuses or there is no sealed key. */
  unsealKey(): { key: Uint8Array; slot: number };
  /** Extends the latch PCR. */
  latch(): void;
  /** True if unsealing again now fails, as the latch promises. */
  latchHolds(): boolean;
  /** Opens the pool's volumes with `key` (only in `slot` when known); false when it opens none. */
  openWithKey(key: Uint8Array, slot?: number): boolean;
  /**
   * The recovery passphrase from a human: the console (no echo) or, when a recovery sidecar
   * runs, `ctl unlock` over ssh, whichever answers first. null when nobody can be asked.
   */
  readSecret(prompt: string): Promise<string | null>;
  /** Tells the channel the last secret came from whether it worked (the ssh client waits). */
  reportResult?(ok: boolean, resealed: boolean): void;
  /** Asks a yes/no question on the console (default no). */
  confirm(question: string): Promise<boolean>;
  /** Seals a new TPM key for the current PCRs, authorised by the passphrase. */
  reseal(passphrase: Uint8Array): void;
}

export interface UnlockResult {
  method: "tpm" | "passphrase";
  resealed: boolean;
}

export interface UnlockOptions {
  tries: number;
  checkLatch: boolean;
}

export async function unlock(log: Logger, ops: UnlockOps, opt: UnlockOptions): Promise<UnlockResult> {
  const hasTpm = await ops.waitForTpm();
  if (hasTpm) {
    let key: { key: Uint8Array; slot: number } | undefined;
    try {
      key = ops.unsealKey();
    } catch (e) {
      log.err(`unlock: TPM did not release the key: ${describe(e)}`);
    }
    // Latch whether or not the unseal worked: nothing later this boot may try again.
    ops.latch();
    if (opt.checkLatch) {
      if (ops.latchHolds()) log.info("unlock: latch holds: the key cannot be unsealed again this boot");
      else log.err("unlock: LATCH FAILED: the key could be unsealed again this boot");
    }
    if (key) {
      const ok = ops.openWithKey(key.key, key.slot);
      key.key.fill(0);
      if (ok) {
        log.info("unlock: unlocked with the TPM");
        return { method: "tpm", resealed: false };
      }
      log.err("unlock: the key from the TPM opens no volume");
    }
  } else {
    log.warn("unlock: no TPM; the recovery passphrase is needed");
  }

  for (let i = 1; i <= opt.tries; i++) {
    const pass = await ops.readSecret(`Recovery passphrase (attempt ${i} of ${opt.tries}): `);
    if (pass === null) throw new BootError("unlock: no TPM key and no console to ask for the recovery passphrase");
    const bytes = Buffer.from(pass.trim(), "utf8");
    const ok = ops.openWithKey(bytes);
    if (!ok) {
      ops.reportResult?.(false, false);
      bytes.fill(0);
      log.err(`unlock: wrong recovery passphrase (attempt ${i} of ${opt.tries})`);
      continue;
    }
    log.info("unlock: unlocked with the recovery passphrase");
    let resealed = false;
    // PCR 7 moves with firmware and dbx updates: offer to seal again for the state we are in now.
    if (hasTpm && (await ops.confirm("Reseal the disk key to this machine's current TPM state? [y/N] "))) {
      try {
        ops.reseal(bytes);
        resealed = true;
        log.info("unlock: resealed; the next boot unlocks unattended");
      } catch (e) {
        log.err(`unlock: reseal failed: ${describe(e)}`);
      }
    }
    ops.reportResult?.(true, resealed);
    bytes.fill(0);
    return { method: "passphrase", resealed };
  }
  throw new BootError(`unlock: ${opt.tries} wrong recovery passphrases`);
}
