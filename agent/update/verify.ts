// The checks an update passes before any of its files is renamed into place on the inactive
// ESP slot (issue #15). The update command has streamed the bundle into temp files (checking
// each file's size and sha256 against the manifest on the way); this decides whether they may
// become the slot's boot chain. Every refusal is one line naming the part and why, and the
// slot is left as it was: nothing here writes outside `tmpDir`.
//
// Order: the cheap checks first, so a wrong bundle is refused in milliseconds, before the two
// slow ones read every byte:
//   1. the running config trusts some signer at all;             (no I/O)
//   2. every file the manifest lists was received;                (no I/O)
//   3. the new UKI's signed config (readUkiConfig, ~6 ms for a 62 MB UKI: no decompression
//      beyond the few-KB config segment), its version = the manifest's;
//   4. anti-rollback: its version is higher than the running one, unless --force (logged);
//      and it is built for this host (per-host builds share the fleet's signer: another
//      host's UKI verifies here too, and would give this machine that host's name and keys);
//   5. the manifest lists exactly the new config's images;
//   6. the UKI's Authenticode signature, with sbverify, against each trusted signer in turn
//      (~0.1 s per signer for a 62 MB UKI on the host: it hashes the file);
//   7. each image against the NEW config's root hash and pinned verity parameters
//      (verityVerify reads and hashes every block: see the measurements below).
// Steps 3-5 trust what a not-yet-verified UKI says, but only to refuse: an update is accepted
// only once all seven hold, and by then the config they read is the signed one.
//
// What this does not protect against: the files changing between these checks and the rename
// (they are the agent's own temp files, but the ESP is FAT anyone with the disk can rewrite).
// That is not a hole: the firmware verifies the UKI and dm-verity the images on every boot.
// These checks are about not installing a bundle that cannot boot or that a machine must not
// take (wrong signer, older version, images from another build), with a clear line now rather
// than a failed trial later.
//
// Measured (host, 2 cores, no KVM, page cache warm; test/system/update-check.test.ts):
//   - verityVerify of build/images/modules.sqfs (20.2 MB, 4932 blocks of 4 KiB, sha256): 47 ms;
//     tools.sqfs (11.9 MB): 22 ms. ~430 MB/s, libcryptsetup's userspace check on one thread.
//   - sbverify on target.efi (62.6 MB): 130 ms. readUkiConfig: 6 ms (uki.ts).
//   - checkUpdate on target.efi + modules + tools, all of it: 250 ms (under Node, with the zstd
//     tool spawned for the config segment).
//   Under QEMU TCG (estimate): the boot's images stage does the same full verity check before
//   it opens an image; build/bench/logs/bench-agent-1.log shows it at ≤ 0.97 s for modules and
//   0.40 s for a 12 MB image, 20-30 MB/s, 15-20x slower than the host. So in a TCG guest:
//   verity ~1.5 s for both images, sbverify ~2-3 s, the rest well under 0.5 s: ~4-5 s per update.
//   sbverify runs as a child without blocking the event loop; libcryptsetup's check is a
//   synchronous koffi call that does block it (~1.5 s under TCG). Sys.verityVerify is a
//   promise so that it can move to koffi's async calls without changing this file.
import type { AgentConfig } from "../config.ts";
import { describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import type { Crypt, Files, Processes } from "../sys/index.ts";
import { toolArgv } from "../sys/tools.ts";
import { type Manifest, UKI_PATH } from "./manifest.ts";
import { type FrameDecompressor, readUkiConfig, runtimeZstdFrame, UpdateRefused } from "./uki.ts";

export { UpdateRefused } from "./uki.ts";

export interface UpdateCheck {
  manifest: Manifest;
  /** Where each file the manifest lists was streamed to (a temp file), by its bundle path. */
  files: ReadonlyMap<string, string>;
  /** The running UKI's signed config: who may sign an update, which version runs. */
  running: AgentConfig;
  /** `update --force` (an admin's): install even when the version is not newer. Logged. */
  force: boolean;
  /** A directory only the agent writes, for the signers' certificates while sbverify reads them. */
  tmpDir: string;
  /** The argv that runs sbverify: the verified tools image's unless a test says otherwise. */
  sbverify?: readonly string[];
  unzstd?: FrameDecompressor;
}

export interface CheckedUpdate {
  version: number;
  /** The new UKI's signed config (parsed strictly). */
  config: AgentConfig;
  /** The new UKI's embedded kernel command line, for `status`. */
  cmdline: string | null;
  /** Which of the running config's update.signers verified the UKI (its index). */
  signer: number;
  /** The images checked, by name. */
  images: string[];
}

/** The image files a config needs on its slot, as bundle paths (<esp.dir>/<name>.sqfs|.verity). */
export function imagePaths(cfg: AgentConfig): string[] {
  return cfg.images.flatMap((i) => [`${cfg.esp.dir}/${i.name}.sqfs`, `${cfg.esp.dir}/${i.name}.verity`]);
}

/** Lists at most three names, then how many more. */
function some(names: readonly string[]): string {
  return names.length <= 3 ? names.join(", ") : `${names.slice(0, 3).join(", ")} and ${names.length - 3} more`;
}

/**
 * Decides whether an update's temp files may be installed: resolves with what was checked,
 * or rejects with an UpdateRefused whose message is the one line to show. Logs the --force
 * override as a warning.
 */
export async function checkUpdate(sys: Files & Processes & Crypt, log: Logger, u: UpdateCheck): Promise<CheckedUpdate> {
  const refuse = (why: string): never => {
    throw new UpdateRefused(`update: ${why}`);
  };
  const { manifest, running } = u;
  const signers = running.update.signers;
  if (signers.length === 0) refuse("this machine trusts no update signer (update.signers is empty in its signed config)");

  const listed = manifest.files.map((f) => f.path);
  const missing = listed.filter((p) => !u.files.has(p));
  if (missing.length) refuse(`${some(missing)}: listed in the manifest but not received`);
  const unlisted = [...u.files.keys()].filter((p) => !listed.includes(p));
  if (unlisted.length) refuse(`${some(unlisted)}: received but not listed in the manifest`);
  const uki = u.files.get(UKI_PATH)!; // the manifest schema requires it, and it was received

  const info = readUkiConfig(sys, uki, UKI_PATH, u.unzstd ?? runtimeZstdFrame);
  const { config } = info;
  if (config.version !== manifest.version) refuse(`the manifest says version ${manifest.version}, the UKI's signed config says ${config.version}`);
  if (config.version <= running.version) {
    if (!u.force) refuse(`version ${config.version} is not newer than the running version ${running.version} (an admin may install it with --force)`);
    log.warn(`update: --force: installing version ${config.version} over ${running.version}`);
  }

  const host = (c: AgentConfig) => c.hostname ?? "(none)";
  if (manifest.host !== undefined && manifest.host !== config.hostname) refuse(`the manifest says host ${manifest.host}, the UKI's signed config says ${host(config)}`);
  if (config.hostname !== running.hostname) {
    if (!u.force) refuse(`the UKI is built for host ${host(config)}, this machine is ${host(running)} (an admin may install it with --force)`);
    log.warn(`update: --force: installing host ${host(config)}'s build on ${host(running)}`);
  }

  const needed = imagePaths(config);
  const notListed = needed.filter((p) => !listed.includes(p));
  if (notListed.length) refuse(`the new config's images need ${some(notListed)}, which the manifest does not list`);
  const extra = listed.filter((p) => p !== UKI_PATH && !needed.includes(p));
  if (extra.length) refuse(`the manifest lists ${some(extra)}, which is no image of the new config`);

  const signer = await verifySigner(sys, log, uki, signers, u.tmpDir, u.sbverify ?? toolArgv("sbverify"));

  for (const img of config.images) {
    const data = `${config.esp.dir}/${img.name}.sqfs`;
    try {
      await sys.verityVerify(u.files.get(data)!, u.files.get(`${config.esp.dir}/${img.name}.verity`)!, img.rootHash, img.verity);
    } catch (e) {
      refuse(`${data}: does not match the root hash in the new UKI's config (${describe(e)})`);
    }
  }

  if (config.update.signers.length === 0) log.warn(`update: version ${config.version} trusts no update signer: it can never be updated over ssh`);
  log.info(`update: version ${config.version} checked: UKI signed by signer ${signer + 1} of ${signers.length}, images ${config.images.map((i) => i.name).join(", ") || "(none)"} match their root hashes`);
  return { version: config.version, config, cmdline: info.cmdline, signer, images: config.images.map((i) => i.name) };
}

/**
 * The index of the first signer whose certificate sbverify accepts the UKI with. Each PEM is
 * written to `tmpDir` for sbverify to read, and removed after. None: refused. sbverify says
 * "Signature verification failed" on stdout, which a failed tool's error does not carry (its
 * stderr's last line), and on stderr warns about every UKI ("data remaining ...: gaps between
 * PE/COFF sections?", the stub's own layout): so the refusal adds what sbverify said only when
 * it is more than that warning ("Image fails hash check" for an altered UKI, "No signature
 * table present", a tool that does not run). The UKI has passed readUkiConfig's section checks
 * before it gets here: sbverify 0.9.4 segfaults on a truncated PE (measured).
 */
async function verifySigner(sys: Files & Processes, log: Logger, uki: string, signers: readonly string[], tmpDir: string, sbverify: readonly string[]): Promise<number> {
  let why = "";
  for (const [i, pem] of signers.entries()) {
    const cert = `${tmpDir}/signer-${i}.pem`;
    sys.writeFile(cert, pem);
    const argv = [...sbverify, "--cert", cert, uki];
    try {
      await sys.runWithInput(argv, []);
      return i;
    } catch (e) {
      // runWithInput says "<argv>: <stderr's last line>": the argv (the tools image's loader
      // and paths) would bury the reason.
      const said = describe(e);
      const reason = said.startsWith(`${argv.join(" ")}: `) ? said.slice(argv.join(" ").length + 2) : said;
      log.debug(`update: signer ${i + 1}: ${reason}`);
      if (!reason.startsWith("warning:")) why = reason;
    } finally {
      try {
        sys.unlink(cert);
      } catch {
        // tmpDir is the agent's own: a leftover public certificate is harmless
      }
    }
  }
  throw new UpdateRefused(`update: the UKI is not signed by a signer this machine trusts${why ? ` (sbverify: ${why})` : ""}`);
}
