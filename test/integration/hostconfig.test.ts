// What root inside the booted OS can do to the next boot (DESIGN §5), under QEMU (TCG):
//  - the host config on the pool asks for binds that leave the root (".." in a path, or a symlink
//    the root's owner planted): each is refused with one line, nothing is mounted over the
//    initramfs, and the root still boots;
//  - after switch_root's chroot the OS's init cannot be executed: the failure policy only logs
//    and reboots, writing nothing into the OS (no recovery sidecar, no /etc/passwd).
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { startVm, stopAll } from "../../qemu/harness.ts";
import { diskWithPool } from "./pool-disk.ts";
import { buildPoolImage, existingPaths, testRootfs, testRootWithInit } from "./pool-image.ts";

const B = "build";
const PROMPT = /Recovery passphrase \(attempt (\d) of 3\): $/;
const PASS = "hostile-host-config-test";
let dir: string;

beforeAll(() => {
  const missing = ["vmlinuz", "initrd.img", "boot.img", "test-init"].map((f) => `${B}/${f}`).filter((f) => !existsSync(f));
  if (missing.length) throw new Error(`missing build artifacts (run make all): ${missing.join(" ")}`);
  dir = mkdtempSync(`${tmpdir()}/initos-hostcfg-`);
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));
afterEach(stopAll);

const sha = (f: string) => createHash("sha256").update(readFileSync(f)).digest("hex");

describe("a hostile host config on the encrypted pool", () => {
  it("binds that leave the root are refused one line each; the root boots and nothing is mounted over the initramfs", async () => {
    const pool = buildPoolImage({
      out: `${dir}/pool.img`,
      passphrase: PASS,
      rootfs: testRootfs(`${dir}/rootfs.tar`),
      subvolumes: ["@root", "@home", "@x"],
      hostConfig: {
        root: "@root",
        binds: [
          { subvol: "@x", path: "/../usr/bin" }, // the initramfs' /usr/bin: what the sidecar beside the OS execs
          { subvol: "@x", path: "/../run/initos/images/tools" },
          { subvol: "@x", path: "/../../etc/initos" }, // keys, the shell setting
          { subvol: "@x", path: "/escape" }, // a symlink in @root: /escape -> /../../usr/bin
          { subvol: "@x", path: "/srv/sidecar" }, // a symlink on the way: /srv -> /../../run/initos/images
          { subvol: "@home", path: "/home" },
        ],
      },
      symlinks: { "@root/escape": "/../../usr/bin", "@root/srv": "/../../run/initos/images" },
      files: { "@x/HOSTILE": "mounted from @x\n" },
    });
    const vm = await startVm({
      name: "hostconfig-hostile-binds",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${B}/initrd.img`, append: "console=ttyS0 initos.reboot_delay=1 initos.root=.." },
      disks: [{ file: diskWithPool(`${B}/boot.img`, pool, `${dir}/machine.img`) }],
    });
    await vm.waitFor(PROMPT, 240_000, true);
    vm.send(`${PASS}\n`);
    const m = await vm.waitFor(/INITOS-TEST-ROOT pid=(\d+) root=(\S+) home=(\S+)/, 240_000);
    expect(m.slice(1, 4)).toEqual(["1", "subvol=@root", "mounted"]);
    const out = vm.output;
    // The cmdline is held to the same rule as the host config: its root is not "..".
    expect(out).toMatch(/initos: cmdline: initos\.root="\.\." is invalid \(expected a subvolume name such as @root\); using the default/);
    const refused = out.match(/initos: (host config initos\.json: refused|pool: refused) [^\r\n]*/g) ?? [];
    expect(refused).toEqual([
      'initos: host config initos.json: refused binds.0 {"subvol":"@x","path":"/../usr/bin"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'initos: host config initos.json: refused binds.1 {"subvol":"@x","path":"/../run/initos/images/tools"}: path: "." and ".." are not allowed in a bind path; not mounted',
      'initos: host config initos.json: refused binds.2 {"subvol":"@x","path":"/../../etc/initos"}: path: "." and ".." are not allowed in a bind path; not mounted',
      "initos: pool: refused bind @x on /escape: a symlink in the path (a bind target must be a real directory of the root); not mounted",
      "initos: pool: refused bind @x on /srv/sidecar: a symlink in the path (a bind target must be a real directory of the root); not mounted",
    ]);
    // The line listing what was mounted: the root and the one honest bind, @x nowhere.
    expect(out).toMatch(/initos: pool: root @root on \/sysroot \(ro\), @home->\/home\r?\n/);
    expect(out).not.toMatch(/@x->/);
    expect(out).not.toMatch(/Kernel panic|boot failed/);
    await vm.waitExit(60_000);
  }, 420_000);
});

describe("after switch_root's chroot (the point of no return)", () => {
  it("an init that cannot be executed: one line, reboot, no sshd, and the OS's disk is not written", async () => {
    // Exists and is executable, so every check before the switch passes; execve fails after it.
    const root = testRootWithInit(`${dir}/noexec-root.img`, "#!/nonexistent/interpreter\n");
    const before = sha(root);
    const vm = await startVm({
      name: "noreturn-exec-fails",
      direct: {
        kernel: `${B}/vmlinuz`,
        initrd: `${B}/initrd.img`,
        // rw, an address and keys (the UKI's): everything the recovery sidecar needs to start.
        append: "console=ttyS0 root=/dev/vdb rootfstype=btrfs rootflags=subvol=@ rw initos.reboot_delay=1 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2",
      },
      disks: [{ file: `${B}/boot.img` }, { file: root, snapshot: false }],
      net: { forward: [] },
    });
    expect(await vm.waitExit(240_000)).toBe(0); // -no-reboot: the policy's reboot ends QEMU
    const out = vm.output;
    expect(out).toMatch(/initos: switch_root: exec \/sbin\/init\r?\n/);
    expect(out).toMatch(/initos: boot failed: execve\("\/sbin\/init", "\/sbin\/init"\): ENOENT\r?\n/);
    expect(out).toMatch(/initos: past switch_root: \/ is the OS now; nothing is written into it and no recovery sidecar starts\r?\n/);
    expect(out).toMatch(/initos: rebooting in 1s/);
    expect(out).toMatch(/reboot: Restarting system/);
    expect(out).not.toMatch(/sshd|dropbear|recovery over ssh|diagnostics in|network: /);
    expect(out).not.toMatch(/Kernel panic/);
    // Nothing of the sidecar's setup landed on the user's disk; nothing else was written either.
    expect(existingPaths(root, "@", ["/etc/passwd", "/etc/group", "/etc/shells", "/root/.ssh", "/run/initos/failure.txt"])).toEqual([]);
    expect(sha(root)).toBe(before); // (the init's atime is ahead: the exec attempt does not bump it)
  }, 300_000);
});
