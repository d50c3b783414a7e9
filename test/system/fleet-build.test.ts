// The build side of fleet updates (issue #15), through make as the README tells it: a host
// directory -> `make host` (unsigned, no private key read) -> `make sign` (PCR 11 signature and
// Authenticode, building nothing) -> `make bundle`; and the one-line refusals on the way. Uses
// what `make all` built (base and agent segments, images, kernel).
import { execFileSync, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { parseManifest, UKI_PATH } from "../../agent/update/manifest.ts";
import { bufferSource, streamOf } from "../../agent/oci/bytes.ts";
import { ukiConfig } from "../../initrd/bundle.ts";
import { peSection, readPe } from "../../initrd/pe.ts";
import { readTarStream } from "../../agent/oci/tar.ts";
import { cliUnzstd } from "../unit/update-fixture.ts";

const HOST = "fleet-test-1";
const VERSION = 42;
const dir = mkdtempSync(`${tmpdir()}/initos-fleet-`);
const HB = `build/hosts/${HOST}`;
afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
  rmSync(HB, { recursive: true, force: true });
  for (const h of ["fleet-test-bad", "fleet-test-nokeys", "fleet-test-none"]) rmSync(`build/hosts/${h}`, { recursive: true, force: true });
});

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");
const make = (...args: string[]) => spawnSync("make", ["--no-print-directory", `HOSTS_DIR=${dir}/hosts`, ...args], { encoding: "utf8" });
const ok = (...args: string[]) => {
  const r = make(...args);
  if (r.status !== 0) throw new Error(`make ${args.join(" ")}: ${r.stderr}`);
  return r.stdout;
};
const sections = (f: string) => readPe(readFileSync(f)).sections.map((s) => s.name);

mkdirSync(`${dir}/hosts/${HOST}`, { recursive: true });
writeFileSync(
  `${dir}/hosts/${HOST}/host.json`,
  JSON.stringify({ hostname: HOST, cmdline: ["initos.sidecar=1"], address: { ip: "10.0.2.15/24", gw: "10.0.2.2" }, update: { commit: "manual", healthSeconds: 30, trialSeconds: 300 } }),
);
writeFileSync(`${dir}/hosts/${HOST}/authorized_keys`, readFileSync("build/test-ssh/id_ed25519.pub"));

describe("make host, make sign, make bundle", () => {
  it("make host builds the host's config segment, initrd and unsigned UKI (.pcrpkey, no .pcrsig)", () => {
    const out = ok("host", `HOST=${HOST}`, `VERSION=${VERSION}`);
    for (const f of ["config.cpio.zst", `${HOST}.initrd`, `${HOST}.cmdline`, `${HOST}.unsigned.efi`]) expect(out, f).toContain(`${sha(`${HB}/${f}`)}  ${f}`);
    const target = readFileSync("build/target.cmdline", "utf8").trim();
    expect(readFileSync(`${HB}/${HOST}.cmdline`, "utf8")).toBe(`${target} initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 initos.sidecar=1\n`);
    const uki = `${HB}/${HOST}.unsigned.efi`;
    expect(sections(uki)).toContain(".pcrpkey");
    expect(sections(uki)).not.toContain(".pcrsig");
    expect(Buffer.from(peSection(readFileSync(uki), ".cmdline")!).toString()).toBe(`${target} initos.ip=10.0.2.15/24 initos.gw=10.0.2.2 initos.sidecar=1\0`);
    // The shared segments, then the host's: only the last one is the host's own.
    const shared = Buffer.concat([readFileSync("build/base.cpio.zst"), readFileSync("build/agent.cpio.zst")]);
    const initrd = readFileSync(`${HB}/${HOST}.initrd`);
    expect(initrd.subarray(0, shared.length).equals(shared)).toBe(true);
    expect(initrd.subarray(shared.length).equals(readFileSync(`${HB}/config.cpio.zst`))).toBe(true);

    const config = ukiConfig(uki, cliUnzstd);
    expect(config).toMatchObject({ version: VERSION, hostname: HOST, update: { commit: "manual", healthSeconds: 30, trialSeconds: 300 } });
    expect(config.ssh.authorizedKeys).toEqual([readFileSync("build/test-ssh/id_ed25519.pub", "utf8").trim()]);
    // The default signer: the db certificate that signs real UKIs (the snakeoil one here).
    expect(config.update.signers).toHaveLength(1);
    expect(config.update.signers[0]!.replace(/\s/g, "")).toBe(readFileSync("/usr/share/ovmf/PkKek-1-snakeoil.pem", "utf8").replace(/\s/g, ""));
    // Nothing changed: nothing rebuilt.
    const mtime = statSync(uki).mtimeMs;
    ok("host", `HOST=${HOST}`, `VERSION=${VERSION}`);
    expect(statSync(uki).mtimeMs).toBe(mtime);
  }, 300_000);

  it("make sign builds nothing: its plan is the signing loop alone", () => {
    const plan = ok("-n", "sign", `HOST=${HOST}`);
    expect(plan).toContain("sign-pcr");
    expect(plan).toContain("sbsign");
    for (const building of ["build.ts uki", "initrd-config", "initrd-base", "initrd-agent", "bun build", "zstd", "images"]) expect(plan, building).not.toContain(building);
  });

  it("make sign adds the PCR 11 signature and the Authenticode signature", () => {
    ok("sign", `HOST=${HOST}`);
    const signed = `${HB}/${HOST}.efi`;
    expect(sections(signed)).toContain(".pcrsig");
    expect(readPe(readFileSync(signed)).certificateTable.size).toBeGreaterThan(0);
    execFileSync("sbverify", ["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", signed], { stdio: "ignore" });
    // The signature is target.efi's kind: the same PCR key (fingerprint), the enter-initrd policy of PCR 11.
    const sig = (f: string) => JSON.parse(Buffer.from(peSection(readFileSync(f), ".pcrsig")!).toString()).sha256[0] as { pcrs: number[]; pkfp: string; pol: string };
    expect(sig(signed).pcrs).toEqual([11]);
    expect(sig(signed).pkfp).toBe(sig("build/target.efi").pkfp);
    expect(sig(signed).pol).not.toBe(sig("build/target.efi").pol);
    expect(existsSync(`${signed}.pcrsigned`)).toBe(false);
  }, 120_000);

  it("make bundle writes <host>-<version>.bundle: manifest, the signed UKI, the images of its config", async () => {
    ok("bundle", `HOST=${HOST}`, `VERSION=${VERSION}`);
    const bundle = `${HB}/${HOST}-${VERSION}.bundle`;
    const entries: { path: string; data: Buffer }[] = [];
    for await (const e of readTarStream(streamOf(bufferSource(readFileSync(bundle))), bundle)) {
      const chunks: Buffer[] = [];
      for await (const c of e.data) chunks.push(c);
      entries.push({ path: e.path, data: Buffer.concat(chunks) });
    }
    const m = parseManifest(entries[0]!.data.toString());
    if (typeof m === "string") throw new Error(m);
    expect(m.version).toBe(VERSION);
    expect(m.host).toBe(HOST);
    const want: Record<string, string> = {
      [UKI_PATH]: `${HB}/${HOST}.efi`,
      "initos/modules.sqfs": "build/images/modules.sqfs",
      "initos/modules.verity": "build/images/modules.verity",
      "initos/tools.sqfs": "build/images/tools.sqfs",
      "initos/tools.verity": "build/images/tools.verity",
    };
    expect(entries.slice(1).map((e) => e.path)).toEqual(Object.keys(want));
    for (const f of m.files) expect(f, f.path).toEqual({ path: f.path, size: statSync(want[f.path]!).size, sha256: sha(want[f.path]!) });
    for (const e of entries.slice(1)) expect(e.data.equals(readFileSync(want[e.path]!)), e.path).toBe(true);
    // Reproducible: again, the same bytes.
    const first = sha(bundle);
    ok("bundle", `HOST=${HOST}`, `VERSION=${VERSION}`);
    expect(sha(bundle)).toBe(first);
  }, 120_000);

  it("refuses with one line: another version than the UKI's, a host not built or not signed, a bad host.json", () => {
    const last = (r: { stderr: string }) => r.stderr.trim().split("\n").filter((l) => !/^make(\[\d+\])?: \*\*\*/.test(l)).at(-1);
    const wrong = make("bundle", `HOST=${HOST}`, `VERSION=${VERSION + 1}`);
    expect(wrong.status).not.toBe(0);
    expect(last(wrong)).toBe(`build bundle: ${HB}/${HOST}.efi carries version ${VERSION} in its signed config, not ${VERSION + 1}`);
    const unbuilt = make("sign", "HOST=fleet-test-none");
    expect(unbuilt.status).not.toBe(0);
    expect(last(unbuilt)).toBe("make sign: build/hosts/fleet-test-none/fleet-test-none.unsigned.efi is missing");
    const unsigned = make("bundle", "HOST=fleet-test-none", "VERSION=1");
    expect(last(unsigned)).toBe("make bundle: build/hosts/fleet-test-none/fleet-test-none.efi is missing (make sign HOST=fleet-test-none makes it)");
    // (Another B: naming another key rewrites B/keys/paths, which would re-sign the main build.)
    const nokey = make("sign", `B=${dir}/b`, `UKIS=${HB}/${HOST}.unsigned.efi`, `PCR_KEY=${dir}/no-such.key`);
    expect(last(nokey)).toBe(`make sign: ${dir}/no-such.key is missing`);
    mkdirSync(`${dir}/hosts/fleet-test-bad`);
    writeFileSync(`${dir}/hosts/fleet-test-bad/host.json`, JSON.stringify({ hostname: "bad", address: { ip: "10.0.2.15" } }));
    writeFileSync(`${dir}/hosts/fleet-test-bad/authorized_keys`, "");
    const bad = make("host", "HOST=fleet-test-bad", "VERSION=1");
    expect(bad.status).not.toBe(0);
    expect(bad.stderr).toContain(`build initrd-config: ${dir}/hosts/fleet-test-bad/host.json: address.ip: expected address/prefix, e.g. 192.168.1.10/24`);
    mkdirSync(`${dir}/hosts/fleet-test-nokeys`);
    writeFileSync(`${dir}/hosts/fleet-test-nokeys/host.json`, JSON.stringify({ hostname: "nokeys" }));
    expect(last(make("host", "HOST=fleet-test-nokeys", "VERSION=1"))).toBe(`make host: ${dir}/hosts/fleet-test-nokeys/authorized_keys is missing (see hosts/README.md)`);
    const none = make("host");
    expect(last(none)).toMatch(/^make host: say which: HOST=<name>/);
  }, 120_000);
});
