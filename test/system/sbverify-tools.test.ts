// sbverify from the verified tools image, run the way the agent runs its tools (toolArgv: the
// image's own ld.so with --library-path, no chroot, nothing from the host's libraries), checks
// an update's UKI against a signer certificate (issue #15): the build's target.efi is signed by
// the snakeoil db key, so that certificate passes and any other fails.
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { toolArgv } from "../../agent/sys/tools.ts";

const SNAKEOIL_CERT = "/usr/share/ovmf/PkKek-1-snakeoil.pem";
const dir = mkdtempSync(`${tmpdir()}/initos-sbverify-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("sbverify in the tools image", () => {
  const root = `${dir}/tools`;
  execFileSync("unsquashfs", ["-q", "-n", "-d", root, "build/images/tools.sqfs"], { stdio: "ignore" });
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", `${dir}/other.key`, "-out", `${dir}/other.pem`, "-subj", "/CN=not the db key", "-days", "1"], { stdio: "ignore" });
  // An empty environment: no LD_LIBRARY_PATH or PATH from the host can help it along.
  const sbverify = (cert: string, uki: string) => {
    const [cmd, ...args] = toolArgv("sbverify", root);
    return spawnSync(cmd!, [...args, "--cert", cert, uki], { encoding: "utf8", env: {} });
  };

  it("is in the image with the libraries it needs", () => {
    const ldd = execFileSync(`${root}/usr/lib64/ld-linux-x86-64.so.2`, ["--list", "--library-path", `${root}/usr/lib/x86_64-linux-gnu`, `${root}/usr/bin/sbverify`], { encoding: "utf8", env: {} });
    for (const lib of ldd.split("\n").filter((l) => l.includes("=>"))) expect(lib, lib).toMatch(new RegExp(`=> ${root}/usr/lib(64|/x86_64-linux-gnu)/`));
  });

  it("accepts target.efi with the certificate of the key that signed it", () => {
    const r = sbverify(SNAKEOIL_CERT, "build/target.efi");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("Signature verification OK");
  });

  it("refuses it with another certificate, and refuses an unsigned UKI", () => {
    const other = sbverify(`${dir}/other.pem`, "build/target.efi");
    expect(other.status).not.toBe(0);
    expect(other.stdout + other.stderr).toContain("Signature verification failed");
    const unsigned = sbverify(SNAKEOIL_CERT, "build/target.unsigned.efi");
    expect(unsigned.status).not.toBe(0);
    expect(unsigned.stdout + unsigned.stderr).toMatch(/No signature table present|Signature verification failed/);
  });
});
