// Loads koffi so that it works both in the compiled agent and under Node (vitest), and gives the
// binding modules a typed face of it.
//
// Why not `import koffi from "koffi"`: inside a `bun build --compile` binary that import
// cannot find its native module at run time. A literal require() of the platform file makes
// Bun embed the .node file into the executable; that object is the koffi API itself.
//
// Why a face instead of koffi itself: koffi types every bound function as
// `(...args: any[]) => any`, so a wrong argument or a misread result would pass tsc. Here each
// binding states its TypeScript signature next to its C prototype, and nothing typed `any`
// leaves this file.
import { createRequire } from "node:module";
import type * as Koffi from "koffi";

declare const Bun: unknown;

function loadKoffi(): typeof Koffi {
  if (typeof Bun !== "undefined") {
    return require("@koromix/koffi-linux-x64/linux_x64/koffi.node") as typeof Koffi;
  }
  // Node (the unit tests) resolves it from the project's node_modules. Not import.meta.url: Bun
  // writes that into the compiled agent as the checkout's absolute path, so two checkouts of
  // the same commit would build different agents (issue #15 needs the same bytes).
  return createRequire(`${process.cwd()}/package.json`)("@koromix/koffi-linux-x64/linux_x64/koffi.node") as typeof Koffi;
}

const koffi = loadKoffi();

declare const pointsTo: unique symbol;
/**
 * A C pointer as koffi 3 passes it: the address as a BigInt (NULL arrives as null, which the
 * signatures spell out as `| null`). The tag says what it points to, so a `kmod_list *` cannot
 * be passed where a `kmod_module *` goes; only a binding's declared result produces one.
 */
export type Ptr<To extends string> = bigint & { readonly [pointsTo]: To };

/**
 * A C `long`/`ssize_t` result: koffi gives a number, or a BigInt when the value is beyond
 * 2^53 (callers that want a count go through Number()).
 */
export type CLong = number | bigint;

/** One argument of a variadic C call: koffi needs its C type spelled before the value. */
type VarValue = string | number | Uint8Array | null;
/** The variadic tail of syscall/ioctl/prctl: (type, value) pairs; the calls here pass at most five (renameat2). */
export type VarArgs =
  | []
  | [string, VarValue]
  | [string, VarValue, string, VarValue]
  | [string, VarValue, string, VarValue, string, VarValue]
  | [string, VarValue, string, VarValue, string, VarValue, string, VarValue]
  | [string, VarValue, string, VarValue, string, VarValue, string, VarValue, string, VarValue];

// `never[]` parameters: every function type is assignable to it, whatever it takes.
type CSignature = (...args: never[]) => unknown;
type IsAny<T> = 0 extends 1 & T ? true : false;
/** True when the signature's result or one of its parameters is `any`. */
type HasAny<F extends CSignature> = true extends IsAny<ReturnType<F>> | { [K in keyof Parameters<F>]: IsAny<Parameters<F>[K]> }[number] ? true : false;

/** A bound C function: called directly, or with `.async` on koffi's worker thread. */
export type CFunction<F extends CSignature> = F & {
  async(...args: [...Parameters<F>, (err: unknown, result: ReturnType<F>) => void]): void;
};

export interface Library {
  /**
   * Binds the C prototype `decl` with the TypeScript signature `F`, which must be given: koffi
   * checks the arguments against the C types at run time, `F` is what tsc checks, so the two
   * must say the same thing. Left out, `F` stays the uncallable `CSignature`; an `F` with `any`
   * in it makes `decl` `never`, so neither compiles.
   */
  fn<F extends CSignature>(decl: HasAny<F> extends true ? never : string): CFunction<F>;
}

/** dlopen()s `path` (a soname); throws when the library is missing. */
export function load(path: string): Library {
  const lib = koffi.load(path);
  return {
    // The one cast between koffi's untyped function and the declared signature.
    fn: <F extends CSignature>(decl: string) => lib.func(decl) as unknown as CFunction<F>,
  };
}

/** Declares an opaque C type, for prototypes that take pointers to it. */
export function opaque(name: string): void {
  koffi.opaque(name);
}

/** Declares a C struct by name (members as C type strings), for prototypes that use it. */
export function struct(name: string, members: Record<string, string>): void {
  koffi.struct(name, members);
}

/**
 * A C function pointer of prototype `decl` that calls `fn`, registered for the life of the
 * process (a library keeps it and calls it after the call that set it has returned).
 */
export function callback<F extends CSignature>(decl: HasAny<F> extends true ? never : string, fn: F): Ptr<"callback"> {
  return koffi.register(fn, koffi.pointer(koffi.proto(decl))) as Ptr<"callback">;
}

/** The NUL-terminated string at `ptr`. */
export function cString(ptr: Ptr<string>): string {
  return koffi.decode(ptr, "char", -1) as string;
}

/** A copy of `length` bytes at `ptr`. */
export function bytesAt(ptr: Ptr<string>, length: number): Uint8Array {
  return Uint8Array.from(koffi.decode(ptr, "uint8_t", length) as number[]);
}

/** The `length` bytes at `ptr`, as memory shared with C (writes go to C's copy). */
export function view(ptr: Ptr<string>, length: number): ArrayBuffer {
  return koffi.view(ptr, length);
}

/** errno as the last call on this thread left it. */
export function errno(): number {
  return koffi.errno();
}

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

/** Returns `result`, or throws a SysError carrying errno when it is negative (the C convention). */
export function check<T extends number | bigint>(call: string, args: readonly unknown[], result: T): T {
  if (result < 0) throw new SysError(call, args, koffi.errno());
  return result;
}
