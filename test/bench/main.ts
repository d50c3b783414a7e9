// `make bench`: the agent against a reference busybox initrd doing the same work, on the same
// installed machine, in one run; then the sidecar's memory, sizes and compressors.
//
//   1. install once onto a blank disk (installer.img, OVMF Secure Boot, swtpm); keep the disk
//      and the TPM state; boot it once with the agent, unmeasured, so one-off first-boot work
//      (the ssh host key saved on the pool) is not counted
//   2. BENCH_RUNS times (default 3), interleaved so host load drifts hit both: boot the disk
//      with the agent's UKI, then a copy whose ESPs hold the reference UKI; every boot gets a
//      fresh copy of the post-install TPM state and a snapshot of its disk
//   3. the agent as sidecar for a minute (BENCH_SIDECAR_WAIT), then `ssh ... status`
//   4. sizes; build/agent.cpio through gzip/xz/zstd/lz4 on the host, and each algorithm once
//      through the kernel's own unpacker in a VM
//
// Prints the report; writes build/bench/results-<time>.json, build/bench/latest.json and
// build/bench/timeline.png. BENCH_SKIP=boots,sidecar,compress,unpack leaves parts out.
// BENCH_BASELINE=FILE.efi adds a third variant to step 2: an agent UKI saved from an earlier
// build, booted from the same disk and images, so a change gets its before/after in one run.
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { snapshotInputs } from "./inputs.ts";
import type { BootSample } from "./parse.ts";
import { renderTimeline } from "./plot.ts";
import { bootSection, compressionSection, goalsSection, memorySection, metricSummaries, recommend, sizeSection, stageSection, stageSummaries } from "./report.ts";
import { compareCompression, type CompressionResult, size, type SizeReport, sizeReport } from "./sizes.ts";
import { boot, install, kernelUnpack, referenceDisk, type SidecarResult, sidecarRss, warmUp } from "./vms.ts";

const OUT = "build/bench";
const runs = Number(process.env.BENCH_RUNS ?? 3);
const sidecarWait = Number(process.env.BENCH_SIDECAR_WAIT ?? 60);
const skip = new Set((process.env.BENCH_SKIP ?? "").split(",").filter(Boolean));
const baseline = process.env.BENCH_BASELINE;
if (baseline !== undefined && !existsSync(baseline)) throw new Error(`BENCH_BASELINE=${baseline}: no such file (an agent UKI from an earlier build, e.g. a copy of build/target.efi)`);
const variants = baseline ? (["agent", "baseline", "reference"] as const) : (["agent", "reference"] as const);
/** One file per algorithm through the kernel (its speed barely depends on the level). */
const UNPACK_IN_KERNEL = ["gzip -9", "xz -6", "zstd -9", "zstd -19", "lz4 -9"];

if (!Number.isInteger(runs) || runs < 1) throw new Error(`BENCH_RUNS=${process.env.BENCH_RUNS}: expected a positive integer`);

const started = new Date();
const t0 = performance.now();
const progress = (msg: string) => console.log(`bench [${((performance.now() - t0) / 1000).toFixed(0).padStart(4)} s] ${msg}`);
mkdirSync(OUT, { recursive: true });
const dir = mkdtempSync(`${tmpdir()}/initos-bench-`);

const samples: BootSample[] = [];
let sidecar: SidecarResult | undefined;
let compression: CompressionResult[] = [];
let sizes: SizeReport;
try {
  const inputs = await snapshotInputs("build", `${dir}/inputs`);
  sizes = sizeReport(inputs);
  if (!skip.has("boots")) {
    progress("installing onto a blank disk (OVMF Secure Boot + swtpm)");
    const installed = await install(inputs, dir);
    progress("warm-up boot of the installed disk (first-boot work, not measured)");
    await warmUp(installed, dir);
    const disks = {
      agent: installed.disk,
      reference: referenceDisk(installed.disk, dir, `${inputs}/reference.efi`, "reference"),
      baseline: baseline ? referenceDisk(installed.disk, dir, baseline, "baseline") : installed.disk,
    };
    for (let run = 1; run <= runs; run++) {
      for (const variant of variants) {
        const s = await boot(variant, run, disks[variant], installed.tpm, dir);
        samples.push(s);
        progress(`${variant} run ${run}: ${s.ok ? `/init → root ${s.initToRoot!.toFixed(2)} s, kernel → root ${s.kernelToRoot!.toFixed(2)} s` : `FAILED: ${s.error}`}`);
      }
    }
  }
  if (!skip.has("sidecar")) {
    progress(`sidecar: booting, then ${sidecarWait} s after "sidecar: ready", ssh status`);
    sidecar = await sidecarRss(inputs, "build/test-ssh/id_ed25519", sidecarWait);
  }
  if (!skip.has("compress")) {
    progress("compressing build/agent.cpio with each method (host)");
    compression = compareCompression(`${inputs}/agent.cpio`, dir);
    compression.push({ method: "none", file: `${inputs}/agent.cpio`, size: size(`${inputs}/agent.cpio`)!, compressSeconds: 0, decompressSeconds: 0 });
    if (!skip.has("unpack")) {
      for (const r of compression.filter((c) => c.method === "none" || UNPACK_IN_KERNEL.includes(c.method))) {
        r.kernelUnpackSeconds = await kernelUnpack(`${inputs}/vmlinuz`, r.method.replace(/[^a-z0-9]+/g, ""), r.file);
        progress(`kernel unpack, ${r.method}: ${r.kernelUnpackSeconds?.toFixed(2) ?? "failed"} s`);
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

const rec = compression.length ? recommend(compression, samples, sizes) : undefined;
const sections = [
  samples.length ? bootSection(samples, runs) : "== boot: skipped",
  samples.length ? goalsSection(samples, sizes) : "",
  samples.length ? stageSection(samples) : "",
  memorySection(samples, sidecar),
  sizeSection(sizes),
  compression.length ? compressionSection("build/agent.cpio", sizes.files["agent.cpio"], compression, rec) : "== compression: skipped",
];

const stamp = started.toISOString().replace(/[:.]/g, "-");
const results = {
  startedAt: started.toISOString(),
  seconds: (performance.now() - t0) / 1000,
  runs,
  samples,
  metrics: metricSummaries(samples),
  stages: stageSummaries(samples),
  sidecar,
  sizes,
  compression: compression.map(({ file: _file, ...c }) => c),
  recommendation: rec,
};
writeFileSync(`${OUT}/results-${stamp}.json`, JSON.stringify(results, null, 1) + "\n");
copyFileSync(`${OUT}/results-${stamp}.json`, `${OUT}/latest.json`);
if (samples.some((s) => s.ok)) await renderTimeline(samples, `${OUT}/timeline.png`);

console.log(`\n${sections.filter(Boolean).join("\n\n")}\n`);
console.log(`results: ${OUT}/results-${stamp}.json (and latest.json); timeline: ${OUT}/timeline.png; serial logs: ${OUT}/logs/`);
console.log(`bench took ${((performance.now() - t0) / 60000).toFixed(1)} min`);
for (const v of variants) {
  if (!skip.has("boots") && !samples.some((s) => s.variant === v && s.ok)) process.exitCode = 1;
}
