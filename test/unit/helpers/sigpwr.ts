// Run with SIGPWR blocked (as preinit leaves it): prints "ready", then "signal N" per signal.
import { watchSignalFd } from "../../../agent/pid1.ts";
import { signalfd } from "../../../agent/sys/libc.ts";

watchSignalFd(signalfd([30]), (n) => {
  console.log(`signal ${n}`);
  process.exit(0);
});
console.log("ready");
setTimeout(() => process.exit(3), 10_000);
