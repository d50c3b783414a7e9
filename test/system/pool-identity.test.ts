// The bindings the pool's identity rests on, for real: libcryptsetup's LUKS2 metadata
// (crypt_dump_json) as the agent reads it before a key is tried, and the kernel's list of a
// mounted btrfs's devices (BTRFS_IOC_FS_INFO / DEV_INFO) the agent checks after the mount.
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { KEY_KDF_BOUND, PASSPHRASE_KDF_BOUND, parseLuksHeader, triableSlots, unprotected } from "../../agent/diskkey/luksheader.ts";
import { luksHeader } from "../../agent/sys/cryptsetup.ts";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-poolid-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const sh = (cmd: string, args: string[], input?: string) => execFileSync(cmd, args, { input, encoding: "utf8", stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"] });

describe("LUKS2 metadata through libcryptsetup", () => {
  it("a volume as install makes it: aes-xts, a PBKDF2 keyslot a TPM key is tried in, an argon2id one only a passphrase is", () => {
    const img = `${dir}/luks.img`;
    sh("truncate", ["-s", "32M", img]);
    sh("cryptsetup", ["luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", img], "tpm-key");
    writeFileSync(`${dir}/old.key`, "tpm-key");
    writeFileSync(`${dir}/new.key`, "recovery passphrase");
    sh("cryptsetup", ["luksAddKey", "--batch-mode", "--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "131072", "--pbkdf-parallel", "2", "--key-file", `${dir}/old.key`, img, `${dir}/new.key`]);
    const meta = parseLuksHeader(img, luksHeader(img));
    expect(meta.segments).toEqual([{ id: 0, type: "crypt", encryption: "aes-xts-plain64" }]);
    expect(meta.keyslots.map((k) => [k.id, k.encryption, k.kdf.type])).toEqual([
      [0, "aes-xts-plain64", "pbkdf2"],
      [1, "aes-xts-plain64", "argon2id"],
    ]);
    expect(meta.keyslots[1]!.kdf).toMatchObject({ time: 4, memory: 131072, cpus: 2 });
    expect(unprotected(meta)).toBeNull();
    expect(triableSlots(meta, KEY_KDF_BOUND).slots).toEqual([0]);
    expect(triableSlots(meta, PASSPHRASE_KDF_BOUND).slots).toEqual([0, 1]);
  });

  it("the same header with its segment turned to cipher_null (checksum made right again) is refused by name", () => {
    const img = `${dir}/null.img`;
    sh("truncate", ["-s", "32M", img]);
    sh("cryptsetup", ["luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-", img], "k");
    // The evil maid's edit: the JSON area's segment cipher, both header copies, checksums
    // recomputed (libcryptsetup refuses a header whose checksum does not match).
    sh(BUN, ["test/system/helpers/luks-null.ts", img]);
    const meta = parseLuksHeader(img, luksHeader(img));
    expect(meta.segments[0]!.encryption).toBe("cipher_null-ecb");
    expect(unprotected(meta)).toBe("cipher_null in data segment 0");
  });
});

describe("btrfs devices of a mounted filesystem", () => {
  it("FS_INFO and DEV_INFO list both devices of a two-device btrfs, by the paths it was mounted with", () => {
    const a = `${dir}/d1.img`;
    const b = `${dir}/d2.img`;
    sh("truncate", ["-s", "200M", a]);
    sh("truncate", ["-s", "200M", b]);
    const la = sh("losetup", ["-f", "--show", a]).trim();
    const lb = sh("losetup", ["-f", "--show", b]).trim();
    try {
      sh("mkfs.btrfs", ["-q", "-f", "-U", "0f5e7a1d-1111-4222-8333-444455556666", la, lb]);
      const out = JSON.parse(sh("unshare", ["-m", "--propagation", "private", BUN, "test/system/helpers/btrfsdevs.ts", la, lb])) as { fsid: string; numDevices: number; devices: { devid: number; path: string }[]; numbers: number[]; want: number[]; notBlock: number | null };
      expect(out.fsid).toBe("0f5e7a1d-1111-4222-8333-444455556666");
      expect(out.numDevices).toBe(2);
      expect(out.devices).toEqual([
        { devid: 1, path: la },
        { devid: 2, path: lb },
      ]);
      expect(out.numbers).toEqual(out.want);
      expect(out.notBlock).toBeNull();
    } finally {
      sh("losetup", ["-d", la]);
      sh("losetup", ["-d", lb]);
    }
  });
});
