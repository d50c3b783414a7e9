import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { KmsgLogger, Timeline } from "../../agent/log.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-log-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("KmsgLogger", () => {
  it("writes one prefixed record per line with the kmsg level, newlines folded", () => {
    writeFileSync(`${dir}/kmsg`, "");
    writeFileSync(`${dir}/printk`, "7\t4\t1\t7\n"); // kernel echoes everything below 7
    const log = new KmsgLogger(`${dir}/kmsg`, `${dir}/printk`);
    log.err("disk\ngone");
    log.warn("w");
    log.info("i");
    log.debug("hidden unless verbose");
    log.verbose = true;
    log.debug("d");
    log.close();
    expect(readFileSync(`${dir}/kmsg`, "utf8")).toBe("<3>initos: disk gone\n<4>initos: w\n<6>initos: i\n<7>initos: d\n");
  });

  it("timeline summary and JSON carry each stage with its duration", () => {
    const t = new Timeline(`${dir}/run/initos/boot.json`);
    t.record({ name: "early", start: 1.5, durationMs: 12.4, ok: true });
    t.record({ name: "root", start: 1.6, durationMs: 3000, ok: false, error: "root device /dev/vdz did not appear within 3s" });
    expect(t.summary()).toBe("early 12ms, root 3000ms FAILED");
    t.save();
    const j = JSON.parse(readFileSync(`${dir}/run/initos/boot.json`, "utf8"));
    expect(j.agentStart).toBe(1.5);
    expect(j.stages[1]).toMatchObject({ name: "root", ok: false });
  });
});
