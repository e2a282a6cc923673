// Validates the KEDA objects (keda.sh/v1alpha1) of the given manifest files against KEDA's CRD
// schemas, offline (@kubernetes-models/keda, generated from KEDA's released CRDs). Prints one
// JSON line {checked, errors: [{file, kind, name, message}]} and exits 1 on any error. The
// Kubernetes API's own kinds are checked by kubernetes-validate (tests/unit/test_deploy.py).
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { ScaledJob } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const MODELS = { ScaledObject, ScaledJob, TriggerAuthentication };
const errors = [];
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) {
      errors.push({ file, kind: "", name: "", message: doc.errors.map((e) => e.message).join("; ") });
      continue;
    }
    const obj = doc.toJS();
    if (!obj || typeof obj.apiVersion !== "string" || !obj.apiVersion.startsWith("keda.sh/")) continue;
    const name = obj.metadata?.name ?? "";
    const Model = obj.apiVersion === "keda.sh/v1alpha1" ? MODELS[obj.kind] : undefined;
    if (!Model) {
      errors.push({ file, kind: String(obj.kind), name, message: `unknown KEDA kind ${obj.apiVersion}/${obj.kind}` });
      continue;
    }
    checked += 1;
    try {
      new Model(obj).validate();
    } catch (err) {
      errors.push({ file, kind: obj.kind, name, message: err.message });
    }
  }
}
console.log(JSON.stringify({ checked, errors }));
process.exit(errors.length ? 1 : 0);
