// Boot entries and efivarfs variables on the fake machine: reuse or create Boot####, the
// immutable flag cleared around writes and deletes, sysfs facts converted to logical blocks,
// and firmware data that does not decode left alone.
import { describe, expect, it } from "vitest";
import {
  bootCurrent,
  bootNext,
  bootOrder,
  clearBootNext,
  ensureBootEntry,
  listBootEntries,
  partitionFacts,
  setBootNext,
  setBootOrder,
} from "../../agent/efi/bootentries.ts";
import { decodeLoadOption, encodeLoadOption, LOAD_OPTION_ACTIVE, type LoadOption } from "../../agent/efi/loadopt.ts";
import { deleteVar, EFI_GLOBAL_GUID, EFIVARS_DIR, INITOS_GUID, listVars, readVar, varPath, writeVar } from "../../agent/efi/vars.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const UUID_A = "11111111-2222-3333-4455-66778899aabb";
const UUID_B = "aaaaaaaa-bbbb-cccc-ddee-ff0011223344";
const LOADER = "\\EFI\\BOOT\\BOOTX64.EFI";
const G = EFI_GLOBAL_GUID;

function machine(lbs = 512): FakeSys {
  const sys = new FakeSys();
  sys.add(EFIVARS_DIR, { kind: "dir" });
  putVar(sys, "Lang", Buffer.from("eng")); // a mounted efivarfs is never empty
  sys.add("/sys/class/block/vda", { kind: "link", target: "../../devices/pci0000:00/0000:00:03.0/virtio1/block/vda" });
  sys.add("/sys/class/block/vda/queue/logical_block_size", { kind: "file", data: `${lbs}\n` });
  const parts: [string, number, number, number, string][] = [
    ["vda1", 1, 2048, 32768, UUID_A],
    ["vda2", 2, 34816, 32768, UUID_B],
  ];
  for (const [p, n, start, size, uuid] of parts) {
    sys.add(`/sys/class/block/${p}`, { kind: "link", target: `../../devices/pci0000:00/0000:00:03.0/virtio1/block/vda/${p}` });
    sys.add(`/sys/class/block/${p}/partition`, { kind: "file", data: `${n}\n` });
    sys.add(`/sys/class/block/${p}/start`, { kind: "file", data: `${start}\n` });
    sys.add(`/sys/class/block/${p}/size`, { kind: "file", data: `${size}\n` });
    sys.partEntries.set(`/dev/${p}`, { uuid, name: `initos-${p}` });
  }
  return sys;
}

function putVar(sys: FakeSys, name: string, data: Uint8Array, attrs = 7, guid = G): void {
  const b = Buffer.alloc(4 + data.length);
  b.writeUInt32LE(attrs, 0);
  b.set(data, 4);
  sys.add(varPath(name, guid), { kind: "file", data: b.toString("latin1") });
}

const entry = (uuid: string, o: Partial<LoadOption> = {}, part = 1, start = 2048): LoadOption => ({
  attributes: LOAD_OPTION_ACTIVE,
  description: "someone's entry",
  filePaths: [[{ type: "hd", partition: part, start, size: 32768, partUuid: uuid }, { type: "file", path: LOADER }]],
  optionalData: new Uint8Array(0),
  ...o,
});

describe("partition facts", () => {
  it("come from sysfs (512-byte sectors) and libblkid", () => {
    expect(partitionFacts(machine(), "/dev/vda2")).toEqual({ partition: 2, start: 34816, size: 32768, partUuid: UUID_B });
  });
  it("are converted to the disk's logical blocks (4Kn disks)", () => {
    expect(partitionFacts(machine(4096), "/dev/vda2")).toEqual({ partition: 2, start: 34816 / 8, size: 32768 / 8, partUuid: UUID_B });
  });
  it("refuse a whole disk, an MBR partition, garbage in sysfs and unaligned partitions", () => {
    const sys = machine();
    expect(() => partitionFacts(sys, "/dev/vda")).toThrow("/dev/vda: not a partition (no /sys/class/block/vda/partition)");
    sys.partEntries.set("/dev/vda1", { uuid: "1234abcd-01", name: null });
    expect(() => partitionFacts(sys, "/dev/vda1")).toThrow('/dev/vda1: partition UUID "1234abcd-01" is not a GPT GUID (an MBR disk?)');
    sys.add("/sys/class/block/vda2/start", { kind: "file", data: "12abc\n" });
    expect(() => partitionFacts(sys, "/dev/vda2")).toThrow('/sys/class/block/vda2/start: "12abc" is not a number');
    const k = machine(4096);
    k.add("/sys/class/block/vda2/start", { kind: "file", data: "34817\n" });
    expect(() => partitionFacts(k, "/dev/vda2")).toThrow("is not whole 4096-byte blocks");
    expect(() => partitionFacts(sys, "/dev/../etc")).toThrow("not a /dev/<partition> name");
  });
});

describe("ensureBootEntry", () => {
  it("creates an entry at the lowest free number, active, without optional data; BootOrder untouched", () => {
    const sys = machine();
    putVar(sys, "Boot0000", encodeLoadOption(entry(UUID_A, {}, 1)));
    putVar(sys, "Boot0002", Uint8Array.from([1, 2, 3])); // junk: its number is still taken
    putVar(sys, "BootOrder", Uint8Array.from([0, 0]));
    const log = silentLog();
    expect(ensureBootEntry(sys, log, { description: "initos B", partition: "/dev/vda2", path: LOADER })).toBe(1);
    const v = readVar(sys, "Boot0001", G)!;
    expect(v.attributes).toBe(7);
    expect(decodeLoadOption(v.data, "Boot0001")).toEqual(entry(UUID_B, { description: "initos B" }, 2, 34816));
    expect(bootOrder(sys)).toEqual([0]);
    expect(log.lines).toContain(`info: efi: Boot0001 created: "initos B" HD(2,GPT,${UUID_B},0x8800,0x8000)/File(${LOADER})`);
    expect(log.lines.some((l) => l.startsWith("warn: efi: Boot0002: 3 bytes is too short"))).toBe(true);
  });

  it("reuses an entry with the same partition UUID and file, whatever its description and the file name's case", () => {
    const sys = machine();
    putVar(sys, "Boot0004", encodeLoadOption(entry(UUID_B, { filePaths: [[{ type: "hd", partition: 2, start: 34816, size: 32768, partUuid: UUID_B }, { type: "file", path: "\\efi\\boot\\bootx64.efi" }]] })));
    const before = sys.readFile(varPath("Boot0004", G));
    const log = silentLog();
    expect(ensureBootEntry(sys, log, { description: "initos B", partition: "/dev/vda2", path: "/EFI/BOOT/BOOTX64.EFI" })).toBe(4);
    expect(sys.readFile(varPath("Boot0004", G))).toBe(before);
    expect(sys.calls.filter((c) => c.startsWith("writeOnce"))).toEqual([]);
    expect(log.lines).toContain(`info: efi: Boot0004 "someone's entry" already boots HD(2,GPT,${UUID_B},0x8800,0x8000)/File(${LOADER})`);
  });

  it("reuses an entry whose path has a hardware prefix before the HD node", () => {
    const sys = machine();
    const pci = { type: "other" as const, nodeType: 1, subType: 1, data: Uint8Array.from([0, 3]) };
    putVar(sys, "Boot0003", encodeLoadOption(entry(UUID_B, { filePaths: [[pci, ...entry(UUID_B, {}, 2, 34816).filePaths[0]!]] })));
    expect(ensureBootEntry(sys, silentLog(), { description: "initos B", partition: "/dev/vda2", path: LOADER })).toBe(3);
  });

  it("rewrites a matching entry in place when it is inactive or its partition moved", () => {
    const sys = machine();
    putVar(sys, "Boot0005", encodeLoadOption(entry(UUID_B, { attributes: 0 }, 2, 34816)));
    putVar(sys, "Boot0006", encodeLoadOption(entry(UUID_A, {}, 1, 4096)));
    const log = silentLog();
    expect(ensureBootEntry(sys, log, { description: "initos B", partition: "/dev/vda2", path: LOADER })).toBe(5);
    expect(decodeLoadOption(readVar(sys, "Boot0005", G)!.data, "x").attributes).toBe(LOAD_OPTION_ACTIVE);
    expect(ensureBootEntry(sys, log, { description: "initos A", partition: "/dev/vda1", path: LOADER })).toBe(6);
    expect(decodeLoadOption(readVar(sys, "Boot0006", G)!.data, "x")).toEqual(entry(UUID_A, { description: "initos A" }, 1, 2048));
    expect(log.lines.filter((l) => l.includes("rewritten"))).toHaveLength(2);
  });

  it("does not match another partition's or another file's entry", () => {
    const sys = machine();
    putVar(sys, "Boot0000", encodeLoadOption(entry(UUID_A, {}, 1)));
    putVar(sys, "Boot0001", encodeLoadOption(entry(UUID_B, { filePaths: [[{ type: "hd", partition: 2, start: 34816, size: 32768, partUuid: UUID_B }, { type: "file", path: "\\EFI\\other.efi" }]] })));
    expect(ensureBootEntry(sys, silentLog(), { description: "initos B", partition: "/dev/vda2", path: LOADER })).toBe(2);
  });

  it("refuses, in one line, where there are no EFI variables (direct kernel boot)", () => {
    const sys = new FakeSys();
    expect(() => ensureBootEntry(sys, silentLog(), { description: "x", partition: "/dev/vda1", path: LOADER })).toThrow(
      "efi: no EFI variables at /sys/firmware/efi/efivars (not booted through UEFI, or efivarfs not mounted)",
    );
  });

  it("takes the partition's facts as given", () => {
    const sys = machine();
    expect(ensureBootEntry(sys, silentLog(), { description: "x", partition: { partition: 3, start: 10, size: 20, partUuid: UUID_A }, path: LOADER })).toBe(0);
    expect(decodeLoadOption(readVar(sys, "Boot0000", G)!.data, "x").filePaths[0]![0]).toEqual({ type: "hd", partition: 3, start: 10, size: 20, partUuid: UUID_A });
  });
});

describe("BootOrder, BootNext, BootCurrent", () => {
  it("read and write through efivarfs", () => {
    const sys = machine();
    expect(bootOrder(sys)).toBeNull();
    expect(bootNext(sys)).toBeNull();
    expect(bootCurrent(sys)).toBeNull();
    setBootOrder(sys, [2, 0, 1]);
    expect(bootOrder(sys)).toEqual([2, 0, 1]);
    setBootNext(sys, 1);
    expect(bootNext(sys)).toBe(1);
    expect(readVar(sys, "BootNext", G)).toEqual({ attributes: 7, data: Uint8Array.from([1, 0]) });
    expect(clearBootNext(sys)).toBe(true);
    expect(clearBootNext(sys)).toBe(false);
    expect(bootNext(sys)).toBeNull();
    putVar(sys, "BootCurrent", Uint8Array.from([4, 0]), 6);
    expect(bootCurrent(sys)).toBe(4);
  });
  it("refuse malformed values from the firmware with one line", () => {
    const sys = machine();
    putVar(sys, "BootOrder", Uint8Array.from([1, 0, 2]));
    expect(() => bootOrder(sys)).toThrow("BootOrder: 3 bytes is not a list of 16-bit numbers");
    putVar(sys, "BootCurrent", Uint8Array.from([1]));
    expect(() => bootCurrent(sys)).toThrow("BootCurrent: 1 bytes, not one 16-bit number");
    sys.add(varPath("BootNext", G), { kind: "file", data: "\x07\x00" });
    expect(() => bootNext(sys)).toThrow("EFI variable BootNext: 2 bytes, too short for its 4 attribute bytes");
  });
  it("lists entries decoded, with the ones that do not decode marked", () => {
    const sys = machine();
    putVar(sys, "Boot0001", encodeLoadOption(entry(UUID_A)));
    putVar(sys, "Boot000A", Uint8Array.from([1, 0, 0, 0, 0xff, 0xff, 0x41, 0, 0, 0]));
    putVar(sys, "Boot000b", encodeLoadOption(entry(UUID_A))); // lower case: not a boot entry the firmware would find
    putVar(sys, "Boot0001", encodeLoadOption(entry(UUID_A)), 7, INITOS_GUID); // another vendor's
    const list = listBootEntries(sys);
    expect(list.map((e) => [e.name, e.option?.description ?? e.error])).toEqual([
      ["Boot0001", "someone's entry"],
      ["Boot000A", "Boot000A: device path list length 65535 at offset 10 runs past the end (0 bytes left)"],
    ]);
  });
});

describe("efivarfs variables", () => {
  it("clear the immutable flag to write, and set it again after", () => {
    const sys = machine();
    writeVar(sys, "TrialState", INITOS_GUID, Uint8Array.from([1]));
    const path = varPath("TrialState", INITOS_GUID);
    sys.immutable.add(path); // as efivarfs marks a variable it does not know once it exists
    writeVar(sys, "TrialState", INITOS_GUID, Uint8Array.from([2]), 3);
    expect(readVar(sys, "TrialState", INITOS_GUID)).toEqual({ attributes: 3, data: Uint8Array.from([2]) });
    expect(sys.immutable.has(path)).toBe(true);
    expect(sys.calls.filter((c) => c.includes("TrialState"))).toEqual([`writeOnce ${path}`, `setImmutable ${path} -i`, `writeOnce ${path}`, `setImmutable ${path} +i`]);
  });
  it("clear it to delete", () => {
    const sys = machine();
    writeVar(sys, "TrialState", INITOS_GUID, Uint8Array.from([1]));
    sys.immutable.add(varPath("TrialState", INITOS_GUID));
    expect(deleteVar(sys, "TrialState", INITOS_GUID)).toBe(true);
    expect(readVar(sys, "TrialState", INITOS_GUID)).toBeNull();
    expect(listVars(sys, INITOS_GUID)).toEqual([]);
  });
  it("refuse names that could leave the directory, and bad GUIDs", () => {
    const sys = machine();
    expect(() => readVar(sys, "../x", G)).toThrow('EFI variable name "../x": only letters, digits and _ (1-128)');
    expect(() => readVar(sys, "X", "8BE4DF61-93CA-11D2-AA0D-00E098032B8C")).toThrow("not a lower-case GUID");
  });
  it("name the variable when a write fails", () => {
    const sys = machine();
    sys.failOn.set("writeOnce", Object.assign(new Error("write: ENOSPC"), { code: "ENOSPC" }));
    expect(() => setBootNext(sys, 1)).toThrow("EFI variable BootNext: write failed: write: ENOSPC");
  });
});
