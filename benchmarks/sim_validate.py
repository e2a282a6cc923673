"""Validates the simulator against the live system on this machine: the small LLaVA is profiled
(`prism.profiling.sim`, the simulator profile `prism profile --sim-out` writes), a real split
deployment (`prism.launch.Deployment`: encoder, prefill and decode processes, Redis, scheduler)
replays the same request sequences as `prism bench` does (`prism.bench.replay`, open loop) at
several loads, and the simulator (`prism.sim`, the scheduler's own core) runs those sequences on
the profile. For each load: p50 and p99 TTFT of both and the relative error of the simulation
(target: within 15%).

The requests: the Azure conversation trace from its start, images overlaid with the multimodal
shape, fitted to the model (`prism.bench.workload.fit`: tokens x 1/8, output clipped), 224 px
images; load k sends them at k requests per second (arrival times rescaled).

Calibration (default; `--no-calibrate` to skip): the profile is fitted on ISOLATED requests only
(`prism.sim.calibrate`): `--isolated` requests of the sequence chosen to cover every image count it
has and a spread of prompt lengths, sent one at a time; least squares over them gives the encoder's
and the prefill's scales separately, decode is scaled by the live-over-simulated time per output
token, and the rest of the gap goes into the fixed per-request path. The loads are then simulated on
the fitted profile; the loaded runs never feed the fit.

What the simulator models of this machine: the stage processes share `shared_cores` cores
(processor sharing), each runs torch with `--threads` threads, the scheduler processes each image
before admission, hops between processes take the profile's overheads. What it does not: the
scheduler's, Redis's and the load generator's own CPU use, and other users of the machine (the
quiet gate waits for an idle CPU before each run and records what it saw).

Prints ONE JSON report. ``--quick``: one load, few requests (a smoke run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import GATE, ROOT, SMALL_MODEL_DIR, TRACES_DIR, ensure_model, finish_report, say  # noqa: E402


ISOLATED_GAP_S = 4.0  # between isolated requests: longer than the longest one takes here


def rel(sim: float | None, live: float | None) -> float | None:
    return None if sim is None or not live else round((sim - live) / live, 4)


def profile_for(args):
    from prism.sim.profile import load, save

    path = args.profile_path
    if path.exists() and not args.reprofile:
        say(f"simulator profile: {path} (kept; --reprofile to measure again)")
        return load(path)
    from prism.profiling.cost import CostSettings
    from prism.profiling.engines import Engines
    from prism.profiling.sim import measure_sim_profile

    GATE.wait()
    say(f"profiling {args.model_dir} for the simulator (threads {args.threads})")
    prof = measure_sim_profile(Engines(args.model_dir), settings=CostSettings(repeats=3, warmup=1),
                               threads=args.threads, shared_cores=os.cpu_count())
    save(prof, path)
    return prof


def sequences(args, limits) -> list:
    from prism.bench.trace import load_trace
    from prism.bench.workload import fit

    trace = load_trace(args.trace, seed=args.seed, limit=args.requests)
    fitted = fit(trace, limits, max_generated=args.max_new_tokens)
    return fitted


def at_rate(seq: list, rate: float) -> list:
    span = max(seq[-1].arrival_s, 1e-9)
    factor = (len(seq) / rate) / span  # mean rate = `rate` requests per second
    return [replace(r, arrival_s=r.arrival_s * factor) for r in seq]


def sim_requests(seq: list, profile) -> list:
    from prism.sim.simulator import SimRequest

    per = profile.prompt_tokens_per_image
    return [SimRequest(f"v{k}", r.arrival_s, max(1, r.context_tokens - r.num_images * per), r.num_images,
                       r.generated_tokens) for k, r in enumerate(seq)]


def brief(s: dict) -> dict:
    return {"ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p99_ms": s["ttft_ms"]["p99"],
            "tpot_p50_ms": s["tpot_ms"]["p50"], "e2e_p50_ms": s["e2e_ms"]["p50"], "completed": s["completed"],
            "requests": s["requests"], "counts": s["counts"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=SMALL_MODEL_DIR)
    ap.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    ap.add_argument("--loads", default="0.25,0.5,1.0", help="requests per second, comma list")
    ap.add_argument("--requests", type=int, default=60, help="requests per load")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--isolated", type=int, default=10,
                    help="requests sent one at a time first (the calibration's only input)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    ap.add_argument("--profile-path", type=Path, default=ROOT / ".bench" / "sim" / "llava-small.json")
    ap.add_argument("--reprofile", action="store_true")
    ap.add_argument("--effective-cores", type=int, default=0,
                    help="cores the simulated stage processes share (0: the profile's, this machine's count)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for an idle CPU before a run")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="simulate the loads on the profile as measured (default: fitted on the isolated requests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="one load (0.5/s), 12 requests")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.loads, args.requests, args.isolated = "0.5", 12, 3
    GATE.max_wait_s = args.quiet_wait
    started = time.time()
    ensure_model(args.model_dir)
    profile = profile_for(args)
    if args.effective_cores:
        from dataclasses import replace as dc_replace

        profile = dc_replace(profile, hardware={**profile.hardware, "shared_cores": args.effective_cores})

    from prism.bench.replay import probe_limits, replay
    from prism.bench.stats import summarize
    from prism.bench.workload import Workload
    from prism.launch import Deployment, DeploymentOptions
    from prism.sim.run import summarize_result
    from prism.sim.simulator import InstanceSpec, SimConfig, simulate

    loads = [float(x) for x in args.loads.split(",") if x.strip()]
    options = DeploymentOptions(model_dir=args.model_dir, layout="split", placement="adaptive",
                                threads=args.threads, slots=16, max_len=2048,
                                log_dir=ROOT / ".bench" / "sim" / "logs")
    config = SimConfig(instances=(InstanceSpec(("encode",)), InstanceSpec(("prefill",)),
                                  InstanceSpec(("decode",), slots=16)), placement="adaptive")
    report: dict = {"model_dir": str(args.model_dir), "profile": str(args.profile_path),
                    "profile_summary": {"tokens_per_image": profile.tokens_per_image,
                                        "overheads_ms": dict(profile.overheads_ms),
                                        "shared_cores": profile.shared_cores},
                    "deployment": {"layout": "split", "placement": "adaptive", "threads": args.threads, "slots": 16},
                    "loads": {}, "target_rel_error": 0.15}
    slo = {"ttft_slo_ms": 1e6, "tpot_slo_ms": 1e6}
    with Deployment(options) as dep:
        say(f"deployment up at {dep.address}: {', '.join(sorted(dep.workers()))}")
        limits = probe_limits(dep.address)
        workload = Workload(limits, seed=args.seed, image_side_px=224)
        seq = sequences(args, limits)
        warm = at_rate(seq[:6], 1.0)
        replay(dep.address, warm, workload=workload)  # warm-up, not measured
        # isolated requests (4 s apart, no queueing): every image count of the sequence and a
        # spread of prompt lengths (`prism.sim.calibrate.pick_isolated`), the calibration's only input
        from prism.sim.calibrate import fit_profile, pick_isolated

        picked = pick_isolated([r.num_images for r in seq], [r.context_tokens for r in seq], args.isolated)
        iso = [replace(seq[k], arrival_s=ISOLATED_GAP_S * j) for j, k in enumerate(picked)]
        # their shapes once first, unmeasured: a shape's first call (new tensor sizes) is slower,
        # and the loaded runs meet every shape warm
        replay(dep.address, [replace(r, arrival_s=ISOLATED_GAP_S / 2 * j) for j, r in enumerate(iso)],
               workload=workload)
        GATE.wait()
        iso_live_recs = replay(dep.address, iso, workload=workload)
        iso_sim_res = simulate(sim_requests(iso, profile), config, profile)
        iso_live = summarize(iso_live_recs, duration_s=ISOLATED_GAP_S * len(iso), **slo)
        iso_sim = summarize_result(iso_sim_res, duration_s=ISOLATED_GAP_S * len(iso), **slo)
        report["isolated"] = {"live": brief(iso_live), "sim": brief(iso_sim),
                              "rel_error": {"ttft_p50": rel(iso_sim["ttft_ms"]["p50"], iso_live["ttft_ms"]["p50"]),
                                            "tpot_p50": rel(iso_sim["tpot_ms"]["p50"], iso_live["tpot_ms"]["p50"])}}
        say(f"isolated: live ttft p50 {iso_live['ttft_ms']['p50']} ms, sim {iso_sim['ttft_ms']['p50']} ms; "
            f"tpot live {iso_live['tpot_ms']['p50']} sim {iso_sim['tpot_ms']['p50']}")
        if not args.no_calibrate:
            def paired(res) -> list:  # the simulated record of each isolated request, in order
                by_arrival = {r.arrival_s: r for r in res.records}
                return [by_arrival.get(r.arrival_s) or r for r in iso_live_recs]

            def resimulate(p) -> tuple[list, list]:
                recs = paired(simulate(sim_requests(iso, p), config, p))
                return [r.ttft_ms for r in recs], [r.tpot_ms for r in recs]

            fit = fit_profile(profile, [r.ttft_ms for r in iso_live_recs], [r.tpot_ms for r in iso_live_recs],
                              resimulate)
            if fit is None:
                report["calibration"] = {"applied": False, "reason": "fewer than two isolated requests completed"}
            else:
                profile, report["calibration"] = fit.profile, fit.as_dict()
                report["calibration"]["isolated_shapes"] = [
                    {"images": r.num_images, "prompt": r.context_tokens, "new": r.generated_tokens,
                     "live_ttft_ms": None if lr.ttft_ms is None else round(lr.ttft_ms, 1)}
                    for r, lr in zip(iso, iso_live_recs)]
            say(f"calibrated on the isolated requests: {report['calibration']}")
        for load in loads:
            reqs = at_rate(seq, load)
            span = reqs[-1].arrival_s or 1.0
            busy = GATE.wait()
            say(f"load {load}/s: live replay of {len(reqs)} requests over {span:.0f} s (cpu busy before {busy:.0%})")
            live_recs = replay(dep.address, reqs, workload=workload)
            sim_res = simulate(sim_requests(reqs, profile), config, profile)
            live = summarize(live_recs, duration_s=span, **slo)
            sim = summarize_result(sim_res, duration_s=span, **slo)
            sim_by = {rec.arrival_s: rec for rec in sim_res.records}
            pairs = [{"k": k, "at_s": round(r.arrival_s, 3), "images": r.num_images, "prompt": r.context_tokens,
                      "new": r.generated_tokens, "live_ttft_ms": None if lr.ttft_ms is None else round(lr.ttft_ms, 1),
                      "sim_ttft_ms": None if r.arrival_s not in sim_by or sim_by[r.arrival_s].ttft_ms is None
                      else round(sim_by[r.arrival_s].ttft_ms, 1)}
                     for k, (r, lr) in enumerate(zip(reqs, live_recs))]
            row = {"live": brief(live), "sim": brief(sim), "cpu_busy_before": round(busy, 3),
                   "rel_error": {"ttft_p50": rel(sim["ttft_ms"]["p50"], live["ttft_ms"]["p50"]),
                                 "ttft_p99": rel(sim["ttft_ms"]["p99"], live["ttft_ms"]["p99"])}}
            row["within_target"] = all(v is not None and abs(v) <= 0.15 for v in row["rel_error"].values())
            row["per_request"] = pairs
            report["loads"][str(load)] = row
            say(f"  live ttft p50 {row['live']['ttft_p50_ms']} p99 {row['live']['ttft_p99_ms']} ms; sim p50 "
                f"{row['sim']['ttft_p50_ms']} p99 {row['sim']['ttft_p99_ms']} ms; errors {row['rel_error']}")
    errs = [abs(v) for row in report["loads"].values() for v in row["rel_error"].values() if v is not None]
    report["max_abs_rel_error"] = round(max(errs), 4) if errs else None
    report["all_within_target"] = all(row["within_target"] for row in report["loads"].values())
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
