// Run under Bun (the agent's runtime) by image-store.test.ts: imports an OCI archive file into
// the image store of an already mounted pool, as the agent would, and prints the summary line
// or the refusal as JSON. The caller empties PATH: the agent has no zstd command.
import { readFileSync } from "node:fs";
import { importImage } from "../../../agent/jails/images.ts";
import type { Logger } from "../../../agent/log.ts";
import { realSys } from "../../../agent/sys/index.ts";

const [pool, name, archive, btrfs] = process.argv.slice(2) as [string, string, string, string];
const quiet: Logger = { err: () => {}, warn: () => {}, info: () => {}, debug: () => {} };
async function* body(): AsyncGenerator<Uint8Array> {
  yield readFileSync(archive);
}
const sys = await realSys();
const out = await importImage(sys, quiet, name, body(), { pool, btrfs: [btrfs] }).then(
  (line) => ({ line }),
  (e: unknown) => ({ error: (e as Error).message }),
);
console.log(JSON.stringify(out));
