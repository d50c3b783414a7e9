import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, describe, expect, it } from "vitest";
import { answerLine, callAdmin, parseCtlRequest, requestFromArgs, serveAdmin, takesBody } from "../../agent/admin.ts";
import { requestLine, serveLines } from "../../agent/sys/ctlsocket.ts";
import { authorizedKeys, runAsShell } from "../../agent/stages/sidecar.ts";
import { nextBackoff } from "../../agent/supervise.ts";
import { FakeSys, silentLog } from "./fakesys.ts";

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
    expect(requestFromArgs(["sh", "-i"], () => "")).toBe('unknown command "sh"; try: status, log, unlock, reseal, switch-root, update, commit, jails, jail, image, hostconfig, reboot, poweroff');
    expect(requestFromArgs([], () => "")).toMatch(/^unknown command ""/);
    expect(requestFromArgs(["status", "now"], () => "")).toBe("ctl status: takes no arguments");
  });

  it("update takes its flags as words, and a body", () => {
    expect(requestFromArgs(["update"], () => "")).toEqual({ cmd: "update", force: false, reboot: false });
    expect(requestFromArgs(["update", "--force", "--reboot"], () => "")).toEqual({ cmd: "update", force: true, reboot: true });
    expect(requestFromArgs(["update", "--now"], () => "")).toBe('ctl update: unknown argument "--now"; it takes --force, --reboot');
    expect(takesBody({ cmd: "update", force: false, reboot: false })).toBe(true);
    expect(takesBody({ cmd: "status" })).toBe(false);
    expect(takesBody({ cmd: "image", action: "import", name: "web" })).toBe(true);
    expect(takesBody({ cmd: "image", action: "list", name: undefined })).toBe(false);
  });

  it("positional words: jail start NAME, image import NAME; wrong ones named", () => {
    expect(requestFromArgs(["jail", "start", "web"], () => "")).toEqual({ cmd: "jail", action: "start", name: "web" });
    expect(requestFromArgs(["image", "list"], () => "")).toEqual({ cmd: "image", action: "list" });
    expect(requestFromArgs(["image", "import", "web"], () => "")).toEqual({ cmd: "image", action: "import", name: "web" });
    expect(requestFromArgs(["jail", "start", "web", "now"], () => "")).toBe('ctl jail: unknown argument "now"; it takes ACTION, NAME');
    expect(requestFromArgs(["jail", "kill", "web"], () => "")).toBe("ctl jail: bad request: action: Invalid option: expected one of \"start\"|\"stop\"|\"restart\"");
    expect(requestFromArgs(["jail", "start", "../x"], () => "")).toMatch(/^ctl jail: bad request: name: expected 1-11 characters/);
  });

  it("answers each request line, logging the command but never a passphrase; refuses bad and overlong ones", async () => {
    const log = silentLog();
    const s = new FakeSys();
    serveAdmin(s, log, async (req) => ({ ok: req.cmd === "status", text: `did ${req.cmd}` }), "/run/initos/ctl.sock");
    const send = (line: string) => s.request("/run/initos/ctl.sock", line);
    expect(await callAdmin({ cmd: "status" }, send)).toEqual({ ok: true, text: "did status" });
    expect(await callAdmin({ cmd: "unlock", passphrase: "secret-words" }, send)).toEqual({ ok: false, text: "did unlock" });
    expect(JSON.parse(await send('{"cmd":"sh"}'))).toEqual({ ok: false, text: "bad request: cmd: expected one of status, log, unlock, reseal, switch-root, update, commit, jails, jail, image, hostconfig, reboot, poweroff" });
    expect(JSON.parse(await send(`{"cmd":"status","x":"${"y".repeat(9000)}"}`))).toEqual({ ok: false, text: "request too long" });
    expect(log.lines).toEqual(["info: ctl: status", "info: ctl: unlock", "warn: ctl: refused: bad request: cmd: expected one of status, log, unlock, reseal, switch-root, update, commit, jails, jail, image, hostconfig, reboot, poweroff"]);
    expect(s.lineServers.get("/run/initos/ctl.sock")?.maxLine).toBe(8192);
  });

  it("a handler that throws answers with its one line instead of dropping the connection", async () => {
    const res = await answerLine(silentLog(), async () => Promise.reject(new Error("tpm: gone")), '{"cmd":"log"}');
    expect(res).toEqual({ ok: false, text: "tpm: gone" });
  });

  it("the socket transport: one line each way per connection, mode 0600, a stale socket file replaced", async () => {
    const path = `${dir}/s`;
    writeFileSync(path, "stale");
    const seen: (string | null)[] = [];
    const server = serveLines(path, 16, async (line) => (seen.push(line), `got ${line?.length ?? "too long"}`));
    for (let i = 0; i < 100 && !(existsSync(path) && statSync(path).isSocket() && (statSync(path).mode & 0o777) === 0o600); i++) await new Promise((r) => setTimeout(r, 10));
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(await requestLine(path, "hello")).toBe("got 5");
    expect(await requestLine(path, "x".repeat(40))).toBe("got too long");
    await server.close();
    expect(seen).toEqual(["hello", null]);
    await expect(requestLine(path, "hello")).rejects.toThrow(/^cannot reach the agent at /);
  });

  it("carries a body after the line with backpressure, and a refusal mid-body still gets its reply", async () => {
    const path = `${dir}/b`;
    const server = serveLines(path, 64, async (line, body) => {
      const h = createHash("sha256");
      let n = 0;
      for await (const c of body) {
        n += c.length;
        h.update(c);
        if (line === "refuse" && n > 1 << 20) return "refused after 1 MiB";
      }
      return `${line} ${n} ${h.digest("hex").slice(0, 12)}`;
    });
    for (let i = 0; i < 100 && !existsSync(path); i++) await new Promise((r) => setTimeout(r, 10));
    const data = Buffer.alloc(24 << 20, 7); // larger than any socket buffer: backpressure is exercised
    const chunks = async function* () {
      for (let i = 0; i < data.length; i += 65536) yield data.subarray(i, i + 65536);
    };
    expect(await requestLine(path, "take", chunks())).toBe(`take ${data.length} ${createHash("sha256").update(data).digest("hex").slice(0, 12)}`);
    expect(await requestLine(path, "refuse", chunks())).toBe("refused after 1 MiB");
    expect(await requestLine(path, "empty", (async function* () {})())).toMatch(/^empty 0 /);
    await server.close();
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
    const { RemoteSecrets } = await import("../../agent/stages/remote.ts");
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
  });
});

describe("reseal over ssh", () => {
  it("unlocks, asks the unlock loop to reseal, and answers only after the reseal", async () => {
    const { RemoteSecrets } = await import("../../agent/stages/remote.ts");
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
  const sent: string[] = [];
  const request = async (line: string) => (sent.push(line), JSON.stringify({ ok: true, text: "answered" }));
  const io = (shell?: (a: string[]) => Promise<number>) => ({ readStdin: () => "", stdinStream: () => (async function* () {})(), request, shell });

  it("a ctl command goes to the admin socket as one JSON line, with or without a shell offered", async () => {
    sent.length = 0;
    expect(await runAsShell(["-c", "status"], io())).toBe(0);
    expect(await runAsShell(["-c", "ctl log"], io(async () => 9))).toBe(0);
    expect(sent).toEqual(['{"cmd":"status"}', '{"cmd":"log"}']);
  });

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
