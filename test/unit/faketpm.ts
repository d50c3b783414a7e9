// A fake TPM for unit tests of disk-key decisions: PCRs extend with the real hash chain, and a
// sealed blob releases its secret only when the policy steps replayed at unseal produce the
// digest it was sealed to (computed with agent/diskkey/policy.ts, which test/system/tss.test.ts
// checks against a real swtpm and systemd). Signatures are verified for real.
import { verify, createPublicKey } from "node:crypto";
import { keyName, policyAuthorize, policyPcr, sha256, ZERO_DIGEST } from "../../agent/diskkey/policy.ts";
import type { TpmOps } from "../../agent/sys/index.ts";
import { type PolicyStep, type Primary, TpmError } from "../../agent/sys/tss.ts";

/** The value a PCR holds after extending `from` with each digest in turn (the TPM does this for the agent). */
export function extendPcr(from: Uint8Array, ...digests: Uint8Array[]): Uint8Array {
  return digests.reduce((acc, d) => sha256(acc, d), from);
}

export class FakeTpm implements TpmOps {
  pcrs = new Map<number, Uint8Array>();
  calls: string[] = [];
  srkExists = false;
  private sealed: { secret: Uint8Array; policy: Uint8Array; primary: Primary["kind"] }[] = [];
  failExtend = false;
  /**
   * How many of the next unseals the kernel interrupts: a module load measured into PCR 10
   * between the session's PolicyPCR and its Unseal, so the TPM answers TPM_RC_PCR_CHANGED.
   */
  measuredDuringSession = 0;

  pcr(n: number): Uint8Array {
    return this.pcrs.get(n) ?? new Uint8Array(32);
  }
  pcrRead(pcrs: readonly number[]): Map<number, Uint8Array> {
    return new Map(pcrs.map((p) => [p, this.pcr(p)]));
  }
  extend(pcr: number, digest: Uint8Array): void {
    this.calls.push(`extend ${pcr}`);
    if (this.failExtend) throw new Error("Esys_PCR_Extend: TPM_RC_LOCALITY");
    this.pcrs.set(pcr, extendPcr(this.pcr(pcr), digest));
  }
  ensureSrk() {
    const created = !this.srkExists;
    this.srkExists = true;
    this.calls.push("ensureSrk");
    return { created, name: Buffer.from("srk-name"), serialized: Buffer.from("srk-serialized") };
  }
  seal(secret: Uint8Array, policyDigest: Uint8Array, primary: Primary): Uint8Array {
    this.calls.push(`seal ${primary.kind}`);
    this.sealed.push({ secret: Buffer.from(secret), policy: Buffer.from(policyDigest), primary: primary.kind });
    return Buffer.from(`blob-${this.sealed.length - 1}`);
  }
  unseal(blob: Uint8Array, primary: Primary, steps: readonly PolicyStep[]): Uint8Array {
    this.calls.push(`unseal ${primary.kind} ${steps.map((s) => s.kind).join("+")}`);
    const m = /^blob-(\d+)$/.exec(Buffer.from(blob).toString());
    const obj = m ? this.sealed[Number(m[1])] : undefined;
    if (!obj || obj.primary !== primary.kind) throw new Error("Esys_Load: TPM_RC_INTEGRITY");
    let d: Uint8Array = ZERO_DIGEST;
    for (const s of steps) {
      if (s.kind === "pcr") d = policyPcr(d, s.pcrs, this.pcrRead(s.pcrs));
      else {
        d = policyPcr(d, s.pcrs, this.pcrRead(s.pcrs));
        if (!Buffer.from(d).equals(s.approvedPolicy)) throw new Error("Esys_PolicyAuthorize: TPM_RC_VALUE");
        const pub = s.publicArea;
        const n = pub.subarray(pub.length - 256);
        const key = createPublicKey({ key: { kty: "RSA", n: Buffer.from(n).toString("base64url"), e: "AQAB" }, format: "jwk" });
        if (!verify("sha256", s.approvedPolicy, key, s.signature)) throw new Error("Esys_VerifySignature: TPM_RC_SIGNATURE");
        d = policyAuthorize(keyName(pub));
      }
    }
    if (this.measuredDuringSession > 0) {
      this.measuredDuringSession--;
      this.pcrs.set(10, extendPcr(this.pcr(10), sha256(Buffer.from("a module"))));
      throw new TpmError("Esys_Unseal", 0x128, "TPM_RC_PCR_CHANGED (0x128): PCR have changed since checked");
    }
    if (!Buffer.from(d).equals(obj.policy)) throw new Error("Esys_Unseal: TPM_RC_POLICY_FAIL");
    return Buffer.from(obj.secret);
  }
  close(): void {
    this.calls.push("close");
  }
}

export const digestOf = (s: string) => sha256(Buffer.from(s));
