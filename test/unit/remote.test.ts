// Remote admin while the initrd needs a human (agent/stages/remote.ts), on the fake machine:
// when it starts at all, what it starts (the network once, the admin socket, dropbear from the
// tools image), who answers the admin commands, and how it stops before switch_root (the grace
// a client that just got its answer has, sshd with everything it started, bounded). Times are
// the fake clock's: nothing here sleeps.
import { describe, expect, it } from "vitest";
import type { AdminCaps } from "../../agent/admin.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { DEFAULT_CONFIG } from "../../agent/config.ts";
import { Coldplug } from "../../agent/stages/devices.ts";
import { RemoteAdmin, RemoteSecrets } from "../../agent/stages/remote.ts";
import type { StopBounds } from "../../agent/supervise.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

const CTL = "/run/initos/ctl.sock";
const DROPBEAR = "/run/initos/images/tools/usr/bin/dropbear";
const TERM = 15;
const KILL = 9;
const keyed = { ...DEFAULT_CONFIG, ssh: { ...DEFAULT_CONFIG.ssh, authorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 op@laptop"] } };
const withAddress = parseCmdline("initos.ip=10.0.0.2/24 initos.gw=10.0.0.1").cmdline;
const bounds: StopBounds = { termMs: 500, killMs: 500, pollMs: 50 };

/** Capabilities that say who answered `status`. */
function caps(who: string): AdminCaps {
  return {
    status: () => [["answered by", who]],
    log: () => [`${who} log`],
    power: (a) => `${a} by ${who}`,
    passphrase: { refused: `not here (${who})` },
    switchRoot: { refused: `not here (${who})` },
    update: { refused: `not here (${who})` },
    commit: { refused: `not here (${who})` }, jails: { refused: "no" },
  };
}

/** A machine with one network interface (eth0), and the remote admin of its boot. */
function machine() {
  const s = new FakeSys().add("/sys/class/net/eth0/address", { kind: "file", data: "52:54:00:12:34:56\n" });
  const log = silentLog();
  return { s, log, cold: new Coldplug(s, log), remote: new RemoteAdmin(s, log) };
}

/** signal calls as [pid, sig, when on the fake clock]. */
function recordSignals(s: FakeSys): [number, number, number][] {
  const out: [number, number, number][] = [];
  const signal = s.signal.bind(s);
  s.signal = (pid, sig) => (out.push([pid, sig, s.clock]), signal(pid, sig));
  return out;
}

const status = async (s: FakeSys) => JSON.parse(await s.request(CTL, '{"cmd":"status"}')) as { ok: boolean; text: string };
const started = (s: FakeSys) => s.calls.filter((c) => /^(net\.|serveLines|spawnService)/.test(c));
const flush = () => new Promise((r) => setTimeout(r, 0));

describe("RemoteAdmin.start", () => {
  it("refuses without authorized keys: false, and nothing is started", async () => {
    const { s, cold, remote } = machine();
    expect(await remote.start(cold, DEFAULT_CONFIG, withAddress, caps("a"))).toBe(false);
    expect(remote.running).toBe(false);
    expect(started(s)).toEqual([]);
    expect(s.lineServers.size).toBe(0);
  });

  it("refuses without an address on the cmdline: false, and nothing is started (not even the loopback)", async () => {
    const { s, cold, remote } = machine();
    expect(await remote.start(cold, keyed, parseCmdline("quiet").cmdline, caps("a"))).toBe(false);
    expect(remote.running).toBe(false);
    expect(started(s)).toEqual([]);
  });

  it("brings the network up, serves the admin socket and runs dropbear from the tools image, supervised", async () => {
    const { s, log, cold, remote } = machine();
    expect(await remote.start(cold, keyed, withAddress, caps("a"))).toBe(true);
    expect(remote.running).toBe(true);
    expect(started(s)).toEqual([
      "net.linkUp lo",
      "net.linkUp eth0",
      "net.addAddress eth0 10.0.0.2/24",
      "net.defaultRoute eth0 10.0.0.1",
      `serveLines ${CTL}`,
      `spawnService ${DROPBEAR} -F -E -s -j -k -p 15022 -r /run/initos/ssh/host_ed25519`,
    ]);
    const [sshd] = [...s.services.values()];
    // dropbear re-executes itself per connection: the tools image's libraries come through the environment.
    expect(sshd!.env).toEqual({ LD_LIBRARY_PATH: "/run/initos/images/tools/usr/lib/x86_64-linux-gnu" });
    // The host key is made (no copy from the pool or the TPM here), and only the command interface is offered.
    expect(s.calls.some((c) => c.startsWith("run ") && c.includes("dropbearkey -t ed25519 -f /run/initos/ssh/host_ed25519"))).toBe(true);
    expect(s.readFile("/root/.ssh/authorized_keys")).toBe("no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 op@laptop\n");
    expect(log.lines).toContain("info: sidecar: sshd on port 15022, 1 authorized key(s)");
    expect(await status(s)).toEqual({ ok: true, text: "answered by: a" });
  });

  it("brings the network up once per boot: shared with whoever asked for it first, and a second start starts nothing", async () => {
    const { s, cold, remote } = machine();
    await Promise.all([remote.network(cold, withAddress, keyed), remote.network(cold, withAddress, keyed)]);
    expect(await remote.start(cold, keyed, withAddress, caps("a"))).toBe(true);
    expect(await remote.start(cold, keyed, withAddress, caps("b"))).toBe(true);
    expect(s.calls.filter((c) => c === "net.linkUp eth0")).toHaveLength(1);
    expect(s.calls.filter((c) => c.startsWith("serveLines"))).toHaveLength(1);
    expect(s.calls.filter((c) => c.startsWith("spawnService"))).toHaveLength(1);
    // The second start still takes over the answers (pool.ts relies on it in sidecar mode).
    expect(await status(s)).toEqual({ ok: true, text: "answered by: b" });
  });

  it("a network that does not come up: false with one line, nothing served (bounded on the fake clock)", async () => {
    const { s, log, cold, remote } = machine();
    const cmdline = parseCmdline("initos.ip=10.0.0.2/24 initos.if=eth9").cmdline;
    expect(await remote.start(cold, keyed, cmdline, caps("a"))).toBe(false);
    expect(remote.running).toBe(false);
    expect(log.lines).toContain("err: recovery: no remote unlock: network interface eth9 did not appear within 30s");
    expect(s.calls.some((c) => /^(serveLines|spawnService)/.test(c))).toBe(false);
    expect(s.clock).toBeGreaterThanOrEqual(30_000);
    expect(s.clock).toBeLessThan(31_000);
  });
});

describe("RemoteAdmin.route", () => {
  it("changes who answers the admin commands; until routed, nothing is available", async () => {
    const { s, cold, remote } = machine();
    await remote.network(cold, withAddress, keyed);
    remote.serve(keyed); // as sidecar mode and the failure policy do, once routed: here before
    expect(await status(s)).toEqual({ ok: false, text: "status: not available yet" });
    remote.route(caps("unlock stage"));
    expect(await status(s)).toEqual({ ok: true, text: "answered by: unlock stage" });
    remote.route(caps("root stage"));
    expect(await status(s)).toEqual({ ok: true, text: "answered by: root stage" });
    expect(JSON.parse(await s.request(CTL, '{"cmd":"unlock","passphrase":"p"}'))).toEqual({ ok: false, text: "unlock: not here (root stage)" });
  });
});

describe("RemoteAdmin.stop", () => {
  async function running() {
    const m = machine();
    expect(await m.remote.start(m.cold, keyed, withAddress, caps("a"))).toBe(true);
    const sshd = [...m.s.services.keys()][0]!;
    return { ...m, sshd };
  }

  it("closes the admin socket first, then stops sshd with every process it started; nothing restarts it", async () => {
    const { s, log, remote, sshd } = await running();
    // A connection (dropbear forks one per client, in a session of its own), its shell and a command.
    s.addProcess({ pid: 600, ppid: sshd, sid: 600, comm: "dropbear" })
      .addProcess({ pid: 601, ppid: 600, sid: 600, comm: "initos-agent" })
      .addProcess({ pid: 602, ppid: 601, sid: 600, comm: "sleep" })
      .addProcess({ pid: 700, ppid: 1, sid: 700, comm: "unrelated" });
    const sent = recordSignals(s);
    await remote.stop(bounds);
    expect(remote.running).toBe(false);
    expect(s.lineServers.get(CTL)!.closed).toBe(true);
    await expect(s.request(CTL, '{"cmd":"status"}')).rejects.toThrow(`nothing serves ${CTL}`);
    expect(s.calls.indexOf(`close ${CTL}`)).toBeLessThan(s.calls.findIndex((c) => c.startsWith("signal ")));
    expect(sent.map(([p, sig]) => [p, sig]).sort()).toEqual([[sshd, TERM], [600, TERM], [601, TERM], [602, TERM]]);
    expect([...s.procs.keys()]).toEqual([700]);
    expect(log.lines.some((l) => /^info: supervise: sshd stopped in \d+ms$/.test(l))).toBe(true);
    await flush();
    s.advance(120_000);
    expect(s.calls.filter((c) => c.startsWith("spawnService"))).toHaveLength(1);
    expect(log.lines.some((l) => l.includes("restarting"))).toBe(false);
  });

  it("restartSshd (jail mode, once the pool's key replaced the recovery key): the sshd that held the old key is stopped after the answer's grace, a new one loads the key now in /run; the admin socket stays", async () => {
    const { s, log, remote, sshd } = await running();
    s.advance(10_000);
    await status(s); // a remote unlock's answer, at 10 s
    s.files.delete("/run/initos/ssh/host_ed25519");
    s.add("/run/initos/ssh/host_ed25519", { kind: "file", data: "the pool's key" });
    const sent = recordSignals(s);
    await remote.restartSshd(keyed, bounds);
    expect(sent.find(([p]) => p === sshd)![2]).toBeGreaterThanOrEqual(12_000);
    expect(s.procs.has(sshd)).toBe(false);
    const spawned = s.calls.filter((c) => c.startsWith("spawnService"));
    expect(spawned).toEqual([`spawnService ${DROPBEAR} -F -E -s -j -k -p 15022 -r /run/initos/ssh/host_ed25519`, `spawnService ${DROPBEAR} -F -E -s -j -k -p 15022 -r /run/initos/ssh/host_ed25519`]);
    expect(s.calls.filter((c) => c.includes("dropbearkey"))).toHaveLength(1); // the key in /run is used, not replaced
    expect(s.readFile("/run/initos/ssh/host_ed25519")).toBe("the pool's key");
    expect(remote.running).toBe(true);
    expect(await status(s)).toEqual({ ok: true, text: "answered by: a" });
    expect(log.lines.some((l) => /^info: supervise: sshd stopped in \d+ms$/.test(l))).toBe(true);
  });

  it("gives a client that just got an answer its grace before sshd goes, and no more", async () => {
    const { s, remote, sshd } = await running();
    s.advance(10_000);
    await status(s); // answered at 10 s
    const sent = recordSignals(s);
    await remote.stop(bounds);
    const term = sent.find(([p]) => p === sshd)!;
    expect(term[2]).toBeGreaterThanOrEqual(12_000); // 2 s after the answer
    expect(term[2]).toBeLessThan(12_000 + bounds.pollMs);
  });

  it("an answer given long before does not delay the stop beyond closing the socket", async () => {
    const { s, remote, sshd } = await running();
    await status(s); // answered at 0
    s.advance(10_000);
    const sent = recordSignals(s);
    await remote.stop(bounds);
    const term = sent.find(([p]) => p === sshd)!;
    expect(term[2]).toBeLessThanOrEqual(10_000 + bounds.termMs);
  });

  it("is bounded when a client never closes its admin connection", async () => {
    const { s, cold, remote } = machine();
    // The socket's close waits for every connection to end: this one never does.
    const serve = s.serveLines.bind(s);
    let closing = 0;
    s.serveLines = (path, max, answer) => {
      const server = serve(path, max, answer);
      return { close: () => (void server.close(), closing++, new Promise<void>(() => {})) };
    };
    expect(await remote.start(cold, keyed, withAddress, caps("a"))).toBe(true);
    const sshd = [...s.services.keys()][0]!;
    const sent = recordSignals(s);
    await remote.stop(bounds);
    expect(closing).toBe(1);
    // waited for the connection up to the bound, then went on to sshd
    expect(sent.filter(([p]) => p === sshd)).toEqual([[sshd, TERM, bounds.termMs]]);
    expect(s.procs.has(sshd)).toBe(false);
  });

  it("is bounded when an ssh connection ignores SIGTERM: SIGKILL after the bound, then on", async () => {
    const { s, log, remote, sshd } = await running();
    s.addProcess({ pid: 600, ppid: sshd, sid: 600, comm: "dropbear", ignore: [TERM] });
    const sent = recordSignals(s);
    await remote.stop(bounds);
    const kill = sent.find(([p, sig]) => p === 600 && sig === KILL)!;
    expect(kill[2]).toBeGreaterThanOrEqual(bounds.termMs);
    expect(s.procs.has(600)).toBe(false);
    // the socket's bound, then SIGTERM's; well within SIGKILL's
    expect(s.clock).toBeLessThan(bounds.termMs + bounds.termMs + bounds.killMs);
    expect(log.lines).toContain("warn: stop sshd: SIGKILL to 1 left after 1s: 600 (dropbear)");
  });

  it("stopping what never started does nothing", async () => {
    const { s, remote } = machine();
    await remote.stop(bounds);
    expect(s.calls).toEqual([]);
    expect(s.clock).toBe(0);
  });
});

describe("RemoteSecrets (beyond admin.test.ts)", () => {
  it("answeredOk is set only by a right passphrase that came over ssh, not by a wrong one nor by the console", async () => {
    const r = new RemoteSecrets();
    r.next();
    expect(r.report(true)).toBe(false); // the console opened it: no ssh client waits
    expect(r.answeredOk).toBe(false);
    const wrong = r.handle({ cmd: "unlock", passphrase: "nope" });
    r.report(false);
    expect(await wrong).toEqual({ ok: false, text: "wrong passphrase" });
    expect(r.answeredOk).toBe(false);
    r.next();
    const right = r.handle({ cmd: "unlock", passphrase: "right" });
    r.report(true);
    expect(await right).toEqual({ ok: true, text: "unlocked; the boot continues" });
    expect(r.answeredOk).toBe(true);
  });

  it("one passphrase at a time: a second client while the first is tried is told nothing waits", async () => {
    const r = new RemoteSecrets();
    const got = r.next();
    const first = r.handle({ cmd: "unlock", passphrase: "first" });
    expect(await r.handle({ cmd: "reseal", passphrase: "second" })).toEqual({ ok: false, text: "reseal: nothing is waiting for a passphrase right now" });
    expect(await got).toBe("first");
    expect(r.wantReseal).toBe(false); // the refused reseal did not change what the first asked for
    r.report(true);
    expect((await first).ok).toBe(true);
  });

  it("hands the passphrase over exactly as sent; wantReseal follows the last request", async () => {
    const r = new RemoteSecrets();
    let got = r.next();
    const a = r.handle({ cmd: "reseal", passphrase: "  two words \n" });
    expect(await got).toBe("  two words \n");
    expect(r.wantReseal).toBe(true);
    r.report(false);
    expect(await a).toEqual({ ok: false, text: "wrong passphrase" }); // a wrong reseal is a wrong passphrase, no reseal text
    got = r.next();
    const b = r.handle({ cmd: "unlock", passphrase: "right" });
    await got;
    expect(r.wantReseal).toBe(false);
    r.report(true, false);
    expect(await b).toEqual({ ok: true, text: "unlocked; the boot continues" });
  });
});
