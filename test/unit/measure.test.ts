// The UKI's PCR signature (.pcrsig): over exactly the sections in the image, refused for a key
// that does not match .pcrpkey, and with an encrypted key's passphrase never in any child's argv.
// That it is byte for byte what systemd-measure sign writes needs a swtpm:
// test/system/measure.test.ts.
import { execFileSync } from "node:child_process";
import { constants, createPublicKey, verify } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it, vi } from "vitest";
import { signedPcrPolicy } from "../../agent/diskkey/policy.ts";
import { expectedPcr11, type MeasuredParts, pcrSignature, SYSTEMD_MEASURE } from "../../initrd/measure.ts";
import { readPe } from "../../initrd/pe.ts";
import { buildUkiFrom } from "../../initrd/uki.ts";
import { measuredParts } from "../measured-parts.ts";

// Every child process started through node:child_process in this file, with its argv and env.
const spawned = vi.hoisted(() => [] as { file: string; args: string[]; env: Record<string, string | undefined> }[]);
vi.mock("node:child_process", async (importOriginal) => {
  const real = await importOriginal<typeof import("node:child_process")>();
  const record =
    <F extends (...a: never[]) => unknown>(fn: F): F =>
    ((file: string, args?: unknown, opts?: unknown) => {
      const argv = Array.isArray(args) ? (args as string[]) : [];
      const o = (Array.isArray(args) ? opts : args) as { env?: Record<string, string | undefined> } | undefined;
      spawned.push({ file, args: [...argv], env: { ...(o?.env ?? process.env) } });
      return (fn as unknown as (...a: unknown[]) => unknown)(file, args, opts);
    }) as unknown as F;
  const wrapped = {
    execFileSync: record(real.execFileSync),
    execFile: record(real.execFile),
    spawnSync: record(real.spawnSync),
    spawn: record(real.spawn),
    execSync: record(real.execSync),
    exec: record(real.exec),
  };
  return { ...real, ...wrapped, default: { ...real, ...wrapped } };
});

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-measure-`);
const PASS = "pcr-Passphrase-4c1f9e";
const SB_PASS = "sb-Passphrase-77a0d3";

const openssl = (...args: string[]) => execFileSync("openssl", args, { stdio: ["ignore", "pipe", "pipe"] });

// Keys: the PCR key, the same key encrypted (passphrase PASS), and an unrelated key.
openssl("genrsa", "-out", `${dir}/pcr.key`, "2048");
openssl("pkey", "-in", `${dir}/pcr.key`, "-pubout", "-out", `${dir}/pcr.pub.pem`);
openssl("pkey", "-in", `${dir}/pcr.key`, "-aes-256-cbc", "-passout", `pass:${PASS}`, "-out", `${dir}/pcr-enc.key`);
openssl("genrsa", "-out", `${dir}/other.key`, "2048");

const parts = measuredParts(dir);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The stub measures VirtualSize bytes of each section: those, read back from the image. */
function sectionsOf(uki: string): Map<string, Buffer> {
  const pe = readPe(readFileSync(uki));
  const out = new Map<string, Buffer>();
  for (const s of pe.sections) {
    if (![".linux", ".initrd", ".cmdline", ".osrel", ".pcrpkey", ".pcrsig"].includes(s.name)) continue;
    const f = `${dir}/section${s.name}`;
    execFileSync("objcopy", ["-O", "binary", `--only-section=${s.name}`, uki, f]);
    const data = readFileSync(f);
    expect(data.length, s.name).toBeGreaterThanOrEqual(s.virtualSize);
    out.set(s.name, data.subarray(0, s.virtualSize));
  }
  return out;
}

describe("PCR signature", () => {
  it("signs another value for other sections", () => {
    const a = JSON.parse(pcrSignature(parts, `${dir}/pcr.key`)).sha256[0];
    writeFileSync(`${dir}/cmdline2`, "console=ttyS0 rw init=/bin/sh\0");
    const b = JSON.parse(pcrSignature({ ...parts, cmdline: `${dir}/cmdline2` }, `${dir}/pcr.key`)).sha256[0];
    expect(b.pkfp).toBe(a.pkfp);
    expect(b.pol).not.toBe(a.pol);
  });

  it("refuses a key that does not match the embedded public key, in one line", () => {
    expect(() => pcrSignature(parts, `${dir}/other.key`)).toThrow(/^PCR key \S+other\.key does not match the public key \S+ embedded as \.pcrpkey: refusing to sign$/);
  });
});

describe("UKI with .pcrsig", () => {
  const kernelJson = `${dir}/kernel.json`;
  writeFileSync(kernelJson, JSON.stringify({ package: "test", release: "6.1.0-test", vmlinuz: parts.linux, root: dir }));
  const uki = (out: string, extra: string[], env: Record<string, string> = {}) =>
    execFileSync(BUN, ["initrd/build.ts", "uki", "--kernel", kernelJson, "--initrd", parts.initrd, "--cmdline", "console=ttyS0 rw", ...extra, "--out", out], {
      env: { ...process.env, ...env },
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });

  it("carries a signature over exactly its own measured sections (build.ts uki --pcr-key)", () => {
    uki(`${dir}/signed.efi`, ["--pcrpkey", parts.pcrpkey, "--pcr-key", `${dir}/pcr.key`]);
    const s = sectionsOf(`${dir}/signed.efi`);
    expect([...s.keys()].sort()).toEqual([".cmdline", ".initrd", ".linux", ".osrel", ".pcrpkey", ".pcrsig"]);
    // What the stub measures, taken back out of the image.
    for (const name of [".linux", ".initrd", ".cmdline", ".osrel", ".pcrpkey"]) writeFileSync(`${dir}/x${name}`, s.get(name)!);
    const fromImage: MeasuredParts = { linux: `${dir}/x.linux`, initrd: `${dir}/x.initrd`, cmdline: `${dir}/x.cmdline`, osrel: `${dir}/x.osrel`, pcrpkey: `${dir}/x.pcrpkey` };
    const pcr = expectedPcr11(fromImage);
    const calc = execFileSync(SYSTEMD_MEASURE, ["calculate", `--linux=${fromImage.linux}`, `--initrd=${fromImage.initrd}`, `--cmdline=${fromImage.cmdline}`, `--osrel=${fromImage.osrel}`, `--pcrpkey=${fromImage.pcrpkey}`, "--bank=sha256", "--phase=enter-initrd"], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
    expect(calc).toContain(`11:sha256=${Buffer.from(pcr).toString("hex")}`);

    const sig = JSON.parse(s.get(".pcrsig")!.toString("utf8")) as { sha256: { pcrs: number[]; pkfp: string; pol: string; sig: string }[] };
    const entry = sig.sha256[0]!;
    const pol = signedPcrPolicy([11], new Map([[11, pcr]]));
    expect(entry.pol).toBe(Buffer.from(pol).toString("hex"));
    const pub = createPublicKey(s.get(".pcrpkey")!);
    expect(verify("sha256", pol, { key: pub, padding: constants.RSA_PKCS1_PADDING }, Buffer.from(entry.sig, "base64"))).toBe(true);
    expect(readFileSync(parts.pcrpkey)).toEqual(s.get(".pcrpkey"));
    // The signature is the one for these sections and nothing else.
    expect(s.get(".pcrsig")!.toString("utf8")).toBe(pcrSignature(fromImage, `${dir}/pcr.key`));
  });

  it("has no .pcrsig without --pcr-key (it can never unseal), .pcrpkey only when asked", () => {
    uki(`${dir}/pkey-only.efi`, ["--pcrpkey", parts.pcrpkey]);
    uki(`${dir}/plain.efi`, []);
    expect([...sectionsOf(`${dir}/pkey-only.efi`).keys()].sort()).toEqual([".cmdline", ".initrd", ".linux", ".osrel", ".pcrpkey"]);
    expect([...sectionsOf(`${dir}/plain.efi`).keys()].sort()).toEqual([".cmdline", ".initrd", ".linux", ".osrel"]);
  });

  const signPcr = (uki: string, out: string, key = `${dir}/pcr.key`, env: Record<string, string> = {}) =>
    execFileSync(BUN, ["initrd/build.ts", "sign-pcr", "--uki", uki, "--pcr-key", key, "--out", out], {
      env: { ...process.env, ...env },
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });

  it("builds the same bytes twice (objcopy's timestamp is reset, issue #15: the signing machine compares)", () => {
    uki(`${dir}/twice-1.efi`, ["--pcrpkey", parts.pcrpkey]);
    // objcopy wrote the time in seconds: make sure a second has passed.
    execFileSync("sleep", ["1.1"]);
    uki(`${dir}/twice-2.efi`, ["--pcrpkey", parts.pcrpkey]);
    expect(readFileSync(`${dir}/twice-2.efi`).equals(readFileSync(`${dir}/twice-1.efi`))).toBe(true);
  });

  it("sign-pcr adds to a built UKI byte for byte the .pcrsig uki --pcr-key would have built in (make sign)", () => {
    uki(`${dir}/late.unsigned.efi`, ["--pcrpkey", parts.pcrpkey]);
    uki(`${dir}/early.efi`, ["--pcrpkey", parts.pcrpkey, "--pcr-key", `${dir}/pcr.key`]);
    signPcr(`${dir}/late.unsigned.efi`, `${dir}/late.efi`);
    expect(readFileSync(`${dir}/late.efi`).equals(readFileSync(`${dir}/early.efi`))).toBe(true);
    // The encrypted copy of the key, its passphrase from PCR_KEY_PASS (the default variable).
    signPcr(`${dir}/late.unsigned.efi`, `${dir}/late-enc.efi`, `${dir}/pcr-enc.key`, { PCR_KEY_PASS: PASS });
    expect(readFileSync(`${dir}/late-enc.efi`).equals(readFileSync(`${dir}/early.efi`))).toBe(true);
  });

  it("sign-pcr refuses, in one line: a UKI with .pcrsig, one without .pcrpkey, an Authenticode-signed one, another key", () => {
    uki(`${dir}/r-signed.efi`, ["--pcrpkey", parts.pcrpkey, "--pcr-key", `${dir}/pcr.key`]);
    uki(`${dir}/r-nopkey.efi`, []);
    uki(`${dir}/r-unsigned.efi`, ["--pcrpkey", parts.pcrpkey]);
    execFileSync("bash", ["-c", 'sbsign --key <(openssl pkey -in "$1" -passin pass:snakeoil) --cert "$2" --output "$3" "$4"', "-", "/usr/share/ovmf/PkKek-1-snakeoil.key", "/usr/share/ovmf/PkKek-1-snakeoil.pem", `${dir}/r-sb.efi`, `${dir}/r-unsigned.efi`], { stdio: "ignore" });
    const why = (uki: string, key?: string) => {
      try {
        signPcr(uki, `${dir}/r-out.efi`, key);
      } catch (e) {
        return String((e as { stderr?: string }).stderr).trim();
      }
      return "signed";
    };
    expect(why(`${dir}/r-signed.efi`)).toMatch(/^build sign-pcr: \S+r-signed\.efi already has a \.pcrsig$/);
    expect(why(`${dir}/r-nopkey.efi`)).toMatch(/^build sign-pcr: \S+r-nopkey\.efi has no \.pcrpkey section \(built without --pcrpkey: it can never unseal\)$/);
    expect(why(`${dir}/r-sb.efi`)).toMatch(/^build sign-pcr: \S+r-sb\.efi is already Authenticode-signed: give the unsigned UKI$/);
    expect(why(`${dir}/r-unsigned.efi`, `${dir}/other.key`)).toMatch(/^build sign-pcr: PCR key \S+other\.key does not match the public key \S+ embedded as \.pcrpkey: refusing to sign$/);
    expect(why(`${dir}/missing.efi`)).toMatch(/^build sign-pcr: --uki \S+missing\.efi does not exist$/);
  });

  it("refuses --pcr-key without --pcrpkey, and a private key as --pcrpkey", () => {
    expect(() => uki(`${dir}/bad.efi`, ["--pcr-key", `${dir}/pcr.key`])).toThrow(/needs the public key embedded too/);
    expect(() => uki(`${dir}/bad.efi`, ["--pcrpkey", `${dir}/pcr.key`])).toThrow(/holds a private key/);
  });
});

describe("encrypted PCR key", () => {
  it("signs with the passphrase from the environment; no child gets the passphrase", () => {
    const plain = pcrSignature(parts, `${dir}/pcr.key`);
    process.env.INITOS_TEST_PCR_PASS = PASS;
    try {
      spawned.length = 0;
      writeFileSync(`${dir}/osrel-c`, 'NAME="initos"\n');
      mkdirSync(`${dir}/work-c`, { recursive: true });
      buildUkiFrom(`${dir}/enc.efi`, { ...parts, osrel: `${dir}/osrel-c`, pcrKey: { path: `${dir}/pcr-enc.key`, passphraseEnv: "INITOS_TEST_PCR_PASS" } }, `${dir}/work-c`);
      const viaEnc = pcrSignature(parts, `${dir}/pcr-enc.key`, "INITOS_TEST_PCR_PASS");
      // RSASSA-PKCS1-v1.5 is deterministic: the same key signs the same bytes.
      expect(viaEnc).toBe(plain);
      expect(spawned.map((c) => c.file)).toEqual(expect.arrayContaining([SYSTEMD_MEASURE, "objcopy"]));
      for (const c of spawned) {
        expect(c.args.join(" "), c.file).not.toContain(PASS);
        expect(Object.values(c.env).join("\n"), `${c.file}'s environment`).not.toContain(PASS);
      }
    } finally {
      delete process.env.INITOS_TEST_PCR_PASS;
    }
    expect(() => pcrSignature(parts, `${dir}/pcr-enc.key`, "INITOS_TEST_PCR_PASS")).toThrow(/is encrypted: put its passphrase in the environment variable INITOS_TEST_PCR_PASS/);
    process.env.INITOS_TEST_PCR_PASS = "wrong";
    try {
      expect(() => pcrSignature(parts, `${dir}/pcr-enc.key`, "INITOS_TEST_PCR_PASS")).toThrow(/cannot decrypt it with the passphrase in \$INITOS_TEST_PCR_PASS/);
    } finally {
      delete process.env.INITOS_TEST_PCR_PASS;
    }
  });

  it("works through build.ts uki with PCR_KEY_PASS in the environment", () => {
    const kernelJson = `${dir}/kernel.json`;
    execFileSync(BUN, ["initrd/build.ts", "uki", "--kernel", kernelJson, "--initrd", parts.initrd, "--cmdline", "console=ttyS0 rw", "--pcrpkey", parts.pcrpkey, "--pcr-key", `${dir}/pcr-enc.key`, "--out", `${dir}/enc-cli.efi`], {
      env: { ...process.env, PCR_KEY_PASS: PASS },
      stdio: ["ignore", "pipe", "pipe"],
    });
    execFileSync(BUN, ["initrd/build.ts", "uki", "--kernel", kernelJson, "--initrd", parts.initrd, "--cmdline", "console=ttyS0 rw", "--pcrpkey", parts.pcrpkey, "--pcr-key", `${dir}/pcr.key`, "--out", `${dir}/plain-cli.efi`], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    expect(sectionsOf(`${dir}/enc-cli.efi`).get(".pcrsig")).toEqual(sectionsOf(`${dir}/plain-cli.efi`).get(".pcrsig"));
  });

  it("the Makefile puts no passphrase on any command line (make -n, passphrases in the environment)", () => {
    openssl("pkey", "-in", `${dir}/pcr.key`, "-aes-256-cbc", "-passout", `pass:${SB_PASS}`, "-out", `${dir}/sb-enc.key`);
    const b = `${dir}/make-build`;
    const plan = execFileSync("make", ["-n", `B=${b}`, `${b}/target.efi`, `${b}/installer.efi`, `${b}/initos.efi`], {
      env: { ...process.env, PCR_KEY: `${dir}/pcr-enc.key`, PCR_KEY_PASS: PASS, SB_KEY: `${dir}/sb-enc.key`, SB_CERT: "/usr/share/ovmf/PkKek-1-snakeoil.pem", SB_KEY_PASS: SB_PASS },
      encoding: "utf8",
    });
    expect(plan).not.toContain(PASS);
    expect(plan).not.toContain(SB_PASS);
    expect(plan).not.toContain("pass:");
    // The production UKI is signed with the user's key, the test UKI with the snakeoil key only.
    expect(plan).toMatch(new RegExp(`openssl pkey -in ${dir}/sb-enc.key -passin env:SB_KEY_PASS.*--output ${b}/target\\.efi`));
    expect(plan).toMatch(new RegExp(`openssl pkey -in ${dir}/sb-enc.key -passin env:SB_KEY_PASS.*--output ${b}/installer\\.efi`));
    expect(plan).toMatch(new RegExp(`openssl pkey -in /usr/share/ovmf/PkKek-1-snakeoil.key -passin env:TEST_SB_KEY_PASS.*--output ${b}/initos\\.efi`));
    // Only target.efi's PCR 11 is signed, at signing time; the PCR key's passphrase is named, not given.
    expect(plan).toMatch(new RegExp(`uki .*--pcrpkey ${b}/keys/pcr.pub.pem --out ${b}/target\\.unsigned\\.efi`));
    expect(plan).toMatch(new RegExp(`sign-pcr --pcr-key ${dir}/pcr-enc.key --pcr-key-pass-env PCR_KEY_PASS --uki ${b}/target\\.unsigned\\.efi --out ${b}/target\\.efi\\.pcrsigned`));
    expect(plan).toMatch(new RegExp(`--output ${b}/target\\.efi ${b}/target\\.efi\\.pcrsigned`));
    expect(plan).not.toMatch(/ uki .*--pcr-key /);
    expect(plan).toMatch(new RegExp(`uki .*--pcrpkey ${b}/keys/pcr.pub.pem --out ${b}/installer\\.unsigned\\.efi`));
    expect(plan).toMatch(new RegExp(`uki .*--pcrpkey ${b}/keys/pcr.pub.pem --out ${b}/initos\\.unsigned\\.efi`));
  });
});
