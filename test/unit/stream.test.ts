// The streaming seam install mode unpacks through, exercised with real processes: one read of a
// file in chunks, a tool fed on stdin with backpressure, the input always read to its end.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { ownChildren } from "../../agent/sys/spawn.ts";
import { readChunks } from "../../agent/sys/index.ts";
import { runWithInput } from "../../agent/sys/spawn.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-stream-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const file = `${dir}/data`;
const data = Buffer.alloc(5 * (1 << 20) + 123);
for (let i = 0; i < data.length; i++) data[i] = (i * 2654435761) >>> 24;
writeFileSync(file, data);

/** Counts the chunks taken from `src`. */
async function* counted(src: AsyncIterable<Uint8Array>, seen: { chunks: number; bytes: number }): AsyncGenerator<Uint8Array> {
  for await (const c of src) {
    seen.chunks++;
    seen.bytes += c.length;
    yield c;
  }
}

describe("readChunks + runWithInput", () => {
  it("feeds the whole file, chunk by chunk, to the tool's stdin", async () => {
    const seen = { chunks: 0, bytes: 0 };
    const out = await runWithInput(spawn, ["sha256sum"], counted(readChunks(file, 1 << 20), seen));
    expect(out.split(" ")[0]).toBe(createHash("sha256").update(data).digest("hex"));
    expect(seen).toEqual({ chunks: 6, bytes: data.length });
    expect(ownChildren.size).toBe(0);
  });

  it("reads the input to its end even when the tool stops reading early", async () => {
    const seen = { chunks: 0, bytes: 0 };
    const out = await runWithInput(spawn, ["head", "-c", "10"], counted(readChunks(file, 1 << 16), seen));
    expect(Buffer.from(out, "latin1").length).toBeGreaterThan(0);
    expect(seen.bytes).toBe(data.length);
  });

  it("a failing tool: its last stderr line", async () => {
    await expect(runWithInput(spawn, ["sh", "-c", "cat >/dev/null; echo 'tar: short read' >&2; exit 3"], readChunks(file))).rejects.toThrow("sh -c cat >/dev/null; echo 'tar: short read' >&2; exit 3: tar: short read");
    await expect(runWithInput(spawn, [`${dir}/no-such-tool`], [Buffer.from("x")])).rejects.toThrow(/no-such-tool: .*ENOENT/);
  });

  it("an input that fails stops the tool (it must not finish on a truncated stream) and says why", async () => {
    async function* broken(): AsyncGenerator<Uint8Array> {
      yield Buffer.alloc(1000);
      throw new Error("read /stick/rootfs.tar: EIO");
    }
    await expect(runWithInput(spawn, ["sh", "-c", "cat >/dev/null; sleep 5"], broken())).rejects.toThrow("read /stick/rootfs.tar: EIO");
    expect(ownChildren.size).toBe(0);
  });
});
