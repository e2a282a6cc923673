"""Admission: accept a request onto a path, or refuse it early with a reason and a retry hint.

`Admission.admit` places the request (`Placement`), estimates its latencies on that path
(`estimate_path`) and refuses, before any work is spent, when

1. too many requests are in flight (``limits.max_inflight``);
2. a stage's queue is over its bound in pending tokens (``limits.queue_tokens[stage]``,
   back-pressure);
3. its deadline (``slo.deadline_ms``) or TTFT target (``slo.ttft_ms``) cannot be met.

Every refusal is ``RESOURCE_EXHAUSTED`` with a message naming the field or limit, and a
``retry_after_s`` hint: the estimated time until enough pending work drains (with no new
arrivals), or None when waiting cannot help (the request's own service time already misses
its objective). A deadline already past is ``DEADLINE_EXCEEDED``; a stage no instance serves
is ``UNAVAILABLE``. The deadline is taken as an end-to-end budget: a client retrying after the
hint starts a fresh budget (``slo.deadline_ms`` counts from arrival). Estimates ignore
priority: every request is estimated behind all pending work on its path (conservative for
high-priority requests, which the stage queues serve first).

`order_key` is the order every stage queue serves its items in (``prism.queue``): higher
priority first; within a priority, earliest deadline first (no deadline last); then the
smaller cost (short requests first); then arrival order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from services.scheduler.core.cost import Estimate, RequestCost, estimate_path
from services.scheduler.core.load import LoadBook, RateTracker
from services.scheduler.core.placement import Placement, PlacementChoice
from services.scheduler.core.routing import Instance, NoInstance

__all__ = ["Admission", "Decision", "Limits", "commit", "order_key"]


@dataclass(frozen=True)
class Limits:
    """Admission limits. Missing or zero bounds mean unbounded."""

    queue_tokens: Mapping[str, int] = field(default_factory=dict)
    """Per stage: the most pending tokens (over all its instances) admission lets build up.
    A request is still admitted onto an empty stage whatever its size."""
    max_inflight: int = 0
    """The most requests in flight (any stage unfinished); 0: unbounded."""
    min_retry_s: float = 0.05
    """Floor of every retry hint, so that clients never retry in a tight loop."""
    unavailable_retry_s: float = 1.0
    """Retry hint when a stage has no instance (workers registering, autoscaler starting one)."""

    def __post_init__(self) -> None:
        bounds = {str(k): int(v) for k, v in self.queue_tokens.items()}
        if any(v < 0 for v in bounds.values()):
            raise ValueError("queue_tokens bounds must be >= 0")
        if self.max_inflight < 0 or self.min_retry_s < 0 or self.unavailable_retry_s < 0:
            raise ValueError("max_inflight, min_retry_s and unavailable_retry_s must be >= 0")
        object.__setattr__(self, "queue_tokens", MappingProxyType(bounds))


@dataclass(frozen=True)
class Decision:
    """The outcome of `Admission.admit`."""

    ok: bool
    code: str = "OK"
    """``OK``, or the gRPC status code name to fail the call with."""
    message: str = ""
    retry_after_s: float | None = None
    """For refusals: when retrying may succeed (None: retrying cannot help)."""
    choice: PlacementChoice | None = None
    """Where the request runs (ok) or would have run (SLO refusals)."""

    @property
    def estimate(self) -> Estimate | None:
        """The latency estimate on the chosen path."""
        return self.choice.estimate if self.choice is not None else None

    @property
    def instances(self) -> Mapping[str, tuple[Instance, ...]]:
        """{stage: instances} of the chosen path (empty when refused before placement)."""
        return self.choice.instances if self.choice is not None else {}


def order_key(priority: int, deadline: float | None, cost: int, seq: int) -> tuple[int, float, int, int]:
    """Sort key of the stage queues: smaller is served first.

    Higher `priority` first; within a priority class the earliest `deadline` first (None: after
    every item with a deadline); then the smaller `cost` in tokens; then `seq` (arrival order).
    This is the order `prism.queue.memory.InMemoryWorkQueue` implements.
    """
    return (-priority, math.inf if deadline is None else deadline, cost, seq)


class Admission:
    """Early admission control on estimated latencies and queue bounds (module docstring)."""

    def __init__(self, limits: Limits | None = None, placement: Placement | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.placement = placement if placement is not None else Placement("adaptive")

    def admit(
        self,
        request: RequestCost,
        now: float,
        book: LoadBook,
        instances: Sequence[Instance],
        *,
        exclude: Collection[str] = (),
    ) -> Decision:
        """Decides whether `request` is accepted at time `now`, and where it runs.

        Pure: nothing is recorded; call `commit` to book an accepted request's work.
        """
        limits = self.limits
        if request.deadline is not None and request.deadline <= now:
            return Decision(False, "DEADLINE_EXCEEDED",
                            f"slo.deadline_ms: deadline passed {(now - request.deadline) * 1e3:.0f} ms ago")

        if limits.max_inflight and book.inflight >= limits.max_inflight:
            n = book.inflight
            drain = max(self._drain_s(s, book, instances) for s in ("encode", "prefill", "decode"))
            retry = (n - limits.max_inflight + 1) * drain / n
            return self._refuse(
                f"limits.max_inflight: {n} requests in flight (max {limits.max_inflight})", retry)

        for stage in request.stages:
            bound = limits.queue_tokens.get(stage)
            if not bound:
                continue
            pending = book.stage_pending(stage)
            cost = request.cost(stage)
            if pending > 0 and pending + cost > bound:
                cap = _stage_capacity(stage, instances, exclude)
                retry = (pending + cost - bound) / cap if cap > 0 else limits.unavailable_retry_s
                return self._refuse(
                    f"limits.queue_tokens[{stage}]: {pending} pending {stage} tokens + {cost} exceed the "
                    f"bound of {bound}", retry)

        try:
            choice = self.placement.decide(request, instances, book, exclude=exclude)
        except NoInstance as exc:
            retry = max(limits.unavailable_retry_s, limits.min_retry_s)
            return Decision(False, "UNAVAILABLE", str(exc), retry)
        est = choice.estimate

        if request.deadline is not None:
            budget = request.deadline - now
            if est.finish_s > budget:
                return self._slo_refusal("slo.deadline_ms", "deadline", budget, est.finish_s,
                                         lambda e: e.finish_s, request, choice, book)
        if request.ttft_target_s is not None and est.ttft_s > request.ttft_target_s:
            return self._slo_refusal("slo.ttft_ms", "TTFT target", request.ttft_target_s, est.ttft_s,
                                     lambda e: e.ttft_s, request, choice, book)
        return Decision(True, "OK", f"{choice.path}: {choice.reason}", None, choice)

    # -- internals -----------------------------------------------------------------------

    def _refuse(self, message: str, retry_s: float | None, choice: PlacementChoice | None = None) -> Decision:
        if retry_s is not None:
            retry_s = max(retry_s, self.limits.min_retry_s)
            message = f"{message}; retry in {retry_s * 1e3:.0f} ms"
        return Decision(False, "RESOURCE_EXHAUSTED", message, retry_s, choice)

    def _slo_refusal(self, field_name, what, budget, estimated, pick, request, choice, book) -> Decision:
        idle = pick(estimate_path(request, choice.encode, choice.prefill, choice.decode, book, idle=True))
        msg = (f"{field_name}: {what} in {budget * 1e3:.0f} ms cannot be met: estimated "
               f"{estimated * 1e3:.0f} ms on the {choice.path} path")
        if idle > budget:
            # Its own service time misses: waiting for the queues to drain cannot help.
            return Decision(False, "RESOURCE_EXHAUSTED",
                            f"{msg}, {idle * 1e3:.0f} ms even with no queued work", None, choice)
        # The queueing part shrinks about one second per second as pending work drains.
        return self._refuse(msg, estimated - budget, choice)

    @staticmethod
    def _drain_s(stage: str, book: LoadBook, instances: Sequence[Instance]) -> float:
        cap = _stage_capacity(stage, instances, ())
        return book.stage_pending(stage) / cap if cap > 0 else 0.0


def _stage_capacity(stage: str, instances: Sequence[Instance], exclude: Collection[str]) -> float:
    """Total tokens/s of the non-draining instances hosting `stage`."""
    return sum(i.capacity[stage] for i in instances if stage in i.stages and not i.draining
               and i.name not in exclude)


def commit(
    book: LoadBook,
    request: RequestCost,
    decision: Decision | PlacementChoice,
    *,
    rates: RateTracker | None = None,
    now: float | None = None,
) -> None:
    """Books an accepted request's work on its chosen instances (and its arrival in `rates`).

    Media items sharing an encoder are booked as one part on it.
    """
    choice = decision.choice if isinstance(decision, Decision) else decision
    if choice is None:
        raise ValueError("cannot commit a refused decision")
    rid = request.request_id
    encoders = choice.instances.get("encode", ())
    if encoders:
        per: dict[str, int] = {}
        for inst, cost in zip(encoders, request.media_costs):
            per[inst.name] = per.get(inst.name, 0) + cost
        for name, tokens in per.items():
            book.add(rid, "encode", name, tokens)
    book.add(rid, "prefill", choice.prefill.name, request.prompt_tokens)
    book.add(rid, "decode", choice.decode.name, request.max_new_tokens)
    if rates is not None:
        for stage in request.stages:
            rates.arrived(stage, request.cost(stage), now)
