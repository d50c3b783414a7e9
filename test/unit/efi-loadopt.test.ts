// EFI load options and device paths: bytes laid out by hand from the UEFI spec (§3.1.3, §10.3),
// round trips, and malformed input from the firmware refused with one line. The comparison with
// what efibootmgr writes is in test/system/efibootmgr.test.ts.
import { describe, expect, it } from "vitest";
import {
  bootVarName,
  decodeBootNumber,
  decodeBootOrder,
  decodeDevicePaths,
  decodeLoadOption,
  encodeBootNumber,
  encodeBootOrder,
  encodeLoadOption,
  formatDevicePath,
  guidFromBytes,
  guidToBytes,
  LOAD_OPTION_ACTIVE,
  type LoadOption,
  parseBootVarName,
} from "../../agent/efi/loadopt.ts";

const UUID = "aaaaaaaa-bbbb-cccc-ddee-ff0011223344";
const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex");
const ucs2 = (s: string) => Buffer.from(`${s}\0`, "utf16le");

/** HD(2,GPT,UUID,0x8800,0x8000), laid out field by field. */
const HD_BYTES = Buffer.concat([
  hex("04 01 2a00"), // media, hard drive, length 42
  hex("02000000"), // partition 2
  hex("0088000000000000"), // start LBA 0x8800
  hex("0080000000000000"), // size 0x8000
  hex("aaaaaaaa bbbb cccc ddee ff0011223344"), // GUID: first three fields little-endian (all same bytes here)
  hex("02 02"), // MBR type GPT, signature type GUID
]);
const FILE_BYTES = Buffer.concat([hex("04 04 3000"), ucs2("\\EFI\\BOOT\\BOOTX64.EFI")]);
const END_BYTES = hex("7f ff 0400");

const option = (o: Partial<LoadOption> = {}): LoadOption => ({
  attributes: LOAD_OPTION_ACTIVE,
  description: "initos B",
  filePaths: [[{ type: "hd", partition: 2, start: 0x8800, size: 0x8000, partUuid: UUID }, { type: "file", path: "\\EFI\\BOOT\\BOOTX64.EFI" }]],
  optionalData: new Uint8Array(0),
  ...o,
});

describe("GUIDs", () => {
  it("are stored mixed-endian: the first three fields little-endian", () => {
    const g = "12345678-9abc-def0-1122-334455667788";
    expect(Buffer.from(guidToBytes(g)).toString("hex")).toBe("78563412bc9af0de1122334455667788");
    expect(guidFromBytes(guidToBytes(g))).toBe(g);
    expect(guidFromBytes(guidToBytes("8BE4DF61-93CA-11D2-AA0D-00E098032B8C"))).toBe("8be4df61-93ca-11d2-aa0d-00e098032b8c");
  });
  it("refuses what is not one", () => {
    expect(() => guidToBytes("not-a-guid")).toThrow('"not-a-guid" is not a GUID');
  });
});

describe("load options", () => {
  it("encodes attributes, path list length, UCS-2 description, HD and File nodes and the End node", () => {
    const fpl = Buffer.concat([HD_BYTES, FILE_BYTES, END_BYTES]);
    const want = Buffer.concat([hex("01000000"), Buffer.from([fpl.length, 0]), ucs2("initos B"), fpl]);
    expect(encodeLoadOption(option()).toString("hex")).toBe(want.toString("hex"));
    expect(fpl.length).toBe(42 + 48 + 4);
  });

  it("decodes what it encodes, optional data included", () => {
    const o = option({ optionalData: Uint8Array.from([1, 2, 3]), description: "Ünïcode ok" });
    expect(decodeLoadOption(encodeLoadOption(o), "Boot0001")).toEqual(o);
  });

  it("keeps nodes it does not interpret (a hardware path before the HD node) as bytes", () => {
    const pci = { type: "other" as const, nodeType: 1, subType: 1, data: Uint8Array.from([0, 3]) };
    const o = option({ filePaths: [[pci, ...option().filePaths[0]!]] });
    const back = decodeLoadOption(encodeLoadOption(o), "Boot0002");
    expect(back.filePaths[0]![0]).toEqual(pci);
    expect(formatDevicePath(back.filePaths[0]!)).toBe(`Path(1,1,0003)/HD(2,GPT,${UUID},0x8800,0x8000)/File(\\EFI\\BOOT\\BOOTX64.EFI)`);
  });

  it("decodes several device paths in one list (e.g. an initrd path after the loader's)", () => {
    const two = Buffer.concat([HD_BYTES, FILE_BYTES, END_BYTES, FILE_BYTES, END_BYTES]);
    expect(decodeDevicePaths(two, "x")).toHaveLength(2);
  });

  it("turns forward slashes into backslashes and refuses relative paths and non-UCS-2 text", () => {
    const o = option({ filePaths: [[{ type: "file", path: "/EFI/Linux/a.efi" }]] });
    expect(decodeLoadOption(encodeLoadOption(o), "x").filePaths[0]).toEqual([{ type: "file", path: "\\EFI\\Linux\\a.efi" }]);
    expect(() => encodeLoadOption(option({ filePaths: [[{ type: "file", path: "EFI\\a.efi" }]] }))).toThrow("is not absolute");
    expect(() => encodeLoadOption(option({ description: "emoji 😀" }))).toThrow("outside UCS-2");
    expect(() => encodeLoadOption(option({ description: "a\0b" }))).toThrow("NUL");
    expect(() => encodeLoadOption(option({ filePaths: [] }))).toThrow("needs a device path");
  });

  it("formats like efibootmgr -v", () => {
    expect(formatDevicePath(option().filePaths[0]!)).toBe(`HD(2,GPT,${UUID},0x8800,0x8000)/File(\\EFI\\BOOT\\BOOTX64.EFI)`);
  });
});

describe("malformed load options are refused with one line naming the variable and offset", () => {
  const good = encodeLoadOption(option());
  const descEnd = 6 + ucs2("initos B").length; // where the path list starts
  const cases: [string, Buffer, RegExp][] = [
    ["too short", good.subarray(0, 5), /^Boot0007: 5 bytes is too short for a load option/],
    ["no NUL after the description", good.subarray(0, descEnd - 2), /^Boot0007: description: string at offset 6 has no NUL terminator/],
    ["path list length past the end", good.subarray(0, good.length - 1), /^Boot0007: device path list length 94 at offset 24 runs past the end \(93 bytes left\)/],
    [
      "a node with length 0",
      (() => {
        const b = Buffer.from(good);
        b.writeUInt16LE(0, descEnd + 2);
        return b;
      })(),
      /^Boot0007: device path node at offset 24 has length 0 \(less than its 4-byte header\)$/,
    ],
    [
      "a node longer than the list",
      (() => {
        const b = Buffer.from(good);
        b.writeUInt16LE(200, descEnd + 42 + 2); // the File node
        return b;
      })(),
      /^Boot0007: device path node at offset 66 has length 200, past the end of the path list \(52 bytes left\)$/,
    ],
    [
      "no End node",
      (() => {
        const b = Buffer.concat([good.subarray(0, descEnd), HD_BYTES, FILE_BYTES]);
        b.writeUInt16LE(90, 4);
        return b;
      })(),
      /^Boot0007: device path has no End node$/,
    ],
    [
      "a Hard Drive node of the wrong length",
      (() => {
        const hd = Buffer.concat([HD_BYTES, hex("0000")]);
        hd.writeUInt16LE(44, 2);
        const fpl = Buffer.concat([hd, END_BYTES]);
        return Buffer.concat([hex("01000000"), Buffer.from([fpl.length, 0]), ucs2("x"), fpl]);
      })(),
      /^Boot0007: Hard Drive node at offset 10 is 44 bytes, not 42$/,
    ],
    [
      "a File node without its NUL",
      (() => {
        const f = Buffer.concat([hex("04 04 0800"), Buffer.from("ab", "utf16le")]);
        const fpl = Buffer.concat([f, END_BYTES]);
        return Buffer.concat([hex("01000000"), Buffer.from([fpl.length, 0]), ucs2("x"), fpl]);
      })(),
      /^Boot0007: File Path node at offset 10: string at offset 0 has no NUL terminator/,
    ],
    [
      "an End node of length 6",
      (() => {
        const fpl = Buffer.concat([hex("7f ff 0600 0000")]);
        return Buffer.concat([hex("01000000"), Buffer.from([fpl.length, 0]), ucs2("x"), fpl]);
      })(),
      /^Boot0007: End node at offset 10 has length 6, not 4$/,
    ],
    [
      "a header cut off",
      (() => {
        const fpl = Buffer.concat([END_BYTES, hex("0401")]);
        return Buffer.concat([hex("01000000"), Buffer.from([fpl.length, 0]), ucs2("x"), fpl]);
      })(),
      /^Boot0007: device path node at offset 14 is cut off \(2 bytes left, a header is 4\)$/,
    ],
    [
      "an empty path list",
      Buffer.concat([hex("01000000 0000"), ucs2("x")]),
      /^Boot0007: empty device path list$/,
    ],
  ];
  for (const [name, bytes, msg] of cases) {
    it(name, () => {
      expect(() => decodeLoadOption(bytes, "Boot0007")).toThrow(msg);
    });
  }

  it("never reads past the buffer, whatever the bytes (every truncation and every single-byte change)", () => {
    for (let n = 0; n < good.length; n++) {
      try {
        decodeLoadOption(good.subarray(0, n), "x");
      } catch (e) {
        expect((e as Error).name).toBe("BootError");
      }
    }
    for (let i = 0; i < good.length; i++) {
      for (const v of [0x00, 0x01, 0x7f, 0xff]) {
        const b = Buffer.from(good);
        b[i] = v;
        try {
          decodeLoadOption(b, "x");
        } catch (e) {
          expect((e as Error).name).toBe("BootError");
          expect((e as Error).message).not.toContain("\n");
        }
      }
    }
  });
});

describe("BootOrder, BootNext, Boot#### names", () => {
  it("are u16 little-endian", () => {
    expect(encodeBootOrder([1, 0x10, 0xabcd]).toString("hex")).toBe("01001000cdab");
    expect(decodeBootOrder(hex("01001000cdab"))).toEqual([1, 0x10, 0xabcd]);
    expect(encodeBootNumber(0x1234).toString("hex")).toBe("3412");
    expect(decodeBootNumber(hex("3412"), "BootNext")).toBe(0x1234);
  });
  it("refuse odd lengths, duplicates and numbers out of range", () => {
    expect(() => decodeBootOrder(hex("010002"))).toThrow("BootOrder: 3 bytes is not a list of 16-bit numbers");
    expect(() => decodeBootNumber(hex("0100 0000"), "BootNext")).toThrow("BootNext: 4 bytes, not one 16-bit number");
    expect(() => encodeBootOrder([1, 1])).toThrow("boot order lists Boot0001 twice");
    expect(() => encodeBootNumber(0x10000)).toThrow("not between 0 and 0xFFFF");
  });
  it("names Boot#### with upper-case hex, and parses only that", () => {
    expect(bootVarName(0xab)).toBe("Boot00AB");
    expect(parseBootVarName("Boot00AB")).toBe(0xab);
    expect(parseBootVarName("Boot00ab")).toBeNull();
    expect(parseBootVarName("BootOrder")).toBeNull();
    expect(parseBootVarName("Boot00AB0")).toBeNull();
  });
});
