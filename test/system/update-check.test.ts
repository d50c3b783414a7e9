// The update checks (agent/update/) on what `make all` built, with the real tools: the config
// read from build/target.efi without decompressing the initrd, the real sbverify with the
// snakeoil db certificate (and another one, and a UKI with one byte flipped), and
// libcryptsetup's verity check of the build's images (and of one with a byte flipped).
// The timings printed here are the ones quoted in uki.ts and verify.ts (not asserted:
// benchmarks are not timed tests).
import { execFileSync, spawnSync } from "node:child_process";
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type AgentConfig, AgentConfigSchema } from "../../agent/config.ts";
import type { Sys } from "../../agent/sys/index.ts";
import { type Manifest, UKI_PATH } from "../../agent/update/manifest.ts";
import { type FrameDecompressor, parseNewc, readUkiConfig, ukiSections } from "../../agent/update/uki.ts";
import { checkUpdate, UpdateRefused } from "../../agent/update/verify.ts";
import { silentLog } from "../unit/fakesys.ts";
import { cliUnzstd } from "../unit/update-fixture.ts";

const UKI = "build/target.efi";
const SNAKEOIL = readFileSync("/usr/share/ovmf/PkKek-1-snakeoil.pem", "utf8");
const dir = mkdtempSync(`${tmpdir()}/initos-update-check-`);
let sys: Sys;
let other = "";

beforeAll(async () => {
  sys = await (await import("../../agent/sys/index.ts")).realSys();
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${dir}/other.key`, "-out", `${dir}/other.pem`, "-subj", "/CN=not the db key", "-days", "1"], { stdio: "ignore" });
  other = readFileSync(`${dir}/other.pem`, "utf8");
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** The config the build wrote into the config segment (build/config.cpio, uncompressed). */
function builtConfig(): AgentConfig {
  const entry = parseNewc(readFileSync("build/config.cpio")).find((e) => e.name === "etc/initos/config.json")!;
  return AgentConfigSchema.parse(JSON.parse(Buffer.from(entry.data).toString("utf8")));
}

/** A copy of `file` with the byte at `offset` inverted. */
function flipped(file: string, offset: number): string {
  const out = `${dir}/flipped-${file.split("/").pop()}`;
  copyFileSync(file, out);
  const fd = openSync(out, "r+");
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] = b[0]! ^ 0xff;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
  return out;
}

function ms(t0: number): string {
  return `${(performance.now() - t0).toFixed(1)} ms`;
}

describe("readUkiConfig on build/target.efi", () => {
  it("returns the config the build wrote and the embedded cmdline, decompressing only the config segment", () => {
    const given: number[] = [];
    const unzstd: FrameDecompressor = (f, max) => (given.push(f.length), cliUnzstd(f, max));
    readUkiConfig(sys, UKI, UKI_PATH, unzstd); // warm: the page cache and the JIT
    const t0 = performance.now();
    const r = readUkiConfig(sys, UKI, UKI_PATH, unzstd);
    console.log(`readUkiConfig(${UKI}, 62 MB): ${ms(t0)} (Node, the zstd tool for the last frame)`);
    expect(r.config).toEqual(builtConfig());
    expect(r.cmdline).toBe(readFileSync("build/target.cmdline", "utf8").trim());
    // Three segments: base, agent, config; the decompressor saw the config segment only.
    expect(r.frames).toHaveLength(3);
    expect(given).toEqual([readFileSync("build/config.cpio.zst").length, readFileSync("build/config.cpio.zst").length]);
  });

  it("under Bun (the agent's runtime) with its own zstd (runtimeZstdFrame), as the agent reads it", () => {
    const script = `${dir}/read-uki.ts`;
    writeFileSync(
      script,
      `import { realSys } from "${process.cwd()}/agent/sys/index.ts";
import { readUkiConfig } from "${process.cwd()}/agent/update/uki.ts";
const sys = await realSys();
const t = [];
let r;
for (let i = 0; i < 20; i++) { const t0 = performance.now(); r = readUkiConfig(sys, "${UKI}"); t.push(performance.now() - t0); }
console.log(JSON.stringify({ config: r.config, cmdline: r.cmdline, first: t[0], median: t.slice(1).sort((a, b) => a - b)[9] }));
`,
    );
    const out = JSON.parse(execFileSync("node_modules/.bin/bun", [script], { encoding: "utf8" })) as { config: AgentConfig; cmdline: string; first: number; median: number };
    console.log(`readUkiConfig under Bun: ${out.first.toFixed(1)} ms the first time, then ${out.median.toFixed(1)} ms (median of 19)`);
    expect(out.config).toEqual(builtConfig());
    expect(out.cmdline).toBe(readFileSync("build/target.cmdline", "utf8").trim());
  });

  it("agrees with decompressing the whole .initrd (the slow way, the kernel's view: the last config.json of all segments)", () => {
    const initrd = ukiSections(sys, UKI).find((s) => s.name === ".initrd")!;
    const bytes = Buffer.alloc(initrd.virtualSize);
    const fd = openSync(UKI, "r");
    readSync(fd, bytes, 0, bytes.length, initrd.rawOffset);
    closeSync(fd);
    const t0 = performance.now();
    const all = execFileSync("zstd", ["-d", "-q", "-c"], { input: bytes, maxBuffer: 1 << 30 });
    console.log(`the whole .initrd decompressed by the zstd tool: ${ms(t0)}, ${(all.length / 1e6).toFixed(1)} MB of cpio`);
    const configs = parseNewc(all).filter((e) => e.name === "etc/initos/config.json");
    expect(configs).toHaveLength(1);
    expect(AgentConfigSchema.parse(JSON.parse(Buffer.from(configs[0]!.data).toString("utf8")))).toEqual(readUkiConfig(sys, UKI, UKI_PATH, cliUnzstd).config);
  });
});

describe("checkUpdate with the real sbverify and libcryptsetup", () => {
  const config = () => builtConfig();
  /** The bundle files as build/ holds them, `over` replacing some. */
  const files = (over: Record<string, string> = {}) =>
    new Map([
      [UKI_PATH, UKI],
      ...config().images.flatMap((i) => [
        [`initos/${i.name}.sqfs`, `build/images/${i.name}.sqfs`],
        [`initos/${i.name}.verity`, `build/images/${i.name}.verity`],
      ]),
      ...Object.entries(over),
    ] as [string, string][]);
  // The build does not stamp a version yet (the config says 0): the manifest says the same, and
  // the running config is version 0 too, so these run with --force (the version rules are unit tested).
  const manifest = (): Manifest => ({ format: 1, version: config().version, files: [...files().keys()].map((path) => ({ path, size: 1, sha256: "0".repeat(64) })) });
  const run = (signers: string[], over: Record<string, string> = {}) => {
    const log = silentLog();
    const running = AgentConfigSchema.parse({ version: config().version, update: { signers } });
    return { log, done: checkUpdate(sys, log, { manifest: manifest(), files: files(over), running, force: true, tmpDir: dir, sbverify: ["/usr/bin/sbverify"], unzstd: cliUnzstd }) };
  };
  const refusal = async (p: Promise<unknown>) => {
    const e = await p.then(() => null, (x: unknown) => x);
    expect(e).toBeInstanceOf(UpdateRefused);
    return (e as Error).message;
  };

  it("accepts target.efi signed with the snakeoil key, and the build's images", async () => {
    const t0 = performance.now();
    const { log, done } = run([SNAKEOIL]);
    const r = await done;
    console.log(`checkUpdate(target.efi + modules + tools): ${ms(t0)}`);
    expect(r).toMatchObject({ version: config().version, signer: 0, images: ["modules", "tools"] });
    expect(log.lines).toContain(`warn: update: --force: installing version ${config().version} over ${config().version}`);
  });

  it("refuses it when the machine trusts another certificate only; accepts with the second of two", async () => {
    expect(await refusal(run([other]).done)).toBe("update: the UKI is not signed by a signer this machine trusts");
    await expect(run([other, SNAKEOIL]).done).resolves.toMatchObject({ signer: 1 });
  });

  it("refuses a UKI with one byte flipped in its kernel (the config still reads: only the signature catches it)", async () => {
    const linux = ukiSections(sys, UKI).find((s) => s.name === ".linux")!;
    const bad = flipped(UKI, linux.rawOffset + 1_000_000);
    expect(readUkiConfig(sys, bad, UKI_PATH, cliUnzstd).config).toEqual(config());
    expect(await refusal(run([SNAKEOIL], { [UKI_PATH]: bad }).done)).toBe("update: the UKI is not signed by a signer this machine trusts (sbverify: Image fails hash check)");
  });

  it("refuses a truncated UKI by its section table, before sbverify (which crashes on one) reads it", async () => {
    const cut = `${dir}/cut.efi`;
    writeFileSync(cut, readFileSync(UKI).subarray(0, 1_000_000));
    const said = spawnSync("/usr/bin/sbverify", ["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", cut]);
    console.log(`sbverify on a UKI cut at 1 MB: status ${said.status}, signal ${said.signal}`);
    expect(await refusal(run([SNAKEOIL], { [UKI_PATH]: cut }).done)).toMatch(/^update: EFI\/BOOT\/BOOTX64\.EFI: truncated: section "\.initrd" \(offset \d+, \d+ bytes\) runs past the end of the file \(1000000 bytes\)$/);
  });

  it("refuses an image with one byte flipped, naming it", async () => {
    const bad = flipped("build/images/modules.sqfs", 10_000_000);
    expect(await refusal(run([SNAKEOIL], { "initos/modules.sqfs": bad }).done)).toMatch(/^update: initos\/modules\.sqfs: does not match the root hash in the new UKI's config \(.+\)$/);
  });
});

describe("Sys.verityVerify on the build's images", () => {
  it("accepts modules and tools against the build's root hashes and pinned parameters, refuses a flipped byte", async () => {
    for (const image of builtConfig().images) {
      const data = `build/images/${image.name}.sqfs`;
      await sys.verityVerify(data, `build/images/${image.name}.verity`, image.rootHash, image.verity); // warm
      const t0 = performance.now();
      await sys.verityVerify(data, `build/images/${image.name}.verity`, image.rootHash, image.verity);
      console.log(`verityVerify ${data} (${(readFileSync(data).length / 1e6).toFixed(1)} MB): ${ms(t0)}`);
    }
    const modules = builtConfig().images.find((i) => i.name === "modules")!;
    const bad = flipped("build/images/modules.sqfs", 4096 * 1000 + 17);
    await expect(sys.verityVerify(bad, "build/images/modules.verity", modules.rootHash, modules.verity)).rejects.toThrow();
  });

  it("sbverify's time on target.efi (for the comments)", () => {
    const t0 = performance.now();
    const r = spawnSync("/usr/bin/sbverify", ["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", UKI]);
    console.log(`sbverify target.efi: ${ms(t0)}`);
    expect(r.status).toBe(0);
  });
});
