"""Scheduler policy-core decision time with a deep backlog.

One *decision* is what the scheduler's front door does per request before handing out work:
``Admission.admit`` (adaptive placement: split routing of every stage incl. splitting the
images over the encoders, the best colocated instance, both latency estimates, the queue-bound
and SLO checks) and, when admitted, ``commit`` (``LoadBook.add`` for every stage).

The book first holds `--queued` requests spread over the instances (4 encoders, 4 prefill, 4
decode and 2 colocated instances by default); after each timed decision the oldest request is
finished (untimed) so that the backlog stays at `--queued`. Requests are a seeded mix: 0-4
images of 576 tokens, 64-2048 prompt tokens, 16-512 new tokens, some with a TTFT target or a
deadline (those mostly get refused with this backlog; refusals are decisions too). Each
decision is timed with ``time.perf_counter_ns``.

The same run at a small backlog (`--small-queued`) shows that the decision time does not grow
with the queue (decisions are O(instances), never O(queued requests)).

Prints one JSON report. Usage:
  python benchmarks/scheduler_bench.py [--queued 10000] [--n 20000] [--encoders 4] [--prefills 4]
                                       [--decodes 4] [--colocated 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from services.scheduler.core import (  # noqa: E402
    Admission,
    Instance,
    Limits,
    LoadBook,
    Placement,
    RequestCost,
    commit,
)

TARGET_US = 100.0
IMAGE_TOKENS = 576


def make_instances(
    encoders: int = 4, prefills: int = 4, decodes: int = 4, colocated: int = 2
) -> list[Instance]:
    """Dedicated instances per stage plus colocated ones hosting all three stages."""
    out: list[Instance] = []
    for k in range(encoders):
        out.append(Instance(f"enc-{k}", f"10.0.0.{k}:50051", frozenset({"encode"}), {"encode": 20_000.0}))
    for k in range(prefills):
        out.append(Instance(f"pre-{k}", f"10.0.1.{k}:50052", frozenset({"prefill"}), {"prefill": 25_000.0}))
    for k in range(decodes):
        out.append(Instance(f"dec-{k}", f"10.0.2.{k}:50053", frozenset({"decode"}), {"decode": 4_000.0},
                            decode_slots=64))
    for k in range(colocated):
        out.append(Instance(f"col-{k}", f"10.0.3.{k}:50050", frozenset({"encode", "prefill", "decode"}),
                            {"encode": 15_000.0, "prefill": 18_000.0, "decode": 3_000.0}, decode_slots=32))
    return out


def make_requests(n: int, rng: random.Random, now: float, prefix: str) -> list[RequestCost]:
    """A seeded request mix (see the module docstring)."""
    reqs = []
    for k in range(n):
        images = rng.choice((0, 0, 1, 1, 2, 4))
        slo = rng.random()
        reqs.append(RequestCost(
            request_id=f"{prefix}{k}",
            priority=rng.choice((0, 0, 0, 1)),
            deadline=now + rng.uniform(1.0, 120.0) if slo < 0.15 else None,
            ttft_target_s=rng.uniform(0.2, 5.0) if 0.15 <= slo < 0.3 else None,
            prompt_tokens=rng.randint(64, 2048),
            max_new_tokens=rng.randint(16, 512),
            media=(IMAGE_TOKENS,) * images,
        ))
    return reqs


def decision_time(queued: int, n: int, *, seed: int = 0, encoders: int = 4, prefills: int = 4,
                  decodes: int = 4, colocated: int = 2) -> dict:
    """Times `n` decisions (admit + placement + routing + LoadBook.add) over a `queued` backlog.

    Returns median/p99/mean in microseconds, their ratio to the 100 µs target, and what the
    decisions were (admitted fraction, refusal codes, paths). Extend alongside with the Redis
    round-trip and goodput parts.
    """
    rng = random.Random(seed)
    instances = make_instances(encoders, prefills, decodes, colocated)
    book = LoadBook()
    admission = Admission(Limits(), Placement("adaptive"))
    now = 1_000.0
    # Backlog: admitted without objectives, so every request lands and is booked.
    backlog: deque[str] = deque()
    for req in make_requests(queued, rng, now, "q"):
        plain = RequestCost(req.request_id, req.priority, None, None, req.image_tokens, req.prompt_tokens,
                            req.max_new_tokens, req.media)
        d = admission.admit(plain, now, book, instances)
        commit(book, plain, d)
        backlog.append(plain.request_id)
    assert book.inflight == queued

    reqs = make_requests(n, rng, now, "r")
    times = [0] * n
    admitted = 0
    codes: dict[str, int] = {}
    paths: dict[str, int] = {}
    clock = time.perf_counter_ns
    gc.collect()
    for k, req in enumerate(reqs):
        t0 = clock()
        d = admission.admit(req, now, book, instances)
        if d.ok:
            commit(book, req, d)
        times[k] = clock() - t0
        codes[d.code] = codes.get(d.code, 0) + 1
        if d.ok:
            admitted += 1
            paths[d.choice.path] = paths.get(d.choice.path, 0) + 1
            backlog.append(req.request_id)
        # Keep the backlog steady (untimed): the oldest request finishes.
        while len(backlog) > queued:
            book.finish_request(backlog.popleft())

    times.sort()
    median_us = statistics.median(times) / 1e3
    p99_us = times[min(n - 1, int(0.99 * n))] / 1e3
    return {
        "queued": queued,
        "decisions": n,
        "instances": len(instances),
        "median_us": round(median_us, 2),
        "p99_us": round(p99_us, 2),
        "mean_us": round(statistics.fmean(times) / 1e3, 2),
        "max_us": round(times[-1] / 1e3, 2),
        "target_us": TARGET_US,
        "median_ratio_to_target": round(median_us / TARGET_US, 3),
        "p99_ratio_to_target": round(p99_us / TARGET_US, 3),
        "admitted_fraction": round(admitted / n, 4),
        "codes": dict(sorted(codes.items())),
        "paths": dict(sorted(paths.items())),
        "book_tasks_after": len(book),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queued", type=int, default=10_000, help="requests already queued")
    ap.add_argument("--small-queued", type=int, default=100, help="backlog of the O(queue) check run")
    ap.add_argument("--n", type=int, default=20_000, help="timed decisions (>= 20,000 for the report)")
    ap.add_argument("--encoders", type=int, default=4)
    ap.add_argument("--prefills", type=int, default=4)
    ap.add_argument("--decodes", type=int, default=4)
    ap.add_argument("--colocated", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = dict(encoders=args.encoders, prefills=args.prefills, decodes=args.decodes,
                 colocated=args.colocated)

    main_run = decision_time(args.queued, args.n, seed=args.seed, **shape)
    small = decision_time(args.small_queued, args.n, seed=args.seed, **shape)
    report = {
        "benchmark": "scheduler_core_decision_time",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "config": {**shape, "placement": "adaptive", "queued": args.queued, "n": args.n, "seed": args.seed},
        "decision_time": main_run,
        "queue_independence": {
            "small_queued": args.small_queued,
            "small_median_us": small["median_us"],
            "large_median_us": main_run["median_us"],
            "large_over_small": round(main_run["median_us"] / small["median_us"], 3),
        },
        "meets_target": main_run["median_us"] < TARGET_US,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
