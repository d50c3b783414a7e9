// Installs the SIGPWR relay, prints "ready", then "signal N" for a relayed signal. Meanwhile
// it keeps the garbage collector busy with a worker thread, so a relay that broke the
// runtime's own use of SIGPWR (thread suspension) would show as a hang or a crash.
import { SIGPWR, watchSignalPipe } from "../../../agent/pid1.ts";
import { relaySignal } from "../../../agent/sys/libc.ts";

const worker = new Worker(URL.createObjectURL(new Blob(["setInterval(() => { const a = []; for (let i = 0; i < 1e5; i++) a.push({ i }); }, 1)"])));
watchSignalPipe(relaySignal(SIGPWR, process.argv[2]!), (n) => {
  console.log(`signal ${n}`);
  worker.terminate();
  process.exit(0);
});
let rounds = 0;
const churn = setInterval(() => {
  const a: object[] = [];
  for (let i = 0; i < 2e5; i++) a.push({ i, s: `x${i}` });
  Bun.gc(true);
  if (++rounds === 5) console.log("ready");
}, 5);
setTimeout(() => {
  clearInterval(churn);
  process.exit(3);
}, 15_000);
