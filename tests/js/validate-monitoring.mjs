// Validate Prometheus Operator objects (JSON array on stdin) against the schemas of
// @kubernetes-models/prometheus-operator; prints one line per invalid object, exits 1 if any.
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const models = { PodMonitor, PrometheusRule, ServiceMonitor };
const input = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));
let failed = 0;
for (const obj of input) {
  const Model = models[obj.kind];
  if (!Model) {
    console.log(`${obj.kind}: no schema`);
    failed++;
    continue;
  }
  try {
    new Model(obj).validate();
    console.log(`${obj.kind}/${obj.metadata.name}: valid`);
  } catch (err) {
    console.log(`${obj.kind}/${obj.metadata.name}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
