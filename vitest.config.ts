import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // QEMU under TCG is slow; each integration test sets its own bound on top of this.
    testTimeout: 20_000,
    hookTimeout: 60_000,
    reporters: ["default"],
    // One file at a time: QEMU under TCG wants both cores; two VMs at once only slow both.
    fileParallelism: false,
  },
});
