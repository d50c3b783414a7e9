// Stage "unlock": get the key of the encrypted pool. Unattended from the TPM when the machine is
// in the measured state it was sealed in (a production UKI, Secure Boot as at install);
// otherwise from a human with the recovery passphrase, on the console or over ssh. Never a shell.
//
// The latch: right after the unseal attempt, whether it worked or not, and before any prompt,
// any volume is opened or anything of the pool is read, the latch PCR is extended, so the key
// cannot be unsealed again until the next reboot, whatever runs later.
import { BootError, describe } from "../errors.ts";
import type { UnsealedKey } from "../diskkey/diskkey.ts";
import type { Logger } from "../log.ts";

/** The side effects unlock needs, so the decisions below can be tested with fakes. */
export interface UnlockOps {
  /** A TPM was found by the boot's tpm stage; false: straight to the passphrase. */
  hasTpm: boolean;
  /** The latch was extended earlier this boot (sidecar mode): the TPM cannot release the key. */
  alreadyLatched: boolean;
  /** Unseals every token that meets the config; never throws (refusals are logged). */
  unsealKeys(): UnsealedKey[];
  /** Extends the latch PCR; throws when it cannot (fail closed). */
  latch(): void;
  /** True if unsealing again now fails, as the latch promises. */
  latchHolds(): boolean;
  /**
   * What opening a volume needs, once the latch holds and before anything is opened or a human
   * asked: dm-crypt and its ciphers from the modules image, which the boot lets go on checking
   * through the unseal, and the pool's driver loading beside it. Rejects when they cannot be
   * had (no image verified).
   */
  beforeOpen(): Promise<void>;
  /**
   * Opens the pool's first volume (on the boot disk) with a key, in the keyslot its token names
   * only, then every other volume of the pool with the same key; true when the first is open.
   */
  openWithTpmKeys(keys: readonly UnsealedKey[]): boolean;
  /** The same with a passphrase: false when it does not open the first volume. */
  openWithPassphrase(passphrase: Uint8Array): boolean;
  /**
   * The recovery passphrase from a human: the console (no echo) or, when a recovery sidecar
   * runs, `ctl unlock` over ssh, whichever answers first. null when nobody can be asked.
   */
  readSecret(prompt: string): Promise<string | null>;
  /** Tells the channel the last secret came from whether it worked (the ssh client waits). */
  reportResult?(ok: boolean, resealed: boolean): void;
  /** Asks a yes/no question on the console (default no). */
  confirm(question: string): Promise<boolean>;
  /** Why no reseal can be offered now (no TPM, Secure Boot off), or null. */
  resealRefusal(): string | null;
  /** Seals a new TPM key for the current state, authorised by the passphrase. */
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

const wipe = (keys: readonly UnsealedKey[]) => keys.forEach((k) => k.key.fill(0));

export async function unlock(log: Logger, ops: UnlockOps, opt: UnlockOptions): Promise<UnlockResult> {
  let keys: UnsealedKey[] = [];
  if (!ops.hasTpm) log.warn("unlock: no TPM; the recovery passphrase is needed");
  else if (ops.alreadyLatched) log.warn("unlock: the latch PCR was extended earlier this boot; the recovery passphrase is needed");
  else keys = ops.unsealKeys();
  // Latch whether or not the unseal worked: nothing later this boot may try again.
  try {
    ops.latch();
  } catch (e) {
    wipe(keys);
    throw e;
  }
  if (opt.checkLatch && ops.hasTpm) {
    if (ops.latchHolds()) log.info("unlock: latch holds: the key cannot be unsealed again this boot");
    else log.err("unlock: LATCH FAILED: the key could be unsealed again this boot");
  }
  try {
    await ops.beforeOpen();
  } catch (e) {
    wipe(keys);
    throw e;
  }
  if (keys.length) {
    let ok: boolean;
    try {
      ok = ops.openWithTpmKeys(keys);
    } finally {
      wipe(keys);
    }
    if (ok) {
      log.info("unlock: unlocked with the TPM");
      return { method: "tpm", resealed: false };
    }
    log.err("unlock: the keys from the TPM do not open the pool's volume");
  }

  for (let i = 1; i <= opt.tries; i++) {
    const pass = await ops.readSecret(`Recovery passphrase (attempt ${i} of ${opt.tries}): `);
    if (pass === null) throw new BootError("unlock: no TPM key and no console to ask for the recovery passphrase");
    const bytes = Buffer.from(pass.trim(), "utf8");
    const ok = ops.openWithPassphrase(bytes);
    if (!ok) {
      ops.reportResult?.(false, false);
      bytes.fill(0);
      log.err(`unlock: wrong recovery passphrase (attempt ${i} of ${opt.tries})`);
      continue;
    }
    log.info("unlock: unlocked with the recovery passphrase");
    let resealed = false;
    // PCR 7 moves with firmware and dbx updates: offer to seal again for the state we are in now.
    const refusal = ops.resealRefusal();
    if (refusal) log.warn(`unlock: no reseal: ${refusal}`);
    else if (await ops.confirm("Reseal the disk key to this machine's current TPM state? [y/N] ")) {
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
