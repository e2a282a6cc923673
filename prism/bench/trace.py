"""Request traces for the benchmarks: real arrival traces with a multimodal overlay.

`load_trace` reads any CSV with the columns ``TIMESTAMP``, ``ContextTokens``,
``GeneratedTokens`` and, optionally, ``NumImages`` (the Azure LLM inference traces in
``/work/shared/traces``, or the multimodal Azure trace of 2025 when it is available). Where
``NumImages`` is missing it is drawn, with a fixed seed, from the published shape of the
multimodal trace (``/work/shared/traces/README.md``):

* half of the requests carry images, half are text-only;
* of the image requests about 66% carry 1 image, about 71% at most 4, about 86% at most 9,
  and the rest 10 to 16 (`IMAGE_COUNT_WEIGHTS`, uniform within each of those ranges);
* image requests come in bursts uncorrelated with the text arrivals: a two-state Markov chain
  over the trace's minutes (`ImageShape`) switches the image probability between a *base*
  state (1/11) and a *burst* state (10/11), so image counts per minute burst about 10x over
  baseline while the arrivals themselves are the trace's; each state holds for a minute with
  probability 0.7 (runs of ~3.3 minutes) and the chain spends half of the time in each, which
  keeps the overall image fraction at one half.

The draws are made for every row of the file in time order before any selection (`start`,
`duration_s`, `limit`), so a request keeps its image count however the trace is cut.

`scale` fits a trace to a small model on a CPU (stretch time, shrink and clip token counts and
image counts); `burstiest_window` picks the window with the highest arrival rate; `describe`
summarises a request list for a report.
"""

from __future__ import annotations

import bisect
import csv
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "IMAGE_COUNT_WEIGHTS",
    "ImageShape",
    "TraceRequest",
    "burstiest_window",
    "describe",
    "draw_image_count",
    "load_trace",
    "parse_timestamp",
    "scale",
]


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float
    """Seconds after the first request of the (selected) trace."""
    context_tokens: int
    generated_tokens: int
    num_images: int

    @property
    def has_images(self) -> bool:
        return self.num_images > 0


def _count_weights() -> dict[int, float]:
    w = {1: 0.66}
    w.update({k: 0.05 / 3 for k in range(2, 5)})  # 2-4: 71% - 66%
    w.update({k: 0.15 / 5 for k in range(5, 10)})  # 5-9: 86% - 71%
    w.update({k: 0.14 / 7 for k in range(10, 17)})  # 10-16: the heavy tail
    return w


IMAGE_COUNT_WEIGHTS: dict[int, float] = _count_weights()
"""P(n images | the request has images), n = 1..16."""


@dataclass(frozen=True)
class ImageShape:
    """The multimodal overlay drawn where a trace has no ``NumImages`` (module docstring)."""

    base_p: float = 1 / 11
    """Probability that a request carries images in the base state."""
    burst_p: float = 10 / 11
    """... in the burst state (10x the base image rate at the same arrival rate)."""
    stay_base: float = 0.7
    """Probability that the base state holds for the next period."""
    stay_burst: float = 0.7
    period_s: float = 60.0
    """The chain steps once per period (a minute: the README's per-minute burst measure)."""
    counts: tuple[tuple[int, float], ...] = tuple(IMAGE_COUNT_WEIGHTS.items())

    @property
    def image_fraction(self) -> float:
        """Long-run fraction of requests with images."""
        leave_base, leave_burst = 1 - self.stay_base, 1 - self.stay_burst
        pi_burst = leave_base / (leave_base + leave_burst) if leave_base + leave_burst > 0 else 0.5
        return self.base_p * (1 - pi_burst) + self.burst_p * pi_burst


def draw_image_count(rng: random.Random,
                     counts: Sequence[tuple[int, float]] = tuple(IMAGE_COUNT_WEIGHTS.items())) -> int:
    """One image count (>= 1) of an image request."""
    values, weights = zip(*counts)
    return rng.choices(values, weights)[0]


def parse_timestamp(text: str) -> float:
    """Seconds (float) from ``2023-11-16 18:15:46.6805900`` (any number of fractional digits,
    ``T`` or space, optional ``Z``/offset; naive times are taken as UTC) or from a plain number
    of seconds."""
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    frac = 0.0
    main = s
    tz = ""
    if s.endswith("Z"):
        main, tz = s[:-1], "+00:00"
    # Split off an offset after the time part (a '+' or a '-' past the date).
    for sign in ("+", "-"):
        k = main.rfind(sign)
        if k > 10:
            main, tz = main[:k], main[k:]
            break
    if "." in main:
        main, digits = main.split(".", 1)
        if not digits.isdigit():
            raise ValueError(f"bad timestamp {text!r}")
        frac = int(digits) / 10 ** len(digits)
    try:
        when = datetime.fromisoformat(main.replace(" ", "T") + tz)
    except ValueError:
        raise ValueError(f"bad timestamp {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() + frac


def _int_field(row: dict, name: str, line: int) -> int:
    raw = (row.get(name) or "").strip()
    try:
        value = int(raw) if raw.lstrip("-").isdigit() else int(float(raw))
    except ValueError:
        raise ValueError(f"line {line}: {name} {raw!r} is not a number") from None
    if value < 0:
        raise ValueError(f"line {line}: {name} {value} is negative")
    return value


def load_trace(
    path: str | Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    start: float | str | None = None,
    duration_s: float | None = None,
    shape: ImageShape = ImageShape(),
) -> list[TraceRequest]:
    """The requests of a trace CSV in arrival order (module docstring).

    Args:
        path: CSV with ``TIMESTAMP``, ``ContextTokens``, ``GeneratedTokens`` and optionally
            ``NumImages`` (taken as it is when present: no draw for that file).
        seed: seed of the ``NumImages`` overlay (same seed, same counts).
        limit: keep at most this many requests (after `start`/`duration_s`).
        start: keep requests from here on: seconds after the file's first request (a number),
            or an absolute timestamp string (as in the file).
        duration_s: keep requests arriving within this many seconds from `start` (or from the
            file's first request).
        shape: the overlay's parameters.

    Returns ``TraceRequest`` s whose ``arrival_s`` counts from the first request kept.
    """
    rows: list[tuple[float, int, int, int, int | None]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = {name.strip() for name in reader.fieldnames or ()}
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - fields
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        has_images = "NumImages" in fields
        for k, row in enumerate(reader):
            row = {key.strip(): value for key, value in row.items() if key is not None}
            line = k + 2
            stamp = row.get("TIMESTAMP") or ""
            if not stamp.strip():
                continue  # a blank line
            try:
                t = parse_timestamp(stamp)
            except ValueError as exc:
                raise ValueError(f"line {line}: {exc}") from None
            images = _int_field(row, "NumImages", line) if has_images else None
            rows.append((t, k, _int_field(row, "ContextTokens", line),
                         _int_field(row, "GeneratedTokens", line), images))
    rows.sort(key=lambda r: (r[0], r[1]))
    if not rows:
        return []

    first = rows[0][0]
    if not has_images:
        rows = _overlay_images(rows, first, seed, shape)

    lo = first
    if start is not None:
        lo = parse_timestamp(start) if isinstance(start, str) else first + float(start)
    hi = math.inf if duration_s is None else lo + float(duration_s)
    kept = [r for r in rows if lo <= r[0] < hi]
    if limit is not None:
        kept = kept[: max(0, int(limit))]
    if not kept:
        return []
    t0 = kept[0][0]
    return [TraceRequest(t - t0, ctx, gen, int(images)) for t, _, ctx, gen, images in kept]


def _overlay_images(rows: list, first: float, seed: int, shape: ImageShape) -> list:
    """Draws NumImages for every row (time order): the Markov chain steps once per period
    from a state drawn from its stationary distribution; one stream for the chain, one for the
    requests, so the chain does not depend on how many requests a period holds."""
    chain = random.Random(f"prism-trace-chain:{seed}")
    draws = random.Random(f"prism-trace-images:{seed}")
    leave_base, leave_burst = 1 - shape.stay_base, 1 - shape.stay_burst
    pi_burst = leave_base / (leave_base + leave_burst) if leave_base + leave_burst > 0 else 0.5
    burst = chain.random() < pi_burst
    period = 0
    out = []
    for t, k, ctx, gen, _ in rows:
        target = int((t - first) // shape.period_s)
        while period < target:
            burst = chain.random() < (shape.stay_burst if burst else 1 - shape.stay_base)
            period += 1
        p = shape.burst_p if burst else shape.base_p
        images = draw_image_count(draws, shape.counts) if draws.random() < p else 0
        out.append((t, k, ctx, gen, images))
    return out


def scale(
    requests: Sequence[TraceRequest],
    *,
    time_factor: float = 1.0,
    max_context: int | None = None,
    max_generated: int | None = None,
    max_images: int | None = None,
    context_factor: float = 1.0,
    generated_factor: float = 1.0,
    min_context: int = 1,
    min_generated: int = 1,
) -> list[TraceRequest]:
    """Fits a trace to a smaller machine: arrival times multiplied by `time_factor` (> 1
    stretches, i.e. lowers the rate); token counts multiplied by their factor, rounded, then
    clipped to ``[min_*, max_*]``; image counts clipped to `max_images` (a request with images
    keeps at least one, so the text-only/image mix is unchanged)."""
    if time_factor <= 0 or context_factor <= 0 or generated_factor <= 0:
        raise ValueError("factors must be > 0")

    def fit(value: int, factor: float, lo: int, hi: int | None) -> int:
        v = max(lo, round(value * factor))
        return v if hi is None else min(hi, v)

    out = []
    for r in requests:
        images = r.num_images if max_images is None else min(r.num_images, max_images)
        if r.num_images > 0 and max_images is not None:
            images = max(1, images)
        out.append(replace(
            r, arrival_s=r.arrival_s * time_factor,
            context_tokens=fit(r.context_tokens, context_factor, min_context, max_context),
            generated_tokens=fit(r.generated_tokens, generated_factor, min_generated, max_generated),
            num_images=images))
    return out


def burstiest_window(
    requests: Sequence[TraceRequest],
    window_s: float,
    *,
    weight: Callable[[TraceRequest], float] | None = None,
) -> list[TraceRequest]:
    """The requests of the `window_s`-long window ``[t, t + window_s)`` starting at a request
    that holds the most requests (or the most total `weight`), the earliest on ties; arrival
    times re-based so that the window's first request is at 0. `requests` must be in arrival
    order (as `load_trace` returns them)."""
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    if not requests:
        return []
    times = [r.arrival_s for r in requests]
    if any(b < a for a, b in zip(times, times[1:])):
        raise ValueError("requests must be in arrival order")
    w = [1.0 if weight is None else float(weight(r)) for r in requests]
    prefix = [0.0]
    for x in w:
        prefix.append(prefix[-1] + x)
    best_i, best_j, best = 0, 0, -math.inf
    for i, t in enumerate(times):
        j = bisect.bisect_left(times, t + window_s, lo=i)
        total = prefix[j] - prefix[i]
        if total > best + 1e-12:
            best_i, best_j, best = i, j, total
    t0 = times[best_i]
    return [replace(r, arrival_s=r.arrival_s - t0) for r in requests[best_i:best_j]]


def describe(requests: Sequence[TraceRequest]) -> dict:
    """Counts, rates and token/image statistics of a request list (for reports)."""
    n = len(requests)
    if not n:
        return {"requests": 0}
    span = requests[-1].arrival_s - requests[0].arrival_s
    with_images = [r for r in requests if r.num_images]
    hist: dict[int, int] = {}
    for r in requests:
        hist[r.num_images] = hist.get(r.num_images, 0) + 1
    return {
        "requests": n,
        "span_s": round(span, 3),
        "rate_per_s": round((n - 1) / span, 3) if span > 0 else None,
        "image_requests": len(with_images),
        "image_fraction": round(len(with_images) / n, 4),
        "images": sum(r.num_images for r in requests),
        "images_histogram": {str(k): hist[k] for k in sorted(hist)},
        "context_tokens_median": statistics.median(r.context_tokens for r in requests),
        "context_tokens_max": max(r.context_tokens for r in requests),
        "generated_tokens_median": statistics.median(r.generated_tokens for r in requests),
        "generated_tokens_max": max(r.generated_tokens for r in requests),
    }
