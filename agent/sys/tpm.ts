// TPM2 through tpm2-tools (the `tpm2` multi-call binary): seal a secret to PCR values, unseal
// it under a PCR policy session, extend a PCR. Scratch files (object contexts, never the
// secret itself) live in a private directory on tmpfs and are removed after each operation.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { sidecarArgv } from "./sidecar.ts";

/** How to run `tpm2`: argv prefix and environment (which TPM, through which TCTI). */
export interface TpmTool {
  argv: string[];
  env: Record<string, string>;
  /**
   * Whether a resource manager sits in between (/dev/tpmrm0 does). Without one (a TPM socket,
   * /dev/tpm0) objects loaded by one command stay loaded and fill the TPM's few object slots,
   * so transient objects are flushed before each command that loads one.
   */
  resourceManager: boolean;
}

/**
 * tpm2 from the verified sidecar image, run through that image's own dynamic loader and
 * libraries, talking to the kernel's resource manager.
 */
export function sidecarTpm2(root: string, device = "/dev/tpmrm0"): TpmTool {
  return {
    argv: sidecarArgv("tpm2", root),
    env: { TPM2TOOLS_TCTI: `device:${device}` },
    resourceManager: device.includes("tpmrm"),
  };
}

export class TpmError extends Error {
  constructor(
    message: string,
    /** The TPM refused because the policy (PCR values) does not match. */
    readonly policyFailure: boolean,
  ) {
    super(message);
    this.name = "TpmError";
  }
}

export interface SealedBlob {
  pub: Uint8Array;
  priv: Uint8Array;
}

/** A PCR selection such as "sha256:7,15". */
export function pcrSelection(pcrs: readonly number[]): string {
  return `sha256:${[...pcrs].sort((a, b) => a - b).join(",")}`;
}

const SHA256 = 32;

export class Tpm {
  constructor(
    private readonly tool: TpmTool,
    private readonly scratchParent = "/run/initos",
  ) {}

  private run(args: string[], input?: Uint8Array): Buffer {
    const [cmd, ...pre] = this.tool.argv;
    const r = spawnSync(cmd!, [...pre, ...args], { input, env: { ...this.tool.env }, maxBuffer: 1 << 20 });
    if (r.error) throw new TpmError(`tpm2 ${args[0]}: ${r.error.message}`, false);
    if (r.status !== 0) {
      const err = r.stderr.toString();
      // The TPM's response code says why; TPM_RC_POLICY_FAIL (0x99d) means the PCRs moved.
      const code = /ErrorCode \((0x[0-9a-f]+)\)/i.exec(err)?.[1]?.replace(/^0x0+/, "0x");
      const policy = code === "0x99d";
      const why = policy
        ? "PCR values differ from the sealed policy (TPM_RC_POLICY_FAIL)"
        : code
          ? `TPM response ${code}`
          : (err.trim().split("\n").at(-1) ?? `exit ${r.status}`);
      throw new TpmError(`tpm2 ${args[0]}: ${why}`, policy);
    }
    return r.stdout;
  }

  private scratch<T>(fn: (dir: string) => T): T {
    mkdirSync(this.scratchParent, { recursive: true, mode: 0o700 });
    const dir = mkdtempSync(`${this.scratchParent}/tpm-`);
    try {
      return fn(dir);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /**
   * The storage primary key: an ECC key from the owner hierarchy's standard template. Derived
   * from the TPM's seed, so it is the same key every time without persisting a handle.
   */
  /** Runs a command that loads objects; see TpmTool.resourceManager. */
  private runLoading(args: string[], input?: Uint8Array): Buffer {
    if (!this.tool.resourceManager) this.run(["flushcontext", "-t"]);
    return this.run(args, input);
  }

  private primary(dir: string): string {
    this.runLoading(["createprimary", "-Q", "-C", "o", "-G", "ecc", "-g", "sha256", "-c", `${dir}/primary.ctx`]);
    return `${dir}/primary.ctx`;
  }

  pcrRead(pcrs: readonly number[]): Map<number, Uint8Array> {
    return this.scratch((dir) => {
      this.run(["pcrread", "-Q", pcrSelection(pcrs), "-o", `${dir}/pcrs`]);
      const raw = readFileSync(`${dir}/pcrs`);
      const sorted = [...pcrs].sort((a, b) => a - b);
      return new Map(sorted.map((p, i) => [p, raw.subarray(i * SHA256, (i + 1) * SHA256)]));
    });
  }

  /**
   * Seals `secret` so that it unseals only while each PCR in `expected` has that value. The
   * object has no auth value of its own: only the PCR policy session can read it.
   */
  seal(secret: Uint8Array, expected: Map<number, Uint8Array>): SealedBlob {
    const pcrs = [...expected.keys()].sort((a, b) => a - b);
    return this.scratch((dir) => {
      const primary = this.primary(dir);
      writeFileSync(`${dir}/pcrs`, Buffer.concat(pcrs.map((p) => expected.get(p)!)));
      this.run(["createpolicy", "-Q", "--policy-pcr", "-l", pcrSelection(pcrs), "-f", `${dir}/pcrs`, "-L", `${dir}/policy`]);
      this.runLoading(["create", "-Q", "-C", primary, "-L", `${dir}/policy`, "-a", "fixedtpm|fixedparent", "-i", "-", "-u", `${dir}/pub`, "-r", `${dir}/priv`], secret);
      return { pub: readFileSync(`${dir}/pub`), priv: readFileSync(`${dir}/priv`) };
    });
  }

  /** Unseals under a PCR policy session; a TpmError with policyFailure when the PCRs moved. */
  unseal(blob: SealedBlob, pcrs: readonly number[]): Buffer {
    return this.scratch((dir) => {
      const primary = this.primary(dir);
      writeFileSync(`${dir}/pub`, blob.pub);
      writeFileSync(`${dir}/priv`, blob.priv);
      this.runLoading(["load", "-Q", "-C", primary, "-u", `${dir}/pub`, "-r", `${dir}/priv`, "-c", `${dir}/seal.ctx`]);
      this.run(["startauthsession", "-Q", "--policy-session", "-S", `${dir}/session.ctx`]);
      try {
        this.run(["policypcr", "-Q", "-S", `${dir}/session.ctx`, "-l", pcrSelection(pcrs)]);
        return this.runLoading(["unseal", "-c", `${dir}/seal.ctx`, "-p", `session:${dir}/session.ctx`]);
      } finally {
        try {
          this.run(["flushcontext", `${dir}/session.ctx`]);
        } catch {
          // the session is gone with the failed command; nothing to flush
        }
      }
    });
  }

  /** Extends `pcr` with a digest of `data`. */
  extend(pcr: number, digest: Uint8Array): void {
    this.run(["pcrextend", `${pcr}:sha256=${Buffer.from(digest).toString("hex")}`]);
  }
}
