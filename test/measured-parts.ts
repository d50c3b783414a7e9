// The sections a UKI's PCR 11 signature covers, as small stand-ins in a test's directory:
// systemd-measure and the stub only hash them. Shared by test/unit and test/system measure tests.
import { writeFileSync } from "node:fs";
import type { MeasuredParts } from "../initrd/measure.ts";

/** Writes linux, initrd, cmdline and osrel into `dir`; `pcrpkey` is the PEM already there. */
export function measuredParts(dir: string, pcrpkey = `${dir}/pcr.pub.pem`): MeasuredParts {
  const parts: MeasuredParts = { linux: `${dir}/linux`, initrd: `${dir}/initrd`, cmdline: `${dir}/cmdline`, osrel: `${dir}/osrel`, pcrpkey };
  writeFileSync(parts.linux, Buffer.concat([Buffer.from("MZ"), Buffer.alloc(400_000, 7)]));
  writeFileSync(parts.initrd, Buffer.alloc(250_001, 3));
  writeFileSync(parts.cmdline, "console=ttyS0 rw\0");
  writeFileSync(parts.osrel, 'NAME="initos"\nID=initos\n');
  return parts;
}
