// The koffi bindings, exercised for real: mounts in a private mount namespace (root only),
// libblkid on an image made here, the SIGPWR relay with a real signal.
import { execFileSync, spawn } from "node:child_process";
import { closeSync, mkdtempSync, openSync, rmSync } from "node:fs";
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
    const out = execFileSync("unshare", ["-m", "--propagation", "private", BUN, "test/system/helpers/mountns.ts"], { encoding: "utf8" });
    const r = JSON.parse(out) as Record<string, unknown>;
    expect(r).toMatchObject({ tmpfsMagic: true, readOnly: true, unmounted: true });
    expect(r.error).toMatch(/^mount\("tmpfs", ".*\/missing", "tmpfs", 0, null\): ENOENT$/);
  });

  it("drainAsync reads a file into /dev/null on a worker thread: its bytes, from the file's position, then 0 at the end", async () => {
    const { drainAsync } = await import("../../agent/sys/libc.ts");
    const file = `${dir}/drain.bin`;
    execFileSync("dd", ["if=/dev/urandom", `of=${file}`, "bs=1M", "count=9", "status=none"]);
    const fd = openSync(file, "r");
    try {
      const first = await drainAsync(fd, 4 << 20);
      const rest = await drainAsync(fd, 64 << 20); // from where the first stopped, to the end
      const end = await drainAsync(fd, 1);
      expect([first, rest, end]).toEqual([4 << 20, 5 << 20, 0]);
    } finally {
      closeSync(fd);
    }
  });

  it("names errno values", () => {
    expect(errnoName(2)).toBe("ENOENT");
    expect(new SysError("chroot", ["/x"], 1).message).toBe('chroot("/x"): EPERM');
  });

  it("SIGPWR from another process reaches the agent through sigrelay, while the runtime keeps working", async () => {
    const lib = `${dir}/sigrelay.so`;
    execFileSync("gcc", ["-shared", "-fPIC", "-Os", "-o", lib, "initrd/sigrelay.c"]);
    const child = spawn(BUN, ["test/system/helpers/sigpwr.ts", lib]);
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

describe("libcryptsetup verity (userspace verification, no device-mapper)", () => {
  const img = () => `${dir}/v.sqfs`;
  let rootHash = "";
  it("accepts an intact image and names the position of a flipped byte", async () => {
    const { verityVerify } = await import("../../agent/sys/cryptsetup.ts");
    execFileSync("sh", ["-c", `mkdir -p ${dir}/src && head -c 2000000 /dev/urandom > ${dir}/src/blob && mksquashfs ${dir}/src ${img()} -quiet -noappend`]);
    rootHash = /Root hash:\s+([0-9a-f]+)/.exec(execFileSync("veritysetup", ["format", img(), `${dir}/v.verity`], { encoding: "utf8" }))![1]!;
    expect(() => verityVerify(img(), `${dir}/v.verity`, rootHash)).not.toThrow();

    execFileSync("cp", [img(), `${dir}/bad.sqfs`]);
    execFileSync("sh", ["-c", `printf '\\377' | dd of=${dir}/bad.sqfs bs=1 seek=1000000 conv=notrunc status=none`]);
    expect(() => verityVerify(`${dir}/bad.sqfs`, `${dir}/v.verity`, rootHash)).toThrow(/^Verification failed at position 999424, Verification of data area failed$/);
  }, 30_000); // mksquashfs + veritysetup: slow when VMs share the machine

  it("refuses a different root hash and a damaged hash tree", async () => {
    const { verityVerify } = await import("../../agent/sys/cryptsetup.ts");
    expect(() => verityVerify(img(), `${dir}/v.verity`, "0".repeat(64))).toThrow("Verification of root hash failed");
    execFileSync("cp", [`${dir}/v.verity`, `${dir}/bad.verity`]);
    execFileSync("sh", ["-c", `printf '\\377' | dd of=${dir}/bad.verity bs=1 seek=4200 conv=notrunc status=none`]);
    expect(() => verityVerify(img(), `${dir}/bad.verity`, rootHash)).toThrow(/Verification/);
    expect(() => verityVerify(img(), img(), rootHash)).toThrow(/no valid verity superblock/);
    expect(() => verityVerify(img(), `${dir}/v.verity`, "xyz")).toThrow('root hash "xyz" is not hex');
  });
});

describe("libblkid on the built images", () => {
  it("probes the test root and the images (make all builds them)", () => {
    expect(probe("build/testroot.img")).toMatchObject({ TYPE: "btrfs", LABEL: "initos-testroot" });
    expect(probe("build/images/modules.sqfs")).toMatchObject({ TYPE: "squashfs" });
    expect(probe("build/images/modules.verity")).toMatchObject({ TYPE: "DM_verity_hash" });
  });
});

describe("LUKS2 on an image file (no device-mapper needed to format and check keys)", () => {
  it("formats with a PBKDF2 TPM slot and an argon2id recovery slot, checks both keys, destroys a slot", async () => {
    const { luksFormat, luksAddKey, luksCheckKey, luksDestroySlot, TPM_KDF, RECOVERY_KDF } = await import("../../agent/sys/cryptsetup.ts");
    const img = `${dir}/luks.img`;
    execFileSync("truncate", ["-s", "32M", img]);
    const key = Buffer.alloc(32, 3);
    expect(luksFormat(img, key, TPM_KDF)).toBe(0);
    expect(luksAddKey(img, key, Buffer.from("recovery words"), RECOVERY_KDF)).toBe(1);
    const dump = execFileSync("cryptsetup", ["luksDump", img], { encoding: "utf8" });
    expect(dump).toMatch(/0: luks2[\s\S]*PBKDF:\s+pbkdf2[\s\S]*Iterations:\s+1000/);
    expect(dump).toMatch(/1: luks2[\s\S]*PBKDF:\s+argon2id[\s\S]*Time cost:\s+4[\s\S]*Memory:\s+131072/);
    expect(luksCheckKey(img, key)).toBe(0);
    expect(luksCheckKey(img, Buffer.from("recovery words"))).toBe(1);
    expect(() => luksCheckKey(img, Buffer.from("nope"))).toThrow(/no keyslot opens with this key: EPERM/);
    luksDestroySlot(img, 0);
    expect(() => luksCheckKey(img, key)).toThrow(/no keyslot opens/);
  });
});

describe("LUKS2 tokens on an image file", () => {
  it("writes, lists and removes systemd-tpm2 tokens as cryptsetup sees them", async () => {
    const { luksFormat, luksSetToken, luksTokens, luksRemoveToken, TPM_KDF } = await import("../../agent/sys/cryptsetup.ts");
    const img = `${dir}/tokens.img`;
    execFileSync("truncate", ["-s", "32M", img]);
    luksFormat(img, Buffer.alloc(32, 4), TPM_KDF);
    const json = JSON.stringify({ type: "systemd-tpm2", keyslots: ["0"], "tpm2-blob": "AAAA", "tpm2-pcrs": [7], "tpm2-pcr-bank": "sha256", "tpm2-primary-alg": "ecc", "tpm2-policy-hash": "00", "tpm2-pin": false });
    expect(luksSetToken(img, json)).toBe(0);
    expect(JSON.parse(execFileSync("cryptsetup", ["token", "export", "--token-id", "0", img], { encoding: "utf8" }))).toEqual(JSON.parse(json));
    expect(luksTokens(img)).toEqual([{ id: 0, json: execFileSync("cryptsetup", ["token", "export", "--token-id", "0", img], { encoding: "utf8" }).trim() }]);
    // libcryptsetup refuses a token that names a keyslot the header does not have.
    expect(() => luksSetToken(img, json.replace('["0"]', '["5"]'))).toThrow(/write token/);
    luksRemoveToken(img, 0);
    expect(luksTokens(img)).toEqual([]);
  });
});
