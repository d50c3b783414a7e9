// Where the bytes are: UKI, initrd segments, agent binary, the largest files in the initrd; and
// how the agent's cpio segment compresses with each candidate tool and level.
import { spawnSync } from "node:child_process";
import { closeSync, existsSync, openSync, readSync, statSync } from "node:fs";

export const size = (f: string): number | undefined => (existsSync(f) ? statSync(f).size : undefined);

export interface SizeReport {
  files: Record<string, number | undefined>;
  /** initrd.img as the kernel gets it (both segments compressed) and unpacked. */
  initrdCompressed?: number;
  initrdUncompressed?: number;
  largest: { segment: string; path: string; size: number }[];
}

/** Regular files in a newc ("070701") cpio archive, with their sizes; throws unless it ends with its trailer. */
export function cpioFiles(archive: string): { path: string; size: number }[] {
  const fd = openSync(archive, "r");
  const out: { path: string; size: number }[] = [];
  const hdr = Buffer.alloc(110);
  const align4 = (n: number) => (n + 3) & ~3;
  try {
    for (let off = 0; ; ) {
      if (readSync(fd, hdr, 0, 110, off) < 110 || hdr.toString("latin1", 0, 6) !== "070701") throw new Error(`${archive}: no cpio header at ${off} (truncated?)`);
      const field = (i: number) => parseInt(hdr.toString("latin1", 6 + i * 8, 14 + i * 8), 16);
      const [mode, fileSize, nameSize] = [field(1), field(6), field(11)];
      const name = Buffer.alloc(nameSize);
      readSync(fd, name, 0, nameSize, off + 110);
      const path = name.toString("utf8", 0, nameSize - 1);
      if (path === "TRAILER!!!") break;
      if ((mode & 0o170000) === 0o100000) out.push({ path, size: fileSize });
      off = align4(align4(off + 110 + nameSize) + fileSize);
    }
  } finally {
    closeSync(fd);
  }
  return out;
}

/** Sizes of the build outputs in `b` (this run's snapshot of build/). */
export function sizeReport(b: string, top = 15): SizeReport {
  const files: Record<string, number | undefined> = {};
  for (const f of [
    "target.efi", "initos.efi", "reference.efi", "initrd.img", "base.cpio", "base.cpio.zst", "agent.cpio", "agent.cpio.zst",
    "initos-agent", "reference.cpio", "reference.initrd", "images/modules.sqfs", "images/tools.sqfs",
  ]) {
    files[f] = size(`${b}/${f}`);
  }
  const base = files["base.cpio"];
  const agent = files["agent.cpio"];
  const largest = (["base", "agent"] as const)
    .flatMap((segment) => (existsSync(`${b}/${segment}.cpio`) ? cpioFiles(`${b}/${segment}.cpio`).map((f) => ({ segment, ...f })) : []))
    .sort((a, b) => b.size - a.size)
    .slice(0, top);
  return {
    files,
    initrdCompressed: files["initrd.img"],
    initrdUncompressed: base !== undefined && agent !== undefined ? base + agent : undefined,
    largest,
  };
}

export interface Method {
  name: string;
  ext: string;
  compress: string[];
  decompress: string[];
}

/**
 * The candidates. lz4 writes the legacy format (-l), the only one the kernel unpacks; xz uses
 * CRC32 checks, the only ones the kernel's xz decoder knows. zstd and xz compress with every
 * core (-T0, as the Makefile does); decompression is single-threaded everywhere, as in the kernel.
 */
export const METHODS: Method[] = [
  { name: "gzip -6", ext: "gz", compress: ["gzip", "-6", "-c"], decompress: ["gzip", "-d", "-c"] },
  { name: "gzip -9", ext: "gz", compress: ["gzip", "-9", "-c"], decompress: ["gzip", "-d", "-c"] },
  { name: "xz -6", ext: "xz", compress: ["xz", "-6", "-T0", "--check=crc32", "-c"], decompress: ["xz", "-d", "-T1", "-c"] },
  { name: "zstd -3", ext: "zst", compress: ["zstd", "-3", "-T0", "-q", "-c"], decompress: ["zstd", "-d", "-q", "-c"] },
  { name: "zstd -9", ext: "zst", compress: ["zstd", "-9", "-T0", "-q", "-c"], decompress: ["zstd", "-d", "-q", "-c"] },
  { name: "zstd -19", ext: "zst", compress: ["zstd", "-19", "-T0", "-q", "-c"], decompress: ["zstd", "-d", "-q", "-c"] },
  { name: "lz4 -1", ext: "lz4", compress: ["lz4", "-1", "-l", "-c"], decompress: ["lz4", "-d", "-c"] },
  { name: "lz4 -9", ext: "lz4", compress: ["lz4", "-9", "-l", "-c"], decompress: ["lz4", "-d", "-c"] },
];

export interface CompressionResult {
  method: string;
  file: string;
  size: number;
  compressSeconds: number;
  decompressSeconds: number;
  /** The kernel's unpack of this file in a VM (decompress + write the initramfs), when measured. */
  kernelUnpackSeconds?: number;
}

/** Runs argv with stdin from `input` and stdout to `output`; returns wall seconds. */
function timed(argv: string[], input: string, output: string): number {
  const inFd = openSync(input, "r");
  const outFd = openSync(output, "w");
  try {
    const t0 = performance.now();
    const r = spawnSync(argv[0]!, argv.slice(1), { stdio: [inFd, outFd, "pipe"] });
    const s = (performance.now() - t0) / 1000;
    if (r.status !== 0) throw new Error(`${argv.join(" ")}: ${r.signal ? `killed by ${r.signal}` : `exit ${r.status}`} ${r.stderr?.toString().trim() ?? ""}`.trim());
    return s;
  } finally {
    closeSync(inFd);
    closeSync(outFd);
  }
}

/**
 * Compresses `input` with each method into `dir`. Blocks the event loop: run it with no VM up.
 * A method that fails twice (the host's OOM killer has been seen to pick a compressor) is left
 * out of the results, with a line saying so.
 */
export function compareCompression(input: string, dir: string, methods = METHODS): CompressionResult[] {
  return methods.flatMap((m) => {
    const file = `${dir}/agent.cpio.${m.name.replace(/[^a-z0-9]+/g, "")}.${m.ext}`;
    for (let attempt = 1; ; attempt++) {
      try {
        const compressSeconds = timed(m.compress, input, file);
        const decompressSeconds = timed(m.decompress, file, "/dev/null");
        return [{ method: m.name, file, size: statSync(file).size, compressSeconds, decompressSeconds }];
      } catch (e) {
        if (attempt < 2) continue;
        console.error(`bench: ${m.name} left out: ${(e as Error).message}`);
        return [];
      }
    }
  });
}
