"""Prometheus metrics of a Prism process (`prometheus_client`), served on ``--metrics-port``.

One registry per process (`REGISTRY`); every series carries the ``instance`` (worker name) or
``model`` it is about, so processes hosting several stages (or tests hosting several services in
one process) keep them apart. Workers count per stage: tasks and their tokens, queue wait and
work time (`observe_task`, called where the trace spans are recorded), batch sizes
(`observe_batch`) and KV bytes moved. The scheduler counts requests by outcome, TTFT, time per
output token, end-to-end latency, reductions by strategy and selection decision time, and keeps
gauges of pending tokens, desired and actual replicas and SLO attainment per stage.
"""
from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["REGISTRY", "observe_batch", "observe_task", "serve"]

REGISTRY = CollectorRegistry()
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# ---- stage workers -------------------------------------------------------------------------
STAGE_TASKS = Counter("prism_stage_tasks", "Tasks a stage worker finished", ["stage", "instance"], registry=REGISTRY)
STAGE_TOKENS = Counter("prism_stage_tokens", "Tokens of finished tasks (encode: media, prefill: prompt, "
                       "decode: generated)", ["stage", "instance"], registry=REGISTRY)
QUEUE_WAIT = Histogram("prism_stage_queue_wait_seconds", "Time a task waited in its stage queue",
                       ["stage", "instance"], buckets=_LATENCY, registry=REGISTRY)
STAGE_WORK = Histogram("prism_stage_work_seconds", "Time from a worker beginning a task to its end",
                       ["stage", "instance"], buckets=_LATENCY, registry=REGISTRY)
BATCH_SIZE = Histogram("prism_stage_batch_size", "Requests per batched call (decode: per step)",
                       ["stage", "instance"], buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
KV_BYTES = Counter("prism_kv_bytes", "KV cache bytes moved between prefill and decode",
                   ["direction", "instance"], registry=REGISTRY)

# ---- scheduler -----------------------------------------------------------------------------
REQUESTS = Counter("prism_requests", "Requests answered, by outcome (a gRPC status code name)",
                   ["model", "outcome"], registry=REGISTRY)
TTFT = Histogram("prism_ttft_seconds", "Time to first token", ["model"], buckets=_LATENCY, registry=REGISTRY)
TPOT = Histogram("prism_tpot_seconds", "Time per output token after the first", ["model"],
                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), registry=REGISTRY)
E2E = Histogram("prism_e2e_seconds", "End-to-end request latency", ["model"], buckets=_LATENCY, registry=REGISTRY)
GENERATED = Counter("prism_generated_tokens", "Tokens generated for callers", ["model"], registry=REGISTRY)
REDUCTIONS = Counter("prism_reductions", "Requests served with reduced inputs, by strategy", ["model", "strategy"],
                     registry=REGISTRY)
SELECTION_DECISION = Histogram("prism_selection_decision_seconds", "Time of one selection decision",
                               buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1), registry=REGISTRY)
PENDING_TOKENS = Gauge("prism_pending_tokens", "Tokens of work booked on a stage and not done", ["stage"],
                       registry=REGISTRY)
REPLICAS = Gauge("prism_replicas", "Workers of a stage: desired (autoscaler) and actual (live)", ["stage", "kind"],
                 registry=REGISTRY)
API_REQUESTS = Counter("prism_api_requests", "Front-door calls by API key name (empty: no valid key) and status",
                       ["key", "code"], registry=REGISTRY)
SLO_ATTAINMENT = Gauge("prism_slo_attainment", "Fraction of recent requests meeting their targets, by stage",
                       ["stage"], registry=REGISTRY)
ADAPT_SOLVES = Counter("prism_adapt_solves", "Adaptation re-solves, by outcome (changed, kept, failed)", ["outcome"],
                       registry=REGISTRY)
ADAPT_FORECAST = Gauge("prism_adapt_forecast_rps", "Arrival rate forecast at the last adaptation re-solve",
                       registry=REGISTRY)
ADAPT_WORKERS = Gauge("prism_adapt_workers", "The applied configuration per stage and variant: replicas, cores, "
                      "max_batch, share_rps", ["stage", "variant", "kind"], registry=REGISTRY)
ADAPT_CORES = Gauge("prism_adapt_cores", "Cores allocated by the applied adaptation configuration", registry=REGISTRY)


def observe_task(stage: str, instance: str, queued_s: float, work_s: float, tokens: int = 0) -> None:
    """A stage worker finished a task: its queue wait, its work time and its tokens."""
    STAGE_TASKS.labels(stage, instance).inc()
    if tokens > 0:
        STAGE_TOKENS.labels(stage, instance).inc(tokens)
    if queued_s >= 0:
        QUEUE_WAIT.labels(stage, instance).observe(queued_s)
    STAGE_WORK.labels(stage, instance).observe(max(0.0, work_s))


def observe_batch(stage: str, instance: str, size: int) -> None:
    BATCH_SIZE.labels(stage, instance).observe(size)


def serve(port: int, host: str = "0.0.0.0") -> tuple[Any, int]:
    """Serves ``/metrics`` of `REGISTRY` on `port` (0: a free one): (the server, its port).
    Stop it with ``server.shutdown()``."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server, server.server_port
