// Run by test/system/poolfiles.test.ts under Bun, as root, in a private mount namespace: the
// real Sys's readRegular on files the OS's root could leave at the top of the pool. Prints one
// JSON object: for each name, what came back (or the refusal) and how long it took.
import { execFileSync } from "node:child_process";
import { mkdirSync, symlinkSync, writeFileSync } from "node:fs";
import { realSys, RefusedFile } from "../../../agent/sys/index.ts";

const top = process.argv[2]!;
// Mounted like the pool (nodev): a device node there cannot even be opened.
mkdirSync(top, { recursive: true });
execFileSync("mount", ["-t", "tmpfs", "-o", "nodev,size=4m", "tmpfs", top]);
mkdirSync(`${top}/initos`);
writeFileSync(`${top}/initos.json`, '{"root":"@root"}');
execFileSync("mkfifo", [`${top}/fifo`]);
execFileSync("truncate", ["-s", "1G", `${top}/big`]); // sparse: tmpfs holds no page of it
execFileSync("mknod", [`${top}/zero`, "c", "1", "5"]); // /dev/zero's numbers: endless bytes if it opened
symlinkSync("/etc/shadow", `${top}/link`);
const sys = await realSys();
const out: Record<string, { result: string; ms: number }> = {};
for (const name of ["initos.json", "missing", "fifo", "big", "zero", "link", "initos"]) {
  const t = performance.now();
  let result: string;
  try {
    const b = sys.readRegular(top, name, 64 * 1024);
    result = b === null ? "none" : `read: ${Buffer.from(b).toString()}`;
  } catch (e) {
    result = e instanceof RefusedFile ? `refused: ${e.why}` : `error: ${(e as Error).message}`;
  }
  out[name] = { result, ms: performance.now() - t };
}
console.log(JSON.stringify(out));
process.exit(0);
