// The koffi bindings, exercised for real: mounts in a private mount namespace (root only),
// libblkid on an image made here, the SIGPWR relay with a real signal.
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { probe, resolveSpec } from "../../agent/sys/blkid.ts";
import { errnoName, SysError } from "../../agent/sys/ffi.ts";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-sys-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("libc bindings", () => {
  it("mount, remount read-only, statfs and umount2 work in a private mount namespace; errors name the call", () => {
    expect(process.getuid?.()).toBe(0); // the suite runs as root (make test installs packages too)
    const out = execFileSync("unshare", ["-m", "--propagation", "private", BUN, "test/unit/helpers/mountns.ts"], { encoding: "utf8" });
    const r = JSON.parse(out) as Record<string, unknown>;
    expect(r).toMatchObject({ tmpfsMagic: true, readOnly: true, unmounted: true });
    expect(r.error).toMatch(/^mount\("tmpfs", ".*\/missing", "tmpfs", 0, null\): ENOENT$/);
  });

  it("names errno values", () => {
    expect(errnoName(2)).toBe("ENOENT");
    expect(new SysError("chroot", ["/x"], 1).message).toBe('chroot("/x"): EPERM');
  });

  it("SIGPWR from another process reaches the agent through sigrelay, while the runtime keeps working", async () => {
    const lib = `${dir}/sigrelay.so`;
    execFileSync("gcc", ["-shared", "-fPIC", "-Os", "-o", lib, "initrd/sigrelay.c"]);
    const child = spawn(BUN, ["test/unit/helpers/sigpwr.ts", lib]);
    let out = "";
    child.stdout.on("data", (d) => {
      out += d;
      if (out === "ready\n") child.kill("SIGPWR");
    });
    const code = await new Promise((r) => child.on("exit", r));
    expect(out).toBe("ready\nsignal 30\n");
    expect(code).toBe(0);
  });
});

describe("libblkid bindings", () => {
  it("probes type, label and UUID of a filesystem image, and resolves a device path spec", () => {
    const img = `${dir}/fat.img`;
    execFileSync("mkfs.vfat", ["-C", "-n", "PROBEME", "-i", "12345678", img, "2048"], { stdio: "ignore" });
    expect(probe(img)).toEqual({ TYPE: "vfat", LABEL: "PROBEME", UUID: "1234-5678" });
    expect(resolveSpec("/dev/null")).toBe("/dev/null");
  });

  it("returns null for data it does not recognise", () => {
    const img = `${dir}/zero.img`;
    execFileSync("truncate", ["-s", "1M", img]);
    expect(probe(img)).toBeNull();
    expect(resolveSpec("LABEL=initos-no-such-label-here")).toBeNull();
  });
});
