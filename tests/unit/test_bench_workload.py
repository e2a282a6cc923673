"""Unit tests for prism/bench/workload.py and the request selection of prism/bench/run.py:
fitting a trace to a model, the image sizes, deterministic bodies, windows at a rate scale."""
from __future__ import annotations

import io
import random

import pytest

from prism.bench.run import BenchConfig, requests_at
from prism.bench.trace import TraceRequest
from prism.bench.workload import ModelLimits, Workload, fit, image_side

LIMITS = ModelLimits(max_context=512, max_new_tokens=100, max_images=4, tokens_per_word=2.0,
                     prompt_overhead=10, image_tokens=64)


def test_fit_scales_and_clips_to_the_context():
    src = [TraceRequest(0.0, 800, 80, 0),      # x1/8 -> 100 prompt, 10 out
           TraceRequest(1.0, 40_000, 4000, 2),  # huge: output capped at 100, prompt at what is left
           TraceRequest(2.0, 8, 8, 9),          # 9 images over the deployment's 4
           TraceRequest(3.0, 100, 16, 1)]       # prompt raised to hold its image
    out = fit(src, LIMITS)
    assert [r.generated_tokens for r in out] == [10, 100, 2, 2]
    assert [r.num_images for r in out] == [0, 2, 4, 1]
    assert out[0].context_tokens == 100
    # room = 512 - 100 out - 8 margin - 10 template = 394 (+ the template) -> 404 in all
    assert out[1].context_tokens == 404
    # 4 images * 64 + 8 text + 10 template: the floor for a 4-image prompt
    assert out[2].context_tokens == 4 * 64 + 8 + 10
    assert out[3].context_tokens == 64 + 8 + 10
    for r in out:
        assert r.context_tokens + r.generated_tokens <= LIMITS.max_context
    assert [r.arrival_s for r in out] == [0.0, 1.0, 2.0, 3.0]


def test_fit_drops_images_that_cannot_fit():
    tight = ModelLimits(max_context=300, max_new_tokens=50, max_images=8, image_tokens=64)
    (r,) = fit([TraceRequest(0.0, 8000, 400, 8)], tight)
    # room 300 - 50 - 8 = 242: three images (192) and 8 text tokens fit, four do not
    assert r.num_images == 3 and r.generated_tokens == 50
    assert r.context_tokens + r.generated_tokens <= 300
    (one,) = fit([TraceRequest(0.0, 10, 10, 5)], ModelLimits(max_context=64, image_tokens=200))
    assert one.num_images == 1  # a request with images keeps one


def test_limits_validated():
    with pytest.raises(ValueError):
        ModelLimits(max_context=4)
    with pytest.raises(ValueError):
        ModelLimits(tokens_per_word=0)


def test_image_sides_follow_the_published_shape():
    rng = random.Random(5)
    sides = sorted(image_side(rng) for _ in range(20_000))
    assert sides[len(sides) // 2] == pytest.approx(500, rel=0.05)
    assert sides[int(0.95 * len(sides))] == pytest.approx(1050, rel=0.06)
    assert sides[int(0.95 * len(sides))] > 1000


def test_workload_bodies_are_deterministic():
    from PIL import Image

    r = TraceRequest(0.0, 10 + 2 * 64 + 40, 5, 2)
    a, b = Workload(LIMITS, seed=3), Workload(LIMITS, seed=3)
    assert a.text_tokens(r) == 40
    assert len(a.text(7, r).split()) == 20  # 40 tokens at 2 tokens per word
    assert a.messages(7, r) == b.messages(7, r)
    assert a.text(7, r) != a.text(8, r)
    msg = a.messages(7, r)[0]["content"]
    assert [p["type"] for p in msg] == ["image", "image", "text"]
    sides = [Image.open(io.BytesIO(p["image"])).size for p in msg[:2]]
    assert sides == [(a.image_side(7, 0),) * 2, (a.image_side(7, 1),) * 2]
    assert Image.open(io.BytesIO(msg[0]["image"])).format == "JPEG"
    fixed = Workload(LIMITS, seed=3, image_side_px=224)
    assert Image.open(io.BytesIO(fixed.image(0, 0))).size == (224, 224)
    assert Workload(LIMITS, seed=4).messages(7, r) != a.messages(7, r)
    with pytest.raises(ValueError):
        Workload(LIMITS, image_side_px=-1)


def test_requests_at_a_rate_scale(tmp_path):
    path = tmp_path / "t.csv"
    rows = ["TIMESTAMP,NumImages,ContextTokens,GeneratedTokens"] + [f"{k * 0.5},{k % 2},800,80" for k in range(100)]
    path.write_text("\n".join(rows) + "\n")
    from prism.bench.trace import load_trace

    trace = load_trace(path)
    cfg = BenchConfig(trace=path, out_dir=tmp_path / "out", duration_s=10.0, start_s=5.0)
    slow = requests_at(trace, cfg, LIMITS, 0.5)   # 5 s of trace (10 requests) stretched to 10 s
    fast = requests_at(trace, cfg, LIMITS, 2.0)   # 20 s of trace (40 requests) squeezed into 10 s
    assert len(slow) == 10 and len(fast) == 40
    assert [r.arrival_s for r in slow] == pytest.approx([k * 1.0 for k in range(10)])
    assert [r.arrival_s for r in fast] == pytest.approx([k * 0.25 for k in range(40)])
    assert [r.num_images for r in slow] == [k % 2 for k in range(10, 20)]  # from trace second 5 on
    assert all(r.generated_tokens == 10 for r in slow)
    with pytest.raises(ValueError):
        BenchConfig(trace=tmp_path / "missing.csv", out_dir=tmp_path)
    with pytest.raises(ValueError, match="rate_scale"):
        BenchConfig(trace=path, out_dir=tmp_path, rate_scale=0)
