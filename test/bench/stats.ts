// Small statistics and formatting helpers for the benchmark report.

export interface Summary {
  n: number;
  min: number;
  median: number;
  max: number;
}

/** min/median/max of the defined values; undefined when there are none. */
export function summarize(values: readonly (number | undefined)[]): Summary | undefined {
  const v = values.filter((x): x is number => x !== undefined && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return undefined;
  const mid = Math.floor(v.length / 2);
  const median = v.length % 2 ? v[mid]! : (v[mid - 1]! + v[mid]!) / 2;
  return { n: v.length, min: v[0]!, median, max: v[v.length - 1]! };
}

/** Index of the sample whose value is the median (the lower one for an even count). */
export function medianIndex(values: readonly (number | undefined)[]): number | undefined {
  const idx = values.map((v, i) => ({ v, i })).filter((x): x is { v: number; i: number } => x.v !== undefined).sort((a, b) => a.v - b.v);
  if (idx.length === 0) return undefined;
  return idx[Math.floor((idx.length - 1) / 2)]!.i;
}

export const fmtS = (s: number | undefined, digits = 2): string => (s === undefined ? "n/a" : s.toFixed(digits));
export const fmtMB = (bytes: number | undefined): string => (bytes === undefined ? "n/a" : (bytes / 1e6).toFixed(1));

/** "1.23 / 1.45 / 1.80" (min / median / max) or "n/a". */
export function fmtSummary(s: Summary | undefined, digits = 2, scale = 1): string {
  if (!s) return "n/a";
  return [s.min, s.median, s.max].map((x) => (x * scale).toFixed(digits)).join(" / ");
}

/** A plain text table: columns padded to their widest cell, the first column left-aligned. */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join("  ").trimEnd();
  return [line(header), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}
