// The container image the jail scenarios run: busybox (static) with its applets, the test init
// (web-init.sh) and a page to serve; written as an OCI archive, as `skopeo copy ... oci-archive:`
// writes one, with a gzip layer. Also its hostile variants for `image import`'s refusals.
import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import { type LayerEntry, OciLayoutWriter, ociImageTar } from "../oci-fixture.ts";

const BUSYBOX = "/bin/busybox"; // busybox-static: runs with no library in the image

function webLayer(): LayerEntry[] {
  const applets = execFileSync(BUSYBOX, ["--list"], { encoding: "utf8" }).split("\n").filter((a) => a && a !== "busybox");
  return [
    { path: "bin", type: "dir" },
    { path: "bin/busybox", type: "file", data: readFileSync(BUSYBOX), mode: 0o755 },
    ...applets.map((a): LayerEntry => ({ path: `bin/${a}`, type: "symlink", target: "busybox" })),
    { path: "init", type: "file", data: readFileSync("test/jails/web-init.sh"), mode: 0o755 },
    { path: "www", type: "dir" },
    { path: "www/index.html", type: "file", data: "hello from the web jail\n" },
    { path: "data", type: "dir" },
    { path: "etc", type: "dir" },
    { path: "etc/passwd", type: "file", data: "root:x:0:0:root:/:/bin/sh\n" },
    { path: "tmp", type: "dir", mode: 0o1777 },
  ];
}

export function writeWebImage(out: string): string {
  writeFileSync(out, ociImageTar({ layers: [webLayer()], config: { Entrypoint: ["/init"] }, gzip: true }));
  return out;
}

/** The good archive cut short: its last blobs missing. */
export function writeTruncated(good: string, out: string): string {
  const b = readFileSync(good);
  writeFileSync(out, b.subarray(0, Math.floor(b.length / 2)));
  return out;
}

/** A layer whose bytes are not the ones its digest names. */
export function writeDigestMismatch(out: string): string {
  const w = new OciLayoutWriter();
  const m = w.image({ layers: [[{ path: "hello", type: "file", data: "hello\n" }]] });
  const manifest = JSON.parse(w.blobs.get(m.digest)!.toString()) as { layers: { digest: string }[] };
  const layer = manifest.layers[0]!.digest;
  const bytes = Buffer.from(w.blobs.get(layer)!);
  bytes.writeUInt8(bytes.readUInt8(600) ^ 0xff, 600); // inside the file's data
  w.replace(layer, bytes);
  writeFileSync(out, w.tar([m]));
  return out;
}

/** A layer that climbs out of the root: a symlink to / and a file written through it. */
export function writeEscape(out: string): string {
  writeFileSync(
    out,
    ociImageTar({
      layers: [
        [{ path: "up", type: "symlink", target: "../../../../" }],
        [{ path: "up/escaped-from-image", type: "file", data: "out\n" }],
      ],
    }),
  );
  return out;
}
