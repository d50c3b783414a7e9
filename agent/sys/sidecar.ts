// Tools from the verified sidecar image run through that image's own dynamic loader and
// libraries, so they need nothing from the initrd beyond the kernel.
export const SIDECAR_ROOT = "/run/initos/images/sidecar";

export function sidecarArgv(tool: string, root = SIDECAR_ROOT): string[] {
  return [`${root}/usr/lib64/ld-linux-x86-64.so.2`, "--library-path", `${root}/usr/lib/x86_64-linux-gnu`, `${root}/usr/bin/${tool}`];
}
