"""Faults, with the whole system as processes on a real redis-server (append-only): a worker
killed with SIGKILL mid-request, Redis restarted between requests and under load, the
scheduler killed and restarted. Each time the caller gets one complete stream equal to
`model.generate`, with no token repeated or missing."""
from __future__ import annotations

import threading
import time

import pytest

from prism.client import PrismClient
from prism.launch import Deployment, DeploymentOptions
from prism.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import random_image
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

N = 48  # tokens per long request (ignore_eos): long enough to be interrupted mid-stream


@pytest.fixture(scope="module")
def oracle(tiny_models) -> Oracle:
    return Oracle(tiny_models["llava"])


def options(model_dir, log_dir, **kw) -> DeploymentOptions:
    return DeploymentOptions(model_dir=model_dir, threads=1, slots=4, max_len=512, log_dir=log_dir,
                             heartbeat_s=0.25, worker_ttl_s=1.5, request_lease_s=2.0, **kw)


def messages(text: str, images: list) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                         {"type": "text", "text": text}]}]


def stream(client: PrismClient, text: str, images: list, n: int, on_token=None) -> list[int]:
    tokens: list[int] = []
    for chunk in client.generate(messages=messages(text, images), max_new_tokens=n):
        tokens.extend(chunk.token_ids)
        if on_token is not None:
            on_token(len(tokens))
    return tokens


def decode_worker_of(deployment: Deployment, request_id_prefix: str = "") -> str:
    import grpc

    with grpc.insecure_channel(deployment.address) as channel:
        listed = admin_pb2_grpc.SchedulerAdminServiceStub(channel).ListRequests(admin_pb2.ListRequestsRequest())
    for request in listed.requests:
        if request.instances.get("decode"):
            return request.instances["decode"]
    raise AssertionError(f"no request in decode: {listed}")


def test_worker_killed_mid_request_is_reclaimed_and_the_stream_is_exact(tiny_models, tmp_path, oracle):
    with Deployment(options(tiny_models["llava"], tmp_path)) as d:
        d.start_worker(("decode",))  # a second decode worker to fail over to
        d.wait_for_workers(4)
        killed: list[str] = []

        def on_token(count: int) -> None:
            if count == 5 and not killed:
                name = decode_worker_of(d)
                d.kill(name)
                killed.append(name)

        with PrismClient(d.address) as client:
            tokens = stream(client, "a long story", [random_image(1)], N, on_token)
        assert killed, "the decode worker was never killed"
        assert tokens == oracle.chat("a long story", [random_image(1)], N)
        # The dead worker is reaped; the survivor serves new requests exactly.
        with PrismClient(d.address) as client:
            assert stream(client, "after", [], 6) == oracle.chat("after", [], 6)
        names = [w.name for w in d.status().workers]
        assert killed[0] not in names


def test_redis_restarted_between_requests_and_under_load_loses_nothing(tiny_models, tmp_path, oracle):
    with Deployment(options(tiny_models["llava"], tmp_path)) as d:
        with PrismClient(d.address) as client:
            assert stream(client, "before", [], 6) == oracle.chat("before", [], 6)
        d.redis.restart()
        with PrismClient(d.address) as client:
            assert stream(client, "between", [random_image(2)], 6) == oracle.chat("between", [random_image(2)], 6)
        results: dict[int, list[int]] = {}
        started = threading.Barrier(5)

        def run(i: int) -> None:
            with PrismClient(d.address) as client:
                started.wait()
                results[i] = stream(client, f"load {i}", [random_image(40 + i)] if i % 2 else [], 24)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait()
        time.sleep(0.3)
        d.redis.restart()  # under load
        for t in threads:
            t.join(120)
        for i in range(4):
            assert results[i] == oracle.chat(f"load {i}", [random_image(40 + i)] if i % 2 else [], 24), i


def test_scheduler_killed_and_restarted_requests_complete(tiny_models, tmp_path, oracle):
    with Deployment(options(tiny_models["llava"], tmp_path)) as d:
        port = int(d.address.rsplit(":", 1)[1])  # the restarted scheduler keeps the address
        restarted = threading.Event()

        def on_token(count: int) -> None:
            if count >= 4 and not restarted.is_set():  # a chunk may carry several tokens
                d.kill("scheduler")
                restarted.set()
                threading.Thread(target=d.start_scheduler, args=(port,), daemon=True).start()

        with PrismClient(d.address) as client:
            tokens = stream(client, "survive a restart", [random_image(3)], N, on_token)
        assert restarted.is_set()
        assert tokens == oracle.chat("survive a restart", [random_image(3)], N)
        # And the new scheduler serves new requests.
        with PrismClient(f"127.0.0.1:{port}") as client:
            assert stream(client, "fresh", [], 5) == oracle.chat("fresh", [], 5)
