"""Adaptation benchmark (issue 7): a fixed configuration against adaptation by variants only, by
vertical scaling only, and both, over a trace whose rate changes, in ONE run on this machine.

By default the trace is replayed against the LIVE system (`benchmarks/adapt_live.py`: a
deployment per policy, the scheduler's adaptation loop acting in place). ``--model-only`` runs
the earlier model of the pool instead, described below:

1. **Measures** the small LLaVA's two variants on this machine, in this run: fp32 and bf16 of
   the same checkpoint (whole-pipeline variants), each request a prompt of `--prompt-tokens`
   and `--new-tokens` greedy tokens through Hugging Face ``generate``, at every batch size in
   `--batches` and every core count up to `--max-cores` (torch threads and core affinity set
   as the workers' in-place vertical scaling sets them). Accuracies come from a supplied file
   (`--accuracy-file`, JSON {"fp32": a, "bf16": b}; default 0.83 / 0.80, stated in the report).
2. **Replays** a trace from `/work/shared/traces` (`prism.bench.trace`), time-scaled so that its
   mean rate is `--load` times what the most accurate variant on one core carries, through a
   discrete-event model of the serving pool under each policy: every request carries its send
   time (a network delay drawn before arrival), each variant's queue is served in remaining-budget
   order, a worker takes the most urgent requests up to its batch, and a batch of ``b`` on ``c``
   cores takes the measured time. Policies:
   * ``fixed``: the configuration the integer program picks for the trace's MEAN rate (what an
     operator sizes for), held the whole run;
   * ``variants``: the variant mix re-solved every `--period-s` from the load forecast
     (InfAdapter), cores and batch held at the fixed configuration's;
   * ``vertical``: the fixed configuration's variant, cores and batch re-solved (Sponge);
   * ``both``: everything re-solved.
   Every policy's decisions come from the adaptation core (`services.scheduler.core.adapt`).
3. **Reports** per policy: SLO violations (requests finishing after their deadline), mean
   accuracy, cost in core-seconds (cores allocated, integrated over the run), and the ratios
   against ``fixed``. The replay is a model of the pool driven by latencies measured in this run
   (a live replay of four configurations on two shared cores would measure the other engineers'
   processes); the live mechanics (variants, SetCompute, reordering) are tested in
   `tests/integration/test_adaptation.py`.

    python benchmarks/adapt_bench.py --quick                 # live, about 8 minutes
    python benchmarks/adapt_bench.py --out adapt.json        # live, the real numbers (300 s per policy)
    python benchmarks/adapt_bench.py --model-only --quick    # the model of the pool, about a minute
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import TRACES_DIR, ensure_model, finish_report, say  # noqa: E402
from services.scheduler.core.adapt import (  # noqa: E402
    Adapter, AdapterSettings, Bounds, Infeasible, LatencyModel, PipelineConfig, RateForecaster, VariantProfile, Weights)

STAGE = "pipeline"


def measure(model_dir: Path, dtype: str, batches: list[int], cores: list[int], prompt_tokens: int,
            new_tokens: int, reps: int) -> dict[int, dict[int, float]]:
    """{cores: {batch: ms}} of one batch of requests through HF generate, on this machine."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    vocab = model.config.text_config.vocab_size
    allowed = sorted(os.sched_getaffinity(0))
    table: dict[int, dict[int, float]] = {}
    try:
        for c in cores:
            torch.set_num_threads(c)
            os.sched_setaffinity(0, allowed[:c])
            for b in batches:
                ids = torch.randint(10, vocab - 1, (b, prompt_tokens), generator=torch.Generator().manual_seed(b))
                times = []
                with torch.inference_mode():
                    model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # warm
                    for _ in range(reps):
                        t = time.perf_counter()
                        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       min_new_tokens=new_tokens, do_sample=False)
                        times.append((time.perf_counter() - t) * 1000)
                table.setdefault(c, {})[b] = sorted(times)[len(times) // 2]
                say(f"  {dtype} cores={c} batch={b}: {table[c][b]:.0f} ms")
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(len(allowed))
    return table


def simulate(arrivals: list[tuple[float, float]], slo_ms: float, profiles: dict[str, VariantProfile],
             decide, period_s: float, end_s: float) -> dict:
    """Discrete-event replay. `arrivals`: (arrival_s, sent_s); `decide(now, forecaster)` returns
    the PipelineConfig in effect from `now` (None: keep). Returns the policy's figures."""
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(t: float, kind: str, data: object = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    t_tick = 0.0
    while t_tick <= end_s:  # before the arrivals: a tick at the time of an arrival decides first
        push(t_tick, "tick")
        t_tick += period_s
    for i, (a, s) in enumerate(arrivals):
        push(a, "arrive", (i, s))
    forecaster = RateForecaster(window_s=period_s, windows=4, margin=0.1)
    config: PipelineConfig | None = None
    queues: dict[str, list] = {}
    busy: dict[str, int] = {}  # variant -> workers busy
    credit: dict[str, float] = {}
    served = violations = 0
    acc_sum = cost_core_s = 0.0
    last_t = 0.0
    late_ms: list[float] = []

    def workers(v: str):
        return next((w for w in config.workers(STAGE) if w.variant == v), None) if config else None

    def start_batches(now: float) -> None:
        for v, q in queues.items():
            w = workers(v)
            if w is None:  # a variant taken out: its queue goes to the current mix's first variant
                if q and config is not None:
                    target = config.workers(STAGE)[0].variant
                    for item in q:
                        heapq.heappush(queues.setdefault(target, []), item)
                    q.clear()
                continue
            while q and busy.get(v, 0) < w.replicas:
                batch = [heapq.heappop(q) for _ in range(min(w.batch, len(q)))]
                busy[v] = busy.get(v, 0) + 1
                push(now + profiles[v].latency_ms(len(batch), w.cores) / 1000, "done", (v, batch))

    while events:
        now, _, kind, data = heapq.heappop(events)
        if config is not None:
            cost_core_s += config.cost_cores * (now - last_t)
        last_t = now
        if kind == "tick":
            new = decide(now, forecaster)
            if new is not None:
                config = new
                credit = {w.variant: 0.0 for w in config.workers(STAGE)}
        elif kind == "arrive":
            i, sent = data
            forecaster.observe(now)
            mix = config.workers(STAGE)
            shares = {w.variant: (w.share_rps if w.share_rps is not None else 1.0) for w in mix}
            total = sum(shares.values()) or 1.0
            for v in shares:
                credit[v] = credit.get(v, 0.0) + shares[v]
            v = max(shares, key=lambda n: credit[n])
            credit[v] -= total
            deadline = sent + slo_ms / 1000  # the remaining budget orders the queue
            heapq.heappush(queues.setdefault(v, []), (deadline, i))
        elif kind == "done":
            v, batch = data
            busy[v] -= 1
            for deadline, _ in batch:
                served += 1
                acc_sum += profiles[v].accuracy
                if now > deadline + 1e-9:
                    violations += 1
                    late_ms.append((now - deadline) * 1000)
        start_batches(now)
    return {"requests": len(arrivals), "served": served, "slo_violations": violations,
            "violation_rate": round(violations / max(served, 1), 4), "mean_accuracy": round(acc_sum / max(served, 1), 4),
            "cost_core_s": round(cost_core_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer measurements and a shorter trace window")
    ap.add_argument("--trace", type=Path, default=TRACES_DIR / "azure_llm_2023_conv.csv")
    ap.add_argument("--duration-s", type=float, default=1800.0, help="seconds of the trace replayed (before scaling)")
    ap.add_argument("--load", type=float, default=0.6, help="mean rate over what fp32 on one core carries")
    ap.add_argument("--slo-factor", type=float, default=4.0, help="SLO = this times fp32's batch-1 time on one core")
    ap.add_argument("--period-s", type=float, default=0.0, help="re-solve period (0: 1/40 of the run)")
    ap.add_argument("--max-cores", type=int, default=min(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--accuracy-file", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--model-only", action="store_true", help="replay through a model of the pool, not the live system")
    ap.add_argument("--log-dir", type=Path, default=None, help="live: where the deployments' logs and profiles go")
    args = ap.parse_args()
    started = time.time()
    if not args.model_only:
        from benchmarks.adapt_live import main_live

        if args.duration_s == 1800.0:
            args.duration_s = 300.0  # live: seconds of replay per policy
        finish_report(main_live(args, started), args.out, started)
        return
    batches = [1, 2, 4]
    prompt, new = (32, 4) if args.quick else (128, 16)
    reps = 1 if args.quick else 3
    accuracy = {"fp32": 0.83, "bf16": 0.80}
    if args.accuracy_file:
        accuracy.update(json.loads(args.accuracy_file.read_text()))
    model_dir = ensure_model()
    cores = list(range(1, args.max_cores + 1))
    say("measuring the variants (HF generate on this machine)")
    tables = {v: measure(model_dir, {"fp32": "float32", "bf16": "bfloat16"}[v], batches, cores, prompt, new, reps)
              for v in ("fp32", "bf16")}
    profiles = {v: VariantProfile(v, STAGE, accuracy[v], LatencyModel(tables[v])) for v in tables}
    base_ms = profiles["fp32"].latency_ms(1, 1)
    slo_ms = args.slo_factor * base_ms
    fp32_1core_rps = max(1000.0 * b / profiles["fp32"].latency_ms(b, 1) for b in batches)

    from prism.bench.trace import load_trace

    duration = args.duration_s / (3 if args.quick else 1)
    reqs = load_trace(args.trace, duration_s=duration)
    span = max(r.arrival_s for r in reqs) or 1.0
    factor = (len(reqs) / span) / (args.load * fp32_1core_rps)  # time stretch: mean rate = load * capacity
    rng = random.Random(0)
    arrivals = []
    for r in reqs:
        at = r.arrival_s * factor
        arrivals.append((at, at - rng.uniform(0.0, 0.2 * slo_ms / 1000)))  # sent before arrival: the network
    end_s = max(a for a, _ in arrivals) + 5.0
    period = args.period_s or end_s / 40
    mean_rate = len(arrivals) / end_s
    bounds_all = Bounds(max_replicas={"*": 2}, batches={"*": tuple(batches)}, cores={"*": tuple(cores)},
                        total_cores=args.max_cores * 2, headroom=0.1)
    weights = Weights(accuracy=10.0, cost=1.0)
    settings = AdapterSettings(slo_ms=slo_ms, period_s=period, horizon_s=period, min_gain=0.25, stable_steps=1,
                               mode="variants")
    all_variants = {STAGE: list(profiles.values())}
    fixed_adapter = Adapter(all_variants, settings, bounds_all, weights)
    try:
        fixed = fixed_adapter.solve(mean_rate * 1.1)
    except Infeasible as exc:
        raise SystemExit(f"no configuration carries the mean rate: {exc.reason}")
    fw = fixed.stages[STAGE]
    fixed_variant = [profiles[w.variant] for w in fixed.workers(STAGE)]

    def adaptive(variants, bounds):
        adapter = Adapter({STAGE: variants}, settings, bounds, weights, clock=lambda: 0.0)
        adapter.current = None

        def decide(now, forecaster):
            adapter.forecaster = forecaster
            adapter.last_solve_s = None
            new = adapter.step(now)
            if new is None and adapter.current is None:  # nothing feasible yet: start from the fixed one
                adapter.current = fixed
                return fixed
            return new
        return decide

    policies = {
        "fixed": lambda now, f: fixed if now == 0.0 else None,
        "variants": adaptive(list(profiles.values()), Bounds(max_replicas={"*": fw.replicas}, batches={"*": (fw.batch,)},
                                                             cores={"*": (fw.cores,)}, total_cores=fixed.cost_cores,
                                                             headroom=0.1)),
        "vertical": adaptive(fixed_variant, bounds_all),
        "both": adaptive(list(profiles.values()), bounds_all),
    }
    results = {}
    for name, decide in policies.items():
        say(f"replaying: {name}")
        results[name] = simulate(arrivals, slo_ms, profiles, decide, period, end_s)
    base = results["fixed"]
    for name, r in results.items():
        r["violations_vs_fixed"] = round(r["slo_violations"] / base["slo_violations"], 3) if base["slo_violations"] else None
        r["violation_reduction"] = (round(1 - r["slo_violations"] / base["slo_violations"], 3)
                                    if base["slo_violations"] else None)
        r["cost_vs_fixed"] = round(r["cost_core_s"] / base["cost_core_s"], 3) if base["cost_core_s"] else None
    both = results["both"]
    report = {
        "benchmark": "adapt_bench", "quick": args.quick,
        "model": {"dir": str(model_dir), "variants": {v: {"accuracy": accuracy[v], "accuracy_source":
                                                           str(args.accuracy_file) if args.accuracy_file else "default (supplied, not measured)",
                                                           "ms": {str(c): {str(b): round(ms, 1) for b, ms in row.items()}
                                                                  for c, row in tables[v].items()}}
                                                      for v in tables},
                  "prompt_tokens": prompt, "new_tokens": new},
        "trace": {"file": str(args.trace), "requests": len(arrivals), "seconds": round(end_s, 1),
                  "mean_rate_rps": round(mean_rate, 3), "time_factor": round(factor, 3)},
        "slo_ms": round(slo_ms, 1), "period_s": round(period, 2),
        "fixed_config": [{"variant": w.variant, "batch": w.batch, "replicas": w.replicas, "cores": w.cores}
                         for w in fixed.workers(STAGE)],
        "policies": results,
        "goal": {"violation_reduction_at_least": 0.65, "cost_at_most_fixed": True,
                 "met": bool(both["violation_reduction"] is not None and both["violation_reduction"] >= 0.65
                             and both["cost_vs_fixed"] is not None and both["cost_vs_fixed"] <= 1.0)},
        "machine": {"cpus": len(os.sched_getaffinity(0))},
    }
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
