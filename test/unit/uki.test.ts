import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { readPe } from "../../initrd/pe.ts";
import { buildUki, STUB } from "../../initrd/uki.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-uki-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** `objdump -h` rows: name → { size, vma, fileOffset } */
function objdumpSections(file: string) {
  const out = execFileSync("objdump", ["-h", file], { encoding: "utf8" });
  const rows = new Map<string, { size: number; vma: bigint }>();
  for (const m of out.matchAll(/^\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+[0-9a-f]+/gm)) {
    rows.set(m[1]!, { size: parseInt(m[2]!, 16), vma: BigInt(`0x${m[3]}`) });
  }
  return rows;
}

describe("UKI layout", () => {
  const parts = {
    ".osrel": Buffer.from("ID=initos\n"),
    ".cmdline": Buffer.from("console=ttyS0 root=/dev/vda\0"),
    ".initrd": Buffer.alloc(300_001, 1),
    ".linux": Buffer.alloc(700_003, 2),
  };
  for (const [s, data] of Object.entries(parts)) writeFileSync(`${dir}/${s.slice(1)}`, data);
  const layout = buildUki(
    `${dir}/uki.efi`,
    (Object.keys(parts) as (keyof typeof parts)[]).map((s) => ({ section: s, file: `${dir}/${s.slice(1)}` })),
  );
  const sections = objdumpSections(`${dir}/uki.efi`);

  it("objdump -h shows every section at the computed VMA with its size", () => {
    for (const l of layout) {
      expect(sections.get(l.section), l.section).toEqual({ size: l.size, vma: l.vma });
    }
  });

  it("places sections page aligned after the stub's own, without overlap, kernel last", () => {
    const stub = readPe(readFileSync(STUB));
    const stubEnd = Math.max(...stub.sections.map((s) => s.virtualAddress + s.virtualSize));
    const ours = [...layout].sort((a, b) => Number(a.vma - b.vma));
    expect(Number(ours[0]!.vma)).toBeGreaterThanOrEqual(stubEnd);
    for (let i = 0; i < ours.length; i++) {
      expect(ours[i]!.vma % 0x1000n).toBe(0n);
      if (i > 0) expect(ours[i]!.vma).toBeGreaterThanOrEqual(ours[i - 1]!.vma + BigInt(ours[i - 1]!.size));
    }
    expect(ours.at(-1)!.section).toBe(".linux");
    // The stub's own sections are untouched.
    for (const s of stub.sections) expect(sections.get(s.name)?.vma).toBe(BigInt(s.virtualAddress));
  });

  it("carries the section contents byte for byte", () => {
    execFileSync("objcopy", ["-O", "binary", "--only-section=.cmdline", `${dir}/uki.efi`, `${dir}/out.cmdline`]);
    // PE sections are padded to the file alignment; the section's own size says where data ends.
    expect(readFileSync(`${dir}/out.cmdline`).subarray(0, parts[".cmdline"].length)).toEqual(parts[".cmdline"]);
  });

  it("signs with sbsign so that sbverify accepts it with the cert and not without", () => {
    execFileSync("sh", ["-c", `openssl rsa -in /usr/share/ovmf/PkKek-1-snakeoil.key -passin pass:snakeoil -out ${dir}/k.key 2>/dev/null`]);
    execFileSync("sbsign", ["--key", `${dir}/k.key`, "--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", "--output", `${dir}/signed.efi`, `${dir}/uki.efi`], { stdio: "ignore" });
    expect(() => execFileSync("sbverify", ["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", `${dir}/signed.efi`], { stdio: "ignore" })).not.toThrow();
    expect(() => execFileSync("sbverify", ["--cert", "/usr/share/ovmf/PkKek-1-snakeoil.pem", `${dir}/uki.efi`], { stdio: "ignore" })).toThrow();
    expect(statSync(`${dir}/signed.efi`).size).toBeGreaterThan(statSync(`${dir}/uki.efi`).size);
  });
});
