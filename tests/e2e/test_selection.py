"""Deadline-driven input reduction as processes: a burst of two-image requests whose deadline
the encoder (advertising 200 tokens/s: 0.64 s for two images, 0.32 s for one) cannot meet as
sent; they are served with an image dropped (what their callers allowed) or refused when even
that cannot make it, each response reports what was dropped, and every output equals
`model.generate` on the inputs actually served."""
from __future__ import annotations

import threading

import pytest

from prism.client import PrismClient, Reduce, ResourceExhaustedError
from prism.launch import Deployment, DeploymentOptions
from prism.profiling.schema import AccuracyEntry, ModelInfo, Profile, StageCost, save
from tests.conftest import random_image
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_overload_burst_served_with_reported_reductions_token_exact(tiny_models, tmp_path):
    model_dir = tiny_models["llava"]
    oracle = Oracle(model_dir)
    cost = {1: StageCost(ms_per_token=1.0, ms_per_call=1.0, tokens_per_call=1, samples=1)}
    profile = tmp_path / "profile.json"
    save(Profile(model=ModelInfo("llava", "llava", "float32", "cpu"),
                 costs={"encode": cost, "prefill": cost, "decode": cost},
                 accuracy={"full": AccuracyEntry(1.0), "drop_images:1": AccuracyEntry(0.8)}), profile)
    options = DeploymentOptions(
        model_dir=model_dir, threads=1, slots=8, max_len=512, log_dir=tmp_path / "logs",
        extra_args={"encode": ["--capacity", "200"],  # advertised (not profiled): two images take 0.64 s
                    "scheduler": ["--selection-profile", str(profile), "--prefill-capacity", "5000",
                                  "--decode-capacity", "800"]})
    images = {i: [random_image(100 + 2 * i), random_image(101 + 2 * i)] for i in range(6)}
    results: dict[int, object] = {}
    with Deployment(options) as d:
        barrier = threading.Barrier(6)

        def one(i: int) -> None:
            messages = [{"role": "user", "content": [{"type": "image", "image": im} for im in images[i]]
                         + [{"type": "text", "text": f"burst {i}"}]}]
            with PrismClient(d.address) as client:
                barrier.wait()
                try:
                    results[i] = client.complete(messages=messages, max_new_tokens=5, deadline_ms=600,
                                                 reduce=Reduce(accuracy_floor=0.5, drop_images=True, min_images=1))
                except ResourceExhaustedError as exc:
                    results[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    served = {i: r for i, r in results.items() if not isinstance(r, Exception)}
    reduced = [i for i, r in served.items() if r.reductions.strategy != "full"]
    assert len(results) == 6 and served, results
    assert reduced, {i: r.reductions for i, r in served.items()}  # the burst forced reductions
    for i, done in served.items():
        red = done.reductions
        assert red.strategy in ("full", "drop_images:1")
        kept = [im for k, im in enumerate(images[i]) if k not in red.dropped_images]
        assert red.dropped_images == (() if red.strategy == "full" else (1,))
        assert red.expected_accuracy == (1.0 if red.strategy == "full" else 0.8)
        assert list(done.token_ids) == oracle.chat(f"burst {i}", kept, 5), i
    for i, r in results.items():
        if isinstance(r, Exception):
            assert "deadline" in str(r) or "slo" in str(r), r
