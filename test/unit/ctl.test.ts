import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { callCtl, parseCtlRequest, requestFromArgs, serveCtl } from "../../agent/ctl.ts";
import { authorizedKeys, runAsShell } from "../../agent/stages/sidecar.ts";
import { nextBackoff } from "../../agent/supervise.ts";
import { silentLog } from "./fakesys.ts";

const dir = mkdtempSync(`${tmpdir()}/initos-ctl-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("ctl requests", () => {
  it("accepts the known commands", () => {
    expect(parseCtlRequest('{"cmd":"status"}')).toEqual({ cmd: "status" });
    expect(parseCtlRequest('{"cmd":"unlock","passphrase":"p"}')).toEqual({ cmd: "unlock", passphrase: "p" });
  });

  it("refuses malformed requests with one line naming the problem", () => {
    expect(parseCtlRequest("status")).toBe("request is not JSON");
    expect(parseCtlRequest('{"cmd":"shell"}')).toMatch(/^bad request: cmd: /);
    expect(parseCtlRequest('{"cmd":"status","x":1}')).toMatch(/^bad request: \(top level\): .*x/);
    expect(parseCtlRequest('{"cmd":"unlock"}')).toMatch(/^bad request: passphrase: /);
    expect(parseCtlRequest('{"cmd":"unlock","passphrase":""}')).toMatch(/^bad request: passphrase: /);
    expect(parseCtlRequest("[]")).toMatch(/^bad request: /);
  });

  it("turns typed words into requests; the passphrase comes from stdin", () => {
    expect(requestFromArgs(["status"], () => "")).toEqual({ cmd: "status" });
    expect(requestFromArgs(["unlock"], () => "words here\n")).toEqual({ cmd: "unlock", passphrase: "words here" });
    expect(requestFromArgs(["sh", "-i"], () => "")).toBe('unknown command "sh"; try: status, log, unlock, reseal, switch-root, reboot, poweroff');
    expect(requestFromArgs([], () => "")).toMatch(/^unknown command ""/);
    expect(requestFromArgs(["status", "now"], () => "")).toBe("ctl status: takes no arguments");
  });

  it("serves one request per connection over the unix socket, logging the command but never a passphrase", async () => {
    const log = silentLog();
    const server = serveCtl(log, async (req) => ({ ok: req.cmd === "status", text: `did ${req.cmd}` }), `${dir}/s`);
    await new Promise((r) => server.once("listening", r));
    expect(await callCtl({ cmd: "status" }, `${dir}/s`)).toEqual({ ok: true, text: "did status" });
    expect(await callCtl({ cmd: "unlock", passphrase: "secret-words" }, `${dir}/s`)).toEqual({ ok: false, text: "did unlock" });
    server.close();
    expect(log.lines).toEqual(["info: ctl: status", "info: ctl: unlock"]);
  });
});

describe("sidecar pieces", () => {
  it("restricts every authorized key to the command interface", () => {
    expect(authorizedKeys(["ssh-ed25519 AAAA test\n"])).toBe("no-port-forwarding,no-agent-forwarding,no-X11-forwarding,no-pty ssh-ed25519 AAAA test\n");
  });

  it("backs off exponentially up to 30s, and starts over after a healthy run", () => {
    expect(nextBackoff(500, 10)).toBe(1000);
    expect(nextBackoff(1000, 10)).toBe(2000);
    expect(nextBackoff(16000, 10)).toBe(30000);
    expect(nextBackoff(30000, 10)).toBe(30000);
    expect(nextBackoff(30000, 120_000)).toBe(1000);
  });
});

describe("remote unlock channel", () => {
  it("hands a ctl passphrase to the waiting unlock loop and the verdict back to the client", async () => {
    const { RemoteSecrets } = await import("../../agent/stages/recovery.ts");
    const r = new RemoteSecrets();
    expect(await r.handle({ cmd: "unlock", passphrase: "x" })).toEqual({ ok: false, text: "unlock: nothing is waiting for a passphrase right now" });
    const next = r.next();
    const answer = r.handle({ cmd: "unlock", passphrase: "words" });
    expect(await next).toBe("words");
    expect(r.report(false)).toBe(true);
    expect(await answer).toEqual({ ok: false, text: "wrong passphrase" });
    const again = r.next();
    const answer2 = r.handle({ cmd: "unlock", passphrase: "right" });
    expect(await again).toBe("right");
    r.report(true);
    expect(await answer2).toEqual({ ok: true, text: "unlocked; the boot continues" });
    expect(r.report(true)).toBe(false); // nobody waits for a verdict now
    expect(await r.handle({ cmd: "status" })).toEqual({ ok: false, text: "status: not available while waiting for the recovery passphrase" });
  });
});

describe("reseal over ssh", () => {
  it("unlocks, asks the unlock loop to reseal, and answers only after the reseal", async () => {
    const { RemoteSecrets } = await import("../../agent/stages/recovery.ts");
    const r = new RemoteSecrets();
    const next = r.next();
    const answer = r.handle({ cmd: "reseal", passphrase: "right" });
    expect(await next).toBe("right");
    expect(r.wantReseal).toBe(true);
    r.report(true, true);
    expect(await answer).toEqual({ ok: true, text: "unlocked and resealed to the current TPM state; the boot continues" });
    const again = r.next();
    const failed = r.handle({ cmd: "reseal", passphrase: "right" });
    await again;
    r.report(true, false);
    expect(await failed).toEqual({ ok: false, text: "unlocked, but the reseal failed (see log); the boot continues" });
  });

  it("reads reseal's passphrase from stdin like unlock, and refuses an empty one", () => {
    expect(requestFromArgs(["reseal"], () => "words\n")).toEqual({ cmd: "reseal", passphrase: "words" });
    expect(requestFromArgs(["unlock"], () => "\n")).toBe("ctl unlock: give the recovery passphrase on stdin");
    expect(requestFromArgs(["switch-root"], () => "")).toEqual({ cmd: "switch-root" });
    expect(parseCtlRequest('{"cmd":"switch-root","now":true}')).toBe('bad request: (top level): Unrecognized key: "now"');
    expect(parseCtlRequest('{"cmd":"reseal"}')).toMatch(/^bad request: passphrase: /);
  });
});

describe("ssh sessions", () => {
  const io = (shell?: (a: string[]) => Promise<number>) => ({ readStdin: () => "", shell });

  it("without a shell offered, anything but a ctl command is refused (exit 2)", async () => {
    expect(await runAsShell(["-c", "cat /etc/passwd"], io())).toBe(2);
    expect(await runAsShell([], io())).toBe(2); // interactive login
  });

  it("with a shell offered, other commands and interactive logins go to busybox sh", async () => {
    const runs: string[][] = [];
    const shell = async (a: string[]) => (runs.push(a), 7);
    expect(await runAsShell(["-c", "echo $((6*7))"], io(shell))).toBe(7);
    expect(await runAsShell([], io(shell))).toBe(7);
    expect(runs).toEqual([["sh", "-c", "echo $((6*7))"], ["sh", "-l"]]);
  });

  it("offers a pty only with the shell", () => {
    expect(authorizedKeys(["ssh-ed25519 AAAA k"], true)).toBe("no-port-forwarding,no-agent-forwarding,no-X11-forwarding ssh-ed25519 AAAA k\n");
  });
});
