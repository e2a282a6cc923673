"""ModServe at scale, in simulation (arXiv 2502.00937, section 7): 128 A100-80GB GPUs serving
Llama-3.2-11B-Vision and InternVL2.5-26B, a vLLM-like monolith (32 colocated TP-4 instances, every
stage on one instance) against decoupled pools (image encoders TP-1, prefill TP-4, decode TP-4,
sized for the trace's stage demand), on the Azure conversation trace with the multimodal overlay
(`prism.bench.trace`), through `prism.sim` (the real scheduler core; stage latencies from the
shipped roofline profiles, whose sources the report cites).

1. SLOs from isolated runs: the trace's first requests one at a time on the monolith; TTFT and
   TBT targets = `--slo-x` x their P99.
2. Maximum load at SLO: the largest rate scale s (the trace's arrivals s times faster, `--span-s`
   simulated seconds of them) at which at least 99% of the requests meet both targets
   (`prism.bench.stats.max_load`), for each deployment; the ratio decoupled / monolith
   (ModServe: 3.3x to 5.5x). The decoupled pools read shared stage queues (the Kubernetes
   deployment's mode; with a queue per worker, prefill is routed at arrival, before its encode
   is booked, and bursts of image requests herd onto one prefill worker).
3. GPUs saved by autoscaling over a bursty day: the trace thinned by a diurnal envelope (a 24-hour
   cycle compressed into `--day-s` seconds, trough at `--trough` of the peak) at 80% of the
   decoupled pools' max load at the peak; static pools (sized for the peak) against the same pools
   under the scheduler's autoscaler; GPUs saved = 1 - GPU-seconds(autoscaled) / GPU-seconds(static)
   (ModServe: 25% to 41.3%), with both runs' SLO attainment.

Prints ONE JSON report. ``--quick``: short windows and a coarse search (a smoke run, minutes).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import TRACES_DIR, finish_report, say  # noqa: E402
from prism.bench.stats import max_load  # noqa: E402
from prism.bench.trace import describe, load_trace  # noqa: E402
from prism.sim.profile import load as load_profile  # noqa: E402
from prism.sim.run import requests_from_trace, summarize_result  # noqa: E402
from prism.sim.simulator import AutoscaleConfig, InstanceSpec, SimConfig, SimRequest, simulate  # noqa: E402

MODELS = {"llama32-11b-vision": "modserve-a100-llama32-11b-vision", "internvl-26b": "modserve-a100-internvl-26b"}
GPUS = 128
TP = 4
PAPER = {"max_load_ratio": [3.3, 5.5], "gpus_saved": [0.25, 0.413]}


def monolith() -> SimConfig:
    return SimConfig(instances=(InstanceSpec(("encode", "prefill", "decode"), count=GPUS // TP, tp=TP, slots=128),),
                     placement="colocated")


def pools(profile, requests: list[SimRequest], *, decode_batch: int = 64, encode_batch: int = 4) -> dict[str, int]:
    """Offline profiling (ModServe 5.2): GPUs per stage in proportion to the trace's demand in
    GPU-seconds per request, from the profile: encode TP-1 at `encode_batch`, prefill TP-4 at
    batch 1, decode TP-4 at `decode_batch`."""
    n = len(requests)
    images = sum(r.num_images for r in requests) / n
    prompt = sum(r.text_tokens + r.num_images * profile.prompt_tokens_per_image for r in requests) / n
    new = sum(r.max_new_tokens for r in requests) / n
    t = profile.tokens_per_image
    eb, db = encode_batch, decode_batch
    demand = {"encode": images * profile.latency_s("encode", eb, eb * t, 1) / eb,
              "prefill": TP * profile.latency_s("prefill", 1, prompt, TP),
              "decode": TP * new * profile.latency_s("decode", db, prompt + new / 2, TP) / db}
    total = sum(demand.values())
    p = max(1, round(GPUS * demand["prefill"] / total / TP))
    d = max(1, round(GPUS * demand["decode"] / total / TP))
    e = GPUS - TP * (p + d)
    if e < 1:
        d = max(1, d - 1)
        e = GPUS - TP * (p + d)
    return {"encode": e, "prefill": p, "decode": d}


def decoupled(sizes: dict[str, int]) -> SimConfig:
    return SimConfig(instances=(
        InstanceSpec(("encode",), count=sizes["encode"], tp=1),
        InstanceSpec(("prefill",), count=sizes["prefill"], tp=TP),
        InstanceSpec(("decode",), count=sizes["decode"], tp=TP, slots=128)), placement="split", shared_queues=True)


def compressed(full: list, s: float, span_s: float, prefix: str = "r") -> list:
    """The trace from its start at `s` times its arrival rate, for `span_s` simulated seconds: the
    trace seconds [0, s x span_s) with times divided by s (repeated end to end when the trace is
    shorter; the image overlay is the trace's, drawn once per row)."""
    length = full[-1].arrival_s + 1.0
    need, out, k = s * span_s, [], 0
    while k * length < need:
        out.extend(replace(r, arrival_s=(r.arrival_s + k * length) / s) for r in full
                   if r.arrival_s + k * length < need)
        k += 1
    return out


def run(requests, config, profile, slo, duration_s) -> dict:
    res = simulate(requests, config, profile)
    return summarize_result(res, ttft_slo_ms=slo["ttft_ms"], tpot_slo_ms=slo["tpot_ms"], duration_s=duration_s)


def brief(s: dict) -> dict:
    return {"attainment": s["slo_attainment"], "ttft_p99_ms": s["ttft_ms"]["p99"], "tpot_p99_ms": s["tpot_ms"]["p99"],
            "throughput_rps": s["throughput_rps"], "gpu_seconds": s["sim"]["gpu_seconds"],
            "placements": s["sim"]["placements"], "mean_batch": s["sim"]["mean_batch"]}


def model_part(key: str, args, full: list) -> dict:
    profile = load_profile(MODELS[key])
    span = args.span_s
    base = requests_from_trace(full, max_new_tokens=args.max_new_tokens)
    iso = [replace(r, arrival_s=30.0 * k) for k, r in enumerate(base[:args.isolated])]  # never overlapping
    iso_stats = run(iso, monolith(), profile, {"ttft_ms": 1e9, "tpot_ms": 1e9}, 30.0 * len(iso))
    slo = {"ttft_ms": round(args.slo_x * iso_stats["ttft_ms"]["p99"], 1),
           "tpot_ms": round(args.slo_x * iso_stats["tpot_ms"]["p99"], 2), "x": args.slo_x,
           "isolated_p99": {"ttft_ms": iso_stats["ttft_ms"]["p99"], "tpot_ms": iso_stats["tpot_ms"]["p99"]}}
    say(f"{key}: SLO ttft {slo['ttft_ms']} ms, tbt {slo['tpot_ms']} ms")
    # the pools: the demand-proportional split under a few batching assumptions, the one meeting the
    # SLO best at a probe load (twice the rate the trace's start runs at x`--start-scale`)
    probe_reqs = requests_from_trace(compressed(full, 2 * args.start_scale, span), max_new_tokens=args.max_new_tokens)
    tried = []
    for db in (64, 16, 4):
        for eb in (4, 1):
            sizes = pools(profile, base, decode_batch=db, encode_batch=eb)
            if sizes in [t[1] for t in tried]:
                continue
            att = run(probe_reqs, decoupled(sizes), profile, slo, span)["slo_attainment"]
            tried.append((att, sizes))
    sizes = max(tried, key=lambda t: t[0])[1]
    say(f"{key}: pools {sizes} (tried {[(t[1], t[0]) for t in tried]})")
    configs = {"monolith": monolith(), "decoupled": decoupled(sizes)}
    out: dict = {"profile": MODELS[key], "sources": [dict(s) for s in profile.sources], "slo": slo,
                 "pools_tried": [{"attainment": a, "instances": z} for a, z in tried],
                 "decoupled_pools_gpus": {"encode": sizes["encode"], "prefill": TP * sizes["prefill"],
                                          "decode": TP * sizes["decode"]}, "max_load": {}}
    for name, config in configs.items():
        started = time.perf_counter()

        def probe(s: float, config=config, name=name):
            reqs = requests_from_trace(compressed(full, s, span), max_new_tokens=args.max_new_tokens)
            stats = run(reqs, config, profile, slo, span)
            say(f"  {key} {name} x{s:.2f}: attainment {stats['slo_attainment']}, ttft p99 {stats['ttft_ms']['p99']} ms")
            return stats["slo_attainment"], brief(stats)

        found = max_load(probe, target=args.target, start=args.start_scale, grow=2.0, max_scale=4096.0,
                         min_scale=0.25, rel_tol=args.rel_tol, max_probes=args.max_probes)
        best = next((p.result for p in found.probes if p.scale == found.best), None)
        rate = None if found.best is None else round(len(compressed(full, found.best, span)) / span, 2)
        out["max_load"][name] = {**found.as_dict(), "at_max": best, "rate_per_s": rate,
                                 "wall_s": round(time.perf_counter() - started, 1)}
    m, d = out["max_load"]["monolith"]["max_scale"], out["max_load"]["decoupled"]["max_scale"]
    out["max_load_ratio"] = round(d / m, 3) if m and d else None
    if args.day_s > 0 and d:
        out["autoscaling"] = day_part(key, args, full, profile, sizes, d, slo)
    return out


def bursty_day(args, full: list, peak_scale: float) -> list[SimRequest]:
    """The trace thinned by a compressed diurnal envelope (module docstring)."""
    rows = compressed(full, peak_scale, args.day_s)
    rng = random.Random(args.seed + 7)
    kept = []
    for r in rows:
        phase = 2 * math.pi * r.arrival_s / args.day_s  # one day; the peak in the middle
        env = args.trough + (1 - args.trough) * (1 - math.cos(phase)) / 2
        if rng.random() < env:
            kept.append(r)
    return requests_from_trace(kept, max_new_tokens=args.max_new_tokens, prefix="d")


def day_part(key: str, args, full: list, profile, sizes: dict[str, int], max_scale: float, slo: dict) -> dict:
    reqs = bursty_day(args, full, args.day_load * max_scale)
    static = decoupled(sizes)
    templates = {"encode": InstanceSpec(("encode",), tp=1),
                 "prefill": InstanceSpec(("prefill",), tp=TP),
                 "decode": InstanceSpec(("decode",), tp=TP, slots=128)}
    auto = replace(static, autoscale=AutoscaleConfig(
        templates=templates, min_replicas=1, max_by_stage=dict(sizes), max_replicas=max(sizes.values()),
        target_utilisation=args.target_utilisation, scale_out_cooldown_s=5.0, scale_in_cooldown_s=args.scale_in_s,
        window_s=10.0, every_s=1.0, start_s=args.start_s))
    out = {"requests": len(reqs), "day_s": args.day_s, "peak_load_scale": round(args.day_load * max_scale, 3),
           "trough": args.trough}
    for name, config in (("static", static), ("autoscaled", auto)):
        started = time.perf_counter()
        res = simulate(reqs, config, profile)
        stats = summarize_result(res, ttft_slo_ms=slo["ttft_ms"], tpot_slo_ms=slo["tpot_ms"], duration_s=args.day_s)
        out[name] = {**brief(stats), "mean_gpus": round(res.gpu_seconds / res.end_s, 2),
                     "replica_changes": len(res.replicas), "wall_s": round(time.perf_counter() - started, 1)}
        say(f"  {key} day {name}: {out[name]['mean_gpus']} GPUs on average, attainment {stats['slo_attainment']}")
    out["gpus_saved"] = round(1 - out["autoscaled"]["gpu_seconds"] / out["static"]["gpu_seconds"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--span-s", type=float, default=60.0, help="simulated seconds of each load probe")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="clip generated tokens (0: as traced)")
    ap.add_argument("--slo-x", type=float, default=5.0)
    ap.add_argument("--target", type=float, default=0.99, help="fraction of requests meeting both targets")
    ap.add_argument("--isolated", type=int, default=200)
    ap.add_argument("--isolated-scale", type=float, default=0.02)
    ap.add_argument("--start-scale", type=float, default=8.0)
    ap.add_argument("--rel-tol", type=float, default=0.1)
    ap.add_argument("--max-probes", type=int, default=12)
    ap.add_argument("--day-s", type=float, default=1800.0, help="a day compressed into this many seconds (0: skip)")
    ap.add_argument("--day-load", type=float, default=0.8, help="peak load as a fraction of the decoupled max")
    ap.add_argument("--trough", type=float, default=0.3)
    ap.add_argument("--target-utilisation", type=float, default=0.8)
    ap.add_argument("--scale-in-s", type=float, default=30.0)
    ap.add_argument("--start-s", type=float, default=20.0, help="seconds for a new worker to come up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 s windows, coarse search, 120 s day")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.span_s, args.rel_tol, args.max_probes, args.isolated = 10.0, 0.5, 6, 40
        args.day_s, args.max_new_tokens = 120.0, args.max_new_tokens or 64
    started = time.time()
    full = load_trace(args.trace, seed=args.seed)
    report: dict = {"setting": {"gpus": GPUS, "monolith": f"{GPUS // TP} x TP-{TP}, every stage on one instance "
                                "(placement colocated)", "decoupled": "encode TP-1, prefill TP-4, decode TP-4 pools "
                                "(placement split)", "trace": str(args.trace), "span_s": args.span_s,
                                "trace_shape": describe(full), "quick": args.quick,
                                "max_new_tokens_clip": args.max_new_tokens or None},
                    "paper": PAPER, "models": {}}
    for key in args.models.split(","):
        say(f"model {key}")
        report["models"][key] = model_part(key, args, full)
    report["ratios"] = {
        "max_load_decoupled_over_monolith": {k: v["max_load_ratio"] for k, v in report["models"].items()},
        "gpus_saved_by_autoscaling": {k: v.get("autoscaling", {}).get("gpus_saved") for k, v in report["models"].items()},
    }
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
