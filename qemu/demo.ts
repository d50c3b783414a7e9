// `make demo`: boots the signed UKI under OVMF with Secure Boot and a TPM, into the test root,
// streaming the serial console, then prints the agent's boot timeline.
import { OVMF, startVm, stopAll } from "./harness.ts";

const vm = await startVm({
  name: "demo",
  firmware: { vars: OVMF.varsSecure },
  disks: [{ file: "build/boot.img" }, { file: "build/testroot.img" }],
  tpm: true,
});
let shown = 0;
const pump = setInterval(() => {
  process.stdout.write(vm.output.slice(shown));
  shown = vm.output.length;
}, 100);
try {
  await vm.waitFor(/INITOS-TEST-ROOT pid=1[^\r\n]*/, 120_000);
  await vm.waitExit(30_000);
  clearInterval(pump);
  process.stdout.write(vm.output.slice(shown));
  const sb = /initos: secureboot: (\S+)/.exec(vm.output)?.[1];
  const timeline = /initos: timeline: ([^\r\n]*)/.exec(vm.output)?.[1];
  const marker = /INITOS-TEST-ROOT[^\r\n]*/.exec(vm.output)?.[0];
  console.log("\n==== initos demo ====");
  console.log(`Secure Boot:        ${sb}`);
  console.log(`agent stages:       ${timeline}`);
  console.log(`switched-to root:   ${marker}`);
  console.log(`serial log:         ${vm.logPath}`);
} catch (e) {
  clearInterval(pump);
  console.error(`demo failed: ${(e as Error).message}`);
  await stopAll();
  process.exit(1);
}
