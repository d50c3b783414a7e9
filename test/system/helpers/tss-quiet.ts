// Run by Bun (the agent's runtime) from test/system/tss.test.ts: a TPM error through the agent's
// TPM layer, against the test's swtpm. The test checks that ESYS printed nothing on stderr (the
// console, in the agent): the TpmError, on stdout, is the only report.
// argv: <tcti>
import { randomBytes } from "node:crypto";
import { openTpm, TpmError } from "../../../agent/sys/tss.ts";

const tpm = openTpm(process.argv[2]!);
try {
  const { serialized } = tpm.ensureSrk();
  const blob = Buffer.from(tpm.seal(randomBytes(16), Buffer.alloc(32), { kind: "srk" }));
  blob[20]! ^= 0x01; // inside TPM2B_PRIVATE's integrity-protected part: Esys_Load fails
  tpm.unseal(blob, { kind: "srk" }, [], serialized);
  console.log("unsealed?");
} catch (e) {
  console.log(e instanceof TpmError ? e.message : `not a TpmError: ${String(e)}`);
} finally {
  tpm.close();
}
