// Run inside `unshare -m --propagation private` as root, with two loop devices holding one
// two-device btrfs: mounts it with the devices named (as the agent does), and prints what the
// real BTRFS_IOC_FS_INFO / DEV_INFO bindings say, and the device numbers of the paths, as JSON.
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { btrfsDevices, MNT_DETACH, mount, MS, umount2 } from "../../../agent/sys/libc.ts";
import { realSys } from "../../../agent/sys/index.ts";

const [a, b] = process.argv.slice(2) as [string, string];
const dir = mkdtempSync(`${tmpdir()}/initos-btrfs-`);
mount(a, dir, "btrfs", MS.RDONLY, `device=${a},device=${b}`);
try {
  const fs = btrfsDevices(dir);
  const sys = await realSys();
  console.log(JSON.stringify({ ...fs, numbers: fs.devices.map((d) => sys.deviceNumber(d.path)), want: [sys.deviceNumber(a), sys.deviceNumber(b)], notBlock: sys.deviceNumber("/etc/hostname") }));
} finally {
  umount2(dir, MNT_DETACH);
}
