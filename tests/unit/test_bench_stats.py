"""Unit tests for prism/bench/stats.py: record arithmetic, quantiles, the summary of a synthetic
run with hand-computed answers, and the max-load search on synthetic monotone functions."""
from __future__ import annotations

import pytest

from prism.bench.stats import RequestRecord, cdf, is_good, max_load, quantile, summarize


def rec(sent, first, done, tokens, status="OK", expected=0, arrival=None):
    return RequestRecord(arrival_s=sent if arrival is None else arrival, sent_s=sent, first_token_s=first,
                         done_s=done, tokens=tokens, status=status, expected_tokens=expected)


def test_record_times():
    r = rec(1.0, 1.25, 2.25, 5, arrival=0.9)
    assert r.ttft_ms == pytest.approx(250.0)
    assert r.tpot_ms == pytest.approx(250.0)  # 1 s over 4 tokens after the first
    assert r.e2e_ms == pytest.approx(1250.0)
    assert r.late_ms == pytest.approx(100.0)
    assert rec(0, 0.1, 0.1, 1).tpot_ms is None
    assert rec(0, None, 0.3, 0, status="RESOURCE_EXHAUSTED").ttft_ms is None
    with pytest.raises(ValueError):
        rec(0, None, 0, -1)
    with pytest.raises(ValueError):
        rec(0, None, 0, 0, status="")


def test_quantile_linear_interpolation():
    xs = [40, 10, 30, 20]  # sorted: 10 20 30 40
    assert quantile(xs, 0.0) == 10
    assert quantile(xs, 1.0) == 40
    assert quantile(xs, 0.5) == pytest.approx(25.0)
    assert quantile(xs, 0.9) == pytest.approx(37.0)  # pos 2.7: 30 + 0.7 * 10
    assert quantile(range(1, 102), 0.99) == pytest.approx(100.0)  # pos 99
    assert quantile([], 0.5) is None
    assert quantile([7], 0.99) == 7
    with pytest.raises(ValueError):
        quantile([1], 1.5)
    assert cdf([3, 1, 2]) == ([1, 2, 3], [1 / 3, 2 / 3, 1.0])


def synthetic_run():
    """Ten requests over a 10 s run: TTFT 100..1000 ms (request k: 100*(k+1)), each 11 tokens
    with TPOT 10 ms except k=8 (TPOT 60 ms); k=9 refused, k=7 cut short (5 of 11 tokens)."""
    out = []
    for k in range(10):
        sent = float(k)
        first = sent + 0.1 * (k + 1)
        tpot = 0.06 if k == 8 else 0.01
        if k == 9:
            out.append(rec(sent, None, sent + 0.001, 0, status="RESOURCE_EXHAUSTED", expected=11))
        elif k == 7:
            out.append(rec(sent, first, first + 4 * tpot, 5, expected=11))
        else:
            out.append(rec(sent, first, first + 10 * tpot, 11, expected=11))
    return out


def test_summarize_known_answers():
    s = summarize(synthetic_run(), ttft_slo_ms=550, tpot_slo_ms=20, duration_s=10.0)
    assert s["requests"] == 10 and s["completed"] == 9 and s["failed"] == 1
    assert s["counts"] == {"OK": 9, "RESOURCE_EXHAUSTED": 1}
    # good: OK, all tokens, ttft <= 550 (k = 0..4), tpot <= 20 -> 5 requests
    assert s["good"] == 5
    assert s["goodput_rps"] == 0.5
    assert s["slo_attainment"] == 0.5
    assert s["throughput_rps"] == 0.9
    assert s["output_tokens_per_s"] == pytest.approx((8 * 11 + 5) / 10.0)
    # TTFT over the 9 completed: 100..900 ms -> p50 500, p90 = 820 (pos 7.2), p99 = 892 (pos 7.92)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["ttft_ms"]["p90"] == pytest.approx(820.0)
    assert s["ttft_ms"]["p99"] == pytest.approx(892.0)
    assert s["ttft_ms"]["n"] == 9
    # TPOT: eight at 10 ms and one at 60 ms -> p50 10, p90 = 10 + 0.2 * 50 = 20, p99 = 10 + 0.92 * 50
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)
    assert s["tpot_ms"]["p90"] == pytest.approx(20.0)
    assert s["tpot_ms"]["p99"] == pytest.approx(56.0)
    assert s["ttft_attainment"] == 0.5  # 5 of 10 sent within 550 ms
    assert s["tpot_attainment"] == 0.8  # 8 of 10 sent (k=8 slow, k=9 failed)
    assert s["makespan_s"] == pytest.approx(9.5)  # k=8 ends last: sent 8, first token 8.9, done 9.5
    assert s["slo"] == {"ttft_ms": 550, "tpot_ms": 20}


def test_is_good_edges():
    one = rec(0, 0.1, 0.1, 1, expected=1)
    assert is_good(one, ttft_slo_ms=100, tpot_slo_ms=1)  # no TPOT for one token
    assert not is_good(one, ttft_slo_ms=99.9, tpot_slo_ms=1)
    assert not is_good(rec(0, 0.1, 0.2, 2, expected=3), ttft_slo_ms=1000, tpot_slo_ms=1000)
    assert is_good(rec(0, 0.1, 0.2, 2), ttft_slo_ms=1000, tpot_slo_ms=1000)  # expected 0: not checked


def test_summarize_empty_and_bad_arguments():
    s = summarize([], ttft_slo_ms=1, tpot_slo_ms=1, duration_s=1)
    assert s["requests"] == 0 and s["slo_attainment"] is None and s["ttft_ms"]["p50"] is None
    with pytest.raises(ValueError):
        summarize([], ttft_slo_ms=1, tpot_slo_ms=1, duration_s=0)
    with pytest.raises(ValueError):
        summarize([], ttft_slo_ms=0, tpot_slo_ms=1, duration_s=1)


def step(capacity):
    """Attainment 1 up to `capacity`, then falling: a monotone load curve."""
    calls = []

    def f(s):
        calls.append(s)
        return 1.0 if s <= capacity else max(0.0, 1.0 - (s - capacity))
    return f, calls


def test_max_load_grows_then_bisects():
    f, calls = step(5.0)
    res = max_load(f, target=0.9, start=1.0, rel_tol=0.05)
    assert calls[:4] == [1.0, 2.0, 4.0, 8.0]  # doubling until 8 fails (attainment 0)
    assert res.best is not None and res.first_failing is not None
    # the true boundary (5.1: attainment 1 - 0.1) is bracketed within the tolerance
    assert res.best <= 5.1 + 1e-9 < res.first_failing
    assert res.first_failing / res.best <= 1.05
    assert [p.scale for p in res.probes] == calls
    assert all(p.ok == (p.attainment >= 0.9) for p in res.probes)
    d = res.as_dict()
    assert d["max_scale"] == res.best and len(d["probes"]) == len(calls)


def test_max_load_shrinks_when_the_start_fails():
    f, calls = step(0.3)
    res = max_load(f, start=1.0, rel_tol=0.1)
    assert calls[:3] == [1.0, 0.5, 0.25]
    assert 0.25 <= res.best <= 0.4 < res.first_failing  # boundary 0.4
    assert res.first_failing / res.best <= 1.1


def test_max_load_limits():
    f, _ = step(1000.0)
    res = max_load(f, start=1.0, max_scale=16.0)
    assert res.best == 16.0 and res.first_failing is None
    f, calls = step(0.0)
    res = max_load(lambda s: 0.0, start=1.0, min_scale=0.25)
    assert res.best is None and res.first_failing == 0.25
    f, calls = step(5.0)
    res = max_load(f, max_probes=3)
    assert len(res.probes) == 3
    res = max_load(lambda s: (1.0 if s < 3 else 0.0, {"s": s}), rel_tol=0.5)
    assert res.probes[0].result == {"s": 1.0}
    with pytest.raises(ValueError):
        max_load(f, target=0.0)
    with pytest.raises(ValueError):
        max_load(f, grow=1.0)
