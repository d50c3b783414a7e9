// A TCP proxy in front of swtpm that plays the kernel's IMA: before forwarding a TPM2_Unseal it
// sends swtpm a TPM2_PCR_Extend of PCR 10 of its own, as a module load measured in the middle of
// a policy session would. The TPM then answers the Unseal with TPM_RC_PCR_CHANGED, exactly as it
// did on the trial boot where btrfs loaded in the background.
//
//   node tpm-measuring-proxy.mjs SWTPM_PORT PROXY_PORT COUNT_FILE
//
// PROXY_PORT carries the raw TPM commands (the swtpm TCTI's data socket), PROXY_PORT + 1 is
// piped to swtpm's control port. COUNT_FILE holds how many of the next Unseals to interrupt; it
// is read before each one and decremented. The proxy runs in its own process because the agent's
// TPM calls are synchronous: in the test's own process it could never answer them.
import { readFileSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";

const [swtpmPort, proxyPort, countFile] = [Number(process.argv[2]), Number(process.argv[3]), process.argv[4]];
const CC_UNSEAL = 0x15e;

// TPM2_PCR_Extend(PCR 10) with an empty password session, one sha256 digest.
const digest = Buffer.alloc(32, 0xa5);
const extend = Buffer.concat([
  Buffer.from([0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82]), // TPM_ST_SESSIONS, size 65, TPM_CC_PCR_Extend
  Buffer.from([0, 0, 0, 10]), // PCR 10
  Buffer.from([0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0]), // TPM_RS_PW, no nonce, no attributes, no hmac
  Buffer.from([0, 0, 0, 1, 0, 0x0b]), // one digest, TPM_ALG_SHA256
  digest,
]);

/** Reads whole TPM messages (header: tag u16, size u32) from a socket, in order. */
function messages(sock) {
  let buf = Buffer.alloc(0);
  const waiting = [];
  const ready = [];
  sock.on("data", (d) => {
    buf = Buffer.concat([buf, d]);
    while (buf.length >= 6 && buf.length >= buf.readUInt32BE(2)) {
      const n = buf.readUInt32BE(2);
      const m = buf.subarray(0, n);
      buf = buf.subarray(n);
      const w = waiting.shift();
      if (w) w(m);
      else ready.push(m);
    }
  });
  return () => new Promise((resolve) => (ready.length ? resolve(ready.shift()) : waiting.push(resolve)));
}

function interruptNext() {
  const left = Number(readFileSync(countFile, "utf8").trim() || "0");
  if (left <= 0) return false;
  writeFileSync(countFile, String(left - 1));
  return true;
}

createServer((client) => {
  const tpm = connect(swtpmPort, "127.0.0.1");
  const fromClient = messages(client);
  const fromTpm = messages(tpm);
  client.on("close", () => tpm.destroy());
  tpm.on("close", () => client.destroy());
  client.on("error", () => tpm.destroy());
  tpm.on("error", () => client.destroy());
  (async () => {
    for (;;) {
      const cmd = await fromClient();
      if (cmd.length >= 10 && cmd.readUInt32BE(6) === CC_UNSEAL && interruptNext()) {
        tpm.write(extend);
        const r = await fromTpm();
        if (r.readUInt32BE(6) !== 0) process.stderr.write(`proxy: PCR_Extend answered 0x${r.readUInt32BE(6).toString(16)}\n`);
      }
      tpm.write(cmd);
      client.write(await fromTpm());
    }
  })();
}).listen(proxyPort, "127.0.0.1");

createServer((client) => {
  const ctrl = connect(swtpmPort + 1, "127.0.0.1");
  client.pipe(ctrl).pipe(client);
  client.on("error", () => ctrl.destroy());
  ctrl.on("error", () => client.destroy());
  client.on("close", () => ctrl.destroy());
  ctrl.on("close", () => client.destroy());
}).listen(proxyPort + 1, "127.0.0.1", () => process.stdout.write("listening\n"));
