"""Scheduler benchmark: policy-core decision time, the Redis queue round trip, and goodput of
split, colocated and adaptive placement under a bursty mixed trace.

Parts (``--parts decision,redis,goodput``; all by default):

**decision** -- one *decision* is what the scheduler's front door does per request before
handing out work: ``Admission.admit`` (adaptive placement: split routing of every stage incl.
splitting the images over the encoders, the best colocated instance, both latency estimates,
the queue-bound and SLO checks) and, when admitted, ``commit`` (``LoadBook.add`` for every
stage). The book first holds `--queued` requests spread over the instances (4 encoders, 4
prefill, 4 decode and 2 colocated instances by default); after each timed decision the oldest
request is finished (untimed) so that the backlog stays at `--queued`. Requests are a seeded
mix: 0-4 images of 576 tokens, 64-2048 prompt tokens, 16-512 new tokens, some with a TTFT
target or a deadline (those mostly get refused with this backlog; refusals are decisions too).
Each decision is timed with ``time.perf_counter_ns``. The same run at a small backlog
(`--small-queued`) shows that the decision time does not grow with the queue (decisions are
O(instances), never O(queued requests)).

**redis** -- the work-queue round trip through a real redis-server (started here with
``RedisProcess`` in a temporary directory, append-only as a deployment runs it): one producer
``RedisWorkQueue`` and one consumer on separate connections (two clients), in one event loop.
Per message: producer ``put`` -> consumer ``get`` -> ``set_state(DONE)`` -> ``ack`` -> the
producer's ``watch`` sees DONE; timed from before ``put`` until the watcher yields DONE. First
`--redis-messages` messages one at a time (median/p99 in microseconds), then the throughput
with `--redis-inflight` producers each keeping one message in flight (the consumer serves them
one after another, as a worker's intake loop does).

**goodput** -- replays the same bursty mixed request sequence against three deployments of the
`small` LLaVA (fp32, CPU), started one after another (``prism.launch.Deployment``):
``split`` (layout split, placement split), ``colocated`` (layout colocated, placement
colocated) and ``adaptive`` (layout mixed, placement adaptive). The sequence: the burstiest
`--window-s` seconds of ``azure_llm_2023_conv.csv`` (``prism.bench.trace.burstiest_window``),
images overlaid with the published multimodal shape (``prism.bench.trace``; the per-minute burst
chain compressed to one step per `--image-period-s` of trace time so that image bursts show up
inside the short replay), then scaled to a 2-core CPU (``prism.bench.trace.scale``): arrivals
stretched `--time-factor` times, text prompt tokens x1/8 clipped to [8, 128], generated tokens
x1/8 clipped to [2, 16] (forced with ``ignore_eos``), at most 2 images per request (each a
seeded random 224x224 PNG: 196 image tokens). Requests are sent open-loop at their arrival
times (``AsyncPrismClient``, chat messages). Every request carries the same TTFT/TPOT targets,
calibrated once on the split deployment before its replay: `--ttft-slo-x` times the idle TTFT
and `--tpot-slo-x` times the idle TPOT of a single 1-image request (median of 3). A request
is *good* when it completed with all its tokens and its client-measured TTFT and TPOT meet
both targets; goodput = good requests per second of replayed trace time (window x time
factor). Admission may refuse a request whose TTFT target it estimates it cannot meet; that
counts as not good. Every deployment gets the same warm-up (sequential text and image requests,
then two concurrent bursts of 4) before its replay; the placement path counts reported are
``status().placements`` minus the warm-up's. Before each calibration and replay the bench
waits (up to `--quiet-wait` s) for a quiet CPU, as the backbone bench does.

Prints progress on stderr and ONE JSON report on stdout (also written to --out).

Usage:
  python benchmarks/scheduler_bench.py [--parts decision,redis,goodput] [--quick] [--out FILE]
      [--queued 10000] [--n 20000] [--redis-messages 2000] [--redis-inflight 32]
      [--window-s 2] [--time-factor 15] [--ttft-slo-x 5] [--tpot-slo-x 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
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



from benchmarks.common import GATE, finish_report, pct, rnd, say  # noqa: E402
from benchmarks.goodput import MODEL_DIR, TRACE, goodput  # noqa: E402


# ---- Redis round trip ----------------------------------------------------------------------------

REDIS_NS = "bench"
STOP_TASK = "bench-stop"


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _consume(url: str) -> dict:
    """The consumer, as a worker's intake loop: `get` one item after another and hand each to
    its own task that sets DONE and acks (so several items can be finishing at once), until
    STOP_TASK."""
    from prism.queue.base import TaskState
    from prism.queue.redis_queue import RedisWorkQueue, connect

    client = connect(url)
    queue = RedisWorkQueue(client, namespace=REDIS_NS, stage="encode", instance="w0", max_depth=4096)
    served, errors = 0, []
    handlers: set[asyncio.Task] = set()

    async def finish(task_id: str) -> None:
        nonlocal served
        try:
            if not await queue.set_state(task_id, TaskState.DONE, compute_ms=0.0):
                errors.append(f"set_state(DONE) on {task_id} returned False")
            if not await queue.ack(task_id):
                errors.append(f"ack({task_id}) returned False")
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            errors.append(f"{task_id}: {type(exc).__name__}: {exc}")
        served += 1

    try:
        while True:
            item = await queue.get(timeout=120)
            if item is None:
                errors.append("get() timed out after 120 s")
                break
            if item.task_id == STOP_TASK:
                await asyncio.gather(*handlers)
                await finish(item.task_id)
                served -= 1
                break
            task = asyncio.create_task(finish(item.task_id))
            handlers.add(task)
            task.add_done_callback(handlers.discard)
    finally:
        await queue.close()
        await client.aclose()
    return {"served": served, "errors": errors[:20], "error_count": len(errors), "cpu_s": time.process_time()}


def _consumer_process(url: str, results) -> None:
    try:
        results.put(asyncio.run(_consume(url)))
    except BaseException as exc:  # noqa: BLE001
        results.put({"served": 0, "errors": [f"consumer crashed: {type(exc).__name__}: {exc}"],
                     "error_count": 1, "cpu_s": time.process_time()})


async def _produce(url: str, messages: int, inflight: int, inflight_messages: int, warmup: int,
                   payload_bytes: int, redis_pid: int, consumer_pid: int) -> dict:
    from prism.queue.base import TaskState, WorkItem
    from prism.queue.redis_queue import RedisWorkQueue, connect

    client = connect(url)
    producer = RedisWorkQueue(client, namespace=REDIS_NS, stage="encode", instance="w0", max_depth=4096)
    payload = random.Random(0).randbytes(payload_bytes)
    errors: list[str] = []

    async def one(tid: str) -> tuple[int, int]:
        """(ns for put, ns from before put until the watcher saw DONE)."""
        t0 = time.perf_counter_ns()
        await producer.put(WorkItem(task_id=tid, payload=payload, cost=196))
        t1 = time.perf_counter_ns()
        async for ev in producer.watch(tid):
            if ev.state.terminal:
                if ev.state is not TaskState.DONE:
                    errors.append(f"{tid} ended {ev.state.name}")
                break
        return t1 - t0, time.perf_counter_ns() - t0

    def cpu() -> tuple[float, float, float]:
        return time.process_time(), _proc_cpu_s(consumer_pid), _proc_cpu_s(redis_pid)

    def shares(a: tuple, b: tuple, wall: float) -> dict:
        names = ("producer", "consumer", "redis_server")
        return {name: round((y - x) / wall, 3) for name, x, y in zip(names, a, b)}

    try:
        for k in range(warmup):
            await asyncio.wait_for(one(f"warm-{k}"), 30)
        gc.collect()
        puts, trips = [], []
        c0, w0 = cpu(), time.perf_counter()
        for k in range(messages):
            put_ns, trip_ns = await asyncio.wait_for(one(f"seq-{k}"), 30)
            puts.append(put_ns)
            trips.append(trip_ns)
        seq_wall = time.perf_counter() - w0
        seq_cpu = shares(c0, cpu(), seq_wall)
        say(f"redis sequential: {messages} messages, median {statistics.median(trips) / 1e3:.0f} µs")

        todo: deque[int] = deque(range(inflight_messages))
        lat: list[int] = []

        async def lane() -> None:
            while todo:
                k = todo.popleft()
                _, trip_ns = await one(f"par-{k}")
                lat.append(trip_ns)

        c0, started = cpu(), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(inflight))), 600)
        wall = time.perf_counter() - started
        par_cpu = shares(c0, cpu(), wall)
        say(f"redis {inflight} in flight: {inflight_messages / wall:.0f} messages/s")
        await one(STOP_TASK)
        depth = await producer.depth()
        dead = await producer.dead_letters()
    finally:
        await client.aclose()
    trips.sort()
    puts.sort()
    lat.sort()
    return {
        "messages": messages,
        "payload_bytes": payload_bytes,
        "median_us": rnd(statistics.median(trips) / 1e3, 1),
        "p99_us": rnd(pct(trips, 0.99) / 1e3, 1),
        "mean_us": rnd(statistics.fmean(trips) / 1e3, 1),
        "min_us": rnd(trips[0] / 1e3, 1),
        "max_us": rnd(trips[-1] / 1e3, 1),
        "put_median_us": rnd(statistics.median(puts) / 1e3, 1),
        "cpu_busy_fraction": seq_cpu,
        "in_flight": {
            "in_flight": inflight,
            "messages": inflight_messages,
            "wall_s": rnd(wall, 3),
            "messages_per_s": rnd(inflight_messages / wall, 1),
            "round_trip_median_us": rnd(statistics.median(lat) / 1e3, 1),
            "round_trip_p99_us": rnd(pct(lat, 0.99) / 1e3, 1),
            "speedup_over_sequential": rnd((inflight_messages / wall) / (messages / seq_wall), 2),
            "cpu_busy_fraction": par_cpu,
        },
        "depth_after": depth,
        "dead_letters": len(dead),
        "producer_errors": errors[:20],
    }


def redis_round_trip(messages: int = 2000, inflight: int = 32, inflight_messages: int = 5000, *,
                     warmup: int = 100, payload_bytes: int = 256) -> dict:
    """Starts a redis-server in a temporary directory and a consumer process, and measures the
    queue round trip (the module docstring); both are stopped afterwards."""
    import multiprocessing

    from prism.runtime.redisproc import RedisProcess

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="prism-bench-redis-") as tmp:
        server = RedisProcess(Path(tmp) / "redis").start()
        results = ctx.Queue()
        consumer = ctx.Process(target=_consumer_process, args=(server.url, results), daemon=True)
        try:
            consumer.start()
            GATE.wait()
            out = asyncio.run(_produce(server.url, messages, inflight, inflight_messages, warmup,
                                       payload_bytes, server.proc.pid, consumer.pid))
            cons = results.get(timeout=60)
            consumer.join(30)
        finally:
            if consumer.is_alive():
                consumer.terminate()
                consumer.join(10)
            server.stop()
    out["consumer_served"] = cons["served"]
    out["errors"] = out.pop("producer_errors") + cons["errors"]
    out["error_count"] = len(out["errors"]) if cons["error_count"] <= len(cons["errors"]) else (
        len(out["errors"]) - len(cons["errors"]) + cons["error_count"])
    out["server"] = {"appendonly": True, "appendfsync": "everysec", "host": "127.0.0.1"}
    out["setup"] = ("producer RedisWorkQueue in this process, consumer RedisWorkQueue (same queue: stage "
                    "encode, instance w0) in a child process, each on its own client; round trip = put -> "
                    "get -> set_state(DONE) -> ack -> the producer's watch sees DONE; the consumer gets "
                    "items one at a time and finishes each (set_state, ack) in its own task")
    return out


# ---- Main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="decision,redis,goodput",
                    help="comma-separated subset of decision,redis,goodput")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~3 min): fewer decisions and messages; goodput: a 1 s window "
                         "stretched 12x, 8 new tokens")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="seconds to wait for an idle machine before each measured run (0: never wait)")
    g = ap.add_argument_group("decision")
    g.add_argument("--queued", type=int, default=10_000, help="requests already queued")
    g.add_argument("--small-queued", type=int, default=100, help="backlog of the O(queue) check run")
    g.add_argument("--n", type=int, default=20_000, help="timed decisions (>= 20,000 for the report)")
    g.add_argument("--encoders", type=int, default=4)
    g.add_argument("--prefills", type=int, default=4)
    g.add_argument("--decodes", type=int, default=4)
    g.add_argument("--colocated", type=int, default=2)
    g = ap.add_argument_group("redis")
    g.add_argument("--redis-messages", type=int, default=2000, help="sequential round trips (>= 1,000)")
    g.add_argument("--redis-inflight", type=int, default=32, help="messages in flight for the throughput run")
    g.add_argument("--redis-inflight-messages", type=int, default=5000)
    g = ap.add_argument_group("goodput")
    g.add_argument("--trace", type=Path, default=TRACE)
    g.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    g.add_argument("--window-s", type=float, default=2.0, help="burstiest window of the trace, trace seconds")
    g.add_argument("--time-factor", type=float, default=15.0, help="replay stretch of the window")
    g.add_argument("--image-period-s", type=float, default=0.25,
                   help="trace seconds per step of the image-burst chain (60 in the full-scale shape)")
    g.add_argument("--max-context", type=int, default=128, help="most text prompt tokens")
    g.add_argument("--max-generated", type=int, default=16, help="most generated tokens")
    g.add_argument("--max-images", type=int, default=2)
    g.add_argument("--ttft-slo-x", type=float, default=5.0, help="TTFT target = this x the idle TTFT")
    g.add_argument("--tpot-slo-x", type=float, default=3.0, help="TPOT target = this x the idle TPOT")
    g.add_argument("--stage-threads", type=int, default=1, help="torch threads of a single-stage worker")
    g.add_argument("--colocated-threads", type=int, default=2, help="torch threads of the all-stage worker")
    g.add_argument("--request-timeout", type=float, default=240.0, help="client timeout per request, s")
    g.add_argument("--deployments", default="split,colocated,adaptive",
                   help="subset to run (split first: it calibrates)")
    g.add_argument("--log-dir", type=Path, default=ROOT / ".bench" / "logs" / "scheduler")
    args = ap.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"decision", "redis", "goodput"}
    if unknown:
        ap.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    args.deployments = set(args.deployments.split(","))
    if args.quick:
        args.n = min(args.n, 5_000)
        args.redis_messages, args.redis_inflight_messages = 1_000, 1_000
        args.window_s, args.time_factor, args.max_generated = 1.0, 12.0, 8
        args.quiet_wait = min(args.quiet_wait, 10.0)
    GATE.max_wait_s = args.quiet_wait

    started = time.time()
    report: dict = {
        "benchmark": "scheduler",
        "quick": args.quick,
        "parts": parts,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "machine": platform.machine(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
    }
    if "decision" in parts:
        shape = dict(encoders=args.encoders, prefills=args.prefills, decodes=args.decodes,
                     colocated=args.colocated)
        say(f"decision time: {args.n} decisions at {args.queued} and at {args.small_queued} queued")
        GATE.wait()
        main_run = decision_time(args.queued, args.n, seed=args.seed, **shape)
        small = decision_time(args.small_queued, args.n, seed=args.seed, **shape)
        say(f"decision time: median {main_run['median_us']} µs, p99 {main_run['p99_us']} µs")
        report["config"] = {**shape, "placement": "adaptive", "queued": args.queued, "n": args.n,
                            "seed": args.seed}
        report["decision_time"] = main_run
        report["queue_independence"] = {
            "small_queued": args.small_queued,
            "small_median_us": small["median_us"],
            "large_median_us": main_run["median_us"],
            "large_over_small": round(main_run["median_us"] / small["median_us"], 3),
        }
        report["meets_target"] = main_run["median_us"] < TARGET_US
    if "redis" in parts:
        say(f"redis round trip: {args.redis_messages} sequential, then {args.redis_inflight_messages} "
            f"with {args.redis_inflight} in flight")
        report["redis_round_trip"] = redis_round_trip(args.redis_messages, args.redis_inflight,
                                                      args.redis_inflight_messages)
    if "goodput" in parts:
        import torch

        report["machine"]["torch"] = torch.__version__
        report["goodput"] = goodput(args)
    finish_report(report, args.out, started)


if __name__ == "__main__":
    main()
