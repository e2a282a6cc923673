"""One `prism bench` run: a trace cut and scaled to the deployment, replayed at the chosen rate,
summarised against the SLO, optionally the largest rate scale that still meets it, a JSON
report and PNG plots.

Rates: ``rate_scale`` multiplies the trace's arrival rate (0.05: a twentieth of production).
Each replay lasts ``duration_s`` of wall time: it takes ``duration_s * rate_scale`` seconds of
the trace (from ``start_s``, or its burstiest window) and stretches them by ``1 / rate_scale``,
so a higher scale sends more requests in the same time. Token counts are shrunk and clipped to
the model (`prism.bench.workload.fit`); outputs are forced to the traced (scaled) lengths.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from prism.bench import stats
from prism.bench.trace import ImageShape, TraceRequest, burstiest_window, describe, load_trace, scale
from prism.bench.workload import ModelLimits, Workload, fit

__all__ = ["BenchConfig", "requests_at", "run_bench"]


@dataclass(frozen=True)
class BenchConfig:
    """Everything a `prism bench` run needs besides the deployment's address."""

    trace: Path
    """CSV with TIMESTAMP, ContextTokens, GeneratedTokens (and optionally NumImages)."""
    out_dir: Path
    """Where report.json and the PNGs go (created)."""
    rate_scale: float = 0.05
    """Multiplies the trace's arrival rate."""
    duration_s: float = 60.0
    """Wall seconds of each replay."""
    ttft_slo_ms: float = 2000.0
    """Time to first token target."""
    tpot_slo_ms: float = 200.0
    """Time per output token target."""
    start_s: float | None = None
    """Seconds into the trace to start from; None: its burstiest window of that length."""
    seed: int = 0
    """Seed of the NumImages overlay (where the trace has none) and of the request bodies."""
    image_period_s: float = 60.0
    """The overlay's burst chain steps once per this many trace seconds."""
    context_factor: float = 1 / 8
    """Traced prompt tokens are multiplied by this, then clipped to the model's context."""
    generated_factor: float = 1 / 8
    """Traced output tokens are multiplied by this."""
    max_generated: int = 64
    """Cap on forced output tokens."""
    image_side: int = 0
    """Image side in pixels; 0: drawn from the multimodal trace's shape (median ~500 px)."""
    search: bool = False
    """Also search the largest rate scale whose SLO attainment reaches `target_attainment`."""
    target_attainment: float = 0.9
    search_probes: int = 6
    """At most this many replays in the search (each `duration_s` long)."""
    send_slo: bool = False
    """Put the TTFT/TPOT targets on each request (the scheduler may then refuse early)."""
    timeout_s: float = 300.0
    """Per-request deadline of the call."""
    plots: bool = True

    def __post_init__(self) -> None:
        if not Path(self.trace).is_file():
            raise ValueError(f"trace: {self.trace} is not a file")
        for name in ("rate_scale", "duration_s", "ttft_slo_ms", "tpot_slo_ms", "context_factor",
                     "generated_factor", "timeout_s", "image_period_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.start_s is not None and self.start_s < 0:
            raise ValueError("start_s: must be >= 0")
        if not 0 < self.target_attainment <= 1:
            raise ValueError("target_attainment: must be in (0, 1]")
        if self.max_generated < 1 or self.search_probes < 1 or self.image_side < 0:
            raise ValueError("max_generated and search_probes must be >= 1, image_side >= 0")


def requests_at(trace: list[TraceRequest], cfg: BenchConfig, limits: ModelLimits,
                rate_scale: float) -> list[TraceRequest]:
    """The requests of one replay at `rate_scale` (module docstring)."""
    span = cfg.duration_s * rate_scale
    if cfg.start_s is None:
        window = burstiest_window(trace, span)
    else:
        lo = cfg.start_s
        window = [r for r in trace if lo <= r.arrival_s < lo + span]
        window = [TraceRequest(r.arrival_s - lo, r.context_tokens, r.generated_tokens, r.num_images)
                  for r in window]
    stretched = scale(window, time_factor=1 / rate_scale)
    return fit(stretched, limits, context_factor=cfg.context_factor, generated_factor=cfg.generated_factor,
               max_generated=cfg.max_generated)


def run_bench(address, cfg: BenchConfig, *, limits: ModelLimits | None = None,
              progress: Callable[[str, int], Callable[[stats.RequestRecord], None]] | None = None,
              log: Callable[[str], None] = lambda msg: None) -> dict:
    """Runs the benchmark against `address` (a ``host:port`` or a `prism.bench.replay.Target`)
    and writes ``report.json`` (and the plots) into ``cfg.out_dir``; returns the report.
    `progress(label, total)` returns the callback each finished request is passed to."""
    from prism.bench.replay import probe_limits, replay

    started = time.time()
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if limits is None:
        log("probing the deployment (ListModels, three one-token requests)")
        limits = probe_limits(address)
    trace = load_trace(cfg.trace, seed=cfg.seed, shape=ImageShape(period_s=cfg.image_period_s))
    if not trace:
        raise ValueError(f"trace: {cfg.trace} has no requests")
    workload = Workload(limits, seed=cfg.seed, image_side_px=cfg.image_side)
    send_slo = (round(cfg.ttft_slo_ms), round(cfg.tpot_slo_ms)) if cfg.send_slo else (0, 0)

    def one_run(rate_scale: float, label: str) -> tuple[dict, list[stats.RequestRecord], list[TraceRequest]]:
        reqs = requests_at(trace, cfg, limits, rate_scale)
        if not reqs:
            raise ValueError(f"no requests in {cfg.duration_s * rate_scale:.1f} s of the trace at scale {rate_scale}")
        log(f"{label}: {len(reqs)} requests over {cfg.duration_s:g} s (rate scale {rate_scale:.4g})")
        callback = progress(label, len(reqs)) if progress else None
        records = replay(address, reqs, workload=workload, timeout_s=cfg.timeout_s, send_slo=send_slo,
                         on_record=callback)
        duration = max(cfg.duration_s, max(r.arrival_s for r in reqs))
        summary = stats.summarize(records, ttft_slo_ms=cfg.ttft_slo_ms, tpot_slo_ms=cfg.tpot_slo_ms,
                                  duration_s=duration)
        summary["rate_scale"] = rate_scale
        summary["offered_rps"] = round(len(reqs) / duration, 4)
        summary["sent"] = len(records)
        summary["workload"] = describe(reqs)
        return summary, records, reqs

    main, records, reqs = one_run(cfg.rate_scale, "replay")
    report: dict = {
        "kind": "prism-bench",
        "address": address if isinstance(address, str) else address.address,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "model_limits": asdict(limits),
        "trace": {"path": str(cfg.trace), "requests": len(trace), "rate_per_s": describe(trace)["rate_per_s"]},
        "run": main,
        "records": [{"arrival_s": round(r.arrival_s, 4), "sent_s": round(r.sent_s, 4),
                     "first_token_s": None if r.first_token_s is None else round(r.first_token_s, 4),
                     "done_s": round(r.done_s, 4), "tokens": r.tokens, "expected_tokens": r.expected_tokens,
                     "num_images": r.num_images, "status": r.status, "message": r.message} for r in records],
    }
    points = [main]
    if cfg.search:
        cache = {cfg.rate_scale: main}

        def attainment(s: float):
            if s not in cache:
                cache[s] = one_run(s, f"search x{s:.3g}")[0]
            return cache[s]["slo_attainment"] or 0.0, cache[s]

        found = stats.max_load(attainment, target=cfg.target_attainment, start=cfg.rate_scale,
                               max_probes=cfg.search_probes, max_scale=cfg.rate_scale * 256,
                               min_scale=cfg.rate_scale / 256)
        best = cache.get(found.best) if found.best is not None else None
        report["max_load"] = found.as_dict() | {
            "max_rate_scale": found.best,
            "max_offered_rps": best["offered_rps"] if best else None,
            "goodput_rps_at_max": best["goodput_rps"] if best else None,
        }
        points = [s for k, s in sorted(cache.items())]
        report["search_runs"] = [{k: s[k] for k in ("rate_scale", "offered_rps", "requests", "completed", "good",
                                                    "throughput_rps", "goodput_rps", "slo_attainment", "counts")}
                                 | {"ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p99_ms": s["tpot_ms"]["p99"]}
                                 for s in points]
    if cfg.plots:
        title = f"{report['address']} at {cfg.rate_scale:g}x the trace's rate"
        report["plots"] = {
            "latency_cdf": str(stats_plot(records, out_dir / "latency_cdf.png", cfg, title)),
            "goodput_vs_load": str(goodput_plot(points, out_dir / "goodput_vs_load.png", cfg)),
        }
    report["wall_s"] = round(time.time() - started, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def stats_plot(records, path: Path, cfg: BenchConfig, title: str) -> Path:
    from prism.bench.plots import plot_latency_cdfs

    return plot_latency_cdfs(records, path, ttft_slo_ms=cfg.ttft_slo_ms, tpot_slo_ms=cfg.tpot_slo_ms, title=title)


def goodput_plot(points: list[dict], path: Path, cfg: BenchConfig) -> Path:
    from prism.bench.plots import plot_goodput

    return plot_goodput(points, path, target=cfg.target_attainment, title="goodput against offered load")
