// hosts/<name>/host.json (initrd/host.ts): what a host may say, the one line a mistake gives,
// and what it becomes: the host's cmdline (checked by the agent's own parser) and its part of
// the signed config. hosts/example must pass as shipped.
import { scratchDirs } from "../scratch.ts";
import { mkdirSync, writeFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { AgentConfigSchema } from "../../agent/config.ts";
import { parseCmdline } from "../../agent/cmdline.ts";
import { hostCmdline, parseHost, readHost, withHost } from "../../initrd/host.ts";

const fresh = scratchDirs("initos-host");
const TARGET = "console=ttyS0 rw initos.latchcheck=1 initos.reboot_delay=3 systemd.gpt_auto=0";

/** The one line parseHost throws for `json`. */
const why = (json: unknown) => {
  try {
    parseHost(json, "hosts/x/host.json");
  } catch (e) {
    return (e as Error).message;
  }
  return "accepted";
};

describe("host.json", () => {
  it("the shipped example is valid, with the cmdline and config it documents", () => {
    const { name, host } = readHost("hosts/example/host.json");
    expect(name).toBe("example");
    const cmdline = hostCmdline(TARGET, host);
    expect(cmdline).toBe(`${TARGET} initos.ip=192.168.10.20/24 initos.gw=192.168.10.1 initos.rootwait=60`);
    const c = parseCmdline(cmdline).cmdline;
    expect([c.staticIp, c.gateway, c.rootWaitSeconds]).toEqual(["192.168.10.20/24", "192.168.10.1", 60]);
    const config = AgentConfigSchema.parse(withHost({ services: [{ name: "t", argv: ["/bin/true"] }] }, host));
    expect(config.hostname).toBe("example");
    expect(config.update).toMatchObject({ healthSeconds: 300, commit: "manual", trialSeconds: 900 });
    expect(config.services.map((s) => s.name)).toEqual(["t"]);
  });

  it("vmJails names the vmhost image, on demand, after the template's; other hosts do not carry it", () => {
    const template = { images: [{ name: "modules" }, { name: "tools" }] };
    const withVms = withHost(template, parseHost({ hostname: "h1", vmJails: true })) as { images: unknown[] };
    expect(withVms.images).toEqual([{ name: "modules" }, { name: "tools" }, { name: "vmhost", onDemand: true }]);
    const plain = withHost(template, parseHost({ hostname: "h2" })) as { images: unknown[] };
    expect(plain.images).toEqual([{ name: "modules" }, { name: "tools" }]);
  });

  it("a minimal host is a hostname; services are added after the template's", () => {
    const host = parseHost({ hostname: "h1", services: [{ name: "agentd", argv: ["/run/initos/images/tools/usr/bin/busybox", "true"] }] });
    expect(hostCmdline(TARGET, host)).toBe(TARGET);
    const config = AgentConfigSchema.parse(withHost({ services: [{ name: "t", argv: ["/bin/true"] }], update: { commit: "auto" } }, host));
    expect(config.services.map((s) => s.name)).toEqual(["t", "agentd"]);
    expect(config.update.commit).toBe("auto");
  });

  it("the host's words go before a `--` (what follows is the init's)", () => {
    const host = parseHost({ hostname: "h1", cmdline: ["quiet"], address: { ip: "10.0.0.2/8", interface: "52:54:00:12:34:56" } });
    expect(hostCmdline("console=ttyS0 -- demo", host)).toBe("console=ttyS0 initos.ip=10.0.0.2/8 initos.if=52:54:00:12:34:56 quiet -- demo");
  });

  it("refuses each mistake with one line naming the key", () => {
    expect(why({})).toMatch(/^hosts\/x\/host\.json: hostname: .*expected string, received undefined$/);
    expect(why({ hostname: "Web_1" })).toBe("hosts/x/host.json: hostname: expected a hostname label (a-z, 0-9, -)");
    expect(why({ hostname: "h", colour: "red" })).toMatch(/^hosts\/x\/host\.json: \(top level\): Unrecognized key: "colour"$/);
    expect(why({ hostname: "h", cmdline: "quiet" })).toMatch(/^hosts\/x\/host\.json: cmdline: .*expected array, received string$/);
    expect(why({ hostname: "h", cmdline: ["a b"] })).toBe("hosts/x/host.json: cmdline.0: expected one word (no spaces or quotes)");
    expect(why({ hostname: "h", cmdline: ["ok", 'x="y'] })).toBe("hosts/x/host.json: cmdline.1: expected one word (no spaces or quotes)");
    expect(why({ hostname: "h", cmdline: ["initos.ip=10.0.0.2/24"] })).toBe('hosts/x/host.json: cmdline.0: the address goes in "address", not in cmdline');
    expect(why({ hostname: "h", address: { ip: "10.0.0.300/24" } })).toBe("hosts/x/host.json: address.ip: expected address/prefix, e.g. 192.168.1.10/24");
    expect(why({ hostname: "h", address: { ip: "10.0.0.3" } })).toBe("hosts/x/host.json: address.ip: expected address/prefix, e.g. 192.168.1.10/24");
    expect(why({ hostname: "h", address: { ip: "10.0.0.3/24", gw: "gateway" } })).toBe("hosts/x/host.json: address.gw: expected an IPv4 address");
    expect(why({ hostname: "h", address: { gw: "10.0.0.1" } })).toMatch(/^hosts\/x\/host\.json: address\.ip: .*expected string, received undefined$/);
    expect(why({ hostname: "h", services: [{ name: "s", argv: ["rel/path"] }] })).toBe("hosts/x/host.json: services.0.argv: argv[0] must be an absolute path");
    expect(why({ hostname: "h", update: { commit: "later" } })).toMatch(/^hosts\/x\/host\.json: update\.commit: /);
    expect(why({ hostname: "h", update: { healthSeconds: 1000, trialSeconds: 900 } })).toBe("hosts/x/host.json: update: trialSeconds must be longer than healthSeconds");
    expect(why({ hostname: "h", update: { watchdogSeconds: 1 } })).toMatch(/^hosts\/x\/host\.json: update\.watchdogSeconds: /);
    expect(why({ hostname: "h", update: { signers: [] } })).toMatch(/^hosts\/x\/host\.json: update: Unrecognized key: "signers"$/);
  });

  it("a cmdline word the agent would reject at boot fails the build instead", () => {
    const host = parseHost({ hostname: "h", cmdline: ["initos.rootwait=soon"] });
    expect(() => hostCmdline(TARGET, host, "hosts/h/host.json")).toThrow(/^hosts\/h\/host\.json: cmdline: initos\.rootwait="soon" is invalid \(expected whole seconds 0-3600\)$/);
  });

  it("reads hosts/<name>/host.json: the directory names the host; bad JSON is one line", () => {
    const root = fresh("hosts");
    mkdirSync(`${root}/Bad_Name`);
    writeFileSync(`${root}/Bad_Name/host.json`, JSON.stringify({ hostname: "h" }));
    expect(() => readHost(`${root}/Bad_Name/host.json`)).toThrow(/the host's directory name "Bad_Name" is not a host name/);
    mkdirSync(`${root}/web-1`);
    writeFileSync(`${root}/web-1/host.json`, "{ hostname: web-1 }");
    expect(() => readHost(`${root}/web-1/host.json`)).toThrow(/^\S+web-1\/host\.json: .*JSON/);
    writeFileSync(`${root}/web-1/host.json`, JSON.stringify({ hostname: "web-1" }));
    expect(readHost(`${root}/web-1/host.json`)).toEqual({ name: "web-1", host: { hostname: "web-1", cmdline: [], services: [] } });
  });
});
