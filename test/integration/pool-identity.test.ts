// Issue #23: the production boot opens only this machine's own pool. The evil maid brings a
// disk of hers to an installed machine (Secure Boot on, a TPM, the production UKI on the
// booted disk) and plugs it in where its device name sorts first (she is /dev/vda, the victim
// /dev/vdb or later; the firmware still boots the victim's disk). Her goal is the victim's
// data: her root must never run while the victim's pool is open, and the victim's pool must
// never be readable by anything but its own root. The test root says what it sees
// (INITOS-SEEN: the device under its root, every open LUKS volume, the btrfs filesystems the
// kernel knows), so each scenario asserts what the attacker would have seen, not only the log.
//
// One victim: installed once by the fleet's installer onto a blank disk with a fresh swtpm
// state. Every boot after that runs on snapshots of its disk and a copy of its TPM state, so
// the scenarios do not disturb each other. Each way in has a positive control: the same volume
// of hers IS one the production boot opens unattended when it is where the agent looks first.
import { execFileSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { OVMF, startVm, stopAll, type Vm } from "../../qemu/harness.ts";
import { attackerKey, gptDisk, linesMatching, luksVolume, newPartUuids, nullCipherKeyslot, putVolume, sealOnVictimTpm, type Seen, seenIn, volumeOpens } from "./attacker.ts";
import { passphraseOpens, tokens } from "./machine.ts";
import { buildPoolImage, buildTwoVolumePool, testRootfs } from "./pool-image.ts";

const B = "build";
const PROMPT = /Recovery passphrase \(attempt (\d) of 3\): $/;
/** Where a boot settles: the root that runs says what it sees, or the passphrase is asked. */
const SETTLED = /INITOS-SEEN [^\n]*\n|Recovery passphrase \(attempt \d of 3\): $/;
const RECOVERY = /RECOVERY PASSPHRASE \(shown once, write it down\): ([a-z0-9-]+)/;
/** Per boot: measured 28-118 s from QEMU start to the test root (or the prompt) under TCG; about twice the slowest. */
const BOOT_MS = 240_000;

let dir: string;
let victim: string;
let victimTpm: string;
let victimRecovery = "";
let victimToken: Record<string, unknown>;
/** The victim pool's btrfs fsid, as its own root sees it. */
let victimFsid = "";
let rootfs: string;

beforeAll(() => {
  dir = mkdtempSync(`${tmpdir()}/initos-pool-identity-`);
  victim = `${dir}/victim.img`;
  victimTpm = `${dir}/victim-tpm`; // not tpm-<name>: tpmCopy makes those (and removes them first)
  mkdirSync(victimTpm);
  execFileSync("truncate", ["-s", "1G", victim]);
  rootfs = testRootfs(`${dir}/rootfs.tar`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

/** A copy of the victim's TPM state for one boot: what a boot does to it stays there. */
function tpmCopy(name: string): string {
  const state = `${dir}/tpm-${name}`;
  rmSync(state, { recursive: true, force: true });
  cpSync(victimTpm, state, { recursive: true });
  return state;
}

/**
 * The production boot of the machine: `disks` in this order (so the first is /dev/vda), the
 * firmware booting `disks[booted]` (Secure Boot on), every disk a snapshot, the victim's TPM
 * (a copy) unless `tpm: false`.
 */
function boot(name: string, disks: string[], booted: number, tpm = true): Promise<Vm> {
  return startVm({
    name: `pool-identity-${name}`,
    firmware: { vars: OVMF.varsSecure },
    disks: disks.map((file, i) => ({ file, bootIndex: i === booted ? 0 : i + 1 })),
    tpm: tpm ? { stateDir: tpmCopy(name) } : false,
    memoryMiB: 2048,
  });
}

/**
 * Waits until the boot settles (a root runs, or the passphrase is asked, or the VM stops: a
 * failed boot powers off) and returns the console; a boot that does none of these in `ms` fails.
 * `from` (a vm.mark()): only what comes after it counts, e.g. after a passphrase was typed.
 */
async function settle(vm: Vm, ms = BOOT_MS, from = 0): Promise<string> {
  const start = Date.now();
  try {
    await vm.waitFor(SETTLED, ms, true, from);
  } catch (e) {
    if (vm.running) throw e;
  }
  console.log(`${vm.name}: settled in ${((Date.now() - start) / 1000).toFixed(0)} s`);
  return vm.output;
}

/** The victim's own root runs from `dev` (its pool volume), and nothing but its pool is open or known. */
function expectVictimRoot(out: string, dev: string): Seen {
  const seen = seenIn(out);
  expect(seen, "no root ran").not.toBeNull();
  expect(seen!.backing).toBe(dev);
  expect(seen!.open).toBe("initos-pool0");
  expect(seen!.btrfs).toBe(victimFsid);
  expect(out).not.toMatch(PROMPT);
  return seen!;
}

/**
 * Why another disk's LUKS2 volume is ignored next to the victim's one-device pool: once the
 * pool's only device is open, every other volume is skipped untried ("all open",
 * agent/stages/volumes.ts joinOthers): the pool's key is never even tried on it.
 */
const NOT_THE_POOLS = () => new RegExp(`not this pool's \\(btrfs ${victimFsid} has 1 device\\(s\\), all open\\)$`);

/** A positive control: her volume, where the agent looks first, was unsealed unattended and her root ran. */
function expectHerRoot(out: string): void {
  expect(out).toMatch(/initos: unlock: \/dev\/vda3 token 0 \(PCR 7,15 \+ signed 11, keyslot 0\): unsealed under the SRK 0x81000001/);
  const seen = seenIn(out);
  expect(seen).toMatchObject({ backing: "vda3", open: "initos-pool0" });
  expect(seen!.btrfs).not.toBe(victimFsid);
}

/** One line, and only one, says `dev` was ignored (and why, when `why` is given). */
function expectIgnored(out: string, dev: string, why?: RegExp): void {
  const lines = linesMatching(out, new RegExp(`initos: unlock: ignored ${dev}: `));
  expect(lines, `ignored-lines for ${dev}`).toHaveLength(1);
  if (why) expect(lines[0]).toMatch(why);
}

describe.sequential("the production boot opens only this machine's own pool (issue #23)", () => {
  it("the victim: installed by the fleet's installer onto a blank disk, it boots unattended into its own root", async () => {
    const install = await startVm({
      name: "pool-identity-victim-install",
      firmware: { vars: OVMF.varsSecure },
      disks: [{ file: `${B}/installer.img` }, { file: victim, snapshot: false }],
      tpm: { stateDir: victimTpm },
      memoryMiB: 2048,
    });
    expect(await install.waitExit(300_000)).toBe(0);
    expect(install.output).toMatch(/initos: install: done: \/dev\/vdb has @root/);
    victimRecovery = RECOVERY.exec(install.output)![1]!;
    victimToken = tokens(victim).get(0)!;
    expect(victimToken).toMatchObject({ type: "systemd-tpm2", keyslots: ["0"] });

    const vm = await boot("victim", [victim], 0);
    const out = await settle(vm);
    const seen = seenIn(out);
    expect(seen).toMatchObject({ root: "/dev/mapper/initos-pool0", backing: "vda3", open: "initos-pool0" });
    expect(seen!.btrfs).toMatch(/^[0-9a-f-]{36}$/);
    victimFsid = seen!.btrfs;
    expect(out).toMatch(/initos: unlock: unlocked with the TPM/);
  }, 600_000);

  describe("(a) a volume the fleet's own installer sealed for her on the victim's TPM", () => {
    let hers: string;
    let herRecovery = "";

    it("she boots the installer with her blank disk as the target: a genuine production token, and a passphrase she knows", async () => {
      hers = `${dir}/hers-installed.img`;
      execFileSync("truncate", ["-s", "1G", hers]);
      const vm = await startVm({
        name: "pool-identity-her-install",
        firmware: { vars: OVMF.varsSecure },
        disks: [{ file: `${B}/installer.img` }, { file: hers, snapshot: false }],
        tpm: { stateDir: tpmCopy("her-install") },
        memoryMiB: 2048,
      });
      expect(await vm.waitExit(300_000)).toBe(0);
      herRecovery = RECOVERY.exec(vm.output)![1]!;
      expect(tokens(hers).get(0)).toMatchObject({ type: "systemd-tpm2", keyslots: ["0"] });
      expect(passphraseOpens(hers, herRecovery)).toBe(true);
      expect(passphraseOpens(hers, victimRecovery)).toBe(false);
    }, 360_000);

    it("control: her disk booted on the victim's machine unseals her token unattended and runs her root", async () => {
      const vm = await boot("a-control", [hers], 0);
      const out = await settle(vm);
      expectHerRoot(out);
    }, 300_000);

    it("attack: her disk first (vda), the victim's booted (vdb): the victim's root runs, hers is ignored with one line, and nothing of hers is unsealed", async () => {
      const vm = await boot("a-attack", [hers, victim], 1);
      const out = await settle(vm);
      expectVictimRoot(out, "vdb3");
      expectIgnored(out, "/dev/vda3", NOT_THE_POOLS());
      expect(out).toMatch(/initos: unlock: pool volume \/dev\/vdb3 on the boot disk \/dev\/vdb/);
      // Her header was not handed to the TPM: the key could still be released then.
      expect(out).not.toMatch(/initos: unlock: \/dev\/vda3 token/);
    }, 300_000);
  });

  describe("(b) a volume she sealed herself with tpm2-tools to the victim's production policy", () => {
    let herPool: string;

    it("she seals her own key under the victim's SRK with the policy digest from the victim's token", async () => {
      const key = attackerKey();
      const work = `${dir}/b-seal`;
      mkdirSync(work);
      const blob = await sealOnVictimTpm(tpmCopy("b-seal"), String(victimToken["tpm2-policy-hash"]), key.secret, work);
      herPool = buildPoolImage({
        out: `${dir}/b-pool.img`,
        passphrase: key.passphrase,
        rootfs,
        subvolumes: ["@root"],
        hostConfig: { root: "@root" },
        token: { ...victimToken, "tpm2-blob": blob.toString("base64"), keyslots: ["0"] },
      });
      expect(volumeOpens(herPool, key.passphrase)).toBe(true);
    }, 120_000);

    it("control: in place of the victim's pool volume (vda3 of a copy of its disk) her volume unseals unattended and her root runs", async () => {
      const disk = `${dir}/b-control.img`;
      execFileSync("cp", ["--sparse=always", victim, disk]);
      putVolume(disk, 3, herPool);
      const vm = await boot("b-control", [disk], 0);
      const out = await settle(vm);
      expectHerRoot(out);
    }, 300_000);

    it("attack: her disk first (vda1), the victim's booted (vdb): the victim's root runs, hers is ignored with one line, her token never reaches the TPM", async () => {
      const disk = gptDisk(`${dir}/b-hers.img`, [herPool]);
      const vm = await boot("b-attack", [disk, victim], 1);
      const out = await settle(vm);
      expectVictimRoot(out, "vdb3");
      expectIgnored(out, "/dev/vda1", NOT_THE_POOLS());
      expect(out).not.toMatch(/initos: unlock: \/dev\/vda1 token/);
    }, 300_000);
  });

  describe("(c) a volume whose keyslot is cipher_null, carrying a copy of the victim's token", () => {
    const HER_PASSPHRASE = "her-null-keyslot-passphrase";
    let nullPool: string;

    beforeAll(() => {
      // Her pool (her root inside, a data segment she holds the key of) whose keyslot 0 is
      // rewritten to cipher_null (attacker.ts nullCipherKeyslot: why by hand, and what was
      // measured on this host). If libcryptsetup opens such a keyslot with any key, the
      // victim's own unsealed key "opens" her volume: the token is the victim's, byte for byte.
      nullPool = buildPoolImage({ out: `${dir}/c-pool.img`, passphrase: HER_PASSPHRASE, rootfs, subvolumes: ["@root"], hostConfig: { root: "@root" }, token: victimToken });
      nullCipherKeyslot(nullPool, HER_PASSPHRASE);
    });

    it("attack: her disk first (vda1), the victim's booted (vdb): the victim's root runs, hers is ignored with one line", async () => {
      const disk = gptDisk(`${dir}/c-hers.img`, [nullPool]);
      const vm = await boot("c-attack", [disk, victim], 1);
      const out = await settle(vm);
      expectVictimRoot(out, "vdb3");
      // Refused for its null keyslot (or, once the pool counts its one device as open, untried).
      expectIgnored(out, "/dev/vda1", new RegExp(`cipher_null in keyslot 0: a null cipher opens with any key$|${NOT_THE_POOLS().source}`));
      expect(out).not.toMatch(/initos: unlock: opened \/dev\/vda1/);
    }, 300_000);

    it("attack: on the victim's own disk in place of its pool volume (the victim's volume moved to a second disk): refused before any key is tried, one line naming cipher_null, nothing opened", async () => {
      // She has the disk for five minutes: the victim's pool volume stays reachable (here: the
      // victim's untouched disk as vdb), and the booted disk's LUKS2 partition is now hers.
      const disk = `${dir}/c-boot.img`;
      execFileSync("cp", ["--sparse=always", victim, disk]);
      newPartUuids(disk, [1, 2]);
      putVolume(disk, 3, nullPool);
      const vm = await boot("c-boot-disk", [disk, victim], 0);
      const out = await settle(vm);
      expect(seenIn(out), "a root ran").toBeNull();
      expect(out).toMatch(/initos: boot failed: unlock: refused \/dev\/vda3: cipher_null in keyslot 0: a null cipher opens with any key; nothing unsealed, nothing opened/);
      // The copied token is the victim's and would unseal (the TPM cannot tell): the header is
      // refused before it is tried, and the victim's own volume on the other disk is never read.
      expect(out).not.toMatch(/initos: unlock: opened |unsealed under the SRK|Recovery passphrase|\/dev\/vdb3/);
    }, 300_000);
  });

  describe("(d, e) other LUKS2 disks attached at boot: hers with a passphrase, a backup drive, a copy of the victim's token", () => {
    const HER_PASSPHRASE = "her-own-pool-passphrase";
    let herDisk: string;

    beforeAll(() => {
      herDisk = gptDisk(`${dir}/d-hers.img`, [buildPoolImage({ out: `${dir}/d-pool.img`, passphrase: HER_PASSPHRASE, rootfs, subvolumes: ["@root"], hostConfig: { root: "@root" } })]);
    });

    it("unattended: none stops the boot at a prompt; the victim's root runs; one line names each ignored disk", async () => {
      const backup = gptDisk(`${dir}/e-backup.img`, [luksVolume(`${dir}/e-backup-vol.img`, "the-backup-drive-passphrase")]);
      const tokenCopy = gptDisk(`${dir}/e-token-copy.img`, [luksVolume(`${dir}/e-token-copy-vol.img`, attackerKey().passphrase, victimToken)]);
      const vm = await boot("de-unattended", [herDisk, backup, tokenCopy, victim], 3);
      const out = await settle(vm);
      expectVictimRoot(out, "vdd3");
      expectIgnored(out, "/dev/vda1", NOT_THE_POOLS());
      expectIgnored(out, "/dev/vdb1", NOT_THE_POOLS());
      expectIgnored(out, "/dev/vdc1", NOT_THE_POOLS());
      expect(out).not.toMatch(/initos: unlock: \/dev\/vd[abc]1 token/);
    }, 300_000);

    it("no TPM: her passphrase typed at the console opens nothing; the victim's recovery passphrase opens only the victim's pool", async () => {
      const vm = await boot("d-passphrase", [herDisk, victim], 1, false);
      await vm.waitFor(PROMPT, BOOT_MS, true);
      const typed = vm.mark();
      vm.send(`${HER_PASSPHRASE}\n`);
      // The next prompt, or (what the old code did) her root running on her volume.
      await settle(vm, 120_000, typed);
      expect(seenIn(vm.output), "a root ran on her passphrase").toBeNull();
      expect(vm.output).toMatch(/initos: unlock: wrong recovery passphrase \(attempt 1 of 3\)/);
      expect(vm.output).toMatch(/Recovery passphrase \(attempt 2 of 3\): $/);
      const again = vm.mark();
      vm.send(`${victimRecovery}\n`);
      const out = await settle(vm, BOOT_MS, again);
      const seen = seenIn(out);
      expect(seen).toMatchObject({ backing: "vdb3", open: "initos-pool0", btrfs: victimFsid });
      expect(out).toMatch(/initos: unlock: unlocked with the recovery passphrase/);
    }, 400_000);
  });

  describe("(g) a pool of two LUKS2 volumes, one btrfs across them, one secret for both (and a cipher_null volume of hers first)", () => {
    const POOL_RECOVERY = "the-two-volume-pool-recovery";
    let disks: string[];
    let fsid = "";

    it("built on the host: the same PBKDF2 key in both, the recovery passphrase in both, the token (sealed to the victim TPM's production policy) on the boot disk's volume only", async () => {
      const key = attackerKey();
      const work = `${dir}/g-seal`;
      mkdirSync(work);
      const blob = await sealOnVictimTpm(tpmCopy("g-seal"), String(victimToken["tpm2-policy-hash"]), key.secret, work);
      const pool = buildTwoVolumePool({
        out: [`${dir}/g-vol0.img`, `${dir}/g-vol1.img`],
        key: key.passphrase,
        recovery: POOL_RECOVERY,
        rootfs,
        token: { ...victimToken, "tpm2-blob": blob.toString("base64"), keyslots: ["0"] },
      });
      fsid = pool.fsid;
      // The first volume where the installer puts the pool (partition 3 of the boot disk: a
      // copy of the victim's, its ESPs and production UKI); the second on a disk of its own
      // that sorts first.
      const bootDisk = `${dir}/g-boot.img`;
      execFileSync("cp", ["--sparse=always", victim, bootDisk]);
      putVolume(bootDisk, 3, pool.volumes[0]);
      // A cipher_null volume of hers (scenario c's) sorts before both: while the pool still
      // lacks its second device, other disks' volumes are looked at, and hers must be refused
      // before the pool's key is tried on it.
      const nullPool = buildPoolImage({ out: `${dir}/g-null.img`, passphrase: "her-null", rootfs, subvolumes: ["@root"], hostConfig: { root: "@root" }, token: victimToken });
      nullCipherKeyslot(nullPool, "her-null");
      disks = [gptDisk(`${dir}/g-hers-null.img`, [nullPool]), gptDisk(`${dir}/g-second.img`, [pool.volumes[1]]), bootDisk];
      for (const v of pool.volumes) for (const p of [key.passphrase, POOL_RECOVERY]) expect(volumeOpens(v, p)).toBe(true);
    }, 120_000);

    const expectBothVolumes = (out: string) => {
      const seen = seenIn(out);
      expect(seen, "no root ran").not.toBeNull();
      expect(seen!.btrfs).toBe(fsid);
      expect(seen!.open.split(",").sort()).toEqual(["initos-pool0", "initos-pool1"]);
      expect(seen!.backing).toBe("vdc3");
      expect(out).toMatch(new RegExp(`initos: pool: btrfs ${fsid} on 2 device\\(s\\): /dev/mapper/initos-pool0 /dev/mapper/initos-pool1`));
      expect(out).toMatch(new RegExp(`initos: unlock: /dev/vdb1 joins the pool \\(btrfs ${fsid}, device 2 of 2\\)`));
      expectIgnored(out, "/dev/vda1", /cipher_null in keyslot 0: a null cipher opens with any key$/);
      expect(linesMatching(out, /initos: unlock: ignored /)).toHaveLength(1);
    };

    it("unlocks unattended: the token on the boot disk's volume, its key opens the other volume too; her cipher_null volume is refused", async () => {
      const vm = await boot("g-unattended", disks, 2);
      const out = await settle(vm);
      expect(out).toMatch(/initos: unlock: \/dev\/vdc3 token 0 \(PCR 7,15 \+ signed 11, keyslot 0\): unsealed under the SRK 0x81000001/);
      expect(out).toMatch(/initos: unlock: unlocked with the TPM/);
      expectBothVolumes(out);
    }, 300_000);

    it("no TPM: the recovery passphrase unlocks both; her cipher_null volume is refused", async () => {
      const vm = await boot("g-passphrase", disks, 2, false);
      await vm.waitFor(PROMPT, BOOT_MS, true);
      const typed = vm.mark();
      vm.send(`${POOL_RECOVERY}\n`);
      const out = await settle(vm, BOOT_MS, typed);
      expect(out).toMatch(/initos: unlock: unlocked with the recovery passphrase/);
      expectBothVolumes(out);
    }, 400_000);
  });

  it("(f) FSID collision: her plain btrfs carrying the victim pool's fsid (and a newer generation): the victim's root runs on its one device", async () => {
    const plain = buildPoolImage({ out: `${dir}/f-plain.img`, passphrase: "", rootfs, subvolumes: ["@root"], hostConfig: { root: "@root" }, fsid: victimFsid, encrypt: false });
    // A generation above the victim pool's: the one the kernel would prefer of two devices
    // claiming the same fsid and devid.
    execFileSync("unshare", ["-m", "sh", "-ec", `m=$(mktemp -d); mount -o loop ${plain} $m; for i in $(seq 300); do echo $i > $m/gen; btrfs -q filesystem sync $m; done; umount $m; rmdir $m`]);
    const disk = gptDisk(`${dir}/f-hers.img`, [plain]);
    const vm = await boot("f-fsid", [disk, victim], 1);
    const out = await settle(vm);
    expectVictimRoot(out, "vdb3");
    expect(out).toMatch(new RegExp(`initos: pool: btrfs ${victimFsid} on 1 device\\(s\\): /dev/mapper/initos-pool0`));
  }, 300_000);
});
