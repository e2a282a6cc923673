"""Autoscaling as processes: a synthetic burst drives the decode stage's token load past its
advertised capacity; the scheduler's desired replicas rise, `prism up`'s local supervisor starts a
second decode worker (never more than the bound), and once the burst is over and the cooldown
has passed it stops it again. Every request of the burst is answered exactly."""
from __future__ import annotations

import threading
import time

import pytest

from prism.client import PrismClient
from prism.launch import Deployment, DeploymentOptions
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_burst_scales_decode_out_then_in_within_bounds(tiny_models, tmp_path):
    model_dir = tiny_models["llava"]
    oracle = Oracle(model_dir)
    options = DeploymentOptions(
        model_dir=model_dir, threads=1, slots=4, max_len=512, log_dir=tmp_path, autoscale=True,
        min_replicas=1, max_replicas=2, heartbeat_s=0.25, worker_ttl_s=1.5,
        extra_args={"decode": ["--capacity", "20"],  # advertised: the tiny model's measured rate is far higher
                    "scheduler": ["--scale-out-cooldown-s", "0", "--scale-in-cooldown-s", "3",
                                  "--autoscale-window-s", "3"]})
    with Deployment(options) as d:
        assert len(d.workers(("decode",))) == 1
        seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                seen.append(len(d.workers(("decode",))))
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results: dict[int, list[int]] = {}

        def one(i: int) -> None:
            with PrismClient(d.address) as client:
                results[i] = list(client.complete(f"burst {i % 8}", max_new_tokens=40).token_ids)

        # The burst: waves of 8 concurrent requests until a second decode worker is up (plus
        # one wave it serves), at most ~60 s.
        wave, until = 0, time.monotonic() + 60
        while time.monotonic() < until:
            threads = [threading.Thread(target=one, args=(wave * 8 + i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            wave += 1
            if max(seen) == 2 and wave > 1 and seen[-1] == 2:
                break
        assert max(seen) == 2, "no scale-out"
        import redis

        exported = redis.Redis.from_url(d.redis_url).hgetall("prism:autoscale")  # for Kubernetes autoscalers
        assert {b"decode.desired", b"decode.actual", b"decode.load_tokens_per_s"} <= set(exported)
        assert 1 <= int(exported[b"decode.desired"]) <= 2
        status = d.status()
        decode = next(s for s in status.stages if s.stage == "decode")
        assert decode.min_replicas == 1 and decode.max_replicas == 2
        until = time.monotonic() + 60
        while len(d.workers(("decode",))) > 1 and time.monotonic() < until:
            time.sleep(0.5)
        stop.set()
        watcher.join()
        assert len(d.workers(("decode",))) == 1, "no scale-in"
        assert max(seen) <= 2 and min(seen) >= 1
        want = {k: oracle.generate(f"burst {k}", [], 40) for k in range(8)}
        for i, tokens in sorted(results.items()):
            assert tokens == want[i % 8], i
