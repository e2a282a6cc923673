"""Deadline-driven modality selection under overload: goodput and job completion time with
selection on versus the same system with it off, at 2x and 4x the sustainable load.

What runs (all on this machine, the small LLaVA, fp32, the split layout by default: an encode, a
prefill and a decode worker, one torch thread each, and the scheduler, as processes, queues in a
local redis-server):

1. `prism profile` (the library call behind it) measures the stage costs of the deployed model;
   accuracy per reduction comes from a supplied file (`ACCURACY`: a random-weight model has no
   accuracy to measure; these stand for the published per-modality results a user would give).
2. The request sequence: the window of the Azure conversation trace (`../shared/traces`) with the
   most images (the multimodal shape overlaid, seeded), its first `--requests` requests; prompt
   tokens scaled to a CPU-sized model, `--new-tokens` generated (forced). Every request with
   images allows dropping images (`min_images` 0, so all of them) down to its floor, drawn from
   `FLOORS`; text-only requests have nothing to reduce.
3. Calibration on the idle deployment (selection off): the e2e latency of a request with k
   images, k = 0..max, one at a time. Each request's deadline is `--deadline-x` times the idle
   latency of its image count. The sustainable load (`--sustainable`):
   * `capacity` (the default): the throughput the system sustains on this request mix, measured:
     the sequence sent closed loop with `--capacity-concurrency` requests in flight (no
     deadline, selection off), requests completed over the time from the first sent to the last
     finished (several concurrencies: the best). The stages overlap on the cores they share and
     batch, so this is what the deployment can serve; on this box it is about 1.5x `idle`.
   * `idle`: one request per mean idle latency of the sequence (one request at a time; an
     underestimate: "4x" of it overloads the system about 2.6 times).
4. For each load L in `--loads`, the sequence's arrival times are scaled so its mean rate is L x
   the sustainable load, and it is replayed open loop (each request at its time) against three fresh
   deployments of the same system: `admission_only` (no profile: admission's per-stage estimate
   decides deadlines), `selection_off` (the profile with no reduction in it: the selection's
   program decides deadlines, every request served as sent) and `selection_on` (the profile with
   every reduction: the program reduces arrivals and reassigns queued requests, and while the
   arrivals overload a stage it trades accuracy for work at the scheduler's load price,
   `--price`, so arrivals come reduced before deadlines force it).

With `--repeats R` each load's sequence is replayed R times on each deployment, `--pause-s` apart
(longer than the load price's window, so each replay is a burst out of quiet; what the
scheduler's feedback learned stays, as in a system that keeps running), and the numbers are
pooled over the replays, each also reported: one replay of 60 requests varies a lot.

Goodput: requests that finish all their tokens within their deadline (client-measured) with the
expected accuracy of what was served at or above their floor (the full request: 1.0), per
second of trace time. JCT: client-measured e2e of the completed requests (mean, p99); refused
requests count in `refused` (RESOURCE_EXHAUSTED before any work), not in JCT.

    .venv/bin/python benchmarks/selection_bench.py --out .bench/selection.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import GATE, ROOT, SMALL_MODEL_DIR, TRACES_DIR, ensure_model, finish_report, pct, rnd, say  # noqa: E402
from benchmarks.goodput import Prompts, send, warm_up  # noqa: E402

#: Supplied accuracy per reduction (relative to the full request).
ACCURACY = {"full": 1.0, "drop_images:1": 0.95, "drop_images:2": 0.9, "drop_images:3": 0.86,
            "drop_images:4": 0.82, "drop_images:5": 0.79, "drop_images:6": 0.76, "drop_images:7": 0.73,
            "drop:image": 0.62}
FLOORS = (0.6, 0.75, 0.85)  # callers' accuracy floors, drawn per request (seeded)
MOSEL_GOODPUT_X = 3.6
MODES = ("admission_only", "selection_off", "selection_on")
#: Options passed to the scheduler as ``--selection-NAME`` (NAME: type, default, what it sets).
SCHEDULER_FLAGS = {
    "parallelism": (float, 0.0, "cores the stage processes share (the program counts work in the workers' CPU "
                                "seconds and shares these cores itself; 0: each stage its own, at the wall-clock "
                                "rates measured under whatever contention there was)"),
    "price": (float, 1.0, "accuracy per second of work per unit of overload (0: reduce only to meet deadlines)"),
    "price-window-s": (float, 10.0, "seconds of arrivals the offered load is measured over"),
    "feedback-window": (int, 128, "served requests the feedback remembers"),
    "feedback-quantile": (float, 0.9, "the quantile of actual over predicted e2e the capacities are divided by"),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=SMALL_MODEL_DIR)
    p.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--window-s", type=float, default=60.0, help="trace window searched for the most images")
    p.add_argument("--max-images", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--max-context", type=int, default=96, help="text tokens per request, at most")
    p.add_argument("--deadline-x", type=float, default=4.0)
    p.add_argument("--loads", type=str, default="2,4", help="multiples of the sustainable load")
    p.add_argument("--sustainable", choices=("capacity", "idle"), default="capacity",
                   help="the sustainable load: the throughput measured closed loop (capacity) or one request "
                        "per mean idle latency (idle)")
    p.add_argument("--capacity-concurrency", type=str, default="4",
                   help="requests in flight while the capacity is measured (comma-separated: each measured, "
                        "the best taken)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--layout", choices=("colocated", "split"), default="split")
    p.add_argument("--encode-batch-tokens", type=int, default=0,
                   help="the encoder's --max-batch-tokens (colocated: --encode-batch-tokens), both modes; "
                        "0: its default (on CPU the tower gains nothing from batching requests: 1 encodes "
                        "each request on its own, so the most urgent finishes first)")
    p.add_argument("--serial-model", action="store_true",
                   help="the selection program's serial model (every stage of every request in series) "
                        "instead of overlapping stages")
    for flag, (kind, default, text) in SCHEDULER_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=default, help=f"the scheduler's --selection-{flag}: {text}")
    p.add_argument("--repeats", type=int, default=1,
                   help="replays of the sequence per load on each deployment (pooled; each also reported), "
                        "--pause-s apart")
    p.add_argument("--pause-s", type=float, default=12.0,
                   help="idle seconds between repeats (longer than the load price's window)")
    p.add_argument("--modes", type=str, default=",".join(MODES),
                   help=f"which of {', '.join(MODES)} to run (selection_off and selection_on at least)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--work-dir", type=Path, default=ROOT / ".bench" / "selection")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes).difference(MODES) or not {"selection_off", "selection_on"} <= set(args.modes):
        p.error(f"--modes: from {', '.join(MODES)}, with selection_off and selection_on")
    if args.repeats < 1 or not 0.0 <= args.feedback_quantile <= 1.0 or args.encode_batch_tokens < 0:
        p.error("--repeats must be >= 1, --feedback-quantile in [0, 1] and --encode-batch-tokens >= 0")
    try:
        args.capacity_concurrency = [int(c) for c in args.capacity_concurrency.split(",")]
    except ValueError:
        p.error("--capacity-concurrency: comma-separated integers")
    if not args.capacity_concurrency or min(args.capacity_concurrency) < 1:
        p.error("--capacity-concurrency: each >= 1")
    return args


def sequence(args) -> tuple[list, dict]:
    from prism.bench.trace import ImageShape, burstiest_window, describe, load_trace, scale

    full = load_trace(args.trace, seed=args.seed, shape=ImageShape())
    window = burstiest_window(full, args.window_s, weight=lambda r: r.num_images)[:args.requests]
    seq = scale(window, context_factor=1 / 16, max_context=args.max_context, min_context=8,
                max_images=args.max_images)
    seq = [replace(r, generated_tokens=args.new_tokens) for r in seq]
    rng = random.Random(args.seed + 4)
    floors = [rng.choice(FLOORS) for _ in seq]
    meta = {"trace": str(args.trace), "trace_requests": len(full), "window_s": args.window_s,
            "requests": len(seq), "window": describe(window), "replayed": describe(seq),
            "scaling": {"context_tokens": f"x1/16, clipped to [8, {args.max_context}]",
                        "generated_tokens": f"{args.new_tokens}, forced (ignore_eos)",
                        "max_images": args.max_images, "image": "224x224 random PNG (seeded)"},
            "images_pattern": "".join(str(min(r.num_images, 9)) for r in seq),
            "floors": {str(f): floors.count(f) for f in FLOORS}}
    return list(zip(seq, floors)), meta


def make_profile(args) -> tuple[Path, dict]:
    from prism.profiling.cost import CostSettings
    from prism.profiling.profile import build_profile
    from prism.profiling.schema import save

    args.work_dir.mkdir(parents=True, exist_ok=True)
    acc = args.work_dir / "accuracy.json"
    acc.write_text(json.dumps(ACCURACY))
    started = time.perf_counter()
    profile = build_profile(args.model_dir, accuracy_file=acc, settings=CostSettings(batch_sizes=(1, 4), repeats=2))
    path = args.work_dir / "profile.json"
    save(profile, path)
    # Selection off: the same program deciding deadlines, with no reduction to choose from.
    save(replace(profile, accuracy={"full": profile.accuracy["full"]}), args.work_dir / "profile-full-only.json")
    took = time.perf_counter() - started
    say(f"profile: {path} in {took:.1f} s")
    costs = {s: {str(b): rnd(c.ms_per_token, 3) for b, c in per.items()} for s, per in profile.costs.items()}
    return args.work_dir, {"wall_s": round(took, 1), "ms_per_token": costs, "accuracy_supplied": ACCURACY}


def deployment(args, name: str, profile: Path | None):
    from prism.launch import Deployment, DeploymentOptions

    sched = [] if profile is None else ["--selection-profile", str(profile)] + [
        arg for flag in SCHEDULER_FLAGS
        for arg in (f"--selection-{flag}", f"{getattr(args, flag.replace('-', '_')):g}")] + (
        ["--no-selection-overlap"] if args.serial_model else [])
    options = DeploymentOptions(model_dir=args.model_dir, layout=args.layout, placement=args.layout,
                                threads=args.threads, slots=16, max_len=2048, log_dir=args.work_dir / "logs" / name,
                                extra_args={"scheduler": sched, **encoder_args(args)})
    return Deployment(options)


def encoder_args(args) -> dict[str, list[str]]:
    """The encoder's batch budget, where the bench sets one."""
    if not args.encode_batch_tokens:
        return {}
    if args.layout == "split":
        return {"encode": ["--max-batch-tokens", str(args.encode_batch_tokens)]}
    return {"worker": ["--encode-batch-tokens", str(args.encode_batch_tokens)]}


async def calibrate(address: str, prompts: Prompts, args) -> dict[int, float]:
    """Idle e2e seconds of a request with k images (k = 0..max), the better of two runs."""
    from prism.client import AsyncPrismClient

    out = {}
    async with AsyncPrismClient(address) as client:
        for k in range(args.max_images + 1):
            runs = []
            for j in range(2):
                GATE.wait()
                r = await send(client, prompts.messages(970 + 2 * k + j, args.max_context // 2, k), args.new_tokens)
                if r["code"] != "OK":
                    raise RuntimeError(f"calibration failed: {r['code']} {r['message']}")
                runs.append(r["e2e_ms"] / 1000)
            out[k] = min(runs)
            say(f"calibration: {k} images, idle e2e {out[k] * 1000:.0f} ms")
    return out


def request_bodies(seq: list, prompts: Prompts) -> list[list[dict]]:
    """The messages of each request of the sequence: the capacity run and the replays send the same."""
    return [prompts.messages(k, r.context_tokens, r.num_images) for k, (r, _) in enumerate(seq)]


async def closed_loop(address: str, seq: list, prompts: Prompts, concurrency: int, args) -> dict:
    """The sequence sent with `concurrency` requests in flight (no deadline, nothing reduced):
    requests completed per second from the first sent to the last finished."""
    from prism.client import AsyncPrismClient

    bodies = request_bodies(seq, prompts)
    results: list[dict] = []
    pending = iter(range(len(seq)))
    async with AsyncPrismClient(address) as client:
        async def sender() -> None:
            for k in pending:  # one shared iterator: each request is sent once
                r = await send(client, bodies[k], seq[k][0].generated_tokens, timeout=args.request_timeout,
                               request_id=f"c{k}-{uuid.uuid4().hex[:8]}")
                results.append({**r, "new_tokens": seq[k][0].generated_tokens})

        await asyncio.gather(*(sender() for _ in range(concurrency)))
    done = [r for r in results if r["code"] == "OK" and r["tokens"] == r["new_tokens"]]
    if len(done) < len(results):
        bad = next(r for r in results if r not in done)
        raise RuntimeError(f"capacity run: {len(results) - len(done)} requests failed ({bad['code']} {bad['message']})")
    span_s = max(r["end"] for r in done) - min(r["sent"] for r in results)
    return {"concurrency": concurrency, "completed": len(done), "span_s": round(span_s, 2),
            "rate_per_s": round(len(done) / span_s, 4)}


def sustainable_rate(address: str, seq: list, prompts: Prompts, idle: dict[int, float], args) -> dict:
    """The sustainable load (`--sustainable`), with how it was found."""
    mean_s = statistics.fmean(idle[r.num_images] for r, _ in seq)
    out = {"definition": args.sustainable, "idle_rate_per_s": round(1 / mean_s, 4)}
    if args.sustainable == "idle":
        return {**out, "rate_per_s": 1 / mean_s}
    runs = []
    for concurrency in args.capacity_concurrency:
        GATE.wait()
        runs.append(asyncio.run(closed_loop(address, seq, prompts, concurrency, args)))
        say(f"capacity: {concurrency} in flight, {runs[-1]['completed']} requests in {runs[-1]['span_s']} s, "
            f"{runs[-1]['rate_per_s']} req/s ({runs[-1]['rate_per_s'] * mean_s:.2f}x one at a time)")
    best = max(r["rate_per_s"] for r in runs)
    return {**out, "rate_per_s": best, "capacity_over_idle": round(best * mean_s, 3), "capacity_runs": runs}


async def replay(address: str, seq: list, prompts: Prompts, idle: dict[int, float], args) -> list[dict]:
    from prism.client import AsyncPrismClient, Reduce

    loop = asyncio.get_running_loop()
    bodies = request_bodies(seq, prompts)
    results: list[dict] = []
    async with AsyncPrismClient(address) as client:
        t0 = loop.time() + 0.2

        async def one(k: int) -> None:
            req, floor = seq[k]
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - loop.time()))
            deadline_ms = max(1, round(args.deadline_x * idle[req.num_images] * 1000))
            reduce = Reduce(accuracy_floor=floor, drop_images=True, min_images=0,
                            drop_modalities=("image",)) if req.num_images else None
            r = await send(client, bodies[k], req.generated_tokens, deadline_ms=deadline_ms, reduce=reduce,
                           timeout=args.request_timeout, request_id=f"i{k}-{uuid.uuid4().hex[:8]}")
            red = r.pop("reductions")
            strategy = red.strategy if red is not None else "full"
            accuracy = ACCURACY["full"] if strategy == "full" else (red.expected_accuracy if red else 0.0)
            r.update(index=k, arrival_s=round(req.arrival_s, 3), images=req.num_images, floor=floor,
                     deadline_ms=deadline_ms, strategy=strategy,
                     accuracy=accuracy, new_tokens=req.generated_tokens)
            results.append(r)

        await asyncio.gather(*(one(k) for k in range(len(seq))))
    return sorted(results, key=lambda r: r["index"])


def good(r: dict) -> bool:
    return (r["code"] == "OK" and r["tokens"] == r["new_tokens"] and r["e2e_ms"] <= r["deadline_ms"]
            and r["accuracy"] >= r["floor"] - 1e-9)


def summarise(results: list[dict], trace_time_s: float) -> dict:
    done = [r for r in results if r["code"] == "OK" and r["tokens"] == r["new_tokens"]]
    jct = sorted(r["e2e_ms"] for r in done)
    codes: dict[str, int] = {}
    strategies: dict[str, int] = {}
    for r in results:
        codes[r["code"]] = codes.get(r["code"], 0) + 1
    for r in done:
        strategies[r["strategy"]] = strategies.get(r["strategy"], 0) + 1
    n_good = sum(good(r) for r in results)
    return {
        "requests": len(results), "completed": len(done), "good": n_good,
        "goodput_per_s": round(n_good / trace_time_s, 4),
        "late": sum(1 for r in done if r["e2e_ms"] > r["deadline_ms"]),
        "below_floor": sum(1 for r in done if r["accuracy"] < r["floor"] - 1e-9),
        "refused": codes.get("RESOURCE_EXHAUSTED", 0),
        "jct_mean_ms": rnd(statistics.fmean(jct), 1) if jct else None,
        "jct_p50_ms": rnd(pct(jct, 0.5), 1), "jct_p99_ms": rnd(pct(jct, 0.99), 1),
        "mean_accuracy_served": rnd(statistics.fmean(r["accuracy"] for r in done), 4) if done else None,
        "image_tokens_served": sum(r["image_tokens"] or 0 for r in done),
        "codes": dict(sorted(codes.items())), "strategies": dict(sorted(strategies.items())),
    }


def scaled(seq: list, rate: float) -> tuple[list, float]:
    """`seq` with arrivals stretched or squeezed to a mean rate of `rate` requests/s."""
    span = seq[-1][0].arrival_s or 1.0
    factor = (len(seq) / rate) / span
    return [(replace(r, arrival_s=r.arrival_s * factor), f) for r, f in seq], span * factor


def run_mode(args, name: str, profile: Path | None, seq: list, prompts: Prompts, base: dict | None,
             loads: list[float]) -> tuple[dict, dict]:
    """One deployment's replays at each load; `base` (the idle calibration and the sustainable
    load) is measured on the first deployment and passed to the others."""
    say(f"{name}: starting")
    out: dict = {}
    with deployment(args, name, profile) as dep:
        asyncio.run(warm_up(dep.address, prompts, args.new_tokens))
        if base is None:
            idle = asyncio.run(calibrate(dep.address, prompts, args))
            base = {"idle": idle, "sustainable": sustainable_rate(dep.address, seq, prompts, idle, args)}
        idle = base["idle"]
        for load in loads:
            rate = load * base["sustainable"]["rate_per_s"]
            timed, trace_s = scaled(seq, rate)
            runs = []
            for rep in range(args.repeats):
                if rep:
                    time.sleep(args.pause_s)
                GATE.wait()
                say(f"{name}: {load}x load, {rate:.2f} req/s, {len(timed)} requests over {trace_s:.1f} s"
                    + (f" (repeat {rep + 1} of {args.repeats})" if args.repeats > 1 else ""))
                started = time.perf_counter()
                results = asyncio.run(replay(dep.address, timed, prompts, idle, args))
                runs.append((results, time.perf_counter() - started))
                one = summarise(results, trace_s)
                say(f"{name} {load:g}x: good {one['good']}/{one['requests']}, goodput "
                    f"{one['goodput_per_s']}/s, refused {one['refused']}, late {one['late']}, JCT mean "
                    f"{one['jct_mean_ms']} p99 {one['jct_p99_ms']} ms, strategies {one['strategies']}")
            summary = summarise([r for results, _ in runs for r in results], trace_s * len(runs))
            summary.update(load_x=load, rate_per_s=round(rate, 3), trace_time_s=round(trace_s, 2),
                           wall_s=round(sum(w for _, w in runs), 1))
            if len(runs) > 1:
                summary["repeats"] = [{k: v for k, v in summarise(results, trace_s).items()
                                       if k in ("good", "late", "refused", "below_floor", "jct_mean_ms", "jct_p99_ms")}
                                      for results, _ in runs]
            summary["per_request"] = [
                {"repeat": rep, **{k: (rnd(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                                   if k in ("index", "arrival_s", "images", "floor", "deadline_ms", "code", "e2e_ms",
                                            "strategy", "accuracy") or (k == "message" and r["code"] != "OK")}}
                for rep, (results, _) in enumerate(runs) for r in results]
            out[f"{load:g}x"] = summary
        sel = dep.status().selection
        out["selector"] = {"decisions": sel.decisions, "decision_p50_ms": rnd(sel.decision_p50_ms, 3),
                           "decision_p99_ms": rnd(sel.decision_p99_ms, 3), "decision_max_ms": rnd(sel.decision_max_ms, 3),
                           "fitted": sel.fitted, "refused": sel.refused, "reassigned": sel.reassigned,
                           "lost_races": sel.lost_races, "last_load_price": rnd(sel.load_price, 3),
                           "last_offered_load": rnd(sel.offered_load, 3)}
    return out, base


def main(argv=None) -> None:
    args = parse(argv)
    started = time.time()
    ensure_model(args.model_dir)
    loads = [float(x) for x in args.loads.split(",")]
    seq, meta = sequence(args)
    prompts = Prompts(args.model_dir, args.seed)
    profile, profile_meta = make_profile(args)
    admission, base = run_mode(args, "admission_only", None, seq, prompts, None, loads) \
        if "admission_only" in args.modes else (None, None)
    off, base = run_mode(args, "selection_off", profile / "profile-full-only.json", seq, prompts, base, loads)
    on, _ = run_mode(args, "selection_on", profile / "profile.json", seq, prompts, base, loads)
    idle = base["idle"]
    report = {
        "benchmark": "deadline-driven modality selection (issue 4)",
        "model": "llava small (fp32)", "layout": args.layout, "threads_per_worker": args.threads,
        "encode_batch_tokens": args.encode_batch_tokens or "default",
        "selection_model": "serial" if args.serial_model else f"stage queues, parallelism {args.parallelism or 'unbounded'}",
        "selection_price": args.price, "price_window_s": args.price_window_s,
        "feedback_window": args.feedback_window, "feedback_quantile": args.feedback_quantile, "repeats": args.repeats,
        "sequence": meta, "profile": profile_meta,
        "calibration": {"idle_e2e_ms_by_images": {str(k): rnd(v * 1000, 1) for k, v in idle.items()},
                        "deadline_x": args.deadline_x,
                        "sustainable": {k: rnd(v, 4) if isinstance(v, float) else v
                                        for k, v in base["sustainable"].items()}},
        "modes": {"admission_only": "no profile: admission's per-stage estimate decides deadlines",
                  "selection_off": "the profile with no reduction: the program decides deadlines, inputs as sent",
                  "selection_on": "the profile with every reduction: the program reduces and reassigns, and under "
                                  "overload trades accuracy for work at the load price (--price)"},
        "admission_only": admission, "selection_off": off, "selection_on": on, "ratios": {},
    }
    for load in loads:
        key = f"{load:g}x"
        a, b = on[key], off[key]
        report["ratios"][key] = {
            "goodput_on_over_off": round(a["goodput_per_s"] / b["goodput_per_s"], 3) if b["goodput_per_s"] else None,
            "jct_mean_off_over_on": round(b["jct_mean_ms"] / a["jct_mean_ms"], 3)
            if a["jct_mean_ms"] and b["jct_mean_ms"] else None,
            "jct_p99_off_over_on": round(b["jct_p99_ms"] / a["jct_p99_ms"], 3)
            if a["jct_p99_ms"] and b["jct_p99_ms"] else None,
            "goodput_on_over_admission_only": round(a["goodput_per_s"] / admission[key]["goodput_per_s"], 3)
            if admission and admission[key]["goodput_per_s"] else None,
        }
    best = max((r["goodput_on_over_off"] or 0) for r in report["ratios"].values())
    report["goal"] = {"mosel_goodput_x": MOSEL_GOODPUT_X, "best_goodput_x": best, "beats_mosel": best > MOSEL_GOODPUT_X}
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
