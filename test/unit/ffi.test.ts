// The typed face of koffi (agent/sys/ffi.ts): bindings carry the TypeScript signature they were
// declared with. The @ts-expect-error lines are checked by `tsc --noEmit` (make test): each
// fails the type check if the guard it exercises stops refusing.
import { describe, expect, it } from "vitest";
import { bytesAt, cString, load, type Ptr } from "../../agent/sys/ffi.ts";

const libc = load("libc.so.6");

describe("typed koffi bindings", () => {
  it("call C with the declared signature and return what C returned", () => {
    const getpid = libc.fn<() => number>("int getpid(void)");
    expect(getpid()).toBe(process.pid);
    const getenv = libc.fn<(name: string) => Ptr<"char"> | null>("void *getenv(const char *name)");
    process.env.INITOS_FFI_TEST = "abc";
    const p = getenv("INITOS_FFI_TEST");
    expect(p).not.toBeNull();
    expect(cString(p!)).toBe("abc");
    expect(Buffer.from(bytesAt(p!, 4)).toString("latin1")).toBe("abc\0");
    expect(getenv("INITOS_FFI_TEST_UNSET")).toBeNull();
    delete process.env.INITOS_FFI_TEST; // unit test files share the process (isolate: false)
  });

  it("refuse, at compile time, a binding without a signature or with `any` in it", () => {
    // @ts-expect-error a signature containing `any` makes the declaration `never`
    const anyArgument = libc.fn<(fd: any) => number>("int close(int fd)");
    // @ts-expect-error an `any` result is refused the same way
    const anyResult = libc.fn<(fd: number) => any>("int close(int fd)");
    const untyped = libc.fn("int close(int fd)");
    const close = libc.fn<(fd: number) => number>("int close(int fd)");
    // At run time all four are the same binding (close(-1): EBADF); only tsc tells them apart.
    expect(anyArgument(-1)).toBe(-1);
    expect(anyResult(-1)).toBe(-1);
    // @ts-expect-error with no signature given, the binding cannot be called at all
    expect(untyped(-1)).toBe(-1);
    expect(close(-1)).toBe(-1);
    // @ts-expect-error arguments are checked against the signature (and koffi refuses at run time)
    expect(() => close("3")).toThrow();
  });
});
