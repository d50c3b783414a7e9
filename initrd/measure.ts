// The UKI's .pcrsig section: the PCR 11 policy of the `enter-initrd` phase, signed with the PCR
// key, in systemd's format. systemd-stub hands it to the initrd as
// /.extra/tpm2-pcr-signature.json; a key sealed with PolicyAuthorize to the PCR key's public
// half unseals only where PCR 11 holds a value that key signed.
//
// The expected PCR 11 value comes from `systemd-measure calculate`: the measurement code of the
// stub's own vendor, not a copy of it. The signature is made here with node:crypto, so the key
// is read from its file and decrypted in this process: a passphrase only ever arrives through
// the environment, and no child process sees it (not in argv, not in its environment).
//
// Only the enter-initrd phase is signed: once the initrd extends PCR 11 with "leave-initrd", no
// signed policy matches and the key cannot be unsealed any more (systemd-measure sign without
// --phase would also sign the later phases).
import { execFileSync } from "node:child_process";
import { constants, createPrivateKey, createPublicKey, type KeyObject, sign } from "node:crypto";
import { readFileSync } from "node:fs";
import { keyFingerprint, signedPcrPolicy } from "../agent/diskkey/policy.ts";

export const SYSTEMD_MEASURE = "/lib/systemd/systemd-measure";
/** The PCR systemd-stub measures the UKI's sections into. */
export const UKI_PCR = 11;
export const PHASE = "enter-initrd";

/** The measured sections of a UKI, as files: exactly what goes into the image. */
export interface MeasuredParts {
  linux: string;
  initrd: string;
  /** The .cmdline section's file, as it is in the UKI (with its trailing NUL, if any). */
  cmdline: string;
  osrel: string;
  pcrpkey: string;
}

/** The systemd-measure options naming each section's file. */
function sectionArgs(p: MeasuredParts): string[] {
  return [`--linux=${p.linux}`, `--initrd=${p.initrd}`, `--cmdline=${p.cmdline}`, `--osrel=${p.osrel}`, `--pcrpkey=${p.pcrpkey}`];
}

/** The environment for children: this process's, minus the variable holding a passphrase. */
function childEnv(secretVar: string | undefined): NodeJS.ProcessEnv {
  const env = { ...process.env };
  if (secretVar) delete env[secretVar];
  return env;
}

/** PCR 11 after systemd-stub measured these sections and the initrd entered `phase`. */
export function expectedPcr11(parts: MeasuredParts, opts: { phase?: string; env?: NodeJS.ProcessEnv } = {}): Uint8Array {
  const phase = opts.phase ?? PHASE;
  const out = execFileSync(SYSTEMD_MEASURE, ["calculate", ...sectionArgs(parts), "--bank=sha256", `--phase=${phase}`, "--json=short"], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    env: opts.env ?? process.env,
  });
  const entries = (JSON.parse(out) as { sha256?: { phase?: string; pcr?: number; hash?: string }[] }).sha256 ?? [];
  const e = entries.find((x) => x.pcr === UKI_PCR && x.phase === phase);
  if (!e || !/^[0-9a-f]{64}$/.test(e.hash ?? "")) throw new Error(`systemd-measure calculate gave no sha256 PCR ${UKI_PCR} value for phase ${phase}: ${out.trim()}`);
  return new Uint8Array(Buffer.from(e.hash!, "hex"));
}

/** The PCR key, decrypted in this process with the passphrase from `passphraseEnvName`. */
export function readPcrKey(path: string, passphraseEnvName?: string): KeyObject {
  const pem = readFileSync(path);
  const passphrase = passphraseEnvName ? process.env[passphraseEnvName] : undefined;
  // PKCS#8 ("BEGIN ENCRYPTED PRIVATE KEY") or traditional ("Proc-Type: 4,ENCRYPTED").
  const encrypted = /-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED/.test(pem.toString("latin1"));
  if (encrypted && !passphrase) {
    throw new Error(`PCR key ${path} is encrypted: put its passphrase in the environment${passphraseEnvName ? ` variable ${passphraseEnvName}` : " (and name the variable)"}`);
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(encrypted ? { key: pem, format: "pem", passphrase } : { key: pem, format: "pem" });
  } catch (e) {
    if (encrypted) throw new Error(`PCR key ${path}: cannot decrypt it with the passphrase in $${passphraseEnvName} (${(e as Error).message})`);
    throw new Error(`PCR key ${path}: not a PEM private key (${(e as Error).message})`);
  }
  if (key.asymmetricKeyType !== "rsa") throw new Error(`PCR key ${path}: expected an RSA key, got ${key.asymmetricKeyType}`);
  return key;
}

/**
 * The .pcrsig JSON for a UKI made of `parts`, signed with the private key in
 * `privateKeyPemPath` (its passphrase, when encrypted, in the environment variable
 * `passphraseEnvName`). The key must be the one whose public half is `parts.pcrpkey`.
 */
export function pcrSignature(parts: MeasuredParts, privateKeyPemPath: string, passphraseEnvName?: string): string {
  const key = readPcrKey(privateKeyPemPath, passphraseEnvName);
  const embedded = createPublicKey(readFileSync(parts.pcrpkey));
  const fp = keyFingerprint(key);
  if (keyFingerprint(embedded) !== fp) {
    throw new Error(`PCR key ${privateKeyPemPath} does not match the public key ${parts.pcrpkey} embedded as .pcrpkey: refusing to sign`);
  }
  const pcr = expectedPcr11(parts, { env: childEnv(passphraseEnvName) });
  const pol = signedPcrPolicy([UKI_PCR], new Map([[UKI_PCR, pcr]]));
  // RSASSA-PKCS1-v1.5 over SHA-256 of the policy digest, as TPM2_VerifySignature checks it.
  const sig = sign("sha256", pol, { key, padding: constants.RSA_PKCS1_PADDING });
  return JSON.stringify({ sha256: [{ pcrs: [UKI_PCR], pkfp: fp, pol: Buffer.from(pol).toString("hex"), sig: sig.toString("base64") }] });
}
