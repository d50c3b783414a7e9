// Tools from the verified tools image run through that image's own dynamic loader and
// libraries, so they need nothing from the initrd beyond the kernel.
export const TOOLS_ROOT = "/run/initos/images/tools";

export function toolArgv(tool: string, root = TOOLS_ROOT): string[] {
  return [`${root}/usr/lib64/ld-linux-x86-64.so.2`, "--library-path", `${root}/usr/lib/x86_64-linux-gnu`, `${root}/usr/bin/${tool}`];
}

/**
 * For a tool that re-executes itself (dropbear does, once per connection, by its own path):
 * the loader trick above would be lost on the re-exec, so the library path goes in the
 * environment instead, which the re-exec inherits. The initrd's ld.so comes from the same
 * glibc build as the image's libc.
 */
export function toolExec(tool: string, root = TOOLS_ROOT): { argv: string[]; env: Record<string, string> } {
  return { argv: [`${root}/usr/bin/${tool}`], env: { LD_LIBRARY_PATH: `${root}/usr/lib/x86_64-linux-gnu` } };
}
