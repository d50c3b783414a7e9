// The decisions of checkUpdate (agent/update/verify.ts) with a fake machine: which update is
// refused, with which one line, and that the cheap checks come before the slow ones (sbverify,
// verity) so a wrong bundle never gets that far. The UKI is a synthetic PE with real zstd
// frames (update-fixture.ts); sbverify and verity are the fake's (their real behaviour is in
// test/system/update-check.test.ts).
import { describe, expect, it } from "vitest";
import { AgentConfigSchema, type AgentConfig } from "../../agent/config.ts";
import { type Manifest, UKI_PATH } from "../../agent/update/manifest.ts";
import { checkUpdate, imagePaths, type UpdateCheck, UpdateRefused } from "../../agent/update/verify.ts";
import { toolArgv } from "../../agent/sys/tools.ts";
import { FakeSys, silentLog } from "./fakesys.ts";
import { cliUnzstd, configJson, HASH_MODULES, HASH_TOOLS, PEM_A, PEM_B, ukiWith } from "./update-fixture.ts";

const TMP = "/run/initos/update";
const SHA = "0".repeat(64);

const files = (paths: readonly string[]) => new Map(paths.map((p) => [p, `${TMP}/${p.replaceAll("/", "_")}.tmp`]));
const ALL = [UKI_PATH, "initos/modules.sqfs", "initos/modules.verity", "initos/tools.sqfs", "initos/tools.verity"];

function manifest(version: number, paths: readonly string[] = ALL): Manifest {
  return { format: 1, version, files: paths.map((path) => ({ path, size: 1, sha256: SHA })) };
}

function running(version: number, signers: string[] = [PEM_B, PEM_A]): AgentConfig {
  return AgentConfigSchema.parse({ version, update: { signers } });
}

/** A fake machine holding the update's temp files, whose sbverify accepts only `signedBy`'s certificate. */
function machine(uki: Buffer, signedBy: string | null = PEM_A, paths: readonly string[] = ALL): FakeSys {
  const sys = new FakeSys();
  for (const [p, tmp] of files(paths)) sys.add(tmp, { kind: "file", data: p === UKI_PATH ? uki.toString("latin1") : `data of ${p}` });
  sys.onRunWithInput = (argv) => {
    const cert = argv[argv.indexOf("--cert") + 1]!;
    // As Sys.runWithInput reports a failed tool: its argv, then stderr's last line.
    // sbverify 0.9.4 warns on stderr about every UKI; "Signature verification failed" goes to stdout.
    if (sys.readFile(cert) !== signedBy) throw new Error(`${argv.join(" ")}: warning: data remaining[62545576 vs 62558224]: gaps between PE/COFF sections?`);
  };
  return sys;
}

function check(sys: FakeSys, over: Partial<UpdateCheck> & { version?: number } = {}) {
  const log = silentLog();
  const u: UpdateCheck = { manifest: manifest(over.version ?? 5), files: files(ALL), running: running(4), force: false, tmpDir: TMP, sbverify: ["/usr/bin/sbverify"], unzstd: cliUnzstd, ...over };
  return { log, done: checkUpdate(sys, log, u) };
}

/** The one-line refusal checkUpdate rejects with. */
async function refused(p: Promise<unknown>): Promise<string> {
  const e = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(e).toBeInstanceOf(UpdateRefused);
  const m = (e as Error).message;
  expect(m).not.toContain("\n");
  expect(m).toMatch(/^update: /);
  return m;
}

const called = (sys: FakeSys, what: string) => sys.calls.filter((c) => c.startsWith(what));

describe("checkUpdate: an acceptable update", () => {
  it("checks the config, then the signature, then each image against the NEW config's root hashes and pinned parameters", async () => {
    const sys = machine(ukiWith(configJson(5), { cmdline: "console=ttyS0" }));
    const { log, done } = check(sys);
    const r = await done;
    expect(r).toMatchObject({ version: 5, cmdline: "console=ttyS0", signer: 1, images: ["modules", "tools"] });
    expect(r.config.update.signers).toEqual([PEM_A]);
    const t = files(ALL);
    // Cheap first: the UKI's config, then sbverify once per signer until one accepts (each
    // certificate written for it and removed after), then verity.
    expect(sys.calls).toEqual([
      `openReader ${t.get(UKI_PATH)}`,
      `writeFile ${TMP}/signer-0.pem`,
      `runWithInput /usr/bin/sbverify --cert ${TMP}/signer-0.pem ${t.get(UKI_PATH)}`,
      `unlink ${TMP}/signer-0.pem`,
      `writeFile ${TMP}/signer-1.pem`,
      `runWithInput /usr/bin/sbverify --cert ${TMP}/signer-1.pem ${t.get(UKI_PATH)}`,
      `unlink ${TMP}/signer-1.pem`,
      `verityVerify ${t.get("initos/modules.sqfs")} ${t.get("initos/modules.verity")} ${HASH_MODULES.slice(0, 8)}`,
      `verityVerify ${t.get("initos/tools.sqfs")} ${t.get("initos/tools.verity")} ${HASH_TOOLS.slice(0, 8)}`,
    ]);
    expect(sys.verityPinned.get(t.get("initos/tools.sqfs")!)).toMatchObject({ dataBlocks: 50 });
    expect(sys.exists(`${TMP}/signer-1.pem`)).toBe(false);
    expect(log.lines).toEqual(["debug: update: signer 1: warning: data remaining[62545576 vs 62558224]: gaps between PE/COFF sections?", "info: update: version 5 checked: UKI signed by signer 2 of 2, images modules, tools match their root hashes"]);
  });

  it("runs the verified tools image's sbverify unless told otherwise", async () => {
    const sys = machine(ukiWith(configJson(5)));
    await check(sys, { sbverify: undefined, running: running(4, [PEM_A]) }).done;
    expect(called(sys, "runWithInput")).toEqual([`runWithInput ${[...toolArgv("sbverify"), "--cert", `${TMP}/signer-0.pem`, files(ALL).get(UKI_PATH)].join(" ")}`]);
  });

  it("--force installs an older or equal version, with a warning line", async () => {
    for (const v of [3, 4]) {
      const sys = machine(ukiWith(configJson(v)));
      const { log, done } = check(sys, { version: v, force: true });
      await expect(done).resolves.toMatchObject({ version: v });
      expect(log.lines).toContain(`warn: update: --force: installing version ${v} over 4`);
    }
  });

  it("a UKI without images needs only the UKI; a new config that trusts no signer is warned about", async () => {
    const sys = machine(ukiWith(configJson(5, { images: [], update: { signers: [] } })), PEM_A, [UKI_PATH]);
    const { log, done } = check(sys, { manifest: manifest(5, [UKI_PATH]), files: files([UKI_PATH]) });
    await expect(done).resolves.toMatchObject({ images: [] });
    expect(called(sys, "verityVerify")).toEqual([]);
    expect(log.lines).toContain("warn: update: version 5 trusts no update signer: it can never be updated over ssh");
  });
});

describe("checkUpdate: refusals, one line each, cheap checks before slow ones", () => {
  it("a machine that trusts no signer refuses before reading anything", async () => {
    const sys = machine(ukiWith(configJson(5)));
    expect(await refused(check(sys, { running: running(4, []) }).done)).toBe("update: this machine trusts no update signer (update.signers is empty in its signed config)");
    expect(sys.calls).toEqual([]);
  });

  it("a listed file not received, a received file not listed", async () => {
    const sys = machine(ukiWith(configJson(5)));
    expect(await refused(check(sys, { files: files(ALL.slice(0, 3)) }).done)).toBe("update: initos/tools.sqfs, initos/tools.verity: listed in the manifest but not received");
    expect(await refused(check(sys, { files: files([...ALL, "initos/extra.sqfs"]) }).done)).toBe("update: initos/extra.sqfs: received but not listed in the manifest");
    expect(sys.calls).toEqual([]);
  });

  it("a UKI that is no UKI: refused naming it, before sbverify ever reads it", async () => {
    const sys = machine(Buffer.from("MZ but nothing else of a PE image".padEnd(200, ".")));
    // e_lfanew is "....": far past the end
    expect(await refused(check(sys).done)).toBe(`update: ${UKI_PATH}: truncated: the PE header (offset ${0x2e2e2e2e}, 24 bytes) runs past the end of the file (200 bytes)`);
    expect(called(sys, "runWithInput")).toEqual([]);
  });

  it("a UKI whose config is invalid", async () => {
    const sys = machine(ukiWith(configJson(5, { rootWaitSeconds: -1 })));
    expect(await refused(check(sys).done)).toBe(`update: ${UKI_PATH}: config: /etc/initos/config.json: rootWaitSeconds: Too small: expected number to be >=0`);
  });

  it("the manifest's version is not the UKI's", async () => {
    const sys = machine(ukiWith(configJson(6)));
    expect(await refused(check(sys, { version: 5 }).done)).toBe("update: the manifest says version 5, the UKI's signed config says 6");
    expect(called(sys, "runWithInput")).toEqual([]);
  });

  it("an older or the same version, without --force: refused before the signature is checked", async () => {
    for (const v of [3, 4]) {
      const sys = machine(ukiWith(configJson(v)));
      const { log, done } = check(sys, { version: v });
      expect(await refused(done)).toBe(`update: version ${v} is not newer than the running version 4 (an admin may install it with --force)`);
      expect(called(sys, "runWithInput")).toEqual([]);
      expect(log.lines).toEqual([]);
    }
  });

  it("another host's build (the fleet's signer signs it too), and a manifest that names another host than its UKI", async () => {
    const sys = machine(ukiWith(configJson(5, { hostname: "web-2" })));
    const here = AgentConfigSchema.parse({ version: 4, hostname: "web-1", update: { signers: [PEM_A] } });
    expect(await refused(check(sys, { running: here }).done)).toBe("update: the UKI is built for host web-2, this machine is web-1 (an admin may install it with --force)");
    expect(await refused(check(sys, { running: running(4) }).done)).toBe("update: the UKI is built for host web-2, this machine is (none) (an admin may install it with --force)");
    expect(await refused(check(sys, { running: here, manifest: { ...manifest(5), host: "web-1" } }).done)).toBe("update: the manifest says host web-1, the UKI's signed config says web-2");
    expect(called(sys, "runWithInput")).toEqual([]);
    const { log, done } = check(sys, { running: here, force: true });
    await expect(done).resolves.toMatchObject({ version: 5 });
    expect(log.lines).toContain("warn: update: --force: installing host web-2's build on web-1");
    // The same host: no question asked.
    const same = machine(ukiWith(configJson(5, { hostname: "web-1" })));
    await expect(check(same, { running: here, manifest: { ...manifest(5), host: "web-1" } }).done).resolves.toMatchObject({ version: 5 });
  });

  it("the manifest lists fewer images than the new config has, or more", async () => {
    const fewer = [UKI_PATH, "initos/modules.sqfs", "initos/modules.verity", "initos/tools.sqfs"];
    const sys = machine(ukiWith(configJson(5)), PEM_A, fewer);
    expect(await refused(check(sys, { manifest: manifest(5, fewer), files: files(fewer) }).done)).toBe("update: the new config's images need initos/tools.verity, which the manifest does not list");
    const more = [...ALL, "initos/sidecar.sqfs", "initos/sidecar.verity"];
    const sys2 = machine(ukiWith(configJson(5)), PEM_A, more);
    expect(await refused(check(sys2, { manifest: manifest(5, more), files: files(more) }).done)).toBe("update: the manifest lists initos/sidecar.sqfs, initos/sidecar.verity, which is no image of the new config");
    // A config keeping its images elsewhere than the bundle's initos/ cannot be matched.
    const elsewhere = machine(ukiWith(configJson(5, { esp: { dir: "boot" } })));
    expect(await refused(check(elsewhere).done)).toBe("update: the new config's images need boot/modules.sqfs, boot/modules.verity, boot/tools.sqfs and 1 more, which the manifest does not list");
    for (const s of [sys, sys2, elsewhere]) expect(called(s, "runWithInput")).toEqual([]);
  });

  it("a UKI no trusted signer signed: every signer tried, certificates removed, no image read", async () => {
    const sys = machine(ukiWith(configJson(5)), "-----BEGIN CERTIFICATE-----\nT1RIRVI=\n-----END CERTIFICATE-----\n");
    expect(await refused(check(sys).done)).toBe("update: the UKI is not signed by a signer this machine trusts");
    expect(called(sys, "runWithInput")).toHaveLength(2);
    expect(called(sys, "unlink")).toEqual([`unlink ${TMP}/signer-0.pem`, `unlink ${TMP}/signer-1.pem`]);
    expect(called(sys, "verityVerify")).toEqual([]);
  });

  it("what sbverify said beyond its warning is shown: an altered UKI", async () => {
    const sys = machine(ukiWith(configJson(5)));
    sys.onRunWithInput = (argv) => {
      throw new Error(`${argv.join(" ")}: Image fails hash check`);
    };
    expect(await refused(check(sys).done)).toBe("update: the UKI is not signed by a signer this machine trusts (sbverify: Image fails hash check)");
  });

  it("an sbverify that does not run says so (not a bad signature alone)", async () => {
    const sys = machine(ukiWith(configJson(5)));
    sys.onRunWithInput = () => {
      throw new Error("/run/initos/images/tools/usr/lib64/ld-linux-x86-64.so.2: spawn /run/initos/images/tools/usr/lib64/ld-linux-x86-64.so.2 ENOENT");
    };
    expect(await refused(check(sys).done)).toMatch(/^update: the UKI is not signed by a signer this machine trusts \(sbverify: .*ENOENT\)$/);
  });

  it("an image that does not match the new config's root hash: named, the other images not read after it", async () => {
    const sys = machine(ukiWith(configJson(5)));
    const t = files(ALL);
    sys.verityFailures.set(t.get("initos/modules.sqfs")!, new Error("Verification of data area failed."));
    expect(await refused(check(sys).done)).toBe("update: initos/modules.sqfs: does not match the root hash in the new UKI's config (Verification of data area failed.)");
    expect(called(sys, "verityVerify")).toHaveLength(1);
  });
});

describe("imagePaths", () => {
  it("names each image's data and hash files under the config's ESP directory", () => {
    expect(imagePaths(AgentConfigSchema.parse(JSON.parse(configJson(1))))).toEqual(ALL.slice(1));
  });
});
