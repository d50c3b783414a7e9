// Run by test/system/jailnet.test.ts under `unshare -n -m --propagation private`: the jails'
// network calls for real, in a throwaway network and mount namespace, checked with iproute2 and
// a TCP exchange over the bridge. Prints one JSON object of what it saw.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, readFileSync, readlinkSync, statSync } from "node:fs";
import { connect } from "node:net";
import { bridge, jailNetns, removeLink, removeNetns, tap } from "../../../agent/sys/jailnet.ts";

const [dir, callersNetns] = process.argv.slice(2) as [string, string];
// The host's own network must never be touched: refuse unless this netns is not the caller's
// (the test passes its own, readlink /proc/self/ns/net; PID 1's is not readable here).
if (!callersNetns || readlinkSync("/proc/self/ns/net") === callersNetns) {
  console.error("refusing: not in a private network namespace (run under unshare -n)");
  process.exit(2);
}

type Json = Record<string, any>; // iproute2's JSON, read loosely: the test asserts its shape
const ip = (args: string[], netns?: string): Json[] =>
  JSON.parse(execFileSync(netns ? "nsenter" : "ip", [...(netns ? [`--net=${netns}`, "ip"] : []), "-j", ...args], { encoding: "utf8" }) || "[]") as Json[];
const link = (name: string): Json | undefined => ip(["-d", "link", "show"]).find((l) => l.ifname === name);
const threadNs = () => readlinkSync("/proc/thread-self/ns/net");
const mounted = (p: string) => readFileSync("/proc/self/mounts", "utf8").split("\n").some((l) => l.split(" ")[1] === p);
const errorOf = (f: () => void): string | null => {
  try {
    f();
    return null;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
};

/** Starts a TCP server in the jail's netns, connects to it from here over the bridge: its answer. */
async function exchange(netnsPath: string, address: string): Promise<string> {
  const server = spawn("nsenter", [`--net=${netnsPath}`, process.execPath, "-e", `require("node:net").createServer((s) => s.end("pong")).listen(8080, ${JSON.stringify(address)}, () => console.log("ready"))`]);
  try {
    await new Promise<void>((resolve, reject) => {
      const bound = setTimeout(() => reject(new Error("the jail's server did not start within 10 s")), 10_000);
      server.stdout.on("data", (d: Buffer) => d.toString().includes("ready") && (clearTimeout(bound), resolve()));
      server.on("exit", (code) => (clearTimeout(bound), reject(new Error(`the jail's server exited: ${code}`))));
    });
    return await new Promise<string>((resolve, reject) => {
      const s = connect(8080, address);
      let got = "";
      const bound = setTimeout(() => (s.destroy(), reject(new Error(`no answer from ${address}:8080 within 10 s`))), 10_000);
      s.on("data", (d) => (got += d.toString()));
      s.on("end", () => (clearTimeout(bound), resolve(got)));
      s.on("error", (e) => (clearTimeout(bound), reject(e)));
    });
  } finally {
    server.kill();
  }
}

const out: Json = {};
const start = threadNs();

bridge("initos0", "10.77.0.1", 24);
out.bridgeAgain = errorOf(() => bridge("initos0", "10.77.0.1", 24));
const br = link("initos0")!;
out.bridge = { kind: br.linkinfo?.info_kind, up: br.flags.includes("UP"), addresses: ip(["addr", "show", "initos0"])[0]!.addr_info.filter((a: Json) => a.family === "inet").map((a: Json) => `${a.local}/${a.prefixlen}`) };
out.ipForward = readFileSync("/proc/sys/net/ipv4/ip_forward", "utf8").trim();

const web = { netnsPath: `${dir}/netns/web`, hostIf: "vj-web", jailIf: "eth0", address: "10.77.0.2", prefix: 24, gateway: "10.77.0.1", bridge: "initos0" };
jailNetns(web);
out.threadBack = threadNs() === start;
out.netnsMounted = mounted(web.netnsPath);
const host = link("vj-web")!;
out.hostEnd = { kind: host.linkinfo?.info_kind, master: host.master, up: host.flags.includes("UP") };
out.bridgeMacs = [br.address, link("initos0")!.address]; // before and after a port joined
const jailAddrs = ip(["addr"], web.netnsPath);
out.jail = {
  links: jailAddrs.map((l) => l.ifname).sort(),
  loUp: jailAddrs.find((l) => l.ifname === "lo")?.flags.includes("UP"),
  eth0Up: jailAddrs.find((l) => l.ifname === "eth0")?.flags.includes("UP"),
  eth0Mac: jailAddrs.find((l) => l.ifname === "eth0")?.address,
  eth0: jailAddrs.find((l) => l.ifname === "eth0")?.addr_info.filter((a: Json) => a.family === "inet").map((a: Json) => `${a.local}/${a.prefixlen}`),
  routes: ip(["route"], web.netnsPath).map((r) => `${r.dst} ${r.gateway ?? ""} ${r.dev}`.replace(/ +/g, " ")),
};
out.answer = await exchange(web.netnsPath, web.address);

// The jail restarts: the same call again replaces the netns and the host end.
const firstNs = statSync(web.netnsPath).ino;
out.again = errorOf(() => jailNetns(web));
out.newNetns = statSync(web.netnsPath).ino !== firstNs;
out.hostEndsAfterAgain = ip(["link"]).filter((l) => l.ifname === "vj-web").length;
out.answerAgain = await exchange(web.netnsPath, web.address);

// Failures: inside the jail's netns (a gateway off the /24) and back in the host's (no such
// bridge). Each names what failed, and leaves no file, mount or link.
for (const [name, bad] of [
  ["offLink", { ...web, netnsPath: `${dir}/netns/bad1`, hostIf: "vj-bad1", gateway: "192.168.9.1" }],
  ["noBridge", { ...web, netnsPath: `${dir}/netns/bad2`, hostIf: "vj-bad2", bridge: "nobr0" }],
] as const) {
  out[name] = { error: errorOf(() => jailNetns(bad)), threadBack: threadNs() === start, file: existsSync(bad.netnsPath), mounted: mounted(bad.netnsPath), hostIf: link(bad.hostIf) !== undefined };
}

removeNetns(web.netnsPath, web.hostIf);
out.removeAgain = errorOf(() => removeNetns(web.netnsPath, web.hostIf));
out.removed = { file: existsSync(web.netnsPath), mounted: mounted(web.netnsPath), hostIf: link("vj-web") !== undefined };

tap("vt-vm1", "initos0");
out.tapAgain = errorOf(() => tap("vt-vm1", "initos0"));
const t = link("vt-vm1")!;
out.tap = { kind: t.linkinfo?.info_kind, data: t.linkinfo?.info_data, master: t.master, up: t.flags.includes("UP") };
out.tapNoBridge = { error: errorOf(() => tap("vt-vm2", "nobr0")), left: link("vt-vm2") !== undefined };
removeLink("vt-vm1");
out.removeLinkAgain = errorOf(() => removeLink("vt-vm1"));
out.tapRemoved = link("vt-vm1") === undefined;
out.links = ip(["link"]).map((l) => l.ifname).sort();

console.log(JSON.stringify(out));
process.exit(0);
