// The printed report: boot times and their ratio, stages, memory, sizes, compression, and the
// compression default the numbers point to.
import type { BootSample, Variant } from "./parse.ts";
import type { CompressionResult, SizeReport } from "./sizes.ts";
import { fmtMB, fmtS, fmtSummary, type Summary, summarize, table } from "./stats.ts";
import type { SidecarResult } from "./vms.ts";

const ALL: Variant[] = ["agent", "baseline", "reference"];
const ok = (samples: BootSample[], v: Variant) => samples.filter((s) => s.variant === v && s.ok);
/** The variants this run booted, in report order (baseline only with BENCH_BASELINE). */
export const variantsOf = (samples: BootSample[]): Variant[] => ALL.filter((v) => v !== "baseline" || samples.some((s) => s.variant === v));

export type Metric = "firmware" | "kernelToInit" | "unpack" | "initToFirstLine" | "initToRoot" | "kernelToRoot" | "wallToRoot";
export const METRICS: [Metric, string][] = [
  ["firmware", "VM start → kernel (firmware, host clock)"],
  ["kernelToInit", "kernel start → /init"],
  ["unpack", "  of which initramfs unpack"],
  ["initToFirstLine", "/init → first log line (runtime start-up)"],
  ["initToRoot", "/init → root init exec"],
  ["kernelToRoot", "kernel start → root init exec"],
  ["wallToRoot", "VM start → root init (host clock)"],
];

export function metricSummaries(samples: BootSample[]): Record<Variant, Record<Metric, Summary | undefined>> {
  const per = (v: Variant) => Object.fromEntries(METRICS.map(([m]) => [m, summarize(ok(samples, v).map((s) => s[m]))])) as Record<Metric, Summary | undefined>;
  return { agent: per("agent"), baseline: per("baseline"), reference: per("reference") };
}

export function stageSummaries(samples: BootSample[]): Record<Variant, Record<string, Summary | undefined>> {
  const names = (v: Variant) => [...new Set(ok(samples, v).flatMap((s) => Object.keys(s.stages)))];
  const per = (v: Variant) => Object.fromEntries(names(v).map((n) => [n, summarize(ok(samples, v).map((s) => s.stages[n]))]));
  return { agent: per("agent"), baseline: per("baseline"), reference: per("reference") };
}

const ratio = (a: Summary | undefined, b: Summary | undefined) => (a && b && b.median > 0 ? a.median / b.median : undefined);

export function bootSection(samples: BootSample[], runs: number): string {
  const m = metricSummaries(samples);
  const loads = summarize(samples.map((s) => s.hostLoad));
  const others = Math.max(0, ...samples.map((s) => s.otherVms ?? 0));
  const failed = samples.filter((s) => !s.ok);
  const base = variantsOf(samples).includes("baseline");
  const rows = METRICS.map(([k, label]) => [
    label,
    fmtSummary(m.agent[k]),
    ...(base ? [fmtSummary(m.baseline[k])] : []),
    fmtSummary(m.reference[k]),
    fmtS(ratio(m.agent[k], m.reference[k])),
    ...(base ? [fmtS(ratio(m.agent[k], m.baseline[k]))] : []),
  ]);
  const r = ratio(m.agent.initToRoot, m.reference.initToRoot);
  return [
    `== boot: ${runs} runs per variant, interleaved; OVMF Secure Boot + swtpm, QEMU TCG, 2 vCPUs, 2048 MiB`,
    `   host load avg at boot start: ${fmtSummary(loads, 1)} (min/median/max); other QEMUs seen: ${others}`,
    ...failed.map((s) => `   FAILED ${s.variant} run ${s.run}: ${s.error} (${s.logPath})`),
    "",
    table(["seconds, min / median / max", "agent", ...(base ? ["baseline"] : []), "reference", "ratio", ...(base ? ["agent/baseline"] : [])], rows),
    ...(base ? [`baseline: ${process.env.BENCH_BASELINE ?? "an earlier build's UKI"} (the same disk and images; ratio is agent/reference)`] : []),
    "",
    `ratio agent/reference, /init → root init exec (median): ${fmtS(r)}${r === undefined ? "" : r <= 1 ? "  (agent no slower)" : `  (agent slower by ${fmtS(m.agent.initToRoot!.median - m.reference.initToRoot!.median)} s)`}`,
    `ratio agent/reference, kernel start → root init exec (median): ${fmtS(ratio(m.agent.kernelToRoot, m.reference.kernelToRoot))}`,
  ].join("\n");
}

export function stageSection(samples: BootSample[]): string {
  const s = stageSummaries(samples);
  // Side by side where the names match (early, modules, esp, images, unlock, root).
  const names = [...new Set([...Object.keys(s.agent), ...Object.keys(s.reference)])];
  const base = variantsOf(samples).includes("baseline");
  const rows = names.map((n) => [
    n,
    fmtSummary(s.agent[n], 0),
    ...(base ? [fmtSummary(s.baseline[n], 0)] : []),
    fmtSummary(s.reference[n], 0),
    fmtS(ratio(s.agent[n], s.reference[n])),
    ...(base ? [fmtS(ratio(s.agent[n], s.baseline[n]))] : []),
  ]);
  return [
    "== stages, ms (min / median / max); agent: its own 'stage X: ok in Nms', reference: between its kmsg lines",
    "   (the agent's images stage runs beside trial, tpm and unlock on the unlock path: its stages overlap)",
    table(["stage", "agent", ...(base ? ["baseline"] : []), "reference", "ratio", ...(base ? ["agent/baseline"] : [])], rows),
  ].join("\n");
}

export function memorySection(samples: BootSample[], sidecar: SidecarResult | undefined): string {
  const rows = variantsOf(samples).map((v) => {
    const before = summarize(ok(samples, v).map((s) => s.memBeforeKb));
    const after = summarize(ok(samples, v).map((s) => s.memAfterKb));
    const freed = before && after ? `${((after.median - before.median) / 1024).toFixed(1)} MiB` : "n/a";
    return [v, before ? String(before.median) : "n/a (not logged)", after ? String(after.median) : "n/a", freed];
  });
  const rss = !sidecar
    ? "skipped"
    : sidecar.rssKb !== undefined
      ? `${sidecar.rssKb} kB (${(sidecar.rssKb / 1024).toFixed(1)} MiB), ${sidecar.afterSeconds} s after "sidecar: ready"`
      : sidecar.ok
        ? `n/a: 'ssh status' has no "agent rss:" line (status was: ${sidecar.status?.replace(/\n/g, "; ")})`
        : `n/a: ${sidecar.error}`;
  // The same root and kernel on both sides: equal "after" values mean the agent leaves nothing
  // behind (initramfs, its own memory) that the shell initrd does not.
  const after = (v: Variant) => summarize(ok(samples, v).map((s) => s.memAfterKb))?.median;
  const a = after("agent");
  const r = after("reference");
  const peak = variantsOf(samples).map((v) => {
    const med = (k: "initrdKb" | "initramfsKb" | "peakInitramfsKb") => summarize(ok(samples, v).map((s) => s[k]))?.median;
    const mib = (kb: number | undefined) => (kb === undefined ? "n/a" : `${(kb / 1024).toFixed(1)} MiB`);
    return [v, mib(med("initrdKb")), mib(med("initramfsKb")), mib(med("peakInitramfsKb"))];
  });
  return [
    "== peak initramfs RAM (median): the initrd image and the unpacked files, both held as unpacking ends",
    table(["variant", "initrd image", "unpacked at /init", "peak"], peak),
    "",
    "== memory: MemAvailable (kB, median) right before switch_root and as the root's init starts",
    table(["variant", "before", "after", "gained across the switch"], rows),
    `after the switch, agent minus reference: ${a !== undefined && r !== undefined ? `${((a - r) / 1024).toFixed(1)} MiB` : "n/a"} (same kernel and root: ~0 means nothing of the initrd stays behind)`,
    `sidecar: agent RSS: ${rss}`,
  ].join("\n");
}

export function sizeSection(r: SizeReport): string {
  const f = r.files;
  const rows: [string, number | undefined][] = [
    ["UKI, agent (target.efi)", f["target.efi"]],
    ["UKI, reference (reference.efi)", f["reference.efi"]],
    ["initrd.img, compressed (zstd, as in the UKI)", r.initrdCompressed],
    ["initrd, uncompressed (base + agent cpio)", r.initrdUncompressed],
    ["  base.cpio (preinit, modules)", f["base.cpio"]],
    ["  base.cpio.zst", f["base.cpio.zst"]],
    ["  agent.cpio (agent, libraries)", f["agent.cpio"]],
    ["  agent.cpio.zst", f["agent.cpio.zst"]],
    ["agent binary (initos-agent)", f["initos-agent"]],
    ["reference initrd, uncompressed / compressed", f["reference.cpio"]],
    ["", f["reference.initrd"]],
    ["ESP: modules.sqfs / tools.sqfs", f["images/modules.sqfs"]],
    ["", f["images/tools.sqfs"]],
  ];
  const merged: string[][] = [];
  for (const [label, bytes] of rows) {
    if (label === "") merged[merged.length - 1]![1] += ` / ${fmtMB(bytes)}`;
    else merged.push([label, fmtMB(bytes)]);
  }
  return [
    "== sizes, MB",
    table(["what", "MB"], merged),
    "",
    `== ${r.largest.length} largest files in the initrd`,
    table(["path", "segment", "MB"], r.largest.map((x) => [x.path, x.segment, fmtMB(x.size)])),
  ].join("\n");
}

export interface Recommendation {
  method: string;
  costSeconds: number;
  current?: { method: string; costSeconds: number };
  /** Every measured method's estimated boot cost, seconds. */
  costs: Record<string, number>;
  firmwareSecondsPerMB?: number;
  basis: string;
}

/** Costs within this fraction of the cheapest count as a tie; the faster build then wins. */
const TIE = 0.05;

/**
 * What a compressor costs a boot: the kernel unpacking it (measured in a VM) plus the firmware
 * reading and hashing the larger UKI (Secure Boot's image hash, the stub's PCR 9 measurement),
 * whose per-MB price comes from the two variants' firmware times and UKI sizes. Among methods
 * within 5% of the cheapest, the one that compresses fastest is picked (builds run often).
 */
export function recommend(results: CompressionResult[], samples: BootSample[], sizes: SizeReport, current = "zstd -9"): Recommendation | undefined {
  const m = metricSummaries(samples);
  const dBytes = (sizes.files["target.efi"] ?? 0) - (sizes.files["reference.efi"] ?? 0);
  const dFw = (m.agent.firmware?.median ?? 0) - (m.reference.firmware?.median ?? 0);
  const perMB = dBytes > 0 && dFw > 0 ? dFw / (dBytes / 1e6) : undefined;
  const measured = results.filter((r) => r.kernelUnpackSeconds !== undefined);
  const useKernel = measured.length > 0;
  const cost = (r: CompressionResult) => (useKernel ? r.kernelUnpackSeconds! : r.decompressSeconds) + (perMB ?? 0) * (r.size / 1e6);
  const pool = useKernel ? measured : results;
  if (pool.length === 0) return undefined;
  const cheapest = Math.min(...pool.map(cost));
  const best = pool.filter((r) => cost(r) <= cheapest * (1 + TIE)).reduce((a, b) => (b.compressSeconds < a.compressSeconds ? b : a));
  const cur = pool.find((r) => r.method === current);
  return {
    method: best.method,
    costSeconds: cost(best),
    current: cur ? { method: cur.method, costSeconds: cost(cur) } : undefined,
    costs: Object.fromEntries(pool.map((r) => [r.method, cost(r)])),
    firmwareSecondsPerMB: perMB,
    basis: `${useKernel ? "kernel unpack in the VM" : "host decompression"} + ${perMB === undefined ? "no firmware term (boots not measured)" : `firmware ${perMB.toFixed(3)} s per MB of UKI`}; ties (within ${TIE * 100}%) go to the fastest compression`,
  };
}

export function compressionSection(input: string, inputBytes: number | undefined, results: CompressionResult[], rec: Recommendation | undefined): string {
  const raw = results.find((r) => r.method === "none");
  const rows = results
    .filter((r) => r.method !== "none")
    .map((r) => [r.method, fmtMB(r.size), inputBytes ? (inputBytes / r.size).toFixed(2) : "n/a", fmtS(r.compressSeconds, 1), fmtS(r.decompressSeconds), fmtS(r.kernelUnpackSeconds), fmtS(rec?.costs[r.method])]);
  if (raw) rows.push(["none (cpio as is)", fmtMB(inputBytes), "1.00", "-", "-", fmtS(raw.kernelUnpackSeconds), fmtS(rec?.costs.none)]);
  return [
    `== compression of ${input} (${fmtMB(inputBytes)} MB), host times are wall seconds`,
    table(["method", "MB", "ratio", "compress s", "decompress s (host)", "kernel unpack s (VM)", "est. boot cost s"], rows),
    "compress: zstd and xz with -T0 (both cores); decompress: one thread, as the kernel does.",
    "kernel unpack: a direct kernel boot of that file alone, 'Trying to unpack' → 'Freeing initrd memory' on the",
    "kernel clock under TCG: decompression plus writing the files into the initramfs. The kernel's decompressors",
    "are slower than the userspace tools (no SIMD, smaller buffers; here also emulated), so rank by that column.",
    "est. boot cost: kernel unpack + the firmware's per-MB cost of a bigger UKI (reading it, the Secure Boot hash,",
    "the PCR measurements), from the agent's and the reference's firmware times and UKI sizes.",
    rec
      ? `recommendation: ${rec.method} (est. ${fmtS(rec.costSeconds)} s of boot${rec.current ? ` vs ${fmtS(rec.current.costSeconds)} s for the current ${rec.current.method}` : ""}); basis: ${rec.basis}`
      : "recommendation: n/a (no measurements)",
  ]
    .filter((l) => l !== "")
    .join("\n");
}

/** Peak initramfs RAM when #17 was filed (session 4's make bench), the base of its "half" goal. */
export const PEAK_RAM_AT_ISSUE_MIB = 171.7;

/**
 * Issue #17's goals, each against this run's numbers: /init → root and power-on → root as
 * ratios to the reference, the UKI's size, and the peak initramfs RAM against the issue's day.
 */
export function goalsSection(samples: BootSample[], sizes: SizeReport): string {
  const m = metricSummaries(samples);
  const peak = summarize(ok(samples, "agent").map((s) => s.peakInitramfsKb))?.median;
  const uki = sizes.files["target.efi"];
  const row = (goal: string, value: number | undefined, limit: number, show: (x: number) => string): string[] => [
    goal,
    value === undefined ? "n/a" : show(value),
    show(limit),
    value === undefined ? "not measured" : value <= limit ? "met" : "not met",
  ];
  const r = (x: number) => x.toFixed(2);
  return [
    "== goals (issue #17), this run",
    table(
      ["goal", "now", "target", ""],
      [
        row("/init → root init exec, agent/reference", ratio(m.agent.initToRoot, m.reference.initToRoot), 0.7, r),
        row("VM start (power-on) → root init, agent/reference", ratio(m.agent.wallToRoot, m.reference.wallToRoot), 1.0, r),
        row("UKI size, MB", uki === undefined ? undefined : uki / 1e6, 45, (x) => x.toFixed(1)),
        row("peak initramfs RAM, MiB", peak === undefined ? undefined : peak / 1024, PEAK_RAM_AT_ISSUE_MIB / 2, (x) => x.toFixed(1)),
      ],
    ),
  ].join("\n");
}
