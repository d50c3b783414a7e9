// Our EFI load options against the real efibootmgr (Debian's 17, libefivar/libefiboot 37), byte
// for byte (root). efibootmgr writes and reads a plain directory instead of efivarfs when
// EFIVARFS_PATH names it (libefivar's efivarfs.c); both sides work on a GPT disk on a loop
// device, efibootmgr reading the GPT itself, our side reading sysfs and libblkid.
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bootCurrent, bootNext, bootOrder, clearBootNext, ensureBootEntry, listBootEntries, partitionFacts, setBootNext, setBootOrder } from "../../agent/efi/bootentries.ts";
import { encodeLoadOption, formatDevicePath, LOAD_OPTION_ACTIVE } from "../../agent/efi/loadopt.ts";
import { EFI_GLOBAL_GUID, INITOS_GUID, readVar, varPath, writeVar } from "../../agent/efi/vars.ts";
import { realSys, type Sys } from "../../agent/sys/index.ts";
import { silentLog } from "../unit/fakesys.ts";

const ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const UUID_A = "11111111-2222-4333-8455-66778899aabb";
const UUID_B = "aaaaaaaa-bbbb-4ccc-8dee-ff0011223344";
const LOADER = "\\EFI\\BOOT\\BOOTX64.EFI";
const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";

const dir = mkdtempSync(`${tmpdir()}/initos-efibootmgr-`);
const loops: string[] = [];
let sys: Sys;
beforeAll(async () => {
  sys = await realSys();
});
afterAll(() => {
  for (const l of loops) spawnSync("losetup", ["-d", l]);
  rmSync(dir, { recursive: true, force: true });
});

/** A GPT disk with two ESP partitions on a loop device of `sector`-byte logical blocks. */
function disk(name: string, sector: 512 | 4096): string {
  const img = `${dir}/${name}.img`;
  execFileSync("truncate", ["-s", "64M", img]);
  const loop = execFileSync("losetup", ["-f", "--show", "-P", "--sector-size", String(sector), img], { encoding: "utf8" }).trim();
  loops.push(loop);
  // sfdisk on the loop device, so the table is laid out in its logical blocks.
  const s = sector === 512 ? 1 : 8;
  const table = `label: gpt\nstart=${2048 / s}, size=${32768 / s}, type=${ESP}, uuid=${UUID_A}\nstart=${34816 / s}, size=${32768 / s}, type=${ESP}, uuid=${UUID_B}\n`;
  execFileSync("sfdisk", ["-q", "--no-reread", loop], { input: table });
  // The kernels here do not always scan a loop device's table by themselves: partx adds it.
  spawnSync("partx", ["-d", loop]);
  execFileSync("partx", ["-a", loop]);
  expect(existsSync(`/sys/class/block/${loop.slice(5)}p2`)).toBe(true);
  return loop;
}

/** efibootmgr on the directory `vars` (EFIVARFS_PATH must end in a slash: libefivar appends the name). */
function efibootmgr(vars: string, ...args: string[]): string {
  return execFileSync("efibootmgr", args, { encoding: "utf8", env: { ...process.env, EFIVARFS_PATH: `${vars}/` } });
}

const file = (vars: string, name: string) => readFileSync(`${vars}/${name}-${EFI_GLOBAL_GUID}`);

describe("EFI boot entries against efibootmgr (root: loop devices)", () => {
  for (const sector of [512, 4096] as const) {
    it(`${sector}-byte sectors: efibootmgr's entry is byte for byte ours, and ours is reused, not duplicated`, () => {
      const loop = disk(`d${sector}`, sector);
      const vars = `${dir}/vars${sector}`;
      mkdirSync(vars);
      efibootmgr(vars, "-q", "-c", "-d", loop, "-p", "2", "-L", "initos B", "-l", LOADER);
      const theirs = file(vars, "Boot0000");

      const facts = partitionFacts(sys, `${loop}p2`);
      const per = sector / 512;
      expect(facts).toEqual({ partition: 2, start: 34816 / per, size: 32768 / per, partUuid: UUID_B });
      const option = { attributes: LOAD_OPTION_ACTIVE, description: "initos B", filePaths: [[{ type: "hd" as const, ...facts }, { type: "file" as const, path: LOADER }]], optionalData: new Uint8Array(0) };
      const ours = Buffer.concat([Buffer.from([7, 0, 0, 0]), encodeLoadOption(option)]);
      expect(ours.toString("hex")).toBe(theirs.toString("hex"));

      // Reused, whatever the description: efibootmgr's entry is the one.
      const log = silentLog();
      expect(ensureBootEntry(sys, log, { description: "initos slot B", partition: `${loop}p2`, path: LOADER }, vars)).toBe(0);
      expect(file(vars, "Boot0000").equals(theirs)).toBe(true);
      // A new one for the other slot, which efibootmgr -v reads as we meant it.
      expect(ensureBootEntry(sys, log, { description: "initos A", partition: `${loop}p1`, path: LOADER }, vars)).toBe(1);
      const shown = efibootmgr(vars, "-v");
      const a = `HD(1,GPT,${UUID_A},0x${(2048 / per).toString(16)},0x${(32768 / per).toString(16)})/File(${LOADER})`;
      const b = `HD(2,GPT,${UUID_B},0x${(34816 / per).toString(16)},0x${(32768 / per).toString(16)})/File(${LOADER})`;
      expect(shown).toContain(`Boot0001* initos A\t${a}`);
      expect(shown).toContain(`Boot0000* initos B\t${b}`);
      expect(listBootEntries(sys, vars).map((e) => `${e.name} ${e.option!.description} ${formatDevicePath(e.option!.filePaths[0]!)}`)).toEqual([`Boot0000 initos B ${b}`, `Boot0001 initos A ${a}`]);
    });
  }

  it("BootOrder and BootNext: what we write efibootmgr reads, and the other way round", () => {
    const vars = `${dir}/order`;
    mkdirSync(vars);
    writeVar(sys, "PlatformLang", EFI_GLOBAL_GUID, Buffer.from("en\0"), 7, vars); // firmware never has none
    // efibootmgr -o takes only entries that exist.
    for (const n of [0, 1, 2, 3]) {
      const part = { partition: n + 1, start: 2048 * (n + 1), size: 2048, partUuid: UUID_A };
      expect(ensureBootEntry(sys, silentLog(), { description: `e${n}`, partition: part, path: `\\EFI\\e${n}.efi` }, vars)).toBe(n);
    }
    setBootOrder(sys, [1, 0, 0x2a], vars);
    setBootNext(sys, 0x2a, vars);
    const shown = efibootmgr(vars);
    expect(shown).toContain("BootOrder: 0001,0000,002A");
    expect(shown).toContain("BootNext: 002A");
    // libefivar writes a plain file without truncating it (efivarfs replaces the whole value at
    // each write; a plain file keeps a longer old tail): start efibootmgr's BootOrder afresh.
    rmSync(`${vars}/BootOrder-${EFI_GLOBAL_GUID}`);
    efibootmgr(vars, "-q", "-o", "0003,0001");
    efibootmgr(vars, "-q", "-n", "0003");
    expect(bootOrder(sys, vars)).toEqual([3, 1]);
    expect(bootNext(sys, vars)).toBe(3);
    expect(clearBootNext(sys, vars)).toBe(true);
    expect(efibootmgr(vars)).not.toContain("BootNext");
    efibootmgr(vars, "-q", "-n", "0001");
    expect(file(vars, "BootNext").toString("hex")).toBe("070000000100");
    efibootmgr(vars, "-q", "-N");
    expect(bootNext(sys, vars)).toBeNull();
    // BootCurrent is the firmware's (volatile: BS|RT); efibootmgr shows what we read.
    writeFileSync(`${vars}/BootCurrent-${EFI_GLOBAL_GUID}`, Buffer.from("060000000300", "hex"));
    expect(efibootmgr(vars)).toContain("BootCurrent: 0003");
    expect(bootCurrent(sys, vars)).toBe(3);
  });

  it("an inactive entry (efibootmgr -A) is rewritten active in place", () => {
    const loop = disk("inactive", 512);
    const vars = `${dir}/inactive`;
    mkdirSync(vars);
    efibootmgr(vars, "-q", "-c", "-d", loop, "-p", "1", "-L", "old A", "-l", LOADER);
    efibootmgr(vars, "-q", "-b", "0000", "-A");
    expect(efibootmgr(vars, "-v")).toContain("Boot0000  old A");
    expect(ensureBootEntry(sys, silentLog(), { description: "initos A", partition: `${loop}p1`, path: LOADER }, vars)).toBe(0);
    expect(efibootmgr(vars, "-v")).toContain(`Boot0000* initos A\tHD(1,GPT,${UUID_A},0x800,0x8000)/File(${LOADER})`);
  });

  it("a variable file with the immutable flag (as efivarfs protects unknown ones) is written with one write and protected again", () => {
    const vars = `${dir}/immutable`;
    mkdirSync(vars);
    writeVar(sys, "TrialState", INITOS_GUID, Buffer.from("a much longer first value"), undefined, vars);
    const path = varPath("TrialState", INITOS_GUID, vars);
    execFileSync("chattr", ["+i", path]);
    try {
    writeVar(sys, "TrialState", INITOS_GUID, Buffer.from("v2"), undefined, vars);
    expect(readVar(sys, "TrialState", INITOS_GUID, vars)).toEqual({ attributes: 7, data: Uint8Array.from(Buffer.from("v2")) });
    expect(execFileSync("lsattr", [path], { encoding: "utf8" })).toMatch(/^\S*i\S* /);
    // One write(2) of attributes and value (what efivarfs needs), seen by strace.
    const helper = `${dir}/write-once.ts`;
    writeFileSync(
      helper,
      `import { realSys } from "${process.cwd()}/agent/sys/index.ts";\nimport { writeVar } from "${process.cwd()}/agent/efi/vars.ts";\nconst sys = await realSys();\nwriteVar(sys, "TrialState", "${INITOS_GUID}", Buffer.from("v3"), 7, "${vars}");\n`,
    );
    const trace = spawnSync("strace", ["-f", "-e", "trace=write,pwrite64,openat,ioctl", BUN, helper], { encoding: "utf8" });
    expect(trace.status).toBe(0);
    const lines = trace.stderr.split("\n").filter((l) => l.includes("TrialState") || l.includes("v3"));
    expect(lines.filter((l) => /write64\(\d+, "\\7\\0\\0\\0v3", 6(, 0)?\) = 6/.test(l))).toHaveLength(1);
    expect(lines.filter((l) => l.includes("v3"))).toHaveLength(1);
    expect(lines.some((l) => l.includes("O_TRUNC"))).toBe(false);
    expect(execFileSync("lsattr", [path], { encoding: "utf8" })).toMatch(/^\S*i\S* /);
    } finally {
      execFileSync("chattr", ["-i", path]);
    }
  });
});
