// Loads koffi so that it works both in the compiled agent and under Node (vitest).
//
// Why not `import koffi from "koffi"`: inside a `bun build --compile` binary that import
// cannot find its native module at run time. A literal require() of the platform file makes
// Bun embed the .node file into the executable; that object is the koffi API itself.
import { createRequire } from "node:module";
import type * as Koffi from "koffi";

declare const Bun: unknown;

function loadKoffi(): typeof Koffi {
  if (typeof Bun !== "undefined") {
    return require("@koromix/koffi-linux-x64/linux_x64/koffi.node") as typeof Koffi;
  }
  return createRequire(import.meta.url)("@koromix/koffi-linux-x64/linux_x64/koffi.node") as typeof Koffi;
}

export const koffi = loadKoffi();

/** An OS error that names the call and its arguments, e.g. `mount("/dev/vda", "/sysroot", "btrfs"): ENOENT`. */
export class SysError extends Error {
  constructor(
    readonly call: string,
    readonly args: readonly unknown[],
    readonly errno: number,
  ) {
    super(`${call}(${args.map((a) => JSON.stringify(a)).join(", ")}): ${errnoName(errno)}`);
    this.name = "SysError";
  }
  get code(): string {
    return errnoName(this.errno);
  }
}

let errnoNames: Map<number, string> | undefined;
export function errnoName(n: number): string {
  if (!errnoNames) {
    errnoNames = new Map();
    for (const [name, value] of Object.entries(koffi.os.errno)) errnoNames.set(value, name);
  }
  return errnoNames.get(n) ?? `errno ${n}`;
}

/** Calls `fn`; if it returns a negative number, throws a SysError carrying errno. */
export function check<T extends number | bigint>(call: string, args: readonly unknown[], result: T): T {
  if (result < 0) throw new SysError(call, args, koffi.errno());
  return result;
}
