// The verity parameters pinned in the signed config against a hash device's superblock, which is
// unauthenticated data on the ESP: libcryptsetup for real on image files (no device-mapper).
// Each forged superblock below differs from the pinned parameters in one field, everything
// else left as `veritysetup format` wrote it.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { VerityParams } from "../../agent/sys/cryptsetup.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-verity-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const data = `${dir}/image.sqfs`;
const tree = `${dir}/image.verity`;
const SALT = createHash("sha256").update("initos verity pinning test").digest("hex");
let rootHash = "";
let pinned: VerityParams;

const cs = () => import("../../agent/sys/cryptsetup.ts");

/** A copy of the hash device with its superblock (struct verity_sb, little endian) changed. */
function forged(name: string, edit: (sb: Buffer) => void): string {
  const b = readFileSync(tree);
  edit(b);
  const out = `${dir}/${name}.verity`;
  writeFileSync(out, b);
  return out;
}
const SB = { hashType: 12, algorithm: 32, dataBlockSize: 64, hashBlockSize: 68, dataBlocks: 72, saltSize: 80, salt: 88 } as const;

beforeAll(() => {
  execFileSync("sh", ["-c", `mkdir -p ${dir}/src && head -c 3000000 /dev/urandom > ${dir}/src/blob && mksquashfs ${dir}/src ${data} -quiet -noappend`]);
  const out = execFileSync(
    "veritysetup",
    ["format", "--format", "1", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096", "--salt", SALT, data, tree],
    { encoding: "utf8" },
  );
  rootHash = /Root hash:\s+([0-9a-f]+)/.exec(out)![1]!;
  const dataBlocks = Number(/Data blocks:\s+(\d+)/.exec(out)![1]);
  pinned = { hashType: 1, hashAlgorithm: "sha256", dataBlockSize: 4096, hashBlockSize: 4096, dataBlocks, salt: SALT };
}, 30_000);

describe("verity superblock against the pinned parameters", () => {
  it("reads the superblock's parameters (crypt_get_verity_info) and accepts an image that matches them", async () => {
    const { verityVerify, veritySuperblock } = await cs();
    expect(veritySuperblock(data, tree)).toEqual(pinned);
    expect(pinned.dataBlocks).toBeGreaterThan(700); // two levels: the truncation below keeps both
    expect(() => verityVerify(data, tree, rootHash, pinned)).not.toThrow();
  });

  it("fewer data blocks keep the top hash block, so the root hash still matches: refused by the pin, naming both values", async () => {
    const { verityVerify } = await cs();
    const fewer = pinned.dataBlocks - 100;
    const f = forged("fewer-blocks", (sb) => sb.writeBigUInt64LE(BigInt(fewer), SB.dataBlocks));
    // What the kernel checks a read against: the root hash over the stored top block (just after
    // the superblock). Unchanged: dm-verity alone would map a verified prefix of the image.
    const top = readFileSync(f).subarray(4096, 8192);
    expect(createHash("sha256").update(Buffer.from(SALT, "hex")).update(top).digest("hex")).toBe(rootHash);
    // libcryptsetup's full userspace check notices only through the zeroed spare area of a hash
    // block; the pin says what is wrong before any data is read.
    expect(() => verityVerify(data, f, rootHash)).toThrow(/Spare area is not zeroed/);
    expect(() => verityVerify(data, f, rootHash, pinned)).toThrow(`verity superblock: dataBlocks is ${fewer}, the signed config pins ${pinned.dataBlocks}`);
  });

  it("another hash type (Chrome OS, salt after the data): refused naming hashType", async () => {
    const { verityVerify } = await cs();
    const f = forged("hash-type-0", (sb) => sb.writeUInt32LE(0, SB.hashType));
    expect(() => verityVerify(data, f, rootHash, pinned)).toThrow("verity superblock: hashType is 0, the signed config pins 1");
  });

  it("another salt: refused naming salt and both values", async () => {
    const { verityVerify } = await cs();
    const other = "00".repeat(32);
    const f = forged("salt", (sb) => Buffer.from(other, "hex").copy(sb, SB.salt));
    expect(() => verityVerify(data, f, rootHash, pinned)).toThrow(`verity superblock: salt is ${other}, the signed config pins ${SALT}`);
    const shorter = forged("salt-size", (sb) => sb.writeUInt16LE(16, SB.saltSize));
    expect(() => verityVerify(data, shorter, rootHash, pinned)).toThrow(`verity superblock: salt is ${SALT.slice(0, 32)}, the signed config pins ${SALT}`);
  });

  it("another hash algorithm of the same digest size: refused naming hashAlgorithm", async () => {
    const { verityVerify } = await cs();
    const f = forged("sha3", (sb) => Buffer.from("sha3-256\0").copy(sb, SB.algorithm));
    expect(() => verityVerify(data, f, rootHash, pinned)).toThrow("verity superblock: hashAlgorithm is sha3-256, the signed config pins sha256");
  });

  it("other block sizes: refused naming the field", async () => {
    const { verityVerify } = await cs();
    const d = forged("data-block-size", (sb) => sb.writeUInt32LE(512, SB.dataBlockSize));
    expect(() => verityVerify(data, d, rootHash, pinned)).toThrow("verity superblock: dataBlockSize is 512, the signed config pins 4096");
    const h = forged("hash-block-size", (sb) => sb.writeUInt32LE(1024, SB.hashBlockSize));
    expect(() => verityVerify(data, h, rootHash, pinned)).toThrow("verity superblock: hashBlockSize is 1024, the signed config pins 4096");
  });

  it("an image formatted again with another salt gets another root hash: the pinned root hash alone refuses it", async () => {
    const { verityVerify } = await cs();
    const other = `${dir}/other-salt.verity`;
    const out = execFileSync("veritysetup", ["format", "--salt", "11".repeat(32), data, other], { encoding: "utf8" });
    expect(/Root hash:\s+([0-9a-f]+)/.exec(out)![1]).not.toBe(rootHash);
    expect(() => verityVerify(data, other, rootHash)).toThrow("Verification of root hash failed");
  });

  it("names the first field that differs, or nothing", async () => {
    const { verityMismatch } = await cs();
    expect(verityMismatch(pinned, pinned)).toBeNull();
    expect(verityMismatch({ ...pinned, hashAlgorithm: "sha512", dataBlocks: 1 }, pinned)).toBe("hashAlgorithm is sha512, the signed config pins sha256");
    expect(verityMismatch({ ...pinned, salt: "" }, pinned)).toBe(`salt is (none), the signed config pins ${SALT}`);
  });
});
