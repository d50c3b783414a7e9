// The VM image builder for real: a btrfs image made from an OCI layout (or a rootfs tarball),
// read back through a loop mount in a private mount namespace (root). The OCI reading and layer
// semantics it builds on are tested without root in test/unit/oci.test.ts.
import { scratchDirs } from "../scratch.ts";
import { execFileSync } from "node:child_process";
import { readdirSync, statSync, writeFileSync } from "node:fs";
import * as zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { buildVmImage } from "../../initrd/vmimage.ts";
import { LOWER, ociImageTar, tarBytes, UPPER } from "../oci-fixture.ts";

const fresh = scratchDirs("initos-vmimage");

describe("buildVmImage", () => {
  /** Runs `script` with the image loop-mounted read-only on $M in a private mount namespace. */
  const inImage = (img: string, script: string, opts = "ro") =>
    execFileSync("unshare", ["-m", "sh", "-ec", `M=$(mktemp -d); mount -o loop,${opts} "$1" "$M"; trap 'umount "$M"; rmdir "$M"' EXIT; ${script}`, "sh", img], { encoding: "utf8" });

  it("makes a btrfs image from an OCI layout tar whose files read back through a loop mount", async () => {
    const d = fresh("vm");
    writeFileSync(`${d}/image.tar`, ociImageTar({ layers: [LOWER, [...UPPER, { path: "bin/app", type: "file", data: "#!/bin/sh\n", mode: 0o755 }]], config: { Cmd: ["/bin/app"] } }));
    const r = await buildVmImage({ from: `${d}/image.tar`, out: `${d}/vm.img` });
    expect(r).toMatchObject({ source: "oci", sizeMiB: 109, skipped: [] });
    expect(r.config?.cmd).toEqual(["/bin/app"]);
    expect(statSync(`${d}/vm.img`).size).toBe(109 * 2 ** 20);
    expect(execFileSync("btrfs", ["inspect-internal", "dump-super", `${d}/vm.img`], { encoding: "utf8" })).toMatch(/^label\s+initos-vm$/m);
    const out = inImage(`${d}/vm.img`, '(cd "$M"; cat etc/keep; ls -A a b; stat -c "%a %U %n" . bin/app)');
    expect(out).toBe("keep\na:\ny\n\nb:\nnew\n755 root .\n755 root bin/app\n");
    expect(readdirSync(d).sort()).toEqual(["image.tar", "vm.img"]); // the staging directory is gone
  });

  it("puts the tree in a subvolume when asked, leaving the top level empty", async () => {
    const d = fresh("vmsub");
    writeFileSync(`${d}/image.tar`, ociImageTar({ layers: [LOWER, UPPER] }));
    await buildVmImage({ from: `${d}/image.tar`, out: `${d}/vm.img`, subvolume: "@", label: "sub-test" });
    expect(inImage(`${d}/vm.img`, 'ls -A "$M"; cat "$M/@/etc/keep"')).toBe("@\nkeep\n");
    expect(inImage(`${d}/vm.img`, 'cat "$M/b/new"', "ro,subvol=@")).toBe("new\n");
  });

  it("builds from a rootfs .tar.gz, keeping .wh. names as ordinary files", async () => {
    const d = fresh("vmtar");
    writeFileSync(`${d}/rootfs.tar.gz`, zlib.gzipSync(tarBytes([{ name: "./", flag: "5" }, { name: "./etc/.wh.keep", flag: "0", data: Buffer.from("literal") }])));
    const r = await buildVmImage({ from: `${d}/rootfs.tar.gz`, out: `${d}/vm.img` });
    expect(r.source).toBe("tar");
    expect(inImage(`${d}/vm.img`, 'cat "$M/etc/.wh.keep"')).toBe("literal");
  });
});
