"""`prism up --tls` as processes: a throwaway CA, mutual TLS between the services, TLS at the
front door (token-exact through the SDK; plain text refused), the health probe speaking TLS from
its environment, and the launcher's own Redis behind a password that no command line shows."""
from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import urlsplit

import grpc
import pytest

from prism.client import PrismClient
from prism.client.errors import PrismError
from prism.launch import Deployment, DeploymentOptions
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_prism_up_with_tls_and_a_redis_password(tiny_models, tmp_path):
    model_dir = tiny_models["llava"]
    options = DeploymentOptions(model_dir=model_dir, threads=1, slots=4, max_len=512, log_dir=tmp_path / "logs",
                                tls=True)
    with Deployment(options) as deployment:
        ca = deployment.certs.ca
        creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        messages = [{"role": "user", "content": "over tls"}]
        with PrismClient(deployment.address, credentials=creds) as client:
            done = client.complete(messages=messages, max_new_tokens=6)
        assert list(done.token_ids) == Oracle(model_dir).chat("over tls", [], 6)
        with PrismClient(deployment.address, timeout=5) as plain, pytest.raises(PrismError) as exc:
            plain.complete(messages=messages, max_new_tokens=2)
        assert exc.value.code is grpc.StatusCode.UNAVAILABLE

        decode = deployment.endpoints()[deployment.workers(("decode",))[0]]
        probe = [sys.executable, "-m", "prism.runtime.healthcheck", decode, "prism.v1.DecodeService"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_TLS_")}
        assert subprocess.run(probe, env=env, timeout=30).returncode == 1  # plain text: refused
        env |= deployment.client_tls.env()
        assert subprocess.run(probe, env=env, timeout=30).returncode == 0

        password = urlsplit(deployment.redis_url).password
        assert password and len(password) >= 24
        for child in deployment.supervisor.children.values():
            assert not any(password in arg for arg in child.argv), child.name
            with open(f"/proc/{child.process.pid}/cmdline", "rb") as f:
                assert password.encode() not in f.read()
