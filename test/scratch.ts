// Scratch directories for a test file, removed after it (vitest's afterAll): kept apart from the
// OCI fixture, which the demo also imports outside vitest.
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll } from "vitest";

/**
 * A temporary directory for the calling test file, removed after it; returns a function that
 * makes a fresh subdirectory in it per call (`fresh("vm")` → .../vm-0, .../vm-1, ...).
 */
export function scratchDirs(prefix: string): (name: string) => string {
  const dir = mkdtempSync(`${tmpdir()}/${prefix}-`);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  let n = 0;
  return (name) => {
    const d = `${dir}/${name}-${n++}`;
    mkdirSync(d);
    return d;
  };
}
