// The kernel comes from Debian's linux-image-cloud-amd64 (VMs: linux-image-amd64, whose config
// has 9p, which the cloud flavour lacks), extracted into the project's cache (never installed
// into the host). depmod runs on the extracted tree because the package's
// postinst, which normally does it, never ran.
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { extractDeb, run } from "./debs.ts";

export interface KernelInfo {
  package: string;
  release: string;
  vmlinuz: string;
  /** The extracted root; modules live in <root>/lib/modules/<release>. */
  root: string;
}

const META = "linux-image-cloud-amd64";

/** linux-image-6.1.0-NN-cloud-amd64: the package the meta-package currently depends on. */
export function resolveKernelPackage(meta = META): string {
  const out = run("apt-cache", ["depends", meta]);
  const m = /Depends:\s*(linux-image-\S+)/.exec(out);
  if (!m) throw new Error(`cannot resolve ${meta} (run apt-get update?)`);
  return m[1]!;
}

export function ensureKernel(cacheDir: string, meta = META, pkg = process.env.KERNEL_PKG || resolveKernelPackage(meta)): KernelInfo {
  const infoFile = `${cacheDir}/${pkg}.json`;
  if (existsSync(infoFile)) return JSON.parse(readFileSync(infoFile, "utf8")) as KernelInfo;

  const root = extractDeb(pkg, cacheDir);
  const release = readdirSync(`${root}/lib/modules`)[0];
  if (!release) throw new Error(`${pkg}: no /lib/modules/<release>`);
  run("depmod", ["-b", root, release]);
  const info: KernelInfo = { package: pkg, release, vmlinuz: `${root}/boot/vmlinuz-${release}`, root };
  writeFileSync(infoFile, JSON.stringify(info, null, 1) + "\n");
  return info;
}
