// `make demo`'s part 7: a VM jail end to end, nested. The machine is demo-vm (make demo builds
// it from build/demo-hosts/demo-vm: "vmJails": true, so its signed config names the vmhost image
// and its boot disk, build/hosts/demo-vm/boot.img, carries it). Booted directly (its kernel and
// its host initrd, no firmware, as part 6) with an encrypted pool whose host config names one VM
// jail; the jail's image is pushed over ssh, `jail start` boots the project's VM kernel + initrd
// under QEMU inside the guest (TCG inside TCG: minutes, which is why no test runs this), the
// app's marker comes out on the outer console as "jail app: ...", and poweroff presses the
// jail's ACPI power button first.
//
// Measured once on this 2-core host (wall): the outer boot to "jails: ready" 23 s (vmhost
// verified in it); `jail start` to the app's marker 398 s (the inner QEMU's first console line
// after ~49 s, the inner kernel runs /init ~135 s later, the inner agent reaches switch_root
// ~200 s after that); `poweroff` to the outer QEMU's exit 4.7 s (the jail stopped in 2.6 s,
// its app got SIGTERM from the power button).
import { type Vm, type VmOptions } from "./harness.ts";
import { ssh } from "./ssh.ts";
import { diskWithPool } from "../test/integration/pool-disk.ts";
import { buildPoolImage, testRootfs } from "../test/integration/pool-image.ts";
import { writeWebImage } from "../test/jails/web-image.ts";

export interface VmJailDemo {
  /** The outer console. */
  output: string;
  /** `jails` as the operator saw it while the VM jail ran. */
  status: string;
  /** Wall seconds: the outer VM's start to "jails: ready" (the passphrase typed at once). */
  bootS: number;
  /** Wall seconds: `jail start` to the inner app's marker on the outer console. */
  startS: number;
  /** Wall seconds: `poweroff` to the outer QEMU's exit. */
  poweroffS: number;
}

const B = "build";
const HOST = `${B}/hosts/demo-vm`;
/** The app: says it is up under its hostname (the jail's name), then waits for the power button. */
const APP = ["/bin/sh", "-c", "echo VM-JAIL-APP-UP $(hostname); trap 'echo VM-JAIL-APP-TERM; exit 0' TERM; sleep 3600 & wait"];

export async function vmJailDemo(
  dir: string,
  show: (title: string, o: VmOptions, drive?: (vm: Vm) => Promise<void>) => Promise<string>,
  operator: (port: number, command: string) => Promise<string>,
): Promise<VmJailDemo> {
  const pool = buildPoolImage({
    out: `${dir}/vmjail-pool.img`,
    passphrase: "demo-vm-jail",
    rootfs: testRootfs(`${dir}/vmjail-rootfs.tar`),
    subvolumes: ["@spare"],
    hostConfig: {
      network: { address: "10.77.0.1/24" },
      jails: [{ name: "app", kind: "vm", image: "app", memory: "384M", cpus: 1, address: "10.77.0.20", command: APP }],
    },
  });
  const r: VmJailDemo = { output: "", status: "", bootS: NaN, startS: NaN, poweroffS: NaN };
  const opts = { key: `${B}/test-ssh/id_ed25519`, knownHosts: `${dir}/known_hosts_vmjail` };
  r.output = await show(
    "7. a VM jail: QEMU from the verified vmhost image, inside this (TCG) guest; minutes",
    {
      name: "demo-vmjail",
      direct: { kernel: `${B}/vmlinuz`, initrd: `${HOST}/demo-vm.initrd`, append: "console=ttyS0 initos.ip=10.0.2.15/24 initos.gw=10.0.2.2" },
      // demo-vm's boot disk: its ESPs carry modules, tools and vmhost.
      disks: [{ file: diskWithPool(`${HOST}/boot.img`, pool, `${dir}/vmjail-machine.img`) }],
      net: { forward: [{ guest: 15022 }] },
      // The jail's QEMU (384M guest) runs in here beside the agent.
      memoryMiB: 2048,
    },
    async (vm) => {
      const port = vm.hostPort(15022);
      const t0 = Date.now();
      await vm.waitFor(/Recovery passphrase \(attempt 1 of 3\): $/, 240_000, true);
      vm.send("demo-vm-jail\n");
      await vm.waitFor(/initos: jails: ready/, 240_000);
      r.bootS = (Date.now() - t0) / 1000;
      const app = writeWebImage(`${dir}/app.tar`);
      console.log(`\n$ ssh -p 15022 root@demo-vm image import app < app.tar`);
      const imported = await ssh(port, "image import app", { ...opts, inputFile: app, timeoutMs: 300_000 });
      console.log(imported.stdout + imported.stderr);
      const from = vm.mark();
      const t1 = Date.now();
      await operator(port, "jail start app");
      // $(hostname) expanded: the inner kernel's own "Command line:" echo does not match.
      await vm.waitFor(/jail app: VM-JAIL-APP-UP app\b/, 900_000, false, from);
      r.startS = (Date.now() - t1) / 1000;
      r.status = await operator(port, "jails");
      const t2 = Date.now();
      await operator(port, "poweroff");
      await vm.waitExit(300_000);
      r.poweroffS = (Date.now() - t2) / 1000;
    },
  );
  return r;
}
