"""Fits a simulator profile to a live deployment from requests sent one at a time.

A profile measured by `prism profile` times each stage's engine call in one process. A deployment
adds its hops and each stage process's own work, and these differ by stage: the encoder's share
of a request's TTFT is not scaled like the prefill's. The fit therefore works on ISOLATED requests
(each sent after the previous one finished, so no queueing) whose time to first token is additive
in the profile:

    ttft = fixed + e * encode_ms + p * prefill_ms

For each isolated request the simulator gives its encode and prefill parts (the TTFT's change when
that stage's table is stretched by `PROBE`), and a least-squares fit of the live TTFTs in RELATIVE
terms (each request's residual over its live TTFT: a short text prompt weighs as much as a long
multi-image one, as the p50 and p99 errors the fit serves do) gives the scales ``e`` and ``p``
(clipped to ``[LO, HI]``); what is left of the gap, the median of live minus re-simulated TTFT, is
the fixed per-request path (client, gRPC, scheduler, Redis) added to the ``client`` overhead.
Decode steps are scaled by the median of live over simulated time per output token. With no image request among the isolated ones, encode takes the prefill's scale.

`pick_isolated` chooses which requests of a sequence to send alone so that the fit sees every
image count the sequence has and a spread of prompt lengths: without a multi-image request among
them the encoder's scale is a guess.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from prism.sim.profile import SimProfile, StageTable

__all__ = ["PROBE", "Fit", "fit_profile", "pick_isolated", "scaled"]

PROBE = 1.5  # a stage's table is stretched by this to read its part of an isolated TTFT
LO, HI = 0.3, 3.0


@dataclass(frozen=True)
class Fit:
    """What `fit_profile` found: the profile and the numbers behind it."""

    profile: SimProfile
    encode_scale: float
    prefill_scale: float
    decode_scale: float
    client_added_ms: float
    requests: int

    def as_dict(self) -> dict:
        return {"applied": True, "requests": self.requests, "encode_scale": round(self.encode_scale, 4),
                "prefill_scale": round(self.prefill_scale, 4), "decode_scale": round(self.decode_scale, 4),
                "client_overhead_added_ms": round(self.client_added_ms, 2)}


def scaled(profile: SimProfile, **factors: float) -> SimProfile:
    """`profile` with the named stages' tables multiplied by their factors."""
    stages = dict(profile.stages)
    for stage, factor in factors.items():
        t = stages[stage]
        stages[stage] = StageTable({b: tuple((x, ms * factor) for x, ms in pts) for b, pts in t.curves.items()},
                                   t.tp_speedup)
    return replace(profile, stages=stages)


def pick_isolated(images: Sequence[int], prompts: Sequence[int], n: int) -> list[int]:
    """Indices of at most `n` requests, in sequence order: the longest-prompt request of every image
    count first (most images first while `n` lasts), then the remaining slots spread over the prompt
    lengths of the rest (evenly spaced ranks), so the fit sees both the stages' scales."""
    if len(images) != len(prompts):
        raise ValueError("images and prompts differ in length")
    if n <= 0 or not images:
        return []
    chosen: list[int] = []
    for count in sorted(set(images), reverse=True):
        group = [k for k in range(len(images)) if images[k] == count]
        chosen.append(max(group, key=lambda k: (prompts[k], -k)))
        if len(chosen) == n:
            return sorted(chosen)
    rest = sorted((k for k in range(len(images)) if k not in chosen), key=lambda k: (prompts[k], k))
    want = n - len(chosen)
    if want >= len(rest):
        return sorted(chosen + rest)
    step = (len(rest) - 1) / max(1, want - 1) if want > 1 else 0.0
    picks = {rest[round(i * step)] for i in range(want)} if want > 1 else {rest[len(rest) // 2]}
    return sorted(set(chosen) | picks)


def _lstsq(rows: list[tuple[float, ...]], ys: list[float]) -> list[float]:
    """Least squares by the normal equations (a handful of unknowns), Gaussian elimination."""
    m = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(m)] for i in range(m)]
    b = [sum(r[i] * y for r, y in zip(rows, ys)) for i in range(m)]
    for col in range(m):
        piv = max(range(col, m), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-12:
            raise ZeroDivisionError("singular")
        a[col], a[piv], b[col], b[piv] = a[piv], a[col], b[piv], b[col]
        for r in range(m):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col])]
                b[r] -= f * b[col]
    return [b[i] / a[i][i] for i in range(m)]


def fit_profile(profile: SimProfile, live_ttft_ms: Sequence[float | None], live_tpot_ms: Sequence[float | None],
                simulate: Callable[[SimProfile], tuple[list[float | None], list[float | None]]]) -> Fit | None:
    """`profile` fitted to the live isolated requests. `simulate(p)`: the simulated (TTFT, TPOT) of
    the same requests, in the same order, on `p`. None when fewer than two requests completed."""
    base_ttft, base_tpot = simulate(profile)
    enc_ttft, _ = simulate(scaled(profile, encode=PROBE))
    pre_ttft, _ = simulate(scaled(profile, prefill=PROBE))
    rows, ys = [], []
    for live, b, e, p in zip(live_ttft_ms, base_ttft, enc_ttft, pre_ttft):
        if None in (live, b, e, p):
            continue
        enc_ms, pre_ms = (e - b) / (PROBE - 1), (p - b) / (PROBE - 1)
        w = 1.0 / max(live, 1e-3)  # relative residuals
        rows.append((w * enc_ms, w * pre_ms, w))
        ys.append(w * (live - (b - enc_ms - pre_ms)))  # live minus the simulated fixed part
    if len(rows) < 2:
        return None
    try:
        if any(r[0] > 1e-6 for r in rows) and len(rows) >= 3:
            e_s, p_s, _ = _lstsq(rows, ys)
        else:
            p_s, _ = _lstsq([(r[0] + r[1], r[2]) for r in rows], ys)
            e_s = p_s
    except ZeroDivisionError:
        e_s = p_s = 1.0
    e_s, p_s = min(HI, max(LO, e_s)), min(HI, max(LO, p_s))
    ratios = [lv / sv for lv, sv in zip(live_tpot_ms, base_tpot) if lv and sv]
    d_s = statistics.median(ratios) if ratios else 1.0
    fitted = scaled(profile, encode=e_s, prefill=p_s, decode=d_s)
    again, _ = simulate(fitted)
    gaps = [lv - sv for lv, sv in zip(live_ttft_ms, again) if lv is not None and sv is not None]
    gap = statistics.median(gaps) if gaps else 0.0
    overheads = dict(fitted.overheads_ms)
    client = max(0.0, overheads.get("client", 0.0) + gap)
    overheads["client"] = client
    return Fit(replace(fitted, overheads_ms=overheads), e_s, p_s, d_s, client - profile.overheads_ms.get("client", 0.0),
               len(rows))
