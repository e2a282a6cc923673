"""Statistics of a replayed run: per-request records in, one summary dict out (pure: no gRPC).

A run is a list of :class:`RequestRecord` (times in seconds from the run's start). From them
:func:`summarize` computes what ``prism bench`` and the simulator report:

* TTFT (first token received less sent), TPOT (the time after the first token over the
  tokens after the first) and end-to-end latency (done less sent), in ms, at p50/p90/p99
  (linear interpolation between order statistics, numpy's default), over successful requests;
* throughput (successful requests per second of `duration_s`) and token throughput;
* goodput: requests that succeeded with all their tokens and met both SLO targets, per second;
* SLO attainment: that number over every request sent (failures count against it);
* counts by status (gRPC code names).

:func:`max_load` searches the largest load (a rate scale) at which a monotone attainment
function still reaches a target: double until it fails, then bisect.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "QUANTILES",
    "LoadProbe",
    "MaxLoad",
    "RequestRecord",
    "cdf",
    "is_good",
    "max_load",
    "quantile",
    "summarize",
]

#: The quantiles every latency is reported at.
QUANTILES: tuple[tuple[str, float], ...] = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


@dataclass(frozen=True)
class RequestRecord:
    """One request of a run. Times are seconds from the run's start (any one clock)."""

    arrival_s: float
    """When the trace says it arrives (the open-loop schedule)."""
    sent_s: float
    """When it was actually sent (>= arrival_s; the gap is the load generator's lag)."""
    first_token_s: float | None
    """When its first generated token was received; None if none was."""
    done_s: float
    """When its call ended (last message, or the error)."""
    tokens: int
    """Generated tokens received."""
    status: str
    """The call's gRPC status code name: "OK" on success, e.g. "RESOURCE_EXHAUSTED"."""
    expected_tokens: int = 0
    """Tokens asked for (forced with ignore_eos); 0: not checked. A successful call that got
    fewer does not count as good."""
    num_images: int = 0
    message: str = ""
    """The error's message, for failed calls."""
    strategy: str = ""
    """Modality selection: the reduction id served ("full": as sent); empty when not known."""
    expected_accuracy: float | None = None
    """Modality selection: the profiled accuracy of what was served; None when not known."""

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.expected_tokens < 0 or self.num_images < 0:
            raise ValueError("tokens, expected_tokens and num_images must be >= 0")
        if not self.status:
            raise ValueError("status must be a status code name")

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.sent_s) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.first_token_s is None or self.tokens < 2:
            return None
        return (self.done_s - self.first_token_s) * 1000.0 / (self.tokens - 1)

    @property
    def e2e_ms(self) -> float:
        return (self.done_s - self.sent_s) * 1000.0

    @property
    def late_ms(self) -> float:
        return (self.sent_s - self.arrival_s) * 1000.0


def quantile(values: Iterable[float], q: float) -> float | None:
    """The `q` quantile (0..1) by linear interpolation between order statistics (numpy's
    default ``linear`` method); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be in [0, 1]")
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cdf(values: Iterable[float]) -> tuple[list[float], list[float]]:
    """Empirical CDF points: sorted values and the fraction at or below each."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(k + 1) / n for k in range(n)]


def is_good(r: RequestRecord, *, ttft_slo_ms: float, tpot_slo_ms: float) -> bool:
    """Succeeded with every token asked for, TTFT and TPOT within their targets (a request
    of one token has no TPOT and meets that target)."""
    if not r.ok or r.ttft_ms is None:
        return False
    if r.expected_tokens and r.tokens < r.expected_tokens:
        return False
    tpot = r.tpot_ms
    return r.ttft_ms <= ttft_slo_ms and (tpot is None or tpot <= tpot_slo_ms)


def _rounded(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _quantiles(values: Sequence[float]) -> dict:
    out = {name: _rounded(quantile(values, q)) for name, q in QUANTILES}
    out["mean"] = _rounded(sum(values) / len(values)) if values else None
    out["n"] = len(values)
    return out


def summarize(records: Sequence[RequestRecord], *, ttft_slo_ms: float, tpot_slo_ms: float,
              duration_s: float) -> dict:
    """The run's summary (module docstring). `duration_s`: the time rates are taken over
    (normally the trace's span as replayed, or the makespan; must be > 0)."""
    if duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    if ttft_slo_ms <= 0 or tpot_slo_ms <= 0:
        raise ValueError("ttft_slo_ms and tpot_slo_ms must be > 0")
    ok = [r for r in records if r.ok]
    good = [r for r in records if is_good(r, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms)]
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    n = len(records)
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    tpot = [r.tpot_ms for r in ok if r.tpot_ms is not None]
    return {
        "requests": n,
        "completed": len(ok),
        "failed": n - len(ok),
        "good": len(good),
        "counts": dict(sorted(counts.items())),
        "duration_s": round(duration_s, 3),
        "ttft_ms": _quantiles(ttft),
        "tpot_ms": _quantiles(tpot),
        "e2e_ms": _quantiles([r.e2e_ms for r in ok]),
        "send_late_ms": _quantiles([r.late_ms for r in records]),
        "throughput_rps": round(len(ok) / duration_s, 4),
        "output_tokens_per_s": round(sum(r.tokens for r in ok) / duration_s, 3),
        "goodput_rps": round(len(good) / duration_s, 4),
        "slo_attainment": round(len(good) / n, 4) if n else None,
        "ttft_attainment": round(sum(1 for x in ttft if x <= ttft_slo_ms) / n, 4) if n else None,
        "tpot_attainment": round(sum(1 for r in ok if r.tpot_ms is None or r.tpot_ms <= tpot_slo_ms) / n, 4)
        if n else None,
        "slo": {"ttft_ms": ttft_slo_ms, "tpot_ms": tpot_slo_ms},
        "makespan_s": round(max(r.done_s for r in records) - min(r.sent_s for r in records), 3) if n else 0.0,
    }


@dataclass(frozen=True)
class LoadProbe:
    """One measured point of the search."""

    scale: float
    attainment: float
    ok: bool
    result: object = None
    """Whatever the probe returned besides its attainment (e.g. the run's summary)."""


@dataclass(frozen=True)
class MaxLoad:
    """The search's answer: the largest scale seen meeting the target (None if even the
    lowest failed), the smallest seen failing (None if none failed up to the cap), and every
    probe in the order run."""

    target: float
    best: float | None
    first_failing: float | None
    probes: tuple[LoadProbe, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict:
        return {"target_attainment": self.target, "max_scale": self.best,
                "first_failing_scale": self.first_failing,
                "probes": [{"scale": p.scale, "attainment": p.attainment, "meets": p.ok} for p in self.probes]}


def max_load(attainment_at: Callable[[float], float | tuple[float, object]], *, target: float = 0.9,
             start: float = 1.0, grow: float = 2.0, max_scale: float = 64.0, min_scale: float = 1 / 64,
             rel_tol: float = 0.1, max_probes: int = 12) -> MaxLoad:
    """The largest scale `s` with ``attainment_at(s) >= target``, assuming attainment falls as
    the load grows: from `start`, multiply by `grow` while it meets the target (up to
    `max_scale`) or divide while it fails (down to `min_scale`), then bisect (geometric mean)
    between the last meeting and the first failing scale until their ratio is within
    ``1 + rel_tol`` or `max_probes` probes ran. `attainment_at` may return the attainment or
    ``(attainment, anything)``; the extra is kept on the probe."""
    if not 0 < target <= 1:
        raise ValueError("target must be in (0, 1]")
    if start <= 0 or grow <= 1 or min_scale <= 0 or max_scale < start or min_scale > start:
        raise ValueError("need 0 < min_scale <= start <= max_scale and grow > 1")
    probes: list[LoadProbe] = []

    def probe(s: float) -> bool:
        got = attainment_at(s)
        value, extra = got if isinstance(got, tuple) else (got, None)
        meets = value >= target
        probes.append(LoadProbe(s, float(value), meets, extra))
        return meets

    good: float | None = None
    bad: float | None = None
    s = start
    if probe(s):
        good = s
        while s < max_scale and len(probes) < max_probes:
            s = min(max_scale, s * grow)
            if not probe(s):
                bad = s
                break
            good = s
    else:
        bad = s
        while s > min_scale and len(probes) < max_probes:
            s = max(min_scale, s / grow)
            if probe(s):
                good = s
                break
            bad = s
    while good is not None and bad is not None and bad / good > 1 + rel_tol and len(probes) < max_probes:
        mid = math.sqrt(good * bad)
        if probe(mid):
            good = mid
        else:
            bad = mid
    return MaxLoad(target, good, bad, tuple(probes))
