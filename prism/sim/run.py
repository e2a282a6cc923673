"""What `prism simulate` and the scripts share: cluster shapes from text, trace requests to
simulated requests, and one run summarised with `prism.bench.stats.summarize` (the same JSON
statistics as `prism bench`) plus what only a simulation knows (decisions, GPU-seconds).

A cluster shape is a comma list of ``STAGES[@tpN]xCOUNT`` groups, STAGES joined by ``+``:
``encode+prefill+decode@tp4x32`` (32 colocated TP-4 instances: a vLLM-like monolith) or
``encode@tp1x32,prefill@tp4x12,decode@tp4x12`` (decoupled pools). Short stage names ``e``,
``p``, ``d`` and ``all`` work too.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import replace

from prism.bench.stats import quantile, summarize
from prism.sim.profile import SimProfile
from prism.sim.selection import SimReduce
from prism.sim.simulator import InstanceSpec, SimConfig, SimRequest, SimResult, simulate

__all__ = ["parse_cluster", "requests_from_trace", "run_summary", "selection_summary", "summarize_result",
           "with_selection"]

_ALIASES = {"e": "encode", "p": "prefill", "d": "decode", "encode": "encode", "prefill": "prefill",
            "decode": "decode"}
_GROUP = re.compile(r"^(?P<stages>[a-z+]+)(?:@tp(?P<tp>\d+))?(?:x(?P<count>\d+))?$")


def parse_cluster(text: str, *, slots: int = 16, encode_batch_tokens: int = 4096,
                  prefill_batch_tokens: int = 2048) -> tuple[InstanceSpec, ...]:
    """Instance specs from a shape (module docstring); ValueError naming the bad group."""
    specs = []
    for raw in text.split(","):
        group = raw.strip().lower()
        m = _GROUP.match(group)
        if not m:
            raise ValueError(f"cluster: {raw.strip()!r} is not STAGES[@tpN]xCOUNT (e.g. encode+prefill+decode@tp4x32)")
        names = m["stages"].split("+")
        stages = ("encode", "prefill", "decode") if names == ["all"] else tuple(_ALIASES.get(n, "") for n in names)
        if "" in stages:
            raise ValueError(f"cluster: {raw.strip()!r} names an unknown stage (encode, prefill, decode, all)")
        specs.append(InstanceSpec(stages=stages, count=int(m["count"] or 1), tp=int(m["tp"] or 1), slots=slots,
                                  encode_batch_tokens=encode_batch_tokens, prefill_batch_tokens=prefill_batch_tokens))
    if not specs:
        raise ValueError("cluster: empty")
    return tuple(specs)


def requests_from_trace(trace: Sequence, *, max_new_tokens: int | None = None, min_new_tokens: int = 1,
                        max_text_tokens: int | None = None, prefix: str = "r") -> list[SimRequest]:
    """`prism.bench.trace.TraceRequest`s (arrival_s, context_tokens, generated_tokens, num_images)
    as simulated requests; the trace's context tokens are the text, images come on top."""
    out = []
    for k, t in enumerate(trace):
        new = max(min_new_tokens, int(t.generated_tokens))
        if max_new_tokens:
            new = min(new, max_new_tokens)
        text = max(1, int(t.context_tokens))
        if max_text_tokens:
            text = min(text, max_text_tokens)
        out.append(SimRequest(f"{prefix}{k}", float(t.arrival_s), text, int(t.num_images), new))
    return out


def with_selection(requests: Sequence[SimRequest], *, floors: Sequence[float], seed: int = 0,
                   deadline_s: float | None = None, reduce: SimReduce | None = None) -> list[SimRequest]:
    """The requests with a deadline budget (None: as they are), and those with images allowing
    `reduce` (default: dropping any or all images) down to a floor drawn from `floors` (seeded)."""
    rng = random.Random(seed)
    reduce = reduce or SimReduce(drop_images=True, drop_all_images=True)
    out = []
    for r in requests:
        floor = rng.choice(list(floors)) if floors else 0.0
        extra = {"deadline_s": deadline_s} if deadline_s else {}
        if r.num_images:
            extra.update(accuracy_floor=floor, reduce=reduce)
        out.append(replace(r, **extra))
    return out


def summarize_result(result: SimResult, *, ttft_slo_ms: float, tpot_slo_ms: float, duration_s: float) -> dict:
    """`summarize` of the records, plus the simulation's own figures under ``"sim"``."""
    out = summarize(result.records, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, duration_s=duration_s)
    out["sim"] = {"placements": result.placements, "gpu_seconds": round(result.gpu_seconds, 3),
                  "end_s": round(result.end_s, 3), "events": result.events,
                  "mean_batch": result.batch_sizes, "replica_changes": len(result.replicas)}
    if result.selection is not None or any(o[5] is not None for o in result.outcomes):
        out["selection"] = selection_summary(result, duration_s=duration_s)
    return out


def selection_summary(result: SimResult, *, duration_s: float) -> dict:
    """Goodput at deadline and floor (completed within the deadline, served at or above the
    floor or as sent), mean expected accuracy of the completed, job completion times (e2e of the
    completed), strategies used and what the selector did."""
    done = [o for o in result.outcomes if o[1] == "OK"]
    good = [o for o in done if (o[5] is None or o[6] <= o[5]) and (o[2] == "full" or (o[3] or 0.0) >= o[4])]
    accs = [o[3] for o in done if o[3] is not None]
    jct = sorted(o[6] for o in done)
    used: dict[str, int] = {}
    for o in done:
        used[o[2]] = used.get(o[2], 0) + 1
    return {
        "good_deadline_floor": len(good),
        "goodput_deadline_floor_rps": round(len(good) / duration_s, 4),
        "mean_accuracy": round(sum(accs) / len(accs), 4) if accs else None,
        "jct_s": {"mean": round(sum(jct) / len(jct), 4) if jct else None,
                  "p99": round(quantile(jct, 0.99), 4) if jct else None, "n": len(jct)},
        "strategies": dict(sorted(used.items())),
        "selector": result.selection,
    }


def run_summary(requests: Sequence[SimRequest], config: SimConfig, profile: SimProfile, *, ttft_slo_ms: float,
                tpot_slo_ms: float, duration_s: float | None = None) -> dict:
    """Simulates and summarises; `duration_s` defaults to the span of the arrivals."""
    result = simulate(requests, config, profile)
    span = duration_s or max((r.arrival_s for r in requests), default=0.0) or 1.0
    return summarize_result(result, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, duration_s=span)
