// The stage timeline as a PNG, rendered headless: Vega-Lite → Vega → SVG → resvg → PNG. Top:
// one bar per variant, the boot whose /init → root time is the median, segment by segment from
// VM start to the root's init. Bottom: median duration of each stage, agent beside reference.
import { writeFileSync } from "node:fs";
import { Resvg } from "@resvg/resvg-js";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import type { BootSample, Variant } from "./parse.ts";
import { variantsOf } from "./report.ts";
import { medianIndex, summarize } from "./stats.ts";

const COLOURS: Record<Variant, string> = { agent: "#4c78a8", baseline: "#9ecae9", reference: "#f58518" };

interface Row {
  variant: Variant;
  segment: string;
  start: number;
  end: number;
  label: string;
}

function medianBoot(samples: BootSample[], variant: Variant): BootSample | undefined {
  const mine = samples.filter((s) => s.variant === variant && s.ok);
  const i = medianIndex(mine.map((s) => s.initToRoot));
  return i === undefined ? undefined : mine[i];
}

export async function renderTimeline(samples: BootSample[], out: string): Promise<void> {
  const rows: Row[] = [];
  const variants = variantsOf(samples);
  for (const variant of variants) {
    const s = medianBoot(samples, variant);
    for (const g of s?.segments ?? []) {
      const d = g.end - g.start;
      rows.push({ variant, segment: g.name, start: g.start, end: g.end, label: d >= 0.9 ? d.toFixed(1) : "" });
    }
  }
  // Segment colours follow the order segments first appear, so both bars read left to right.
  const order = [...new Set(rows.sort((a, b) => a.start - b.start).map((r) => r.segment))];
  // Stages too short to see (the handoff checks) are left out of the bar chart.
  const stageNames = [...new Set(samples.filter((s) => s.ok).flatMap((s) => Object.keys(s.stages)))].filter((n) =>
    samples.some((s) => (s.stages[n] ?? 0) >= 50),
  );
  const medians = stageNames.flatMap((stage) =>
    variants.flatMap((variant) => {
      const m = summarize(samples.filter((s) => s.variant === variant && s.ok).map((s) => s.stages[stage]));
      return m ? [{ stage, variant, ms: m.median }] : [];
    }),
  );
  const spec: TopLevelSpec = {
    $schema: "https://vega.github.io/schema/vega-lite/v6.json",
    background: "white",
    padding: 12,
    title: { text: "initos boot: agent vs reference shell initrd (median run, QEMU TCG)", fontSize: 15 },
    // Each chart its own colours: segments above, variants below.
    resolve: { scale: { color: "independent" } },
    vconcat: [
      {
        width: 960,
        height: 55 * variants.length,
        data: { values: rows },
        layer: [
          {
            mark: { type: "bar", height: 34, stroke: "white", strokeWidth: 0.5 },
            encoding: {
              y: { field: "variant", type: "nominal", title: null, sort: variants },
              x: { field: "start", type: "quantitative", title: "seconds since the kernel started (firmware: host clock, before 0)" },
              x2: { field: "end" },
              color: { field: "segment", type: "nominal", sort: order, scale: { scheme: "tableau20" }, legend: { title: "segment", columns: 4, orient: "bottom", labelLimit: 260 } },
            },
          },
          {
            mark: { type: "text", fontSize: 10, color: "black" },
            encoding: {
              y: { field: "variant", type: "nominal", sort: variants },
              x: { field: "mid", type: "quantitative" },
              text: { field: "label" },
            },
            transform: [{ calculate: "(datum.start + datum.end) / 2", as: "mid" }],
          },
        ],
      },
      {
        width: 960,
        height: 180,
        data: { values: medians },
        mark: "bar",
        encoding: {
          x: { field: "stage", type: "nominal", sort: stageNames, title: "stage (median over runs)", axis: { labelAngle: 0 } },
          xOffset: { field: "variant" },
          y: { field: "ms", type: "quantitative", title: "ms" },
          color: { field: "variant", type: "nominal", scale: { domain: variants, range: variants.map((v) => COLOURS[v]) }, legend: { title: null, orient: "top-right" } },
        },
      },
    ],
  };
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
  const svg = await view.toSVG();
  view.finalize();
  const png = new Resvg(svg, { fitTo: { mode: "zoom", value: 1.5 }, font: { loadSystemFonts: true, defaultFontFamily: "DejaVu Sans", sansSerifFamily: "DejaVu Sans" } }).render().asPng();
  writeFileSync(out, png);
}
