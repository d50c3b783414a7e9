// The jails' network for real (agent/sys/jailnet.ts): rtnetlink, unshare/setns on the calling
// thread, the netns bind mount and the tap ioctls, all inside a throwaway network and mount
// namespace (unshare -n -m), so the machine's own network is never touched; iproute2 and a TCP
// exchange over the bridge check the result from inside the same namespaces. Root only.
import { execFileSync } from "node:child_process";
import { mkdtempSync, readlinkSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, beforeAll, describe, expect, it } from "vitest";

const BUN = "node_modules/@oven/bun-linux-x64-baseline/bin/bun";
const dir = mkdtempSync(`${tmpdir()}/initos-jailnet-`);
afterAll(() => rmSync(dir, { recursive: true, force: true }));

// One run of the helper does every step in order (each depends on the state the one before
// left, as on a host); the tests below read what it saw.
let r: Record<string, unknown>;
beforeAll(() => {
  expect(process.getuid?.()).toBe(0);
  const out = execFileSync("unshare", ["-n", "-m", "--propagation", "private", BUN, "test/system/helpers/jailnet.ts", dir, readlinkSync("/proc/self/ns/net")], { encoding: "utf8", timeout: 60_000 });
  r = JSON.parse(out) as Record<string, unknown>;
});

describe("jails' network (rtnetlink, in private namespaces)", () => {
  it("bridge: created with the host's address, up, forwarding on, a MAC of its own that ports joining do not change; a second call is fine", () => {
    expect(r.bridge).toEqual({ kind: "bridge", up: true, addresses: ["10.77.0.1/24"] });
    expect(r.bridgeMacs).toEqual(["02:49:0a:4d:00:01", "02:49:0a:4d:00:01"]);
    expect(r.ipForward).toBe("1");
    expect(r.bridgeAgain).toBeNull();
  });

  it("jailNetns: lo and eth0 up in the new netns, its address, default route via the host; the host end on the bridge; the thread back in the host's netns", () => {
    expect(r.threadBack).toBe(true);
    expect(r.netnsMounted).toBe(true);
    expect(r.jail).toEqual({ links: ["eth0", "lo"], loUp: true, eth0Up: true, eth0Mac: "02:4a:0a:4d:00:02", eth0: ["10.77.0.2/24"], routes: ["default 10.77.0.1 eth0", "10.77.0.0/24 eth0"] });
    expect(r.hostEnd).toEqual({ kind: "veth", master: "initos0", up: true });
  });

  it("the host reaches the jail over the bridge (TCP to its address answers)", () => {
    expect(r.answer).toBe("pong");
  });

  it("a second jailNetns for the same jail (a restart) replaces the netns and the host end, and the host reaches it at once (same MAC: its ARP entry still holds)", () => {
    expect(r.again).toBeNull();
    expect(r.newNetns).toBe(true);
    expect(r.hostEndsAfterAgain).toBe(1);
    expect(r.answerAgain).toBe("pong");
  });

  it("a failure in the jail's netns or back in the host's names the request and the interface, and leaves nothing", () => {
    expect(r.offLink).toEqual({ error: expect.stringMatching(/^rtnetlink default route via 192\.168\.9\.1 on eth0 in .*\/netns\/bad1: ENETUNREACH$/), threadBack: true, file: false, mounted: false, hostIf: false });
    expect(r.noBridge).toEqual({ error: 'rtnetlink attach vj-bad2 to nobr0, up: if_nametoindex("nobr0"): ENODEV', threadBack: true, file: false, mounted: false, hostIf: false });
  });

  it("removeNetns leaves no file, no mount and no host link; again is fine", () => {
    expect(r.removed).toEqual({ file: false, mounted: false, hostIf: false });
    expect(r.removeAgain).toBeNull();
  });

  it("tap: persistent, no packet info header, on the bridge, up; idempotent; removed again when it cannot be attached", () => {
    expect(r.tap).toEqual({ kind: "tun", data: { type: "tap", pi: false, vnet_hdr: false, multi_queue: false, persist: true }, master: "initos0", up: true });
    expect(r.tapAgain).toBeNull();
    expect(r.tapNoBridge).toEqual({ error: 'rtnetlink attach vt-vm2 to nobr0, up: if_nametoindex("nobr0"): ENODEV', left: false });
  });

  it("removeLink deletes, a missing link is fine; nothing but the bridge is left", () => {
    expect(r.tapRemoved).toBe(true);
    expect(r.removeLinkAgain).toBeNull();
    expect(r.links).toEqual(["initos0", "lo"]);
  });
});
