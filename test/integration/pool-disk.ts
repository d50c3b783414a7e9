// A machine's disk as the installer lays it out, for scenarios that bring their own pool: a copy
// of a disk with the ESPs (build/boot.img: initos-a, initos-b) and the pool's LUKS2 volume
// (pool-image.ts) as its third partition. The agent takes the pool's first volume only from the
// disk the firmware booted (the disk with the slots), so a pool on a disk of its own is another
// disk's volume to it, never opened.
import { execFileSync } from "node:child_process";
import { statSync } from "node:fs";

const MiB = 1 << 20;
const LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
const sh = (cmd: string, args: string[], input?: string) => execFileSync(cmd, args, { input, encoding: "utf8", stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });

/** `out`: `boot` (sparse copy) + `pool` as partition 3 ("initos-luks"), byte for byte. */
export function diskWithPool(boot: string, pool: string, out: string): string {
  sh("cp", ["--sparse=always", boot, out]);
  const start = Math.ceil(statSync(boot).size / MiB) * MiB;
  const size = Math.ceil(statSync(pool).size / MiB) * MiB;
  sh("truncate", ["-s", String(start + size + MiB), out]); // + room for the backup GPT
  sh("sfdisk", ["-q", "--relocate", "gpt-bak-std", out]);
  sh("sfdisk", ["-q", "--append", out], `start=${start / 512}, size=${size / 512}, type=${LINUX_TYPE}, name="initos-luks"\n`);
  sh("dd", [`if=${pool}`, `of=${out}`, "bs=1M", `seek=${start / MiB}`, "conv=notrunc,sparse", "status=none"]);
  return out;
}
