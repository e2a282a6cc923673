"""The Kubernetes manifests (`deploy/k8s`), validated offline: every object of the Kubernetes
API against its schema in strict mode (kubernetes-validate, bundled OpenAPI schemas: unknown
fields are errors, as with server-side field validation), every KEDA object against KEDA's CRD
schema (@kubernetes-models/keda under Node.js), and what no schema knows: each Prism container's
arguments and environment parse with that service's own config, every link is TLS (mutual between
stages, health probes included), the Redis password comes from a Secret and never from the
command line, each stage runs on shared queues, and each
stage's ScaledObject watches exactly the Redis stream and consumer group that its workers read,
with a lag trigger and a pending-entries trigger. Planted errors fail each check."""
from __future__ import annotations

import json
import shutil
import subprocess
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from prism.queue.redis_queue import GROUP, SHARED
from prism.runtime.config import config_from_cli
from prism.v1 import prism_pb2, stages_pb2
from tests.unit.test_deploy import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
CHECK = K8S / "check"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor the manifests target (native gRPC probes are GA since 1.27)
STAGE_OF = {"services.encoder": "encode", "services.prefill": "prefill", "services.decode": "decode"}
SERVICE_OF = {
    "services.scheduler": prism_pb2.DESCRIPTOR.services_by_name["PrismService"].full_name,
    "services.encoder": stages_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,
    "services.prefill": stages_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name,
    "services.decode": stages_pb2.DESCRIPTOR.services_by_name["DecodeService"].full_name,
}


def documents(directory: Path = K8S) -> list[tuple[Path, dict]]:
    """Every object of the kustomization's resources, with its file."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    out = []
    for name in kustomization["resources"]:
        path = directory / name
        out += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def core_errors(docs: list[tuple[Path, dict]]) -> list[str]:
    import kubernetes_validate

    errors = []
    for path, doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.path}: {exc.message}")
    return errors


def keda_check(*files: Path) -> tuple[int, dict]:
    node = shutil.which("node")
    assert node, "Node.js is missing (scripts/bootstrap.sh installs it)"
    assert (CHECK / "node_modules").is_dir(), "run `npm install` in deploy/k8s/check (scripts/bootstrap.sh does)"
    out = subprocess.run([node, str(CHECK / "keda.mjs"), *map(str, files)], capture_output=True, text=True,
                         timeout=60, cwd=CHECK)
    return out.returncode, json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from prism.runtime.tls import make_certs

    return make_certs(tmp_path_factory.mktemp("tls"))


def container_config(container: dict, model_dir: Path, certs):
    """The service's own config, parsed from the container's arguments and environment, as the
    kubelet expands them ($(VAR) from the container's env; the secret's files in /tls)."""
    argv = container["args"]
    assert argv[:2] == ["python", "-m"] and argv[2] in CONFIGS, argv
    cls_path, prefix = CONFIGS[argv[2]]
    module, cls = cls_path.split(":")
    fill = {"$(POD_NAME)": "prism-decode-7d9f-abcde", "$(POD_IP)": "10.1.2.3", "$(REDIS_PASSWORD)": "pw",
            "/model": str(model_dir), "/tls/": f"{certs.ca.parent}/"}

    def expand(a: str) -> str:
        for var, value in fill.items():
            a = a.replace(var, value)
        return a

    defined = {e["name"] for e in container.get("env", ())}
    for text in [*argv, *(e.get("value", "") for e in container.get("env", ()))]:
        for var in ("POD_NAME", "POD_IP", "REDIS_PASSWORD"):
            assert f"$({var})" not in text or var in defined, (var, text)  # defined, so the kubelet expands it
    environ = {e["name"]: expand(e["value"]) for e in container.get("env", ()) if "value" in e}
    args = [expand(a) for a in argv[3:]]
    return argv[2], config_from_cli(getattr(import_module(module), cls), env_prefix=prefix, argv=args,
                                    environ=environ), environ


def scaling_problems(docs: list[tuple[Path, dict]], model_dir: Path, certs) -> list[str]:
    """What a schema cannot see: each stage Deployment and the ScaledObject that scales it agree
    with the queues the code reads."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    redis_svc = by_kind["Service"]["redis"]
    redis_address = f"redis.{yaml.safe_load((K8S / 'kustomization.yaml').read_text())['namespace']}.svc.cluster.local"
    redis_address += f":{redis_svc['spec']['ports'][0]['port']}"
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind.get("ScaledObject", {}).values()}
    stages_seen = set()
    for name, deployment in by_kind["Deployment"].items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        if container["image"] != "prism":
            continue
        module, config, environ = container_config(container, model_dir, certs)
        want = ["python", "-m", "prism.runtime.healthcheck", f"127.0.0.1:{config.server.port}", SERVICE_OF[module]]
        for probe in ("startupProbe", "readinessProbe"):
            if container[probe].get("exec", {}).get("command") != want:
                problems.append(f"{name}: {probe} is not {want}")
        mutual = module != "services.scheduler"
        if config.server.tls_cert is None or (config.server.tls_ca is not None) != mutual:
            problems.append(f"{name}: not {'mutual ' if mutual else ''}TLS")
        probe_tls = {k for k in ("PRISM_TLS_CA", "PRISM_TLS_CERT", "PRISM_TLS_KEY") if k in environ}
        if probe_tls != ({"PRISM_TLS_CA", "PRISM_TLS_CERT", "PRISM_TLS_KEY"} if mutual else {"PRISM_TLS_CA"}):
            problems.append(f"{name}: its health probe lacks TLS settings ({sorted(probe_tls)})")
        if not any(v.get("secret", {}).get("secretName") == "prism-tls" for v in spec["volumes"]):
            problems.append(f"{name}: no certificates mounted")
        if not config.queue.shared_queues or config.queue.redis_url != "redis://:pw@redis:6379/0":
            problems.append(f"{name}: not on the shared queues of redis://:<password>@redis:6379/0")
        if any("redis://" in a for a in container["args"]):
            problems.append(f"{name}: a Redis URL on the command line")
        volume = next(v for v in spec["volumes"] if v["name"] == "model")
        if not volume["persistentVolumeClaim"].get("readOnly"):
            problems.append(f"{name}: the model volume is not read-only")
        stage = STAGE_OF.get(module)
        if stage is None:
            continue
        stages_seen.add(stage)
        if container["resources"]["limits"].get("nvidia.com/gpu") != 1:
            problems.append(f"{name}: no GPU")
        if spec["terminationGracePeriodSeconds"] <= config.server.drain_grace_s:
            problems.append(f"{name}: killed before its drain grace ends")
        if config.server.advertise_host != "10.1.2.3" or config.server.worker_name != "prism-decode-7d9f-abcde":
            problems.append(f"{name}: does not advertise its pod IP under its pod name")
        so = scaled.get(name)
        if so is None:
            problems.append(f"{name}: no ScaledObject")
            continue
        triggers = so["spec"]["triggers"]
        want_stream = f"{config.queue.namespace}:q:{stage}:{SHARED}"
        kinds = set()
        for trig in triggers:
            meta = trig["metadata"]
            if trig["type"] != "redis-streams" or meta.get("stream") != want_stream:
                problems.append(f"{so['metadata']['name']}: trigger {trig.get('name')} watches {meta.get('stream')}, "
                                f"not {want_stream}")
            auth = by_kind.get("TriggerAuthentication", {}).get(trig.get("authenticationRef", {}).get("name"))
            if auth is None or auth["spec"]["secretTargetRef"][0]["name"] != "prism-redis":
                problems.append(f"{so['metadata']['name']}: trigger {trig.get('name')} has no Redis password")
            if meta.get("consumerGroup") != GROUP or meta.get("address") != redis_address:
                problems.append(f"{so['metadata']['name']}: trigger {trig.get('name')} reads group "
                                f"{meta.get('consumerGroup')} at {meta.get('address')}")
            kinds |= {k for k in ("lagCount", "pendingEntriesCount") if k in meta}
        if kinds != {"lagCount", "pendingEntriesCount"}:
            problems.append(f"{so['metadata']['name']}: needs a lag trigger and a pending-entries trigger, has {kinds}")
    if stages_seen != set(STAGE_OF.values()):
        problems.append(f"stage Deployments: {sorted(stages_seen)}")
    return problems


def test_manifests_validate_against_kubernetes_and_keda_schemas():
    docs = documents()
    kinds = sorted({d["kind"] for _, d in docs})
    assert {"Deployment", "Service", "StatefulSet", "ScaledObject", "PersistentVolumeClaim"} <= set(kinds), kinds
    assert core_errors(docs) == []
    code, report = keda_check(*sorted({p for p, _ in docs}))
    assert code == 0 and report == {"checked": 4, "errors": []}, report


def test_stages_run_on_shared_queues_scaled_by_the_stream_they_read(tiny_models, certs):
    docs = documents()
    assert scaling_problems(docs, tiny_models["llava"], certs) == []
    redis = next(d for _, d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis")
    redis_args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--appendonly" in redis_args and redis_args[redis_args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    scheduler = next(d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "prism-scheduler")
    _, config, _ = container_config(scheduler["spec"]["template"]["spec"]["containers"][0], tiny_models["llava"], certs)
    assert config.queue.shared_queues and config.server.metrics_port == 9464  # desired replicas on /metrics
    decode = next(so for _, so in docs if so["kind"] == "ScaledObject" and so["metadata"]["name"] == "prism-decode")
    assert decode["spec"]["minReplicaCount"] >= 0 and decode["spec"]["maxReplicaCount"] > 1


@pytest.mark.parametrize("old, new, expect", [
    ("containerPort: 50061", "containerPort: grpc-port", "containerPort"),  # wrong type
    ("terminationGracePeriodSeconds: 60", "terminationGracePeriodSecond: 60", "terminationGracePeriodSecond"),
])
def test_a_planted_core_error_fails(tmp_path, old, new, expect):
    broken = tmp_path / "prefill.yaml"
    text = (K8S / "prefill.yaml").read_text()
    assert old in text
    broken.write_text(text.replace(old, new, 1))
    errors = core_errors([(broken, d) for d in yaml.safe_load_all(broken.read_text())])
    assert len(errors) == 1 and expect in errors[0], errors


def test_a_planted_keda_error_fails(tmp_path):
    broken = tmp_path / "autoscaling.yaml"
    text = (K8S / "autoscaling.yaml").read_text()
    broken.write_text(text.replace("maxReplicaCount: 16", "maxReplicaCount: sixteen", 1))
    code, report = keda_check(broken)
    assert code == 1 and report["checked"] == 4 and len(report["errors"]) == 1, report
    assert report["errors"][0]["name"] == "prism-decode" and "maxReplicaCount" in report["errors"][0]["message"]


@pytest.mark.parametrize("old, new, expect", [
    ("stream: prism:q:decode:shared\n        consumerGroup: workers\n        lagCount",
     "stream: prism:q:decode:prism-decode-0\n        consumerGroup: workers\n        lagCount", "watches"),
    ("pendingEntriesCount: \"8\"\n---\napiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: prism-prefill",
     "streamLength: \"8\"\n---\napiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: prism-prefill",
     "needs a lag trigger and a pending-entries trigger"),
])
def test_a_planted_scaling_mismatch_fails(tmp_path, tiny_models, certs, old, new, expect):
    for path in K8S.glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    text = (tmp_path / "autoscaling.yaml").read_text()
    assert old in text
    (tmp_path / "autoscaling.yaml").write_text(text.replace(old, new, 1))
    problems = scaling_problems(documents(tmp_path), tiny_models["llava"], certs)
    assert len(problems) == 1 and expect in problems[0], problems
