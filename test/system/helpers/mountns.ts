// Run inside `unshare -m --propagation private` as root: exercises the real koffi bindings to
// mount/statfs/umount2 and reports results as JSON on stdout.
import { mkdtempSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { FS_MAGIC, mount, MS, MNT_DETACH, statfsType, umount2 } from "../../../agent/sys/libc.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-ns-`);
const out: Record<string, unknown> = {};
mount("tmpfs", dir, "tmpfs", MS.NOSUID | MS.NODEV, "size=1m,mode=0700");
out.tmpfsMagic = statfsType(dir) === FS_MAGIC.TMPFS;
writeFileSync(`${dir}/f`, "x");
mount(null, dir, null, MS.REMOUNT | MS.RDONLY);
try {
  writeFileSync(`${dir}/g`, "y");
  out.readOnly = false;
} catch (e) {
  out.readOnly = (e as NodeJS.ErrnoException).code === "EROFS";
}
umount2(dir, MNT_DETACH);
out.unmounted = statfsType(dir) !== FS_MAGIC.TMPFS && !existsSync(`${dir}/f`);
try {
  mount("tmpfs", `${dir}/missing`, "tmpfs", 0, null);
} catch (e) {
  out.error = (e as Error).message;
}
console.log(JSON.stringify(out));
