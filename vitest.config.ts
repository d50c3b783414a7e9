import { defineConfig } from "vitest/config";

// Three kinds of tests, run one kind after the other (groupOrder) when `npx vitest run` runs all:
// - unit: no root, no build, no daemons (`make unit`, seconds). Files share a worker's module
//   cache (isolate: false), which halves the run: importing the agent in every file was most of
//   it. Unit tests keep no state in modules between files (and restore process.env).
// - system: root, loop devices, mount namespaces, swtpm, and what `make all` built.
// - integration: QEMU under TCG, slow; each test sets its own bound on top of the timeouts.
// system and integration run one file at a time, as every test did before the split: QEMU
// wants both cores (two VMs at once only slow both).

// Unit files that vi.mock a module: the mock only takes if the file is the first to import it,
// which a shared module cache cannot promise, so these run isolated.
const MOCKING = ["test/unit/measure.test.ts"];

export default defineConfig({
  test: {
    testTimeout: 20_000,
    hookTimeout: 60_000,
    reporters: ["default"],
    projects: [
      { extends: true, test: { name: "unit", include: ["test/unit/**/*.test.ts"], exclude: MOCKING, isolate: false, sequence: { groupOrder: 0 } } },
      { extends: true, test: { name: "unit-isolated", include: MOCKING, sequence: { groupOrder: 0 } } },
      { extends: true, test: { name: "system", include: ["test/system/**/*.test.ts"], fileParallelism: false, sequence: { groupOrder: 1 } } },
      { extends: true, test: { name: "integration", include: ["test/integration/**/*.test.ts"], fileParallelism: false, sequence: { groupOrder: 2 } } },
    ],
  },
});
