// `update`: a bundle from the control plane into the inactive A/B slot, then its trial.
//
//   1. refuse at once what cannot go on: a trial already running, no second slot, a slot this
//      boot's images came from, a version that is not newer (or failed its trial before)
//   2. stream the bundle's files into a staging directory on the inactive ESP, each checked
//      against the manifest's size and sha256 as it is written (a bundle is ~95 MB: it is never
//      held in memory, and the UKI's signature can only be checked on the whole file)
//   3. check them (verify.ts): the UKI's Authenticode signature by a signer in the running
//      config, the images against the root hashes in the NEW UKI's signed config
//   4. only then rename them into place, images first and the UKI last, each directory fsynced:
//      until the last rename the slot's UKI is the old one, and the slot is not booted anyway
//   5. the firmware: a boot entry per slot, BootOrder starting with the running slot (what any
//      reset returns to), the trial recorded, then BootNext set to the new slot
//
// The running slot is never touched. A refusal removes the staging directory and leaves the
// slot's files as they were, byte for byte. A power cut at any point leaves the old slot
// bootable and first in BootOrder; the next update starts by removing the stale staging files.
// Between recording the trial and setting BootNext (milliseconds) a power cut would count the
// version as failed: --force applies it again.
import type { CtlResponse, UpdateOptions } from "../admin.ts";
import type { AgentConfig } from "../config.ts";
import { BootError, describe } from "../errors.ts";
import type { Logger } from "../log.ts";
import { MS } from "../sys/consts.ts";
import type { Crypt, Files, Mounts, Processes } from "../sys/index.ts";
import type { EspResult, EspSlot } from "../stages/esp.ts";
import { readTarStream, type TarStreamEntry } from "../oci/tar.ts";
import { MANIFEST_MAX, MANIFEST_NAME, type Manifest, type ManifestFile, parseManifest, UKI_PATH } from "./manifest.ts";
import { mayApply, orderWith, recordWritten, type UpdateState } from "./trial.ts";
import { checkUpdate } from "./verify.ts";
import { createHash } from "node:crypto";

/** Where the staged files wait on the inactive ESP (removed by a refusal, or the next update). */
export const STAGING_DIR = "initos/.update";

/** The staged files of a bundle, by their ESP path. */
export interface Staged {
  manifest: Manifest;
  /** ESP path (manifest path) → the staged file's path. */
  files: ReadonlyMap<string, string>;
}

/** The firmware's side of an update: boot entries, BootOrder, BootNext, the update record. */
export interface UpdateFirmware {
  /** The Boot#### entry that boots `slot`'s UKI (created when missing). */
  entryFor(slot: EspSlot): number;
  bootOrder(): number[];
  setBootOrder(order: readonly number[]): void;
  setBootNext(entry: number): void;
  loadState(): UpdateState;
  saveState(s: UpdateState): void;
}

export interface UpdateDeps {
  sys: Files & Mounts;
  log: Logger;
  /** The running (signed) config. */
  config: AgentConfig;
  /** The boot disk's slots as the esp stage found them (the booted one marked). */
  esp: () => EspResult | Promise<EspResult>;
  /** Step 3: throws naming what failed; the new UKI's config otherwise. */
  check: (staged: Staged, force: boolean) => Promise<AgentConfig>;
  firmware: UpdateFirmware;
}

const refuse = (line: string): never => {
  throw new BootError(line);
};

/** Where the signers' certificates wait while sbverify reads them (tmpfs, root only). */
const CHECK_DIR = "/run/initos/update";

/** The dependencies on a real machine: the checks of verify.ts, the firmware given. */
export function realUpdateDeps(sys: Files & Mounts & Processes & Crypt, log: Logger, config: AgentConfig, esp: UpdateDeps["esp"], firmware: UpdateFirmware): UpdateDeps {
  const check: UpdateDeps["check"] = async (staged, force) => {
    sys.mkdirp(CHECK_DIR, 0o700);
    return (await checkUpdate(sys, log, { manifest: staged.manifest, files: staged.files, running: config, force, tmpDir: CHECK_DIR })).config;
  };
  return { sys, log, config, esp, check, firmware };
}

/**
 * The `update` command of a process (PID 1 in sidecar mode, the agent beside the OS): one at
 * a time, every refusal logged as the one line it answers, `--reboot` once the slot is written.
 */
export function updateCommand(log: Logger, deps: () => UpdateDeps, reboot: () => string): (opts: UpdateOptions, bundle: AsyncIterable<Buffer>) => Promise<CtlResponse> {
  let busy = false;
  return async (opts, bundle) => {
    if (busy) return { ok: false, text: "update: another update is being written" };
    busy = true;
    try {
      const text = await applyUpdate(deps(), bundle, opts);
      return { ok: true, text: opts.reboot ? `${text}\n${reboot()}` : text };
    } catch (e) {
      const text = describe(e);
      log.err(text.startsWith("update: ") ? text : `update: ${text}`);
      return { ok: false, text };
    } finally {
      busy = false;
    }
  };
}

/** The booted slot and the one an update writes; refused when there is no such pair. */
export function updateSlots(esp: EspResult): { booted: EspSlot; target: EspSlot } {
  const booted = esp.slots.find((s) => s.booted);
  if (!booted) refuse("update: cannot tell which slot this boot came from (no LoaderDevicePartUUID): not writing either");
  const target = esp.slots.find((s) => !s.booted);
  if (!target) refuse(`update: no second slot beside slot ${booted!.name} on the boot disk`);
  return { booted: booted!, target: target! };
}

/** Runs the whole update; the answer's text. */
export async function applyUpdate(d: UpdateDeps, bundle: AsyncIterable<Buffer>, opts: UpdateOptions): Promise<string> {
  const { sys, log, firmware } = d;
  const state = firmware.loadState();
  if (state.trial?.started) refuse(`update: the trial of version ${state.trial.version} in slot ${state.trial.slot} is running; it must commit or fall back first`);
  const { booted, target } = updateSlots(await d.esp());
  const mnt = mountTarget(sys, target);
  let manifest: Manifest;
  try {
    manifest = await stageAndCheck(d, mnt, bundle, state, opts.force);
  } finally {
    unmountTarget(sys, log, mnt);
  }
  const entry = firmware.entryFor(target);
  const current = firmware.entryFor(booted);
  // Any reset before the commit must come back here: the running slot first, the new one next.
  firmware.setBootOrder(orderWith(firmware.bootOrder(), current, entry));
  firmware.saveState(recordWritten(state, { slot: target.name, entry, version: manifest.version, from: { slot: booted.name, version: d.config.version } }));
  firmware.setBootNext(entry);
  const hex = entry.toString(16).toUpperCase().padStart(4, "0");
  const line = `update: version ${manifest.version} written to slot ${target.name}; BootNext is Boot${hex}: the next boot is its trial, slot ${booted.name} stays the default until it commits`;
  log.info(line);
  return line;
}

/** Mounts the inactive slot read-write for the update; refused when this boot uses it. */
function mountTarget(sys: Files & Mounts, slot: EspSlot): string {
  const mounted = sys.mountPoints();
  // The esp stage mounts the other slot only when an image of the booted slot failed
  // verification and its copy there was used: writing it would pull files from under this boot.
  if (mounted.includes(slot.mountPoint)) refuse(`update: slot ${slot.name} holds images this boot runs from (the booted slot's copy failed verification); not writing it`);
  const mnt = `/run/initos/update-${slot.name}`;
  if (mounted.includes(mnt)) refuse(`update: another update is writing slot ${slot.name}`);
  sys.mkdirp(mnt, 0o700);
  try {
    sys.mount(slot.device, mnt, "vfat", MS.NOSUID | MS.NODEV | MS.NOEXEC, "umask=0077");
  } catch (e) {
    refuse(`update: cannot mount slot ${slot.name} (${slot.device}) read-write: ${describe(e)}`);
  }
  return mnt;
}

function unmountTarget(sys: Files & Mounts, log: Logger, mnt: string): void {
  try {
    sys.umount(mnt, 0); // not lazily: an unmount that fails must be seen (it also flushes FAT)
  } catch (e) {
    log.err(`update: unmounting ${mnt}: ${describe(e)}`);
  }
}

/** Steps 2-4 on the mounted slot; the staging directory is gone afterwards either way. */
async function stageAndCheck(d: UpdateDeps, mnt: string, bundle: AsyncIterable<Buffer>, state: UpdateState, force: boolean): Promise<Manifest> {
  const { sys, log } = d;
  const stagingDir = `${mnt}/${STAGING_DIR}`;
  removeStaging(sys, stagingDir, log);
  sys.mkdirp(stagingDir, 0o700);
  try {
    const entries = readTarStream(bundle, "bundle")[Symbol.asyncIterator]();
    const next = async (): Promise<TarStreamEntry | null> => {
      try {
        const r = await entries.next();
        return r.done ? null : r.value;
      } catch (e) {
        return refuse(`update: ${describe(e)}`);
      }
    };
    const manifest = await readManifest(await next());
    const gate = mayApply(state, d.config.version, manifest.version, force);
    if (!gate.ok) return refuse(gate.refused);
    if (gate.warning) log.warn(gate.warning);
    log.info(`update: bundle of version ${manifest.version}${manifest.host ? ` for ${manifest.host}` : ""}: ${manifest.files.length} files, ${(manifest.files.reduce((n, f) => n + f.size, 0) / 1e6).toFixed(1)} MB`);

    const files = new Map<string, string>();
    for (const f of manifest.files) {
      const e = await next();
      if (!e) refuse(`update: bundle: ends before ${f.path}`);
      if (e!.path !== f.path || e!.type !== "file") refuse(`update: bundle: expected ${f.path} next, found ${JSON.stringify(e!.path)}`);
      const staged = `${stagingDir}/${f.path.slice(f.path.lastIndexOf("/") + 1)}`;
      await writeChecked(sys, staged, e!.data, f);
      files.set(f.path, staged);
    }
    const extra = await next();
    if (extra) refuse(`update: bundle: ${JSON.stringify(extra.path)} is not in its manifest`);

    await d.check({ manifest, files }, force); // logs what it checked
    // Images first, the UKI last: the slot's UKI changes only when everything it needs is there.
    const order = [...manifest.files].sort((a, b) => Number(a.path === UKI_PATH) - Number(b.path === UKI_PATH));
    for (const f of order) {
      const final = `${mnt}/${f.path}`;
      const dir = final.slice(0, final.lastIndexOf("/"));
      sys.mkdirp(dir, 0o700);
      sys.rename(files.get(f.path)!, final);
      sys.fsyncPath(dir);
    }
    return manifest;
  } finally {
    removeStaging(sys, stagingDir, log);
  }
}

async function readManifest(e: TarStreamEntry | null): Promise<Manifest> {
  if (!e || e.path !== MANIFEST_NAME || e.type !== "file") refuse(`update: bundle: the first entry must be ${MANIFEST_NAME}${e ? `, not ${JSON.stringify(e.path)}` : " (the bundle is empty)"}`);
  const parts: Buffer[] = [];
  let n = 0;
  for await (const c of e!.data) {
    n += c.length;
    if (n > MANIFEST_MAX) refuse(`update: bundle: ${MANIFEST_NAME} is larger than ${MANIFEST_MAX} bytes`);
    parts.push(c);
  }
  const m = parseManifest(Buffer.concat(parts).toString("utf8"));
  return typeof m === "string" ? refuse(`update: ${m}`) : m;
}

/** Writes one file as it streams in, refusing it as soon as it is longer than listed, and after if shorter or different. */
async function writeChecked(sys: Files, path: string, data: AsyncIterable<Buffer>, f: ManifestFile): Promise<void> {
  const hash = createHash("sha256");
  let n = 0;
  async function* counted(): AsyncGenerator<Buffer> {
    const it = data[Symbol.asyncIterator]();
    for (;;) {
      let r: IteratorResult<Buffer>;
      try {
        r = await it.next();
      } catch (e) {
        return refuse(`update: ${describe(e)}`); // the bundle's fault (cut short, malformed), not the disk's
      }
      if (r.done) return;
      n += r.value.length;
      if (n > f.size) refuse(`update: bundle: ${f.path} is longer than the ${f.size} bytes its manifest lists`);
      hash.update(r.value);
      yield r.value;
    }
  }
  try {
    await sys.writeStream(path, counted(), 0o600);
  } catch (e) {
    if (e instanceof BootError) throw e;
    if ((e as NodeJS.ErrnoException).code === "ENOSPC") refuse(`update: the inactive ESP is full writing ${f.path} (the bundle needs ${f.size} bytes for it)`);
    refuse(`update: writing ${f.path}: ${describe(e)}`);
  }
  if (n !== f.size) refuse(`update: bundle: ${f.path} is truncated (${n} of ${f.size} bytes)`);
  if (hash.digest("hex") !== f.sha256) refuse(`update: bundle: ${f.path} does not match its sha256 in the manifest`);
}

/** Removes our staging directory's files (flat: one per bundle part), then the directory. */
function removeStaging(sys: Files, dir: string, log: Logger): void {
  if (!sys.exists(dir)) return;
  for (const name of sys.readdir(dir)) {
    try {
      sys.unlink(`${dir}/${name}`);
    } catch (e) {
      log.warn(`update: removing ${dir}/${name}: ${describe(e)}`);
    }
  }
  try {
    sys.rmdir(dir);
  } catch (e) {
    log.warn(`update: removing ${dir}: ${describe(e)}`);
  }
}
