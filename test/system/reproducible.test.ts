// What the signing machine rebuilds and compares before it signs (issue #15) is the same bytes
// from any checkout of a commit. A copy of the tracked files at another path builds the agent,
// the base and agent segments, the images and a host (hosts/example: its config segment, its
// initrd, its cmdline and its unsigned UKI); each must equal what this checkout builds, given
// the same VERSION and public keys. Since every segment and image has fixed times, the commit's
// time (SOURCE_DATE_EPOCH) is no input of these bytes: it only gives VERSION its default.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");
const other = mkdtempSync(`${tmpdir()}/initos-other-checkout-`);
const VERSION = "20260101";
afterAll(() => rmSync(other, { recursive: true, force: true }));

const make = (cwd: string, ...args: string[]) => execFileSync("make", ["-C", cwd, "--no-print-directory", ...args], { stdio: ["ignore", "ignore", "pipe"] });

describe("reproducible from another checkout", () => {
  it("the agent, base and agent segments, images and a host's unsigned artifacts built at another path are byte-identical to this build's", () => {
    // cpio -m keeps the files' times: the copy's package.json is not newer than the shared
    // node_modules/.installed, so make runs no npm ci there.
    execFileSync("sh", ["-c", `git ls-files -z | cpio -pdm0 --quiet "${other}"`]);
    symlinkSync(`${process.cwd()}/node_modules`, `${other}/node_modules`);
    // The kernel is an input (extracted once into the cache), not something the checkout makes.
    symlinkSync(`${process.cwd()}/.cache`, `${other}/.cache`);
    mkdirSync(`${other}/build`);
    copyFileSync("build/kernel.json", `${other}/build/kernel.json`);
    // Another commit time than this build's (the copy is no git checkout): it must not matter.
    const epoch = "1000000000";
    make(other, "build/initos-agent", "build/base.cpio", "build/agent.cpio", "build/images/modules.json", `SOURCE_DATE_EPOCH=${epoch}`);
    for (const f of ["initos-agent", "preinit", "sigrelay.so", "base.cpio", "agent.cpio", "images/modules.sqfs", "images/modules.verity", "images/tools.sqfs", "images/tools.verity"]) {
      expect(sha(`${other}/build/${f}`), f).toBe(sha(`build/${f}`));
    }
    // zstd -19 of the 128 MB agent segment takes 1-2 minutes on these 2 cores; its output is a
    // function of its input and level, and the inputs were just shown equal: take this build's.
    for (const f of ["base.cpio.zst", "agent.cpio.zst"]) {
      copyFileSync(`build/${f}`, `${other}/build/${f}`);
      utimesSync(`${other}/build/${f}`, new Date(), new Date());
    }
    // A host, on both sides with the same version and the same PCR public key (given as a file
    // there, as a build machine without the PCR key does; derived from the key here).
    make(".", "host", "HOST=example", `VERSION=${VERSION}`);
    make(other, "host", "HOST=example", `VERSION=${VERSION}`, `PCR_PUB=${process.cwd()}/build/keys/pcr.pub.pem`, `SOURCE_DATE_EPOCH=${epoch}`);
    for (const f of ["config.cpio", "config.cpio.zst", "example.cmdline", "example.initrd", "example.unsigned.efi"]) {
      expect(sha(`${other}/build/hosts/example/${f}`), f).toBe(sha(`build/hosts/example/${f}`));
    }
    // make compare, the signing machine's check, says the same.
    make(".", "compare", "HOST=example", `FROM=${other}/build/hosts/example`);
  }, 900_000);
});
