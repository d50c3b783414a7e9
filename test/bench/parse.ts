// Reads one boot's serial console into numbers. Everything is on the kernel's clock (printk
// timestamps, on by default) except the firmware, which runs before the kernel has a clock and
// is measured on the host (VM start → the kernel's first line).
//
// Markers:
//   kernel   "Trying to unpack rootfs image as initramfs...", "Freeing initrd memory", "Run /init as init process"
//   agent    "initos: ..." (first line), "initos: stage X: ok in Nms" (at the end of X),
//            "initos: switch_root: exec ...", "initos: handoff: MemAvailable N kB before switch_root"
//   ref      "initos-ref: stage X" (at the start of X), "initos-ref: switch_root: exec ...",
//            "initos-ref: handoff: MemAvailable N kB before switch_root"
//   root     "INITOS-TEST-ROOT ... uptime=S memavailable=NkB" (printed by the root's init as it starts)

/**
 * agent: this build's UKI; reference: the busybox shell initrd; baseline: the agent UKI of an
 * earlier build (BENCH_BASELINE), for a before/after of a change in the same run.
 */
export type Variant = "agent" | "baseline" | "reference";

/** A span of the boot, in seconds since the kernel started (the firmware's is negative). */
export interface Segment {
  name: string;
  start: number;
  end: number;
}

export interface BootSample {
  variant: Variant;
  run: number;
  ok: boolean;
  error?: string;
  logPath: string;
  /** Host clock, seconds: VM start → the kernel's first line (firmware, UKI load and verify). */
  firmware?: number;
  /** Host clock, seconds: VM start → the root's init line. */
  wallToRoot?: number;
  unpack?: number;
  kernelToInit?: number;
  /** /init → the first line of the agent or the script (runtime start-up). */
  initToFirstLine?: number;
  initToRoot?: number;
  kernelToRoot?: number;
  /** Stage durations in ms, in the order they ran. */
  stages: Record<string, number>;
  memBeforeKb?: number;
  /** The initrd image the kernel held while unpacking it ("Freeing initrd memory: NK"). */
  initrdKb?: number;
  /** What the unpacked initramfs holds as /init starts (preinit's "initramfs N kB", tmpfs only). */
  initramfsKb?: number;
  /**
   * Peak RAM of the initramfs before switch_root: at the end of unpacking the kernel holds
   * both the image and the unpacked files (initrdKb + initramfsKb). The runtime image's
   * decompressed pages are page cache (reclaimable) and not counted.
   */
  peakInitramfsKb?: number;
  memAfterKb?: number;
  segments: Segment[];
  /** Host contention when the boot started: 1-minute load average, other QEMUs running. */
  hostLoad?: number;
  otherVms?: number;
}

interface Stamped {
  t: number;
  text: string;
}

/** Lines with a printk timestamp; the console interleaves them with plain output. */
export function stampedLines(output: string): Stamped[] {
  const out: Stamped[] = [];
  for (const line of output.split(/\r?\n/)) {
    const m = /\[\s*(\d+\.\d+)\] (.*)$/.exec(line);
    if (m) out.push({ t: Number(m[1]), text: m[2]! });
  }
  return out;
}

const first = (lines: Stamped[], re: RegExp): Stamped | undefined => lines.find((l) => re.test(l.text));

export const ROOT_MARKER = /INITOS-TEST-ROOT [^\n]*uptime=([\d.]+) memavailable=(-?\d+)kB/;

export function parseBoot(variant: Variant, run: number, output: string, logPath: string, wall: { firmware?: number; toRoot?: number }): BootSample {
  const lines = stampedLines(output);
  const sample: BootSample = { variant, run, ok: false, logPath, stages: {}, segments: [], firmware: wall.firmware, wallToRoot: wall.toRoot };
  const unpackStart = first(lines, /Trying to unpack rootfs image as initramfs/)?.t;
  const unpackEnd = first(lines, /Freeing initrd memory/)?.t;
  const runInit = first(lines, /Run \/init as init process/)?.t;
  const root = ROOT_MARKER.exec(output);
  const rootAt = root ? Number(root[1]) : undefined;
  if (unpackStart !== undefined && unpackEnd !== undefined) sample.unpack = unpackEnd - unpackStart;
  sample.kernelToInit = runInit;
  if (root) sample.memAfterKb = Number(root[2]);
  const freed = first(lines, /Freeing initrd memory: \d+K/);
  if (freed) sample.initrdKb = Number(/Freeing initrd memory: (\d+)K/.exec(freed.text)![1]);
  const held = first(lines, /initos(-ref| preinit): initramfs \d+ kB/);
  if (held) sample.initramfsKb = Number(/initramfs (\d+) kB/.exec(held.text)![1]);
  if (sample.initrdKb !== undefined && sample.initramfsKb !== undefined) sample.peakInitramfsKb = sample.initrdKb + sample.initramfsKb;
  if (runInit !== undefined && rootAt !== undefined) {
    sample.initToRoot = rootAt - runInit;
    sample.kernelToRoot = rootAt;
  }

  const seg = (name: string, start: number | undefined, end: number | undefined) => {
    if (start !== undefined && end !== undefined && end >= start) sample.segments.push({ name, start, end });
  };
  if (wall.firmware !== undefined) seg("firmware (host clock)", -wall.firmware, 0);
  seg("kernel", 0, unpackStart ?? runInit);
  seg("initramfs unpack", unpackStart, unpackEnd);
  seg("kernel", unpackEnd, runInit);

  const prefix = variant === "reference" ? "initos-ref: " : "initos: ";
  const own = lines.filter((l) => l.text.startsWith(prefix) && (runInit === undefined || l.t >= runInit));
  const firstLine = own[0]?.t;
  if (runInit !== undefined && firstLine !== undefined) sample.initToFirstLine = firstLine - runInit;
  seg(variant === "reference" ? "busybox sh start-up" : "preinit + Bun start-up", runInit, firstLine);

  const exec = own.find((l) => l.text.startsWith(`${prefix}switch_root: exec`))?.t;
  const mem = own.map((l) => /handoff: MemAvailable (\d+) kB before switch_root/.exec(l.text)).find((m) => m);
  if (mem) sample.memBeforeKb = Number(mem[1]);

  if (variant !== "reference") {
    // "stage X: ok in Nms" is logged when X ends.
    let last: number | undefined;
    for (const l of own) {
      const m = /^initos: stage (\S+): ok in (\d+)ms/.exec(l.text);
      if (!m) continue;
      const ms = Number(m[2]);
      sample.stages[m[1]!] = ms;
      seg(m[1]!, l.t - ms / 1000, l.t);
      last = l.t;
    }
    seg("switch_root", last, exec);
  } else {
    // "stage X" is logged when X starts; it ends where the next starts (the last at the exec).
    const starts = own.map((l) => ({ l, m: /^initos-ref: stage (\S+)$/.exec(l.text) })).filter((x) => x.m);
    starts.forEach(({ l, m }, i) => {
      const end = starts[i + 1]?.l.t ?? exec;
      if (end === undefined) return;
      sample.stages[m![1]!] = (end - l.t) * 1000;
      seg(m![1]!, l.t, end);
    });
  }
  seg("exec → root init", exec, rootAt);

  const failed = own.find((l) => /boot failed|stage \S+: failed/.test(l.text));
  if (failed) sample.error = failed.text;
  sample.ok = sample.initToRoot !== undefined;
  if (!sample.ok && !sample.error) sample.error = "no root marker";
  return sample;
}
