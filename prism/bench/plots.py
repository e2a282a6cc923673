"""PNG plots of a `prism bench` run (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prism.bench.stats import RequestRecord, cdf

__all__ = ["plot_goodput", "plot_latency_cdfs"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path, *, ttft_slo_ms: float, tpot_slo_ms: float,
                      title: str = "") -> Path:
    """CDFs of TTFT, TPOT and end-to-end latency of the successful requests, SLO targets marked."""
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    series = (("TTFT", [r.ttft_ms for r in ok if r.ttft_ms is not None], ttft_slo_ms),
              ("TPOT", [r.tpot_ms for r in ok if r.tpot_ms is not None], tpot_slo_ms),
              ("end to end", [r.e2e_ms for r in ok], None))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values, slo) in zip(axes, series):
        if values:
            xs, ys = cdf(values)
            ax.step(xs, ys, where="post")
        if slo:
            ax.axvline(slo, color="tab:red", linestyle="--", label=f"SLO {slo:g} ms")
            ax.legend(loc="lower right")
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} (n={len(values)})")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput(points: Sequence[dict], path: Path, *, target: float, title: str = "") -> Path:
    """Goodput and throughput (left axis) and SLO attainment (right axis) against the offered
    load. `points`: dicts with ``offered_rps``, ``goodput_rps``, ``throughput_rps`` and
    ``slo_attainment``."""
    plt = _pyplot()
    pts = sorted(points, key=lambda p: p["offered_rps"])
    x = [p["offered_rps"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(x, [p["throughput_rps"] for p in pts], "o-", label="throughput")
    ax.plot(x, [p["goodput_rps"] for p in pts], "s-", label="goodput (met SLO)")
    ax.plot(x, x, ":", color="gray", label="offered")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(x, [p["slo_attainment"] or 0.0 for p in pts], "^--", color="tab:green", label="SLO attainment")
    ax2.axhline(target, color="tab:red", linestyle="--", linewidth=0.8)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("SLO attainment")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
