// The TPM over one boot: found once (bounded wait), the boot phases measured into PCR 11 as
// systemd-pcrphase does, and the latch PCR extended exactly once.
//
// Why the latch matters on *every* path: the disk key is sealed to the latch PCR at zero. A
// boot that is not going to unseal (a root= UKI, sidecar mode, install, a VM) extends it before
// it touches anything an attacker could bring (another disk, the network, a root filesystem),
// so nothing that runs later this boot can unseal, whatever it is. The unlock path extends it
// right after its unseal attempt. A latch that cannot be extended fails the boot: fail closed.
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Clock, Files, Tpm, TpmOps } from "../sys/index.ts";
import { phaseDigest } from "./policy.ts";
import { pollUntil } from "../wait.ts";

/** The digest the latch PCR is extended with: any non-zero one will do; fixed, so it is predictable. */
export const LATCH_DIGEST = Buffer.from("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "hex");
/** systemd-pcrphase's PCR and words: systemd-measure signs PCR 11 as it is after "enter-initrd". */
export const PHASE_PCR = 11;
export type Phase = "enter-initrd" | "leave-initrd";
const TPM_DEVICE = "/dev/tpmrm0";
/**
 * A TPM 2.0 on x86 is announced by the firmware's ACPI TPM2 table. Only then is it worth waiting
 * for a device that is late; without it the wait would only add its bound to every boot of a
 * machine or VM that has no TPM (the Debian kernels here have the TIS and CRB drivers built in,
 * so a TPM the firmware announces is usually there before /init runs).
 */
const ACPI_TPM2 = "/sys/firmware/acpi/tables/TPM2";

export interface TpmSettings {
  waitSeconds: number;
  latchPcr: number;
}

export class BootTpm {
  private device: TpmOps | null | undefined;
  private latchedWhy: string | undefined;
  /** Why the TPM the firmware announces could not be reached: the boot must not leave the initrd. */
  private unreachable: string | undefined;
  private readonly phases: Phase[] = [];

  constructor(
    private readonly sys: Files & Tpm & Clock,
    private readonly log: Logger,
    private readonly settings: TpmSettings,
  ) {}

  /** The TPM, once it appeared (bounded wait, once per boot); null when there is none. */
  async find(): Promise<TpmOps | null> {
    if (this.device !== undefined) return this.device;
    const { sys, log } = this;
    const bound = sys.exists(ACPI_TPM2) ? this.settings.waitSeconds : 0;
    if (!(await pollUntil(sys, bound * 1000, 50, () => sys.exists(TPM_DEVICE) || null))) {
      if (bound) {
        this.unreachable = `no ${TPM_DEVICE} after ${bound}s although the firmware announces a TPM2`;
        log.err(`tpm: ${this.unreachable}`);
      } else log.warn("tpm: none (the firmware announces no TPM2)");
      return (this.device = null);
    }
    try {
      this.device = sys.tpm();
    } catch (e) {
      this.unreachable = `${TPM_DEVICE} is there but cannot be used: ${describe(e)}`;
      log.err(`tpm: ${this.unreachable}`);
      this.device = null;
    }
    return this.device;
  }

  get present(): boolean {
    return !!this.device;
  }

  get latched(): boolean {
    return this.latchedWhy !== undefined;
  }

  /** The TPM device; only after find() returned one. */
  get tpm(): TpmOps {
    if (!this.device) throw new BootError("tpm: no TPM");
    return this.device;
  }

  /** Measures a boot phase into PCR 11 (once per phase), as systemd-pcrphase does. */
  measurePhase(phase: Phase): void {
    if (!this.device || this.phases.includes(phase)) return;
    this.device.extend(PHASE_PCR, phaseDigest(phase));
    this.phases.push(phase);
    this.log.info(`tpm: PCR ${PHASE_PCR} extended with phase ${phase}`);
  }

  /**
   * Extends the latch PCR, once per boot. No TPM (find() gave null): nothing can be unsealed, so
   * nothing to latch. A TPM that refuses the extend: the boot stops here (the caller wipes any
   * key it holds first).
   */
  latch(why: string): void {
    if (this.latchedWhy !== undefined || this.device === null) return;
    if (this.device === undefined) throw new BootError("tpm: latch before the TPM was looked for");
    try {
      this.device.extend(this.settings.latchPcr, LATCH_DIGEST);
    } catch (e) {
      throw new BootError(`tpm: cannot extend the latch PCR ${this.settings.latchPcr}: ${describe(e)}; stopping, fail closed`);
    }
    this.latchedWhy = why;
    this.log.info(`tpm: latch PCR ${this.settings.latchPcr} extended (${why})`);
  }

  /**
   * Before the hand-off (switch_root, or jails): the latch must hold, and PCR 11 says the
   * initrd is over. A TPM that is there but was not reached fails closed here: the OS (or a
   * jail's VM) that sees it later would find the latch PCR at zero and PCR 11 still in the
   * enter-initrd phase, and could extend PCR 11 itself into exactly the value the PCR key
   * signed, then unseal the disk key. So no OS and no jail runs on such a boot; the failure
   * policy takes over (the recovery sidecar, which unlocks nothing into an OS, or a reboot,
   * where the TPM may well appear in time).
   */
  async leaveInitrd(): Promise<void> {
    await this.find(); // a path that never looked for the TPM still latches before the OS runs
    if (this.unreachable) throw new BootError(`tpm: refusing to hand the machine to an OS or to jails: ${this.unreachable}, so its latch PCR could not be extended`);
    this.latch("hand-off");
    this.measurePhase("leave-initrd");
  }

  close(): void {
    try {
      this.device?.close();
    } catch {
      // closing a TPM context at hand-off: nothing to do about a failure
    }
  }
}
