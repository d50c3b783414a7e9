// The update's decisions with fakes: the trial state machine (trial.ts), and the apply flow
// (apply.ts) on FakeSys: what is written where, what a refusal leaves behind, the firmware's
// variables afterwards. The real bundle, signature and firmware are the integration test's.
import { createHash } from "node:crypto";
import { describe, expect, it } from "vitest";
import type { AgentConfig } from "../../agent/config.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import type { EspResult, EspSlot } from "../../agent/stages/esp.ts";
import { applyUpdate, STAGING_DIR, type UpdateFirmware } from "../../agent/update/apply.ts";
import { MANIFEST_NAME, parseManifest, UKI_PATH } from "../../agent/update/manifest.ts";
import { initrdAdmin, type BootState } from "../../agent/boot.ts";
import { Timeline } from "../../agent/log.ts";
import { RemoteAdmin } from "../../agent/stages/remote.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { TrialRun } from "../../agent/update/session.ts";
import { commitWaitsFor, EMPTY_STATE, mayApply, onBoot, orderWith, parseUpdateState, serializeUpdateState, type UpdateState } from "../../agent/update/trial.ts";
import { tarBytes } from "../oci-fixture.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const trial = { slot: "b", entry: 2, version: 7, from: { slot: "a", version: 6 }, started: false };

describe("the bundle's manifest", () => {
  const ok = { format: 1, version: 7, files: [{ path: UKI_PATH, size: 3, sha256: "a".repeat(64) }] };
  const bad: [string, string, RegExp][] = [
    ["not JSON", "{", /^bundle: manifest.json is not JSON$/],
    ["another format", JSON.stringify({ ...ok, format: 2 }), /^bundle: manifest.json: format: /],
    ["version 0", JSON.stringify({ ...ok, version: 0 }), /^bundle: manifest.json: version: /],
    ["no UKI", JSON.stringify({ ...ok, files: [{ path: "initos/modules.sqfs", size: 1, sha256: "a".repeat(64) }] }), /no EFI\/BOOT\/BOOTX64.EFI/],
    ["a path twice", JSON.stringify({ ...ok, files: [...ok.files, ...ok.files] }), /listed twice/],
    ["a path outside the slot's files", JSON.stringify({ ...ok, files: [...ok.files, { path: "initos/../EFI/x.efi", size: 1, sha256: "a".repeat(64) }] }), /files\.1\.path: expected/],
    ["an absolute path", JSON.stringify({ ...ok, files: [{ ...ok.files[0], path: `/${UKI_PATH}` }] }), /files\.0\.path: /],
    ["a bad hash", JSON.stringify({ ...ok, files: [{ ...ok.files[0], sha256: "xyz" }] }), /sha256/],
    ["a size of 0", JSON.stringify({ ...ok, files: [{ ...ok.files[0], size: 0 }] }), /files\.0\.size: /],
    ["an unknown key", JSON.stringify({ ...ok, signedBy: "me" }), /signedBy/],
  ];
  for (const [what, text, line] of bad) it(`refuses ${what} in one line`, () => expect(parseManifest(text)).toMatch(line));
  it("accepts a well-formed one", () => expect(parseManifest(JSON.stringify(ok))).toEqual(ok));
});

describe("who may update", () => {
  const caps = (sidecarMode: boolean, booted: boolean) => {
    const sys = new FakeSys();
    const log = silentLog();
    const ctx = { sys, log, timeline: new Timeline("/nonexistent/boot.json") };
    const state: BootState = {
      remote: new RemoteAdmin(sys, log),
      inputs: { cmdline: parseCmdline("").cmdline, config: DEFAULT_CONFIG, early: { secureBoot: "on", efivars: Promise.resolve(true) } },
      ...(booted ? { esp: ESP, update: { firmware: new FakeFirmware() } } : {}),
    };
    return initrdAdmin(ctx, state, sidecarMode ? () => {} : undefined);
  };
  it("sidecar mode, booted through UEFI from the ESP: update; never commit in the initrd", () => {
    expect("run" in caps(true, true).update).toBe(true);
    expect(caps(true, true).commit).toEqual({ refused: expect.stringMatching(/commits beside the OS/) });
  });
  it("the recovery sidecar and a machine without its slots: refused", () => {
    expect(caps(false, true).update).toEqual({ refused: expect.stringMatching(/only in sidecar mode/) });
    expect(caps(true, false).update).toEqual({ refused: expect.stringMatching(/only in sidecar mode/) });
  });
});

describe("the trial state machine", () => {
  it("a boot with no trial recorded is normal", () => {
    expect(onBoot(EMPTY_STATE, { bootedSlot: "a", version: 6, bootNext: null }).kind).toBe("normal");
  });
  it("the trial slot booting the trial's version is the trial, and marks it started", () => {
    const v = onBoot({ failed: [], trial }, { bootedSlot: "b", version: 7, bootNext: null });
    expect(v.kind).toBe("trial");
    expect(v.changed).toBe(true);
    expect(v.state.trial?.started).toBe(true);
  });
  it("the old slot with BootNext still set is a trial not begun: nothing changes", () => {
    const v = onBoot({ failed: [], trial }, { bootedSlot: "a", version: 6, bootNext: 2 });
    expect(v.kind).toBe("pending");
    expect(v.changed).toBe(false);
  });
  it("the old slot after BootNext was used is the fallback: the version is failed", () => {
    const v = onBoot({ failed: [], trial }, { bootedSlot: "a", version: 6, bootNext: null });
    expect(v.kind).toBe("failed");
    expect(v.state.trial).toBeUndefined();
    expect(v.state.failed).toEqual([7]);
    expect(v.state.last).toMatchObject({ version: 7, outcome: "failed" });
    if (v.kind === "failed") expect(v.note).toMatch(/never ran/); // the agent of the trial never marked it
  });
  it("a started trial that rebooted into the old slot failed, whatever BootNext says", () => {
    const v = onBoot({ failed: [], trial: { ...trial, started: true } }, { bootedSlot: "a", version: 6, bootNext: 2 });
    expect(v.kind).toBe("failed");
  });
  it("the trial slot running another version drops the trial", () => {
    const v = onBoot({ failed: [], trial }, { bootedSlot: "b", version: 9, bootNext: null });
    expect(v.kind).toBe("normal");
    expect(v.state.trial).toBeUndefined();
  });
  it("refuses older and failed versions unless forced", () => {
    expect(mayApply(EMPTY_STATE, 6, 6, false)).toMatchObject({ ok: false, refused: expect.stringMatching(/not newer/) });
    expect(mayApply(EMPTY_STATE, 6, 5, true)).toMatchObject({ ok: true, warning: expect.stringMatching(/--force/) });
    expect(mayApply({ failed: [7] }, 6, 7, false)).toMatchObject({ ok: false, refused: expect.stringMatching(/failed its trial/) });
    expect(mayApply({ failed: [7] }, 6, 8, false)).toEqual({ ok: true });
  });
  it("the stored record: round trip, and garbage counts as none", () => {
    const s: UpdateState = { failed: [3], trial, last: { version: 7, slot: "b", outcome: "written", detail: "" } };
    expect(parseUpdateState(serializeUpdateState(s)).state).toEqual(s);
    expect(parseUpdateState(Buffer.from("{")).error).toMatch(/not JSON/);
    expect(parseUpdateState(Buffer.from('{"trial":{"slot":"../x"}}')).error).toMatch(/malformed/);
    expect(parseUpdateState(null).state).toEqual(EMPTY_STATE);
  });
  it("BootOrder: the chosen slots first, the firmware's entries kept after them", () => {
    expect(orderWith([0, 1, 2, 3], 2, 1)).toEqual([2, 1, 0, 3]);
    expect(orderWith([], 5, 4)).toEqual([5, 4]);
  });
  it("the commit waits for the root, the health time, then (manual) the control plane", () => {
    const c = { healthSeconds: 60, policy: "manual" as const, commitAsked: false };
    expect(commitWaitsFor({ ...c, upSeconds: null })).toBe("the root");
    expect(commitWaitsFor({ ...c, upSeconds: 10 })).toMatch(/stay up 60 s/);
    expect(commitWaitsFor({ ...c, upSeconds: 61 })).toMatch(/commit/);
    expect(commitWaitsFor({ ...c, upSeconds: 61, commitAsked: true })).toBeNull();
    expect(commitWaitsFor({ ...c, policy: "auto", upSeconds: 61 })).toBeNull();
  });
});

/** The firmware's variables as a fake keeps them. */
class FakeFirmware implements UpdateFirmware {
  entries = new Map<string, number>([["a", 1]]);
  order = [0, 1];
  next: number | null = null;
  state: UpdateState = EMPTY_STATE;
  entryFor(slot: EspSlot): number {
    if (!this.entries.has(slot.name)) this.entries.set(slot.name, this.entries.size + 1);
    return this.entries.get(slot.name)!;
  }
  bootOrder = () => this.order;
  setBootOrder = (o: readonly number[]) => void (this.order = [...o]);
  setBootNext = (n: number) => void (this.next = n);
  bootNext = () => this.next;
  loadState = () => this.state;
  saveState = (s: UpdateState) => void (this.state = s);
}

const ESP: EspResult = {
  disk: "/dev/vda",
  slots: [
    { name: "a", partLabel: "initos-a", device: "/dev/vda1", mountPoint: "/run/initos/esp-a", booted: true },
    { name: "b", partLabel: "initos-b", device: "/dev/vda2", mountPoint: "/run/initos/esp-b", booted: false },
  ],
};
const MNT = "/run/initos/update-b";
const sha = (d: Buffer) => createHash("sha256").update(d).digest("hex");

function bundle(version: number, files: Record<string, Buffer>, tweak: (m: { path: string; size: number; sha256: string }[]) => void = () => {}): Buffer {
  const list = Object.entries(files).map(([path, d]) => ({ path, size: d.length, sha256: sha(d) }));
  tweak(list);
  const manifest = Buffer.from(JSON.stringify({ format: 1, version, files: list }));
  return tarBytes([{ name: MANIFEST_NAME, flag: "0", data: manifest }, ...Object.entries(files).map(([name, data]) => ({ name, flag: "0" as const, data }))]);
}
const PARTS = { "initos/modules.sqfs": Buffer.from("modules v7"), "initos/modules.verity": Buffer.from("hash v7"), [UKI_PATH]: Buffer.from("uki v7") };
const chunks = (b: Buffer, n = 100) => (async function* () {
  for (let i = 0; i < b.length; i += n) yield b.subarray(i, i + n);
})();

function setup(checks: (force: boolean) => Promise<AgentConfig> = async () => ({ ...DEFAULT_CONFIG, version: 7 })) {
  const sys = new FakeSys();
  sys.add(`${MNT}/${UKI_PATH}`, { kind: "file", data: "uki v5" }); // what slot b holds now
  const fw = new FakeFirmware();
  const log = { lines: [] as string[], info(l: string) { this.lines.push(l); }, warn(l: string) { this.lines.push(l); }, err(l: string) { this.lines.push(l); }, debug() {} };
  const deps = { sys, log, config: { ...DEFAULT_CONFIG, version: 6 }, esp: () => ESP, check: (_: unknown, force: boolean) => checks(force), firmware: fw };
  return { sys, fw, log, deps };
}

describe("update: a bundle into the inactive slot", () => {
  it("writes slot b, images before the UKI, then BootOrder, the trial and BootNext", async () => {
    const { sys, fw, deps } = setup();
    const text = await applyUpdate(deps, chunks(bundle(7, PARTS)), { force: false, reboot: false });
    expect(text).toMatch(/version 7 written to slot b; BootNext is Boot0002/);
    expect(sys.readFile(`${MNT}/${UKI_PATH}`)).toBe("uki v7");
    expect(sys.readFile(`${MNT}/initos/modules.sqfs`)).toBe("modules v7");
    const renames = sys.calls.filter((c) => c.startsWith("rename"));
    expect(renames.at(-1)).toContain(UKI_PATH);
    expect(renames).toHaveLength(3);
    expect(sys.calls.find((c) => c.startsWith("mount /dev/vda2"))).toMatch(new RegExp(`^mount /dev/vda2 ${MNT} vfat 0xe umask=0077$`)); // read-write (no MS_RDONLY), nosuid, nodev, noexec
    expect(sys.calls.find((c) => c.startsWith("mount /dev/vda1"))).toBeUndefined(); // the running slot is never mounted for writing
    expect(fw.order).toEqual([1, 2, 0]); // the running slot first: any reset before the commit comes back
    expect(fw.next).toBe(2);
    expect(fw.state.trial).toMatchObject({ slot: "b", entry: 2, version: 7, from: { slot: "a", version: 6 }, started: false });
    expect([...sys.files.keys()].some((k) => k.includes(STAGING_DIR))).toBe(false);
  });

  const refusals: [string, () => Buffer, RegExp][] = [
    ["an older version", () => bundle(6, PARTS), /not newer than the running version 6/],
    ["a file longer than listed", () => bundle(7, PARTS, (l) => void (l[0]!.size -= 1)), /longer than/],
    ["a file whose hash differs", () => bundle(7, PARTS, (l) => void (l[1]!.sha256 = "0".repeat(64))), /does not match its sha256/],
    ["a truncated bundle", () => bundle(7, PARTS).subarray(0, 1200), /bundle|truncated|ends before/],
    ["a bundle without its manifest first", () => tarBytes([{ name: UKI_PATH, flag: "0", data: Buffer.from("x") }]), /first entry must be manifest.json/],
    ["a manifest naming a path outside the slot's files", () => bundle(7, { ...PARTS, "initos/../x.sqfs": Buffer.from("x") }), /manifest.json: files/],
    ["an extra file after the listed ones", () => Buffer.concat([bundle(7, PARTS).subarray(0, -1024), tarBytes([{ name: "initos/evil.sqfs", flag: "0", data: Buffer.from("x") }])]), /not in its manifest/],
  ];
  for (const [what, make, line] of refusals) {
    it(`refuses ${what}, and slot b and the firmware stay as they were`, async () => {
      const { sys, fw, deps } = setup();
      await expect(applyUpdate(deps, chunks(make()), { force: false, reboot: false })).rejects.toThrow(line);
      expect(sys.readFile(`${MNT}/${UKI_PATH}`)).toBe("uki v5");
      expect([...sys.files.keys()].filter((k) => k.startsWith(`${MNT}/`) && k !== `${MNT}/${UKI_PATH}`)).toEqual([]);
      expect(fw.next).toBeNull();
      expect(fw.order).toEqual([0, 1]);
      expect(fw.state).toEqual(EMPTY_STATE);
      expect(sys.calls.some((c) => c.startsWith(`umount ${MNT}`))).toBe(true);
    });
  }

  it("refuses what the checks refuse (signature, root hashes), after staging, leaving nothing", async () => {
    const { sys, fw, deps } = setup(async () => {
      throw new Error("update: the UKI is not signed by a signer this machine trusts");
    });
    await expect(applyUpdate(deps, chunks(bundle(7, PARTS)), { force: false, reboot: false })).rejects.toThrow(/not signed/);
    expect(sys.readFile(`${MNT}/${UKI_PATH}`)).toBe("uki v5");
    expect(sys.calls.filter((c) => c.startsWith("rename"))).toEqual([]);
    expect(fw.next).toBeNull();
  });

  it("a full ESP is one line, and the staged part is removed", async () => {
    const { sys, deps } = setup();
    sys.spaceLeft = 12;
    await expect(applyUpdate(deps, chunks(bundle(7, PARTS)), { force: false, reboot: false })).rejects.toThrow(/ESP is full writing initos\/modules.verity/);
    expect([...sys.files.keys()].some((k) => k.includes(STAGING_DIR))).toBe(false);
  });

  it("stale staging files from a cut update are removed first, then it succeeds", async () => {
    const { sys, deps } = setup();
    sys.add(`${MNT}/${STAGING_DIR}`, { kind: "dir" }).add(`${MNT}/${STAGING_DIR}/BOOTX64.EFI`, { kind: "file", data: "half" });
    await applyUpdate(deps, chunks(bundle(7, PARTS)), { force: false, reboot: false });
    expect(sys.calls).toContain(`unlink ${MNT}/${STAGING_DIR}/BOOTX64.EFI`);
    expect(sys.readFile(`${MNT}/${UKI_PATH}`)).toBe("uki v7");
  });

  it("refuses while a trial runs, and a slot this boot's images came from", async () => {
    const a = setup();
    a.fw.state = { failed: [], trial: { ...trial, started: true } };
    await expect(applyUpdate(a.deps, chunks(bundle(8, PARTS)), { force: false, reboot: false })).rejects.toThrow(/trial of version 7 in slot b is running/);
    const b = setup();
    b.sys.mounts.push("/run/initos/esp-b");
    await expect(applyUpdate(b.deps, chunks(bundle(7, PARTS)), { force: false, reboot: false })).rejects.toThrow(/holds images this boot runs from/);
    expect(b.sys.calls.find((c) => c.startsWith("mount"))).toBeUndefined();
  });

  it("refuses without a known booted slot", async () => {
    const { deps } = setup();
    deps.esp = () => ({ disk: "/dev/vda", slots: ESP.slots.map((s) => ({ ...s, booted: false })) });
    await expect(applyUpdate(deps, chunks(bundle(7, PARTS)), { force: false, reboot: false })).rejects.toThrow(/cannot tell which slot/);
  });
});

describe("the running trial", () => {
  function run(policy: Partial<AgentConfig["update"]> = {}) {
    const sys = new FakeSys();
    sys.add("/proc/uptime", { kind: "file", data: "40.0 10.0\n" });
    const pets: string[] = [];
    const wd = { path: "/dev/watchdog0", identity: "Software Watchdog", options: 0x180, timeout: 30, timeLeft: () => null, pet: () => void pets.push("pet"), disarm: () => void pets.push("disarm"), release: () => void pets.push("release") };
    const log = { lines: [] as string[], info(l: string) { this.lines.push(l); }, warn(l: string) { this.lines.push(l); }, err(l: string) { this.lines.push(l); }, debug() {} };
    const fw = new FakeFirmware();
    fw.entries.set("b", 2);
    fw.order = [1, 2, 0];
    fw.state = { failed: [7], trial: { ...trial, started: true } };
    const t = new TrialRun(sys, log, { ...trial, started: true }, { ...DEFAULT_CONFIG.update, healthSeconds: 60, trialSeconds: 300, ...policy }, wd);
    return { sys, pets, log, fw, t };
  }
  it("pets every third of the timeout, and stops at the deadline so the watchdog fires", async () => {
    const { sys, pets, log, t } = run();
    t.startPetting();
    expect(pets).toEqual(["pet"]);
    await sys.advance(10_000);
    expect(pets).toEqual(["pet", "pet"]);
    await sys.advance(250_000); // power-on at 40 s: the deadline (300 s) is 260 s after the start
    const n = pets.length;
    expect(n).toBe(26); // at 0 s, then every 10 s until the deadline (260 s) comes first
    await sys.advance(60_000);
    expect(pets).toHaveLength(n);
    expect(log.lines.join("\n")).toMatch(/did not commit within 300 s.*resets into slot a/);
  });
  it("commits after the health time (auto): BootOrder, the record, the watchdog disarmed", async () => {
    const { sys, pets, fw, t } = run();
    t.rootReached();
    expect(t.tryCommit(fw)).toBe(false);
    await sys.advance(61_000);
    expect(t.tryCommit(fw)).toBe(true);
    expect(fw.order).toEqual([2, 1, 0]);
    expect(fw.state.trial).toBeUndefined();
    expect(fw.state.failed).toEqual([]);
    expect(fw.state.last).toMatchObject({ version: 7, outcome: "committed" });
    expect(pets.at(-1)).toBe("disarm");
  });
  it("manual: an early commit is noted and happens once the OS stayed up", async () => {
    const { sys, fw, t } = run({ commit: "manual" });
    t.rootReached();
    expect(t.tryCommit(fw)).toBe(false);
    expect(t.ask(fw).text).toMatch(/noted; version 7 still waits for the OS to stay up 60 s/);
    await sys.advance(61_000);
    expect(t.tryCommit(fw)).toBe(true);
  });
  it("manual: no commit without the control plane", async () => {
    const { sys, fw, t } = run({ commit: "manual" });
    t.rootReached();
    await sys.advance(120_000);
    expect(t.tryCommit(fw)).toBe(false);
    expect(t.ask(fw).text).toMatch(/committed/);
  });
});
