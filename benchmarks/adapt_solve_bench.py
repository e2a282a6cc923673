"""Decision time of adaptation's integer programs (services/scheduler/core/adapt_solve.py) on a
realistic case, and the optimum's value against the best fixed configuration (the most accurate
pipeline, sized for the peak) in the same run.

The case: the small LLaVA's measured costs on this kind of machine (docs in /work/shared field
notes: encoder ~200 ms per image, prefill ~1.1 s per 1k tokens, decode ~33/51/70 ms per step at
batch 1/4/16, at 2 threads; bf16 ~3x faster for encoder and prefill) as variants: encoder fp32 and
bf16, a large and a small language model (prefill and decode tied to the same one), 32 tokens
generated; batches 1..16, cores 1..8, 16 replicas per stage, 64 cores. Rates sweep 0.5..8 req/s.
For each rate: `solve_pipeline` (IPA), `solve_variants` on the whole pipeline as one stage
(InfAdapter), `solve_vertical` for the decode worker (Sponge): median seconds of `--repeats`
solves, program outcome (cores, accuracy).

    .venv/bin/python benchmarks/adapt_solve_bench.py            # the real numbers
    .venv/bin/python benchmarks/adapt_solve_bench.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import finish_report, rnd, say  # noqa: E402
from services.scheduler.core.adapt import (  # noqa: E402
    Bounds,
    Infeasible,
    LatencyModel,
    VariantProfile,
    Weights,
    solve_pipeline,
    solve_variants,
    solve_vertical,
)

THREADS = 2  # the cores the field-note numbers were measured at
NEW_TOKENS = 32


def _model(points: dict[int, float], scale: float = 1.0) -> LatencyModel:
    return LatencyModel({THREADS: {b: ms * scale for b, ms in points.items()}}, serial_fraction=0.1)


def variants() -> dict[str, list[VariantProfile]]:
    encode = {b: 200.0 * b for b in (1, 2, 4, 8, 16)}  # batching does not help the CPU encoder
    prefill = {b: 330.0 * b for b in (1, 2, 4, 8, 16)}  # a ~300-token prompt
    decode = {1: 33.0 * NEW_TOKENS, 4: 51.0 * NEW_TOKENS, 16: 74.0 * NEW_TOKENS}
    return {
        "encode": [VariantProfile("fp32", "encode", 1.0, _model(encode)),
                   VariantProfile("bf16", "encode", 0.99, _model(encode, 1 / 3))],
        "prefill": [VariantProfile("large", "prefill", 0.83, _model(prefill)),
                    VariantProfile("small", "prefill", 0.74, _model(prefill, 0.4))],
        "decode": [VariantProfile("large", "decode", 1.0, _model(decode)),
                   VariantProfile("small", "decode", 1.0, _model(decode, 0.5))],
    }


def whole(vs: dict[str, list[VariantProfile]]) -> list[VariantProfile]:
    """Each tied (encoder, language model) pair as one whole-pipeline variant at batch b: the sum
    of its stages at the same batch and cores (a worker running the whole path)."""
    out = []
    for e in vs["encode"]:
        for lm in ("large", "small"):
            p = next(v for v in vs["prefill"] if v.name == lm)
            d = next(v for v in vs["decode"] if v.name == lm)
            table = {c: {b: e.latency_ms(b, c) + p.latency_ms(b, c) + d.latency_ms(b, c) for b in (1, 2, 4, 8)}
                     for c in (1, 2, 4, 8)}
            out.append(VariantProfile(f"{e.name}-{lm}", "pipeline", e.accuracy * p.accuracy, LatencyModel(table)))
    return out


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        try:
            result = fn()
        except Infeasible as exc:
            result = exc
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three rates, three repeats")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slo-ms", type=float, default=8000.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    started = time.time()
    rates = (0.5, 2.0, 6.0) if args.quick else (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
    repeats = 3 if args.quick else args.repeats
    vs = variants()
    combos = [{"encode": e, "prefill": lm, "decode": lm} for e in ("fp32", "bf16") for lm in ("large", "small")]
    bounds = Bounds(max_replicas={"*": 16}, batches={"*": (1, 2, 4, 8, 16)}, cores={"*": (1, 2, 4, 8)},
                    total_cores=64, headroom=0.1)
    weights = Weights(accuracy=40.0)
    # the fixed baseline: the most accurate variants, configured once for the peak rate
    fixed = solve_pipeline({"encode": vs["encode"][:1], "prefill": vs["prefill"][:1], "decode": vs["decode"][:1]},
                           max(rates), args.slo_ms, bounds, Weights(accuracy=0.0))
    rows = []
    for rate in rates:
        say(f"rate {rate} req/s")
        t_ipa, ipa = timed(lambda: solve_pipeline(vs, rate, args.slo_ms, bounds, weights, combinations=combos), repeats)
        t_inf, inf = timed(lambda: solve_variants(whole(vs), rate, args.slo_ms, bounds, weights, stage="pipeline"),
                           repeats)
        t_sp, sp = timed(lambda: solve_vertical(vs["decode"][0], rate, args.slo_ms / 2, 8, (1, 4, 16)), repeats)
        rows.append({
            "rate_rps": rate,
            "ipa_s": rnd(t_ipa, 5), "ipa_cores": getattr(ipa, "cost_cores", None),
            "ipa_accuracy": rnd(getattr(ipa, "expected_accuracy", None), 4),
            "ipa": {s: c.__dict__ for s, c in ipa.stages.items()} if hasattr(ipa, "stages") else str(ipa),
            "infadapter_s": rnd(t_inf, 5), "infadapter_cores": getattr(inf, "cost_cores", None),
            "infadapter_accuracy": rnd(getattr(inf, "expected_accuracy", None), 4),
            "sponge_s": rnd(t_sp, 5), "sponge_cores_batch": sp if isinstance(sp, tuple) else str(sp),
            "ipa_cores_vs_fixed": rnd(getattr(ipa, "cost_cores", 0) / fixed.cost_cores, 3),
        })
    report = {
        "benchmark": "adapt_solve", "quick": args.quick, "repeats": repeats, "slo_ms": args.slo_ms,
        "fixed_peak_config": {"cores": fixed.cost_cores, "accuracy": fixed.expected_accuracy,
                              "stages": {s: c.__dict__ for s, c in fixed.stages.items()}},
        "rows": rows,
        "ipa_s_max": max(r["ipa_s"] for r in rows), "infadapter_s_max": max(r["infadapter_s"] for r in rows),
        "sponge_s_max": max(r["sponge_s"] for r in rows),
    }
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
