"""MOSEL's comparison at cluster scale, in simulation: modality selection on against off at 2x and
4x the sustainable load (MOSEL, arXiv 2310.18481, reports 3.6x goodput).

Setting: the ModServe A100-80GB profile of Llama-3.2-11B-Vision (`prism/sim/profiles`, a cited
roofline), decoupled pools read from shared stage queues (`--cluster`, 32 GPUs by default), the
Azure conversation trace with the multimodal overlay (bursty arrivals; `prism.bench.trace`),
every request with a deadline of `--deadline-s`; requests with images allow dropping any or all
images down to a floor drawn from `FLOORS` (seeded). Accuracies per reduction: `ACCURACY`,
ASSUMED (clearly not measured: a relative drop per image removed, of the size per-modality
ablations of VLMs report), unless `--accuracy-file` supplies published figures.

1. Sustainable load: the largest rate scale at which selection off (the program deciding
   deadlines, no reduction) completes >= `--target` of the requests within their deadlines
   (`prism.bench.stats.max_load`).
2. At 2x and 4x that scale, three runs on the same requests: `admission_only` (no selection
   profile: admission's estimate), `selection_off` (a profile with only "full") and
   `selection_on` (every reduction). Goodput: requests completed within the deadline at or above
   their floor, per second; JCT: e2e of the completed (mean, p99); mean expected accuracy.

Prints ONE JSON report with on/off ratios. ``--quick``: 10 s windows, a coarse search.

    .venv/bin/python benchmarks/mosel_sim.py --out .bench/mosel_sim.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import TRACES_DIR, finish_report, say  # noqa: E402
from benchmarks.modserve_sim import compressed  # noqa: E402
from prism.bench.stats import max_load  # noqa: E402
from prism.bench.trace import describe, load_trace  # noqa: E402
from prism.sim.profile import load as load_profile  # noqa: E402
from prism.sim.run import parse_cluster, requests_from_trace, summarize_result, with_selection  # noqa: E402
from prism.sim.selection import SelectionConfig, load_selection_profile, profile_from_accuracy  # noqa: E402
from prism.sim.simulator import SimConfig, simulate  # noqa: E402

PROFILE = "modserve-a100-llama32-11b-vision"
#: ASSUMED accuracies (module docstring), relative to the full request's 1.0.
ACCURACY = {"full": 1.0, "drop_images:1": 0.95, "drop_images:2": 0.9, "drop_images:3": 0.86,
            "drop_images:4": 0.82, "drop_images:5": 0.79, "drop_images:6": 0.76, "drop_images:7": 0.73,
            "drop:image": 0.62}
FLOORS = (0.6, 0.75, 0.85)
MOSEL_GOODPUT_X = 3.6


def config(cluster: str, accuracy: dict | None) -> SimConfig:
    sel = None if accuracy is None else SelectionConfig(profile_from_accuracy(accuracy))
    return SimConfig(instances=parse_cluster(cluster, slots=128), placement="split", shared_queues=True,
                     selection=sel)


def requests(full, scale, args):
    reqs = requests_from_trace(compressed(full, scale, args.span_s), max_new_tokens=args.max_new_tokens)
    return with_selection(reqs, floors=FLOORS, seed=args.seed, deadline_s=args.deadline_s)


def run(reqs, cfg, profile, span) -> dict:
    started = time.perf_counter()
    s = summarize_result(simulate(reqs, cfg, profile), ttft_slo_ms=1e9, tpot_slo_ms=1e9, duration_s=span)
    sel = s["selection"]
    return {"requests": s["requests"], "completed": s["completed"], "counts": s["counts"],
            "good": sel["good_deadline_floor"], "goodput_rps": sel["goodput_deadline_floor_rps"],
            "jct_mean_s": sel["jct_s"]["mean"], "jct_p99_s": sel["jct_s"]["p99"],
            "mean_accuracy": sel["mean_accuracy"], "strategies": sel["strategies"], "selector": sel["selector"],
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    ap.add_argument("--cluster", default="encode@tp1x8,prefill@tp4x4,decode@tp4x2")
    ap.add_argument("--span-s", type=float, default=60.0, help="simulated seconds of arrivals per run")
    ap.add_argument("--deadline-s", type=float, default=5.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--loads", default="2,4")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--accuracy-file", type=Path, help="JSON {reduction_id: accuracy} (published results)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="10 s windows, a coarse search")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    max_probes, rel_tol = 10, 0.1
    if args.quick:
        args.span_s, max_probes, rel_tol = 10.0, 5, 0.5
    started = time.time()
    accuracy = ACCURACY
    source = "ASSUMED (benchmarks/mosel_sim.py ACCURACY): not measured"
    if args.accuracy_file:
        prof = load_selection_profile(args.accuracy_file)
        accuracy, source = {k: v.accuracy for k, v in prof.accuracy.items()}, str(args.accuracy_file)
    profile = load_profile(PROFILE)
    full = load_trace(args.trace, seed=args.seed)
    off_cfg = config(args.cluster, {"full": accuracy["full"]})

    def probe(s: float):
        r = run(requests(full, s, args), off_cfg, profile, args.span_s)
        att = r["good"] / max(1, r["requests"])
        say(f"  sustainable probe x{s:.2f}: {att:.3f} within deadline")
        return att, r

    found = max_load(probe, target=args.target, start=1.0, grow=2.0, max_scale=4096.0, min_scale=0.05,
                     rel_tol=rel_tol, max_probes=max_probes)
    base = found.best or 0.05
    report: dict = {"setting": {"profile": PROFILE, "sources": [dict(s) for s in profile.sources],
                                "cluster": args.cluster, "gpus": config(args.cluster, None).gpus,
                                "trace": str(args.trace), "trace_shape": describe(full), "span_s": args.span_s,
                                "deadline_s": args.deadline_s, "floors": FLOORS, "accuracy": accuracy,
                                "accuracy_source": source, "quick": args.quick},
                    "paper": {"goodput_x": MOSEL_GOODPUT_X},
                    "sustainable": {"rate_scale": base, "search": found.as_dict()}, "loads": {}}
    ratios = {}
    for load in (float(x) for x in args.loads.split(",")):
        reqs = requests(full, base * load, args)
        row = {"rate_scale": round(base * load, 3), "rate_per_s": round(len(reqs) / args.span_s, 2)}
        for name, acc in (("admission_only", None), ("selection_off", {"full": accuracy["full"]}),
                          ("selection_on", accuracy)):
            row[name] = run(reqs, config(args.cluster, acc), profile, args.span_s)
            say(f"x{load:g} {name}: goodput {row[name]['goodput_rps']}/s, jct p99 {row[name]['jct_p99_s']} s")
        on, off = row["selection_on"], row["selection_off"]
        ratios[f"{load:g}x"] = {
            "goodput_on_over_off": round(on["goodput_rps"] / off["goodput_rps"], 3) if off["goodput_rps"] else None,
            "goodput_on_over_admission_only": round(on["goodput_rps"] / row["admission_only"]["goodput_rps"], 3)
            if row["admission_only"]["goodput_rps"] else None,
            "jct_mean_on_over_off": round(on["jct_mean_s"] / off["jct_mean_s"], 3) if off["jct_mean_s"] else None,
            "jct_p99_on_over_off": round(on["jct_p99_s"] / off["jct_p99_s"], 3) if off["jct_p99_s"] else None}
        report["loads"][f"{load:g}x"] = row
    report["ratios"] = ratios
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()

