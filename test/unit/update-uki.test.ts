// An update's UKI read without trusting it (agent/update/uki.ts): the PE section table, the
// .initrd's zstd frames walked by their headers, only the last frame decompressed, its cpio's
// config parsed strictly. Synthetic PE files, real zstd frames (the zstd tool), malformed on
// purpose: each refusal is one line naming the file.
import { describe, expect, it } from "vitest";
import { CONFIG_SEGMENT_MAX, type FrameDecompressor, initrdFrames, parseNewc, readUkiConfig, UpdateRefused, ukiSections } from "../../agent/update/uki.ts";
import { FakeSys } from "./fakesys.ts";
import { cliUnzstd, configJson, newc, peImage, SECTION_FIELDS, sectionEntry, ukiWith, zstd } from "./update-fixture.ts";

const PATH = "/run/initos/update/BOOTX64.EFI.tmp";
const NAME = "EFI/BOOT/BOOTX64.EFI";

function sysWith(bytes: Uint8Array): FakeSys {
  return new FakeSys().add(PATH, { kind: "file", data: Buffer.from(bytes).toString("latin1") });
}

/** Counts what the decompressor is given: the proof that only the config segment is decompressed. */
function spy(): FrameDecompressor & { given: number[] } {
  const given: number[] = [];
  const f = ((frame: Uint8Array, max: number) => (given.push(frame.length), cliUnzstd(frame, max))) as FrameDecompressor & { given: number[] };
  f.given = given;
  return f;
}

function read(bytes: Uint8Array, unzstd: FrameDecompressor = cliUnzstd) {
  return readUkiConfig(sysWith(bytes), PATH, NAME, unzstd);
}

/** The refusal's message (and that it is one line naming the file). */
function refusal(bytes: Uint8Array, unzstd: FrameDecompressor = cliUnzstd): string {
  try {
    read(bytes, unzstd);
  } catch (e) {
    expect(e).toBeInstanceOf(UpdateRefused);
    const m = (e as Error).message;
    expect(m).not.toContain("\n");
    expect(m).toMatch(new RegExp(`^update: ${NAME.replace(/\./g, "\\.")}[:/]`));
    return m;
  }
  throw new Error("not refused");
}

/** Section `i`'s table entry field set to `value`. */
function withField(pe: Buffer, i: number, field: keyof typeof SECTION_FIELDS, value: number): Buffer {
  const b = Buffer.from(pe);
  b.writeUInt32LE(value, sectionEntry(i) + SECTION_FIELDS[field]);
  return b;
}

/** Where the .initrd (section 3 of ukiWith) is: offset and size. */
function initrdOf(pe: Buffer): { at: number; size: number } {
  return { at: pe.readUInt32LE(sectionEntry(3) + SECTION_FIELDS.rawOffset), size: pe.readUInt32LE(sectionEntry(3) + SECTION_FIELDS.virtualSize) };
}

/** A UKI whose .initrd is exactly `initrd`. */
const ukiOf = (initrd: Uint8Array) => peImage([{ name: ".cmdline", data: Buffer.from("x\0") }, { name: ".initrd", data: initrd }]);

describe("readUkiConfig: a well-formed UKI", () => {
  it("returns the config segment's config and the .cmdline, decompressing only the last frame", () => {
    const uki = ukiWith(configJson(42), { cmdline: "console=ttyS0 rw initos.x=1" });
    const unzstd = spy();
    const r = read(uki, unzstd);
    expect(r.config.version).toBe(42);
    expect(r.config.images.map((i) => i.name)).toEqual(["modules", "tools"]);
    expect(r.cmdline).toBe("console=ttyS0 rw initos.x=1");
    expect(r.frames.map((f) => f.skippable)).toEqual([false, false, false]);
    // Each frame ends where the next begins, and the frames fill the section.
    const { at, size } = initrdOf(uki);
    expect(r.frames[0]!.offset).toBe(at);
    for (let i = 1; i < 3; i++) expect(r.frames[i]!.offset).toBe(r.frames[i - 1]!.offset + r.frames[i - 1]!.length);
    expect(r.frames[2]!.offset + r.frames[2]!.length).toBe(at + size);
    // One call, with the config segment's few hundred bytes: not the agent segment.
    expect(unzstd.given).toEqual([r.frames[2]!.length]);
    expect(r.frames[2]!.contentSize).toBe(1024); // sized (made from a file): the cpio, padded to 512
    expect(r.frames[1]!.contentSize).toBeNull(); // made from a pipe: no content size, windowed
  });

  it("walks many-block frames (raw, RLE and compressed blocks), checksums on and off, skippable frames and zero padding", () => {
    const cfg = zstd(newc([{ name: "etc/initos/config.json", data: configJson(7) }]), { args: ["--no-check"] });
    const random = Buffer.from(Array.from({ length: 600_000 }, (_, i) => (i * 2654435761) >>> 24));
    const blocks = zstd(Buffer.concat([random, Buffer.alloc(400_000, 0x41)]), { args: ["-1"] });
    const skippable = Buffer.alloc(8 + 10, 0xee);
    skippable.writeUInt32LE(0x184d2a53, 0);
    skippable.writeUInt32LE(10, 4);
    const r = read(ukiOf(Buffer.concat([blocks, skippable, cfg, Buffer.alloc(13)])));
    expect(r.config.version).toBe(7);
    expect(r.frames.map((f) => f.skippable)).toEqual([false, true, false]);
    expect(r.frames[0]!.contentBound).toBeGreaterThanOrEqual(1_000_000);
    // A skippable frame after the config segment: the config is still the last data frame.
    expect(read(ukiOf(Buffer.concat([blocks, cfg, skippable]))).config.version).toBe(7);
  });

  it("takes the last config.json of the segment (the one the kernel leaves), with ./ and / prefixes as the kernel resolves them", () => {
    const uki = ukiWith("", { configEntries: [{ name: "./etc/initos/config.json", data: configJson(1) }, { name: "/etc/initos/config.json", data: configJson(2) }] });
    expect(read(uki).config.version).toBe(2);
  });

  it("ukiSections lists every section with its sizes and offsets", () => {
    const s = ukiSections(sysWith(ukiWith(configJson(1))), PATH, NAME);
    expect(s.map((x) => x.name)).toEqual([".text", ".osrel", ".cmdline", ".initrd", ".linux"]);
    expect(s[0]).toEqual({ name: ".text", virtualSize: 3000, virtualAddress: 0x1000, rawSize: 3072, rawOffset: 1024 });
  });

  it("a UKI without .cmdline has none", () => {
    const cfg = zstd(newc([{ name: "etc/initos/config.json", data: configJson(3) }]));
    expect(read(peImage([{ name: ".initrd", data: cfg }])).cmdline).toBeNull();
  });
});

describe("readUkiConfig: not a PE image, or a truncated one", () => {
  it("garbage, an empty file, a short file: not a PE image", () => {
    expect(refusal(Buffer.from("this is not an EFI binary, just some text that goes on for a while....."))).toBe(`update: ${NAME}: not a PE image (no MZ header)`);
    expect(refusal(Buffer.alloc(0))).toBe(`update: ${NAME}: not a PE image (0 bytes, less than a DOS header)`);
    expect(refusal(Buffer.from("MZ"))).toBe(`update: ${NAME}: not a PE image (2 bytes, less than a DOS header)`);
  });

  it("an MZ header pointing past the end, or at no PE signature", () => {
    const dos = Buffer.alloc(64);
    dos.write("MZ");
    dos.writeUInt32LE(0x10000, 0x3c);
    expect(refusal(dos)).toBe(`update: ${NAME}: truncated: the PE header (offset 65536, 24 bytes) runs past the end of the file (64 bytes)`);
    const pe = ukiWith(configJson(1));
    const noSig = Buffer.from(pe);
    noSig.write("XX", 0x40);
    expect(refusal(noSig)).toBe(`update: ${NAME}: not a PE image (no PE signature at offset 64)`);
  });

  it("a PE32 (not PE32+) image, no sections, too many sections", () => {
    const pe = ukiWith(configJson(1));
    const pe32 = Buffer.from(pe);
    pe32.writeUInt16LE(0x10b, 0x40 + 24);
    expect(refusal(pe32)).toBe(`update: ${NAME}: not a PE32+ image (optional header magic 0x10b)`);
    const none = Buffer.from(pe);
    none.writeUInt16LE(0, 0x46);
    expect(refusal(none)).toBe(`update: ${NAME}: not a UKI (0 PE sections)`);
    const many = Buffer.from(pe);
    many.writeUInt16LE(200, 0x46);
    expect(refusal(many)).toBe(`update: ${NAME}: not a UKI (200 PE sections)`);
  });

  it("a section table that runs past the end of the file", () => {
    const pe = ukiWith(configJson(1));
    const b = Buffer.from(pe);
    b.writeUInt16LE(95, 0x46); // the table ends at byte 4128 of a 600-byte file
    expect(refusal(b.subarray(0, 600))).toBe(`update: ${NAME}: truncated: the section table (95 sections) (offset 328, 3800 bytes) runs past the end of the file (600 bytes)`);
  });

  it("a file cut short: the first section that runs past the end is named", () => {
    const pe = ukiWith(configJson(1));
    const at = initrdOf(pe).at;
    expect(refusal(pe.subarray(0, at + 1000))).toMatch(new RegExp(`^update: ${NAME}: truncated: section ".initrd" \\(offset ${at}, \\d+ bytes\\) runs past the end of the file \\(${at + 1000} bytes\\)$`));
    expect(refusal(pe.subarray(0, pe.length - 1))).toMatch(/truncated: section ".linux" .* runs past the end of the file/);
  });

  it("a section whose offset points past the end of the file", () => {
    expect(refusal(withField(ukiWith(configJson(1)), 1, "rawOffset", 0x7fffffff))).toMatch(/^update: .*: truncated: section ".osrel" \(offset 2147483647, 512 bytes\) runs past the end of the file/);
  });

  it("an .initrd bigger in memory than in the file, two .initrd sections, none, an empty one", () => {
    const pe = ukiWith(configJson(1));
    const raw = pe.readUInt32LE(sectionEntry(3) + SECTION_FIELDS.rawSize);
    expect(refusal(withField(pe, 3, "virtualSize", raw + 1))).toBe(`update: ${NAME}: section .initrd is ${raw + 1} bytes but has only ${raw} in the file`);
    const two = Buffer.from(pe);
    two.write(".initrd\0", sectionEntry(1), "latin1");
    expect(refusal(two)).toBe(`update: ${NAME}: not a UKI (2 .initrd sections)`);
    const none = Buffer.from(pe);
    none.write(".initrx\0", sectionEntry(3), "latin1");
    expect(refusal(none)).toBe(`update: ${NAME}: not a UKI (no .initrd section)`);
    expect(refusal(withField(pe, 3, "virtualSize", 0))).toBe(`update: ${NAME}: not a UKI (an empty .initrd section)`);
  });

  it("a file that cannot be opened", () => {
    expect(() => readUkiConfig(new FakeSys(), PATH, NAME, cliUnzstd)).toThrow(`update: ${NAME}: cannot be read (open ${PATH}: ENOENT)`);
  });
});

describe("readUkiConfig: the .initrd's zstd frames", () => {
  const cfgFrame = () => zstd(newc([{ name: "etc/initos/config.json", data: configJson(1) }]));

  it("an .initrd that is not zstd (garbage; an uncompressed cpio after the last frame, which the kernel would unpack over the config)", () => {
    expect(refusal(ukiOf(Buffer.from("garbage garbage garbage")))).toBe(`update: ${NAME}: the .initrd is not zstd frames (0x62726167 at offset 1024)`);
    const cpio = newc([{ name: "etc/initos/config.json", data: configJson(99) }]);
    expect(refusal(ukiOf(Buffer.concat([cfgFrame(), cpio])))).toMatch(/^update: .*: the \.initrd is not zstd frames \(0x37303730 at offset \d+\)$/);
  });

  it("a frame cut short by the section's end, at every length", () => {
    const first = zstd(Buffer.alloc(300_000, 1));
    const f = Buffer.concat([first, cfgFrame()]);
    const cuts = new Set<string>();
    for (let len = 1; len < f.length; len += len < 40 ? 1 : 37) {
      if (len === first.length) continue; // a whole frame: the last one then, and no cpio (below)
      const m = refusal(ukiOf(f.subarray(0, len)));
      cuts.add(m.replace(/\d+/g, "N"));
    }
    // Every cut is named as such, from the magic number to the last block
    for (const c of cuts) expect(c).toMatch(/truncated \.initrd: .* runs past the end of the section|not zstd frames/);
    expect([...cuts].some((c) => c.includes("block header"))).toBe(true);
    expect(refusal(ukiOf(first))).toBe(`update: ${NAME}: the .initrd's last segment: cpio: not a newc header at offset 0`);
  });

  it("a frame header with the reserved bit, a reserved block type, a block bigger than the frame allows", () => {
    const f = cfgFrame();
    const reserved = Buffer.from(f);
    reserved[4] = reserved[4]! | 0x08;
    expect(refusal(ukiOf(reserved))).toBe(`update: ${NAME}: zstd frame at offset 1024: reserved header bit set`);
    // The first block header follows the 4-byte magic, the descriptor and the window byte (a pipe: no content size).
    expect(f[4]! & 0xe0).toBe(0); // not single segment, no content size
    const bt3 = Buffer.from(f);
    bt3[6] = bt3[6]! | 0x06;
    expect(refusal(ukiOf(bt3))).toBe(`update: ${NAME}: zstd frame at offset 1024: reserved block type at offset 1030`);
    const huge = Buffer.from(f);
    huge.writeUIntLE((huge.readUIntLE(6, 3) & 7) | (0x1fffff << 3), 6, 3);
    expect(refusal(ukiOf(huge))).toMatch(/^update: .*: zstd frame at offset 1024: a 2097151-byte block at offset 1030, more than the frame's \d+-byte maximum$/);
  });

  it("a content size bigger than the frame's blocks can hold", () => {
    const f = zstd(Buffer.from("abc"), { sized: true }); // single segment, 1-byte content size
    expect(f[4]! & 0xe0).toBe(0x20);
    const b = Buffer.from(f);
    b[5] = 200;
    expect(refusal(ukiOf(b))).toBe(`update: ${NAME}: zstd frame at offset 1024 says 200 bytes of content, more than its blocks can hold`);
  });

  it("a zero-size frame last: an empty segment holds no config", () => {
    const empty = zstd(Buffer.alloc(0), { sized: true });
    expect(refusal(ukiOf(Buffer.concat([cfgFrame(), empty])))).toBe(`update: ${NAME}: no etc/initos/config.json in the .initrd's last segment`);
    // Only skippable frames, or only zeros: no data frame at all
    const skippable = Buffer.alloc(8);
    skippable.writeUInt32LE(0x184d2a50, 0);
    expect(refusal(ukiOf(skippable))).toBe(`update: ${NAME}: the .initrd holds no zstd frame`);
    expect(refusal(ukiOf(Buffer.alloc(100)))).toBe(`update: ${NAME}: the .initrd holds no zstd frame`);
  });

  it("a skippable frame whose size runs past the section", () => {
    const s = Buffer.alloc(8);
    s.writeUInt32LE(0x184d2a5f, 0);
    s.writeUInt32LE(0xffffff, 4);
    expect(refusal(ukiOf(Buffer.concat([cfgFrame(), s])))).toMatch(/truncated \.initrd: a skippable frame at offset \d+ runs past the end of the section/);
  });

  it("a last segment too big to be a config segment is not decompressed", () => {
    const unzstd = spy();
    const big = zstd(Buffer.alloc(CONFIG_SEGMENT_MAX + 1, 3), { sized: true });
    expect(refusal(ukiOf(Buffer.concat([cfgFrame(), big])), unzstd)).toBe(`update: ${NAME}: the .initrd's last segment (up to ${CONFIG_SEGMENT_MAX + 1} bytes) is not a config segment (at most ${CONFIG_SEGMENT_MAX})`);
    expect(unzstd.given).toEqual([]);
  });

  it("a frame the decompressor refuses (corrupt compressed data)", () => {
    const f = zstd(newc([{ name: "etc/initos/config.json", data: configJson(1) }]), { args: ["-19"] });
    const bad = Buffer.from(f);
    for (let i = 12; i < bad.length - 8; i++) bad[i] = bad[i]! ^ 0x5a;
    expect(refusal(ukiOf(bad))).toMatch(/^update: .*: the \.initrd's last segment does not decompress \(.*\)$/);
  });
});

describe("readUkiConfig: the config segment's cpio and config", () => {
  it("no config.json in the last segment (it is in an earlier one: not where the build puts it)", () => {
    const uki = ukiWith("", { configEntries: [{ name: "etc/initos/other.json", data: "{}" }] });
    expect(refusal(uki)).toBe(`update: ${NAME}: no etc/initos/config.json in the .initrd's last segment`);
  });

  it("a config.json that is a symlink, a directory or a hard link", () => {
    for (const e of [{ mode: 0o120777 }, { mode: 0o40755 }, { mode: 0o100644, nlink: 2 }]) {
      expect(refusal(ukiWith("", { configEntries: [{ name: "etc/initos/config.json", data: configJson(1), ...e }] }))).toBe(`update: ${NAME}: etc/initos/config.json in the .initrd is not a plain file`);
    }
  });

  it("a segment that is not cpio", () => {
    const uki = ukiOf(zstd(Buffer.from("not a cpio archive at all, but long enough to hold a header..................................................................")));
    expect(refusal(uki)).toBe(`update: ${NAME}: the .initrd's last segment: cpio: not a newc header at offset 0`);
  });

  it("a config that is not JSON, or that parseConfig finds an error in: nothing is defaulted for an update", () => {
    expect(refusal(ukiWith("{ not json"))).toMatch(new RegExp(`^update: ${NAME}: config: /etc/initos/config.json is not JSON \\(.*\\)$`));
    expect(refusal(ukiWith(configJson(1, { surprise: true })))).toMatch(new RegExp(`^update: ${NAME}: config: /etc/initos/config.json: \\(top level\\): .*surprise`));
    expect(refusal(ukiWith(configJson(-1)))).toBe(`update: ${NAME}: config: /etc/initos/config.json: version: Too small: expected number to be >=0`);
  });
});

describe("parseNewc", () => {
  it("reads entries across concatenated archives, skipping the zero padding between them", () => {
    const two = Buffer.concat([newc([{ name: "a", data: "1" }]), newc([{ name: "b", data: "22" }])]);
    expect(parseNewc(two).map((e) => [e.name, Buffer.from(e.data).toString()])).toEqual([
      ["a", "1"],
      ["b", "22"],
    ]);
  });

  it("refuses a header cut short, a name or data past the end, a field that is not hex, an entry with no name", () => {
    const a = newc([{ name: "etc/initos/config.json", data: "x".repeat(100) }]);
    expect(() => parseNewc(a.subarray(0, 50))).toThrow("cpio: a header at offset 0 runs past the end");
    expect(() => parseNewc(a.subarray(0, 120))).toThrow("cpio: a name at offset 0 runs past the end");
    expect(() => parseNewc(a.subarray(0, 150))).toThrow(`cpio: "etc/initos/config.json"'s 100 bytes run past the end`);
    const notHex = Buffer.from(a);
    notHex.write("zz", 6 + 6 * 8);
    expect(() => parseNewc(notHex)).toThrow("cpio: a header at offset 0 has a field that is not hex");
    const noName = Buffer.from(a);
    noName.write("00000000", 6 + 11 * 8);
    expect(() => parseNewc(noName)).toThrow("cpio: an entry at offset 0 has no name");
  });
});

describe("initrdFrames", () => {
  it("lists the frames without decompressing any", () => {
    const frames = initrdFrames(sysWith(ukiWith(configJson(1))), PATH, NAME);
    expect(frames).toHaveLength(3);
    expect(frames.every((f) => f.length > 0 && !f.skippable)).toBe(true);
  });
});
