// Synthetic UKIs for the update checks' unit tests: a PE32+ section table written here, an
// .initrd of real zstd frames (the zstd tool) holding newc cpio archives written here, so that
// each malformation is one edit away from a valid file.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import type { FrameDecompressor } from "../../agent/update/uki.ts";

/** zstd of `data`; `sized` gives the frame its content size (the tool knows it for a file, not a pipe). */
export function zstd(data: Uint8Array, opts: { sized?: boolean; args?: string[] } = {}): Buffer {
  if (!opts.sized) return execFileSync("zstd", ["-q", "-c", ...(opts.args ?? [])], { input: data });
  const dir = mkdtempSync(`${tmpdir()}/initos-zstd-`);
  try {
    writeFileSync(`${dir}/in`, data);
    return execFileSync("zstd", ["-q", "-c", ...(opts.args ?? []), `${dir}/in`]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The zstd tool as the agent's one-frame decompressor (Node 20 has no zstd in node:zlib). */
export const cliUnzstd: FrameDecompressor = (frame, maxOutput) => {
  const out = execFileSync("zstd", ["-d", "-q", "-c"], { input: frame, maxBuffer: maxOutput + 1 });
  if (out.length > maxOutput) throw new Error(`more than ${maxOutput} bytes`);
  return out;
};

export interface NewcEntry {
  name: string;
  data?: Uint8Array | string;
  /** Full st_mode; a regular file 0644 by default. */
  mode?: number;
  nlink?: number;
}

/** A newc cpio archive (with its TRAILER!!! and 512-byte padding, as writeCpio makes). */
export function newc(entries: readonly NewcEntry[]): Buffer {
  const parts: Buffer[] = [];
  let size = 0;
  const put = (b: Buffer) => {
    parts.push(b);
    size += b.length;
  };
  const pad = () => put(Buffer.alloc((4 - (size % 4)) % 4));
  const entry = (ino: number, e: NewcEntry) => {
    const data = typeof e.data === "string" ? Buffer.from(e.data) : Buffer.from(e.data ?? new Uint8Array());
    const name = Buffer.from(`${e.name}\0`);
    const fields = [ino, e.mode ?? 0o100644, 0, 0, e.nlink ?? 1, 0, data.length, 0, 0, 0, 0, name.length, 0];
    put(Buffer.from(`070701${fields.map((n) => n.toString(16).padStart(8, "0")).join("")}`, "latin1"));
    put(name);
    pad();
    put(data);
    pad();
  };
  entries.forEach((e, i) => entry(i + 1, e));
  entry(0, { name: "TRAILER!!!", mode: 0, nlink: 1 });
  put(Buffer.alloc((512 - (size % 512)) % 512));
  return Buffer.concat(parts);
}

export interface PeSectionIn {
  name: string;
  data: Uint8Array;
  /** Defaults to data's length. */
  virtualSize?: number;
}

/**
 * A PE32+ image: DOS header (e_lfanew 0x40), PE signature, COFF header, a 240-byte optional
 * header (magic 0x20b, nothing else), the section table, then each section's data at a
 * 512-byte aligned offset, its raw size rounded up to 512 (objcopy's file alignment).
 */
export function peImage(sections: readonly PeSectionIn[]): Buffer {
  const optSize = 240;
  const tableAt = 0x40 + 24 + optSize;
  let at = Math.ceil((tableAt + sections.length * 40) / 512) * 512;
  const head = Buffer.alloc(at);
  head.writeUInt16LE(0x5a4d, 0);
  head.writeUInt32LE(0x40, 0x3c);
  head.writeUInt32LE(0x00004550, 0x40);
  head.writeUInt16LE(0x8664, 0x44);
  head.writeUInt16LE(sections.length, 0x46);
  head.writeUInt16LE(optSize, 0x40 + 20);
  head.writeUInt16LE(0x20b, 0x40 + 24);
  const bodies: Buffer[] = [];
  let va = 0x1000;
  sections.forEach((s, i) => {
    const e = tableAt + i * 40;
    head.write(s.name, e, 8, "latin1");
    const raw = Math.ceil(s.data.length / 512) * 512;
    head.writeUInt32LE(s.virtualSize ?? s.data.length, e + 8);
    head.writeUInt32LE(va, e + 12);
    head.writeUInt32LE(raw, e + 16);
    head.writeUInt32LE(at, e + 20);
    const body = Buffer.alloc(raw);
    Buffer.from(s.data).copy(body);
    bodies.push(body);
    at += raw;
    va += Math.ceil(Math.max(raw, 1) / 0x1000) * 0x1000;
  });
  return Buffer.concat([head, ...bodies]);
}

/** A section table entry's field offsets (from the entry's start), for tests that edit them. */
export const SECTION_FIELDS = { virtualSize: 8, rawSize: 16, rawOffset: 20 } as const;
/** Where section `i`'s table entry starts in a peImage. */
export const sectionEntry = (i: number) => 0x40 + 24 + 240 + i * 40;

export const PEM_A = "-----BEGIN CERTIFICATE-----\nQUFBQQ==\n-----END CERTIFICATE-----\n";
export const PEM_B = "-----BEGIN CERTIFICATE-----\nQkJCQg==\n-----END CERTIFICATE-----\n";
export const HASH_MODULES = "a".repeat(64);
export const HASH_TOOLS = "b".repeat(64);
export const VERITY = { hashType: 1 as const, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks: 100, salt: "" };

/** A config as the build writes it, for version `version` with the modules and tools images. */
export function configJson(version: number, over: Record<string, unknown> = {}): string {
  return JSON.stringify({
    version,
    images: [
      { name: "modules", rootHash: HASH_MODULES, verity: VERITY },
      { name: "tools", rootHash: HASH_TOOLS, verity: { ...VERITY, dataBlocks: 50 } },
    ],
    update: { signers: [PEM_A] },
    ...over,
  });
}

/**
 * A UKI whose .initrd is base + agent + config segments, each a zstd frame of a newc cpio, the
 * config segment holding `config` (text) at etc/initos/config.json.
 */
export function ukiWith(config: string, opts: { agentBytes?: number; cmdline?: string; configEntries?: NewcEntry[]; initrdTail?: Buffer } = {}): Buffer {
  const base = zstd(newc([{ name: "init", data: "#!preinit", mode: 0o100755 }, { name: "etc", mode: 0o40755, nlink: 2 }]));
  // The agent segment: incompressible bytes (raw blocks) and zeros (RLE and compressed blocks).
  const agentData = Buffer.concat([Buffer.alloc(opts.agentBytes ?? 300_000, 7), Buffer.from(Array.from({ length: 200_000 }, (_, i) => (i * 7919) % 251))]);
  const agent = zstd(newc([{ name: "usr/bin/initos-agent", data: agentData, mode: 0o100755 }]));
  const cfg = zstd(newc(opts.configEntries ?? [{ name: "etc/initos/config.json", data: config }]), { sized: true });
  const initrd = Buffer.concat([base, agent, cfg, opts.initrdTail ?? Buffer.alloc(0)]);
  return peImage([
    { name: ".text", data: Buffer.alloc(3000, 0xcc) },
    { name: ".osrel", data: Buffer.from('NAME="initos"\n') },
    { name: ".cmdline", data: Buffer.from(`${opts.cmdline ?? "console=ttyS0 rw"}\0`) },
    { name: ".initrd", data: initrd },
    { name: ".linux", data: Buffer.alloc(5000, 0x90) },
  ]);
}
