// Debian packages the build needs as files (kernel, firmware): downloaded and extracted into
// the project cache, never installed into the host.
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmSync } from "node:fs";

export function run(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
}

/** Extracts package `pkg` into <cacheDir>/<pkg>/ once; returns that directory. */
export function extractDeb(pkg: string, cacheDir: string): string {
  const root = `${cacheDir}/${pkg}`;
  const done = `${root}/.extracted`;
  if (existsSync(done)) return root;
  rmSync(root, { recursive: true, force: true });
  const debs = `${cacheDir}/debs`;
  mkdirSync(debs, { recursive: true });
  run("apt-get", ["download", "-q", pkg], debs);
  const deb = readdirSync(debs).find((f) => f.startsWith(`${pkg}_`) && f.endsWith(".deb"));
  if (!deb) throw new Error(`apt-get download ${pkg} produced no .deb`);
  run("dpkg-deb", ["-x", `${debs}/${deb}`, root]);
  mkdirSync(done);
  return root;
}
