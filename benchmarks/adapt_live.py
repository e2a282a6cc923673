"""The LIVE path of `benchmarks/adapt_bench.py` (issue 7): the fixed configuration against
adaptation by variants only, by vertical scaling only, and both, each replaying the same
time-varying trace against a whole deployment on this machine (`prism.launch.Deployment`:
Redis, workers and scheduler as processes), the scheduler's adaptation loop (``--adapt``) acting
live: SetCompute in place, variant routing weights, drains and the launcher's restarts.

1. **Profile, live.** One deployment serving the small LLaVA as two whole-pipeline variants,
   ``fp32`` and ``bf16`` (one checkpoint, two dtypes; one colocated worker each). For each variant,
   cores in {1, 2} and every batch bound the workers can use (1, 2, 4 quick; up to their 8
   slots in full): its worker is given the share by SetCompute and ``b`` concurrent requests
   pinned to it are timed end to end, each repetition after the quiet gate (`benchmarks.common.GATE`),
   the MIN of `reps` kept (other engineers' load only ever adds time). That table is
   the adaptation loop's variants file. **Accuracy**: the eval prompts are answered by each
   variant; a variant's accuracy is the fraction of its tokens equal to fp32's at the same
   position (agreement with the larger variant is the label on random-weight models; fp32 is
   1.0 by definition).
2. **Trace.** A window of `--trace` time-scaled so that its mean rate is `--load` times what fp32
   on one core carries; its peaks exceed that.
3. **Policies**, each on a fresh deployment (same start state), all with the same batch bounds:
   ``fixed`` -- what the integer program picks for the trace's MEAN rate (one variant, its cores
   and batch bound; `fixed_choice`), set once, no loop; ``variants`` -- fp32 and bf16, the loop
   choosing the mix and batch on the fixed one's cores; ``vertical`` -- the fixed one's variant, the
   loop choosing cores and the batch bound within the FIXED one's core budget (cores allocated never
   exceed the fixed policy's, so it cannot cost more by design; on a machine where the fixed pick is
   one core this leaves the batch bound and the deadline order as its levers: cores are whole and
   one is the least a worker gets, see ``core_budget`` in the report); ``both`` -- fp32 and bf16,
   cores and batch, within the same budget (where the budget is one core, the same levers as
   ``variants``); ``both_2core`` -- ``both`` allowed 1 or 2 cores, up to 2 in all (outside the
   goal: it shows what a second core does on this machine, at its cost). A variant the loop leaves
   out keeps its idle worker for the replay plus 60 s (at least 120 s; ``--adapt-stop-delay-s``), so that
   switching back restarts nothing (a restart loads the model on the cores the kept workers need),
   PARKED at once (the
   applier shrinks it in place to one thread on a cpu the kept configuration holds: it adds no
   allocated core; a worker that cannot be parked yet is counted). Requests pin nothing and carry
   their send time (the SDK's ``sent_unix_ms``).
4. **Figures** per policy: SLO violations (requests whose end-to-end time from their scheduled
   arrival exceeds the SLO, failures included), mean accuracy (of the variant that served each
   request), cost in core-seconds: distinct cores allocated x time over the replay window (from
   just before the first request is sent to the last answer). Fixed: its cores x the replay;
   adaptive: the loop's integral `GetStatus.adaptation.core_seconds` read at the same two points
   (the applied configuration's cores plus any variant left out and not parked). Neither counts
   process start-up before the replay; a worker the loop starts during it counts from the moment
   the configuration naming it is applied.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks.common import GATE, say

PROMPT = "Describe the picture of the harbour at dawn in a few words please"


def _tokens(done) -> list[int]:
    return list(done.token_ids)


async def _timed_batch(address: str, variant: str, b: int, new: int) -> float:
    from prism.client import AsyncPrismClient

    async with AsyncPrismClient(address) as client:
        t = time.perf_counter()
        await asyncio.gather(*(client.complete(f"{PROMPT} {k}", max_new_tokens=new, ignore_eos=True, variant=variant)
                               for k in range(b)))
        return (time.perf_counter() - t) * 1000


def _set_share(d, variant: str, cores: int, batch: int) -> None:
    import grpc

    from prism.v1 import worker_pb2, worker_pb2_grpc

    st = d.status()
    for w in st.workers:
        if d.started.get(w.name, ((), ""))[1] != variant:
            continue
        with grpc.insecure_channel(w.address) as ch:
            stub = worker_pb2_grpc.WorkerAdminServiceStub(ch)
            allowed = list(stub.GetCompute(worker_pb2.GetComputeRequest()).allowed_cpus)
            cpus = allowed[:cores]
            stub.SetCompute(worker_pb2.SetComputeRequest(share=worker_pb2.ComputeShare(
                threads=len(cpus), cpus=cpus, max_batch=batch)))


def profile_live(model_dir: Path, log_dir: Path, cores: list[int], batches: list[int], new: int, reps: int,
                 eval_n: int) -> tuple[dict, dict]:
    """({variant: {cores: {batch: ms}}}, {variant: accuracy}) measured through a live deployment."""
    from prism.client import PrismClient
    from prism.launch import Deployment, DeploymentOptions

    opts = DeploymentOptions(model_dir=model_dir, threads=1, slots=8, max_len=512, log_dir=log_dir, layout="colocated",
                             variants=(f"fp32={model_dir}:1.0", f"bf16={model_dir}:1.0"),
                             variant_dtypes={"bf16": "bfloat16"})
    tables: dict = {}
    with Deployment(opts) as d:
        for v in ("fp32", "bf16"):
            asyncio.run(_timed_batch(d.address, v, 1, new))  # warm
            for c in cores:
                for b in batches:
                    _set_share(d, v, c, b)
                    times = []
                    for _ in range(reps):  # each after the quiet gate; the min: others' load only adds time
                        GATE.wait()
                        times.append(asyncio.run(_timed_batch(d.address, v, b, new)))
                    ms = min(times)
                    tables.setdefault(v, {}).setdefault(c, {})[b] = round(ms, 1)
                    say(f"  live {v} cores={c} batch={b}: {ms:.0f} ms (min of {reps})")
        agree = total = 0
        with PrismClient(d.address) as client:
            for k in range(eval_n):
                prompt = f"eval question {k}: what is shown?"
                ref = _tokens(client.complete(prompt, max_new_tokens=new, ignore_eos=True, variant="fp32"))
                got = _tokens(client.complete(prompt, max_new_tokens=new, ignore_eos=True, variant="bf16"))
                agree += sum(a == b for a, b in zip(ref, got))
                total += len(ref)
    return tables, {"fp32": 1.0, "bf16": round(agree / max(total, 1), 4)}


async def _replay(address: str, arrivals: list[float], new: int, slo_ms: float, accuracy: dict) -> dict:
    from prism.client import AsyncPrismClient

    loop = asyncio.get_running_loop()
    out: list[tuple[float, str, bool]] = []
    errors: list[str] = []
    async with AsyncPrismClient(address) as client:
        t0 = loop.time() + 0.2

        async def one(k: int, at: float) -> None:
            await asyncio.sleep(max(0.0, t0 + at - loop.time()))
            try:
                done = await client.complete(f"{PROMPT} {k % 16}", max_new_tokens=new, ignore_eos=True, timeout=120)
                out.append(((loop.time() - t0 - at) * 1000, done.variant or "fp32", True))
            except Exception as exc:  # noqa: BLE001 - a failure is a violation
                errors.append(f"{getattr(getattr(exc, 'code', None), 'name', type(exc).__name__)}: "
                              f"{str(getattr(exc, 'message', exc))[:120]}")
                out.append(((loop.time() - t0 - at) * 1000, "", False))

        await asyncio.gather(*(one(k, at) for k, at in enumerate(arrivals)))
    ok = [(ms, v) for ms, v, good in out if good]
    lat = sorted(ms for ms, _ in ok)
    return {"requests": len(out), "failed": len(out) - len(ok),
            "errors": {e: errors.count(e) for e in sorted(set(errors))},
            "slo_violations": sum(1 for ms, _, good in out if not good or ms > slo_ms),
            "mean_accuracy": round(statistics.fmean(accuracy[v] for _, v in ok), 4) if ok else None,
            "served_by": {v: sum(1 for _, x in ok if x == v) for v in sorted({x for _, x in ok})},
            "e2e_p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
            "e2e_p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None}


def run_policy(name: str, model_dir: Path, log_dir: Path, variants: list[str], profile: Path | None, adapt_args: list[str],
               arrivals: list[float], new: int, slo_ms: float, accuracy: dict,
               fixed: tuple[str, int, int] | None = None) -> dict:
    from prism.launch import Deployment, DeploymentOptions

    spec = tuple(f"{v}={model_dir}:{accuracy[v]}" for v in variants)
    sched = ["--adapt", f"--adapt-profile={profile}", f"--adapt-slo-ms={slo_ms}", *adapt_args] if profile else []
    opts = DeploymentOptions(model_dir=model_dir, threads=1, slots=8, max_len=512, log_dir=log_dir, layout="colocated",
                             variants=spec, variant_dtypes={"bf16": "bfloat16"} if "bf16" in variants else {},
                             extra_args={"scheduler": sched})
    with Deployment(opts) as d:
        if fixed is not None:  # the operator's static choice: its cores and batch bound, set once
            variant, cores, batch = fixed
            d.wait_for_workers(len(d.workers()))
            _set_share(d, variant, cores, batch)
        if profile:  # the loop's first configuration applied (and its drains followed by the launcher)
            until = time.monotonic() + 60
            while not d.status().adaptation.changes and time.monotonic() < until:
                time.sleep(0.2)
            time.sleep(2.0)
        before = d.status().adaptation.core_seconds if profile else 0.0
        t = time.monotonic()
        res = asyncio.run(_replay(d.address, arrivals, new, slo_ms, accuracy))
        span = time.monotonic() - t
        st = d.status().adaptation
        res["cost_core_s"] = round(st.core_seconds - before, 1) if profile else round(fixed[1] * span, 1)
        res["replay_s"] = round(span, 1)
        if profile:
            res["adaptation"] = {"solves": st.solves, "changes": st.changes, "errors": st.errors,
                                 "last": [(w.variant, w.replicas, w.cores, w.max_batch) for w in st.workers]}
    say(f"  {name}: {json.dumps({k: res[k] for k in ('slo_violations', 'mean_accuracy', 'cost_core_s')})}")
    return res


def fixed_choice(variants_file: Path, mean_rps: float, slo_ms: float, batches: list[int],
                 cores: list[int]) -> tuple[str, int, int]:
    """The static configuration an operator would size for the trace's MEAN rate: the integer
    program's pick (one variant; cores and batch bound within the bounds the adaptive policies
    get), held the whole run. Returns (variant, cores, max batch)."""
    from services.scheduler.core.adapt import Bounds, Weights, load_profile, solve_pipeline

    variants = load_profile(variants_file)
    bounds = Bounds(max_replicas={"*": 1}, batches={"*": tuple(batches)}, cores={"*": tuple(cores)},
                    total_cores=max(cores), headroom=0.1)
    config = solve_pipeline({"pipeline": variants}, mean_rps, slo_ms, bounds, Weights(accuracy=10.0, cost=1.0))
    w = config.stages["pipeline"]
    return w.variant, w.cores, w.batch


def main_live(args, started: float) -> dict:
    """The live benchmark; returns the report (adapt_bench prints it)."""
    import random

    from benchmarks.common import ensure_model
    from prism.bench.trace import load_trace

    work = Path(args.log_dir or "/tmp/prism-adapt-bench")
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_model()
    cores, batches = [1, 2], [1, 2, 4] if args.quick else [1, 2, 4, 8]  # the workers' slots: 8
    new = 4 if args.quick else 8
    GATE.max_wait_s = 20.0 if args.quick else 60.0
    say("profiling the variants live (SetCompute shares, pinned requests)")
    tables, accuracy = profile_live(model_dir, work / "profile", cores, batches, new, 2 if args.quick else 3,
                                    4 if args.quick else 16)
    if args.accuracy_file:
        accuracy.update(json.loads(Path(args.accuracy_file).read_text()))
    files = {}
    for name, vs in (("both", ["fp32", "bf16"]), ("fp32", ["fp32"]), ("bf16", ["bf16"])):
        files[name] = work / f"variants-{name}.json"
        files[name].write_text(json.dumps({"variants": [
            {"name": v, "stage": "pipeline", "accuracy": accuracy[v],
             "table": {str(c): {str(b): ms for b, ms in row.items()} for c, row in tables[v].items()}} for v in vs]}))
    base_ms = tables["fp32"][1][1]
    slo_ms = round(args.slo_factor * base_ms, 1)
    fp32_rps = 1000.0 / tables["fp32"][1][1]  # one request at a time on one core
    duration = 60.0 if args.quick else min(args.duration_s, 600.0)
    reqs = load_trace(args.trace, duration_s=duration * 30)  # a stretch of the trace, its shape kept
    span = max(r.arrival_s for r in reqs) or 1.0
    rng = random.Random(0)
    picked = sorted(r.arrival_s for r in reqs if rng.random() < 1.0)
    factor = duration / span
    arrivals = [a * factor for a in picked]
    mean = len(arrivals) / duration
    keep = min(1.0, args.load * fp32_rps / mean)  # thin the trace to the mean rate wanted
    arrivals = [a for a in arrivals if rng.random() < keep]
    mean = len(arrivals) / duration
    win = [sum(1 for a in arrivals if w <= a < w + 5) / 5 for w in range(0, int(duration), 5)]
    period = args.period_s or 3
    # a variant left out is kept (parked) longer than the replay: switching back restarts nothing
    # (a restart loads the model while the kept worker still serves: two cores for seconds)
    stop_delay = max(120.0, duration + 60.0)
    common = [f"--adapt-period-s={period}", "--adapt-window-s=1.5", "--adapt-windows=4",
              "--adapt-horizon-s=3", "--adapt-stable-steps=2", "--adapt-min-gain=0.5", "--adapt-max-replicas=1",
              f"--adapt-batches={','.join(map(str, batches))}", "--adapt-headroom=0.1",
              f"--adapt-stop-delay-s={stop_delay:g}"]
    fixed = fixed_choice(files["both"], mean, slo_ms, batches, cores)
    variant, fcores, fbatch = fixed
    policies = {  # every policy: the same batch bounds (those profiled); cores at most the fixed one's or 2
        "fixed": ([variant], None, []),
        "variants": (["fp32", "bf16"], files["both"], common + [f"--adapt-cores={fcores}",
                                                                f"--adapt-total-cores={fcores}"]),
        "vertical": ([variant], files[variant],  # the fixed one's core budget: never more cores than it
                     common + [f"--adapt-cores={','.join(str(c) for c in cores if c <= fcores)}",
                               f"--adapt-total-cores={fcores}"]),
        "both": (["fp32", "bf16"], files["both"],  # the fixed one's core budget too (the goal: no more cost)
                 common + [f"--adapt-cores={','.join(str(c) for c in cores if c <= fcores)}",
                           f"--adapt-total-cores={fcores}"]),
        "both_2core": (["fp32", "bf16"], files["both"],  # outside the goal: a second core, at its cost
                       common + [f"--adapt-cores={','.join(map(str, cores))}", f"--adapt-total-cores={max(cores)}"]),
    }
    results = {}
    for name, (vs, prof, extra) in policies.items():
        say(f"replaying {len(arrivals)} requests over {duration:.0f} s: {name}")
        results[name] = run_policy(name, model_dir, work / name, vs, prof, extra, arrivals, new, slo_ms, accuracy,
                                   fixed if name == "fixed" else None)
    budgets = {"fixed": fcores, "variants": fcores, "vertical": fcores, "both": fcores, "both_2core": max(cores)}
    for name, r in results.items():
        r["core_budget"] = budgets[name]
    base = results["fixed"]
    for r in results.values():
        r["violation_reduction"] = (round(1 - r["slo_violations"] / base["slo_violations"], 3)
                                    if base["slo_violations"] else None)
        r["cost_vs_fixed"] = round(r["cost_core_s"] / base["cost_core_s"], 3) if base["cost_core_s"] else None
    both = results["both"]
    return {
        "benchmark": "adapt_bench", "mode": "live", "quick": args.quick,
        "model": {"dir": str(model_dir), "new_tokens": new, "profile_ms": {v: tables[v] for v in tables},
                  "accuracy": accuracy, "accuracy_source": str(args.accuracy_file) if args.accuracy_file else
                  "token agreement with fp32 on eval prompts, measured live (random weights: fp32 is the label)"},
        "trace": {"file": str(args.trace), "requests": len(arrivals), "seconds": duration, "mean_rps": round(mean, 3),
                  "peak_5s_rps": round(max(win), 3), "fp32_one_core_rps": round(fp32_rps, 3)},
        "slo_ms": slo_ms, "batches": batches, "cores": cores,
        "fixed_config": {"variant": variant, "cores": fcores, "max_batch": fbatch,
                         "how": "the integer program's choice (one variant) at the trace's mean rate, same bounds"},
        "policies": results,
        "vertical_note": ("vertical scaling is bounded by the fixed policy's cores (cost never above fixed by design)"
                          + ("; the fixed pick is 1 core, the least a worker gets, so here it moves only the batch "
                             "bound (in place) and serves by deadline: an earlier run giving it a 2nd core on this "
                             "2-core machine (shared with client, scheduler and Redis) was slower and cost 1.7x; "
                             "both_2core shows a second core in this run" if fcores == 1 else "")),
        "cost_accounting": ("distinct cores allocated x seconds over the replay window, the same for every policy; "
                            "a variant left out is parked on a core the configuration holds (else counted); "
                            f"parked workers hold memory, not cores, and are kept {stop_delay:g} s (longer than the "
                            "replay) so switching back restarts nothing"),
        "goal": {"violation_reduction_at_least": 0.65, "cost_at_most_fixed": True,
                 "met": bool(both["violation_reduction"] is not None and both["violation_reduction"] >= 0.65
                             and both["cost_vs_fixed"] is not None and both["cost_vs_fixed"] <= 1.0)},
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_start": os.getloadavg()[0]},
    }
