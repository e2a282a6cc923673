"""Unit tests for prism/bench/trace.py: the trace loader, its multimodal overlay, scale and
burstiest_window."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prism.bench.trace import (  # noqa: E402
    IMAGE_COUNT_WEIGHTS,
    ImageShape,
    TraceRequest,
    burstiest_window,
    describe,
    draw_image_count,
    load_trace,
    parse_timestamp,
    scale,
)

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZURE_ROWS = [
    "2023-11-16 18:15:46.6805900,374,44",
    "2023-11-16 18:15:50.9951690,396,109",
    "2023-11-16 18:15:51.2224670,879,55",
    "2023-11-16 18:15:51.3910170,91,16",
    "2023-11-16 18:16:47.0000000,1200,7",
]


def write(tmp_path: Path, text: str, name: str = "trace.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def big_trace(tmp_path: Path, n: int = 10_000, rate: float = 5.0, seed: int = 1) -> Path:
    """`n` rows of Poisson arrivals at `rate`/s, Azure format."""
    rng = random.Random(seed)
    t, lines = 0.0, [AZURE_HEADER.strip()]
    for _ in range(n):
        t += rng.expovariate(rate)
        lines.append(f"{t:.6f},{rng.randint(1, 4000)},{rng.randint(1, 500)}")
    return write(tmp_path, "\n".join(lines) + "\n", "big.csv")


# ---- parsing ---------------------------------------------------------------------------------


def test_parses_azure_rows_exactly(tmp_path):
    reqs = load_trace(write(tmp_path, AZURE_HEADER + "\n".join(AZURE_ROWS) + "\n"))
    assert [r.context_tokens for r in reqs] == [374, 396, 879, 91, 1200]
    assert [r.generated_tokens for r in reqs] == [44, 109, 55, 16, 7]
    # seven fractional digits, relative to the first request
    want = [0.0, 4.314579, 4.541877, 4.710427, 60.31941]
    assert [r.arrival_s for r in reqs] == pytest.approx(want, abs=1e-6)
    assert all(isinstance(r, TraceRequest) and r.num_images >= 0 for r in reqs)


def test_parse_timestamp_forms():
    a = parse_timestamp("2023-11-16 18:15:46.6805900")
    assert parse_timestamp("2023-11-16T18:15:46.68059Z") == pytest.approx(a, abs=1e-6)
    assert parse_timestamp("2023-11-16 19:15:46.68059+01:00") == pytest.approx(a, abs=1e-6)
    assert parse_timestamp("12.5") == 12.5
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


def test_num_images_taken_as_is(tmp_path):
    text = ("TIMESTAMP,NumImages,ContextTokens,GeneratedTokens\n"
            "0.0,0,100,10\n0.5,3,200,20\n1.25,16,300,30\n2.0,1,400,40\n")
    path = write(tmp_path, text)
    for seed in (0, 1, 99):
        reqs = load_trace(path, seed=seed)
        assert [r.num_images for r in reqs] == [0, 3, 16, 1]
        assert [r.arrival_s for r in reqs] == [0.0, 0.5, 1.25, 2.0]
        tokens = [(r.context_tokens, r.generated_tokens) for r in reqs]
        assert tokens == [(100, 10), (200, 20), (300, 30), (400, 40)]


def test_rows_sorted_by_time_and_blank_lines_skipped(tmp_path):
    text = "TIMESTAMP,ContextTokens,GeneratedTokens\n3.0,3,3\n1.0,1,1\n\n2.0,2,2\n"
    reqs = load_trace(write(tmp_path, text))
    assert [r.context_tokens for r in reqs] == [1, 2, 3]
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 2.0]


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="GeneratedTokens"):
        load_trace(write(tmp_path, "TIMESTAMP,ContextTokens\n0,1\n"))
    with pytest.raises(ValueError, match="line 3"):
        load_trace(write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n0,1,1\n1,x,1\n"))
    with pytest.raises(ValueError, match="negative"):
        load_trace(write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n0,-1,1\n"))
    assert load_trace(write(tmp_path, "TIMESTAMP,ContextTokens,GeneratedTokens\n")) == []


def test_start_duration_limit(tmp_path):
    path = write(tmp_path, AZURE_HEADER + "\n".join(AZURE_ROWS) + "\n")
    everything = load_trace(path, seed=3)
    cut = load_trace(path, seed=3, start=4.0, duration_s=1.0)
    assert [r.context_tokens for r in cut] == [396, 879, 91]
    assert cut[0].arrival_s == 0.0
    assert cut[1].arrival_s == pytest.approx(everything[2].arrival_s - everything[1].arrival_s)
    # the images a request got do not depend on the cut
    assert [r.num_images for r in cut] == [r.num_images for r in everything[1:4]]
    absolute = load_trace(path, seed=3, start="2023-11-16 18:15:50.5", duration_s=1.0)
    assert absolute == cut
    assert [r.context_tokens for r in load_trace(path, limit=2)] == [374, 396]
    assert load_trace(path, start=1000.0) == []


# ---- the image overlay -----------------------------------------------------------------------


def test_same_seed_same_trace(tmp_path):
    path = big_trace(tmp_path, n=2000)
    a, b = load_trace(path, seed=7), load_trace(path, seed=7)
    assert a == b
    c = load_trace(path, seed=8)
    assert [r.num_images for r in a] != [r.num_images for r in c]
    assert [r.arrival_s for r in a] == [r.arrival_s for r in c]  # only the overlay depends on the seed


def test_limit_keeps_overlay(tmp_path):
    path = big_trace(tmp_path, n=2000)
    assert load_trace(path, seed=2, limit=500) == load_trace(path, seed=2)[:500]


def test_image_count_weights_match_the_published_shape():
    w = IMAGE_COUNT_WEIGHTS
    assert sum(w.values()) == pytest.approx(1.0)
    assert min(w) == 1 and max(w) == 16
    assert w[1] == pytest.approx(0.66)
    assert sum(v for k, v in w.items() if k <= 4) == pytest.approx(0.71)
    assert sum(v for k, v in w.items() if k <= 9) == pytest.approx(0.86)
    assert ImageShape().image_fraction == pytest.approx(0.5)


def test_image_count_distribution_on_10k_draws():
    rng = random.Random(123)
    draws = [draw_image_count(rng) for _ in range(10_000)]
    n = len(draws)
    assert 1 <= min(draws) and max(draws) <= 16
    assert sum(d == 1 for d in draws) / n == pytest.approx(0.66, abs=0.02)
    assert sum(d <= 4 for d in draws) / n == pytest.approx(0.71, abs=0.02)
    assert sum(d <= 9 for d in draws) / n == pytest.approx(0.86, abs=0.02)
    assert sum(d >= 10 for d in draws) / n == pytest.approx(0.14, abs=0.02)


def test_overlay_distribution_on_a_10k_trace(tmp_path):
    """~10k requests over ~33 minutes: half with images overall (the chain averages out over
    its runs, so a wide tolerance), counts among image requests as published."""
    reqs = load_trace(big_trace(tmp_path, n=10_000, rate=5.0), seed=0)
    assert len(reqs) == 10_000
    imgs = [r.num_images for r in reqs if r.num_images]
    assert len(imgs) / len(reqs) == pytest.approx(0.5, abs=0.15)
    k = len(imgs)
    assert sum(d == 1 for d in imgs) / k == pytest.approx(0.66, abs=0.03)
    assert sum(d <= 4 for d in imgs) / k == pytest.approx(0.71, abs=0.03)
    assert sum(d <= 9 for d in imgs) / k == pytest.approx(0.86, abs=0.03)
    assert max(imgs) == 16


def test_overlay_is_bursty_by_minute(tmp_path):
    """Per minute the image fraction sits near the base (1/11) or the burst (10/11) level,
    both occur, and the states come in runs (the chain holds with probability 0.7)."""
    reqs = load_trace(big_trace(tmp_path, n=20_000, rate=5.0), seed=0)
    minutes: dict[int, list[int]] = {}
    for r in reqs:
        minutes.setdefault(int(r.arrival_s // 60), []).append(r.num_images > 0)
    fractions = [sum(v) / len(v) for m, v in sorted(minutes.items()) if len(v) >= 100]
    assert len(fractions) >= 50
    states = [f > 0.5 for f in fractions]
    assert all(f < 0.2 or f > 0.8 for f in fractions)
    assert 0.25 < sum(states) / len(states) < 0.75
    changes = sum(a != b for a, b in zip(states, states[1:]))
    assert changes < 0.5 * (len(states) - 1)  # runs, not independent minutes (0.3 expected)
    # the arrivals themselves are the trace's: text requests are not thinned to make room
    per_minute = [len(v) for m, v in sorted(minutes.items()) if len(v) >= 100]
    assert max(per_minute) / min(per_minute) < 1.5


def test_overlay_period_and_shape_are_parameters(tmp_path):
    path = big_trace(tmp_path, n=3000, rate=5.0)
    always = load_trace(path, shape=ImageShape(base_p=1.0, burst_p=1.0))
    assert all(r.num_images >= 1 for r in always)
    never = load_trace(path, shape=ImageShape(base_p=0.0, burst_p=0.0))
    assert all(r.num_images == 0 for r in never)
    fast = load_trace(path, shape=ImageShape(period_s=1.0), seed=0)
    slow = load_trace(path, shape=ImageShape(period_s=60.0), seed=0)
    assert [r.num_images for r in fast] != [r.num_images for r in slow]


# ---- scale, burstiest_window, describe -------------------------------------------------------


def reqs_at(times, images=None):
    images = images or [0] * len(times)
    return [TraceRequest(t, 1000 + k, 100 + k, n) for k, (t, n) in enumerate(zip(times, images))]


def test_scale():
    src = [TraceRequest(0.0, 2000, 300, 0), TraceRequest(1.5, 40, 3, 5), TraceRequest(2.0, 1, 1, 1)]
    out = scale(src, time_factor=10, context_factor=1 / 8, max_context=128, min_context=8,
                generated_factor=1 / 8, max_generated=16, min_generated=2, max_images=2)
    assert [r.arrival_s for r in out] == [0.0, 15.0, 20.0]
    assert [r.context_tokens for r in out] == [128, 8, 8]  # 250 clipped; 5 and 0 raised to the floor
    assert [r.generated_tokens for r in out] == [16, 2, 2]
    assert [r.num_images for r in out] == [0, 2, 1]  # text-only stays text-only
    assert src[1].num_images == 5  # inputs untouched
    same = scale(src)
    assert same == src
    assert [r.num_images for r in scale(src, max_images=0)] == [0, 1, 1]  # a request with images keeps one
    with pytest.raises(ValueError):
        scale(src, time_factor=0)


def test_burstiest_window_picks_the_densest_window():
    times = [0.0, 5.0, 10.0, 10.2, 10.4, 10.9, 11.5, 20.0, 20.1]
    win = burstiest_window(reqs_at(times), 1.0)
    assert [r.context_tokens for r in win] == [1002, 1003, 1004, 1005]  # 10.0 .. 10.9
    assert [r.arrival_s for r in win] == pytest.approx([0.0, 0.2, 0.4, 0.9])
    # [t, t + w): the request exactly at t + w is out
    assert len(burstiest_window(reqs_at([0.0, 1.0, 2.0]), 1.0)) == 1
    # ties: the earliest window
    assert [r.context_tokens for r in burstiest_window(reqs_at([0.0, 0.5, 3.0, 3.5]), 1.0)] == [1000, 1001]
    assert burstiest_window([], 1.0) == []
    with pytest.raises(ValueError):
        burstiest_window(reqs_at([1.0, 0.0]), 1.0)
    with pytest.raises(ValueError):
        burstiest_window(reqs_at([0.0]), 0.0)


def test_burstiest_window_by_weight():
    times = [0.0, 0.1, 0.2, 5.0, 5.5]
    reqs = reqs_at(times, images=[0, 0, 0, 4, 4])
    assert len(burstiest_window(reqs, 1.0)) == 3
    heavy = burstiest_window(reqs, 1.0, weight=lambda r: 1 + 10 * r.num_images)
    assert [r.num_images for r in heavy] == [4, 4]


def test_burstiest_window_on_a_loaded_trace_keeps_its_rate(tmp_path):
    reqs = load_trace(big_trace(tmp_path, n=5000, rate=5.0), seed=0)
    win = burstiest_window(reqs, 10.0)
    assert win[0].arrival_s == 0.0 and win[-1].arrival_s < 10.0
    assert len(win) >= 50  # at least the mean count of a 10 s window
    assert describe(win)["requests"] == len(win)


def test_describe():
    d = describe(reqs_at([0.0, 1.0, 2.0], images=[0, 2, 1]))
    assert d["requests"] == 3 and d["span_s"] == 2.0 and d["rate_per_s"] == 1.0
    assert d["image_requests"] == 2 and d["images"] == 3
    assert d["images_histogram"] == {"0": 1, "1": 1, "2": 1}
    assert describe([]) == {"requests": 0}
