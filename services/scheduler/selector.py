"""Deadline-driven input reduction (MOSEL-style modality selection): the adapter between the
pure program (`core.selection`) and the requests being served.

Every request this scheduler serves is a *job* of the program (`jobs`): its remaining work per
stage, its deadline, and, for a request whose caller allowed reductions and whose encoding has
not started, every candidate strategy (`prism.models.reduce` candidates, measured exactly through
the processor when it arrived, with the accuracy `prism profile` measured for it; those below
the caller's floor are not offered, the full request always is).

* **An arrival** with a deadline is decided by the program (`admit`): it picks the arrival's
  strategy and reassigns the queued, not-yet-encoded jobs so that every deadline is met,
  maximising total expected accuracy; or the arrival is refused before any work is spent on it,
  naming the deadlines that would be missed. The program's model (requests a worker has begun
  first, then the rest as the stage queues serve them, by priority and earliest deadline, at the
  measured stage capacities, the stages overlapping as a flow shop on the cores they share, or,
  with ``--no-selection-overlap``, every stage of every request in series) replaces admission's deadline estimate
  when selection is on, while admission still applies the limits, back-pressure, placement and
  a TTFT target (there, and for requests without a deadline, only the request's own reductions
  are tried, most accurate first).
* **Overload** (`LoadPrice`): while the arrivals' work exceeds a stage's measured capacity, the
  program trades accuracy for work at a price that grows with the overload, so arrivals and
  queued jobs are served on cheaper inputs (never below a floor) before deadlines force it and
  more requests finish in time.
* **Feedback** (`Slowdown`): each request the program admitted and that was served adds its
  actual over its predicted e2e, and each still in service past its prediction its elapsed over
  predicted time (a lower bound, heard before it finishes); the measured capacities are divided
  by a quantile of these (`--selection-feedback-quantile`), so what the model leaves out
  (transfers, the scheduler's own work, shared cores) is charged to the work. With
  `Flow.parallelism` (cores the stages share) the capacities are tokens per CPU second of the
  workers, and the program shares the cores itself.
* **A slow stage**: every `every_s` the queue is checked against the measured stage capacities
  (`tick`); when a deadline is at risk, the reassignable jobs are reassigned the same way (a
  job late even on its cheapest strategy is put on it, and constrains no one).
* **A reassignment** takes back the job's queued encode tasks atomically only while no worker has
  started them (`cancel(if_queued=True)`), and its pipeline serves the new inputs in its next
  attempt; a job whose encoding began is never changed. A request allowing nothing is never
  changed; each job changes at most `MAX_CHANGES` times.

The chosen inputs are persisted with the accepted request at arrival and reported on the last
message (`reductions_proto`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import grpc

from prism.runtime import metrics
from prism.v1 import common_pb2, prism_pb2
from services.scheduler.core.selection import FULL, Flow, Job, Strategy, admit_with_selection
from services.scheduler.core.selection_jobs import (
    LoadPrice,
    Served,
    Slowdown,
    arrival_price,
    job_of,
    new_job,
    offered,
    serving_order,
    tick_changes,
)
from services.scheduler.intake import Admitted
from services.scheduler.pipeline import Pipeline, Progress, StageError

log = logging.getLogger(__name__)

MODALITY = {"image": common_pb2.MODALITY_IMAGE, "audio": common_pb2.MODALITY_AUDIO}
#: The most times one request's inputs are reassigned (no thrash; attempts stay below a takeover's).
MAX_CHANGES = 3


@dataclass(frozen=True)
class Option:
    """One strategy of a request: its work (media tokens exact, prompt tokens estimated from the
    full prompt) and the reduction (None for the full request)."""

    strategy: Strategy
    reduction: Any  # prism.models.reduce.Reduction


@dataclass(frozen=True)
class Entry:
    """A request whose inputs may be reduced: the request as sent and its options by strategy id;
    the inputs of an option are prepared when it is chosen (`Selector.served_as`)."""

    adm: Admitted
    options: dict[str, Option]
    prepared: dict[str, Admitted] = dataclasses.field(default_factory=dict)


@dataclass
class Stats:
    """What the selector did (for the admin status and benchmarks)."""

    decisions: int = 0
    decision_s: list[float] = dataclasses.field(default_factory=list)
    fitted: int = 0  # arrivals accepted thanks to a reduction or a reassignment
    refused: int = 0
    reassigned: int = 0  # queued requests whose inputs were changed
    lost_races: int = 0  # reassignments not applied: a worker had started encoding
    slowdown: float = 1.0  # actual over predicted e2e of the requests served (`Slowdown`)
    price: float = 0.0  # the load price at the latest arrival (`LoadPrice`)
    offered_load: float = 0.0  # the offered load at the latest arrival


class Selector:
    def __init__(self, profile: Any, pipeline: Pipeline, executor: concurrent.futures.Executor, *,
                 every_s: float = 0.25, time_limit_s: float = 0.01, flow: Flow | None = None,
                 load_price: LoadPrice | None = None, slowdown: Slowdown | None = None):
        self.profile = profile
        self.load_price = load_price  # None: the program trades no accuracy for work (deadlines only)
        self.slowdown = slowdown  # None: the measured capacities as they are
        self._predicted: dict[str, tuple[float, float]] = {}  # admitted by the program: (arrival, predicted e2e s)
        self._slow = 1.0  # the slowdown the latest capacities were divided by
        self.flow = flow  # the program's model: stages overlapping (a flow shop), or None: in series
        self.pipeline = pipeline
        self.executor = executor
        self.every_s, self.time_limit_s = every_s, time_limit_s
        self.served: dict[str, Progress] = {}  # every request accepted here and not finished
        self.entries: dict[str, Entry] = {}  # those that allow reductions
        self.stats = Stats()
        self._lock = asyncio.Lock()

    @property
    def enabled(self) -> bool:
        return self.profile is not None and bool(self.profile.accuracy)

    def wants(self, adm: Admitted) -> bool:
        return self.enabled and adm.allowed is not None and adm.allowed.allows_any and bool(adm.media)

    # ---- bookkeeping -------------------------------------------------------------------
    async def prepare(self, adm: Admitted) -> Entry | None:
        """Its options (off the event loop), when reductions may apply to it."""
        if not self.wants(adm):
            return None
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._options, adm)

    def _options(self, adm: Admitted) -> Entry:
        from prism.models.reduce import candidates, media_tokens

        adapter, processor = adm.model.adapter, adm.model.processor
        full = _full_cost(adm.prompt)
        per_item = [i.num_tokens for i in adm.prompt.items]
        reductions, costs = {}, []
        for r in candidates(adapter, processor, list(adm.media), adm.allowed):
            if r.is_full:
                media = full["media_tokens"]
            elif r.image_scale == 1.0 and r.audio_seconds is None:  # drops: the kept items' own tokens
                media = sum(per_item[i] for i in r.kept([m for m, _ in adm.media]))
            else:
                media = media_tokens(adapter, processor, list(adm.media), r)
            reductions[r.id] = None if r.is_full else r
            costs.append({"reduction": r.id, "media_tokens": media,
                          "prompt_tokens": full["prompt_tokens"] - full["media_tokens"] + media})
        strategies = offered(self.profile.strategies_for(costs, decode_tokens=adm.max_new_tokens),
                             adm.accuracy_floor, media_tokens=full["media_tokens"],
                             prompt_tokens=full["prompt_tokens"], decode_tokens=adm.max_new_tokens)
        options = {sid: Option(s, reductions.get(sid)) for sid, s in strategies.items()}
        return Entry(adm, options)

    async def served_as(self, entry: Entry, strategy_id: str) -> Admitted:
        """The request served with `strategy_id`, its inputs prepared exactly as an unreduced
        request's (off the event loop; once per option)."""
        if strategy_id not in entry.prepared:
            opt = entry.options[strategy_id]
            if opt.reduction is None:
                adm = dataclasses.replace(entry.adm, reduction=None, expected_accuracy=opt.strategy.accuracy)
            else:
                adm = await asyncio.get_running_loop().run_in_executor(
                    self.executor, _reduced, entry.adm, opt.reduction, opt.strategy.accuracy)
            entry.prepared[strategy_id] = adm
        return entry.prepared[strategy_id]

    def accepted(self, adm: Admitted, entry: Entry | None, progress: Progress | None = None) -> Progress:
        """Follow a request from its acceptance to its end (`finished`)."""
        progress = progress or self.served.get(adm.request_id) or Progress()
        progress.adm = adm
        self.served[adm.request_id] = progress
        if entry is not None:
            self.entries[adm.request_id] = entry
        return progress

    def finished(self, request_id: str) -> None:
        self.served.pop(request_id, None)
        self.entries.pop(request_id, None)
        self._predicted.pop(request_id, None)

    def completed(self, request_id: str) -> None:
        """The request was served whole: how long it took against what the program predicted."""
        predicted = self._predicted.pop(request_id, None)
        if predicted is not None and self.slowdown is not None:
            arrival, predicted_s = predicted
            actual_s = time.time() - arrival
            self.slowdown.served(predicted_s, actual_s)
            log.debug("request %s served in %.3f s; the program predicted %.3f s", request_id, actual_s, predicted_s)
            self._slowdown_now()  # the status's slowdown

    # ---- the program's view ------------------------------------------------------------
    def capacity(self) -> dict[str, float]:
        """Tokens/s per stage over the live, non-draining instances, as measured live (each task
        over its share of its batch's compute: the batch's throughput) or assumed until measured.
        When the program's stages share a bounded number of cores (`Flow.parallelism`), tokens
        per CPU second: the program itself then shares the cores among the busy stages, which
        wall-clock rates measured under contention would count a second time."""
        cluster, cap = self.pipeline.cluster, {}
        per_cpu = self.flow is not None and self.flow.parallelism < math.inf
        for inst in cluster.instances:
            if not inst.draining:
                for stage in inst.stages:
                    rate = (cluster.profiled(inst.name, stage, cpu=True) if per_cpu else 0.0) or inst.capacity[stage]
                    cap[stage] = cap.get(stage, 0.0) + rate
        self._slow = self._slowdown_now()
        return {stage: rate / self._slow for stage, rate in cap.items()}

    def _slowdown_now(self) -> float:
        """The slowdown (`Slowdown.value_with`) from the requests served and those in service
        already past what the program predicted for them."""
        if self.slowdown is None:
            return 1.0
        now = time.time()
        overdue = [(now - arrival) / predicted_s for arrival, predicted_s in self._predicted.values()
                   if predicted_s > 0 and now - arrival > predicted_s]
        self.stats.slowdown = self.slowdown.value_with(overdue)
        return self.stats.slowdown

    def _reassignable(self, rid: str, progress: Progress) -> bool:
        return (rid in self.entries and progress.reassignable and progress.reassigned is None
                and progress.reassignments < MAX_CHANGES)

    def _begun(self, progress: Progress) -> bool:
        return progress.encode_started or progress.encode_ms > 0 or progress.first_at is not None

    def _served(self, rid: str, progress: Progress) -> Served:
        """A request being served, as plain state (`core.selection_jobs`)."""
        adm = progress.adm
        entry = self.entries.get(rid)
        return Served(rid, adm.deadline, adm.priority, adm.accuracy_floor, adm.max_new_tokens,
                      media_tokens=sum(i.num_tokens for i in adm.prompt.items),
                      prompt_tokens=len(adm.prompt.input_ids),
                      current=adm.reduction.id if adm.reduction is not None else FULL,
                      options=None if entry is None else {sid: o.strategy for sid, o in entry.options.items()},
                      reassignable=self._reassignable(rid, progress), begun=self._begun(progress),
                      encoded=not adm.prompt.items or progress.encode_ms > 0,
                      prefilled=progress.first_at is not None, generated=len(progress.tokens),
                      encoding=progress.encode_started, prefilling=progress.prefill_started)

    def jobs(self) -> list[Job]:
        """Every request being served, as a job of the program."""
        return [job_of(self._served(rid, progress), seq) for seq, (rid, progress) in enumerate(self.served.items())
                if progress.adm is not None]

    def order(self, jobs: list[Job]) -> list[str]:
        """The serving order the program assumes (`serving_order`): requests a worker has begun
        first, in arrival order; then priority, earliest deadline, arrival (under stage queues:
        each stage its running request first, then priority, earliest deadline, arrival)."""
        begun = {rid for rid, p in self.served.items() if self._begun(p)}
        return serving_order(jobs, begun, self.flow)

    def _new_job(self, adm: Admitted, entry: Entry | None) -> Job:
        c = _full_cost(adm.prompt)
        return new_job(adm.request_id, None if entry is None else {sid: o.strategy for sid, o in entry.options.items()},
                       adm.deadline, adm.accuracy_floor, adm.priority, len(self.served),
                       media_tokens=c["media_tokens"], prompt_tokens=c["prompt_tokens"],
                       max_new_tokens=adm.max_new_tokens)

    def _price(self, now: float, new: Job, capacity: dict[str, float]) -> float:
        """The arrival counted in the offered load; the price of work now (`LoadPrice`)."""
        price = arrival_price(self.load_price, now, new, capacity)
        if self.load_price is not None:
            self.stats.price, self.stats.offered_load = price, self.load_price.load(now)
        return price

    async def _solve(self, fn, *args, **kw):
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(fn, *args, **kw)
        finally:
            self.stats.decisions += 1
            self.stats.decision_s.append(time.perf_counter() - started)
            metrics.SELECTION_DECISION.observe(self.stats.decision_s[-1])
            del self.stats.decision_s[:-1000]

    # ---- arrivals ----------------------------------------------------------------------
    async def admit(self, adm: Admitted, entry: Entry | None) -> Admitted:
        """An arrival: accepted with the strategy the program gives it (queued requests
        reassigned as it says), or StageError (RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, naming the
        deadlines missed). The program decides its deadline; admission still applies the
        limits, back-pressure, placement and a TTFT target (where the request's own reductions
        are tried, most accurate first)."""
        if adm.deadline is None:
            return await self._admit_plainly(adm, entry)
        async with self._lock:
            capacity = self.capacity()
            if not capacity:
                return await self._admit_plainly(adm, entry)
            now, jobs, new = time.time(), self.jobs(), self._new_job(adm, entry)
            decision = await self._solve(admit_with_selection, jobs, new, now, capacity,
                                         order=self.order([*jobs, new]), time_limit_s=self.time_limit_s,
                                         flow=self.flow, price=self._price(now, new, capacity))
            if not decision.ok:
                self.stats.refused += 1
                log.debug("request %s refused at slowdown %.2f, %d in service: %s", adm.request_id, self._slow,
                          len(jobs), decision.message)
                rates = ", ".join(f"{s} {capacity[s]:.0f}" for s in ("encode", "prefill", "decode") if s in capacity)
                raise StageError(getattr(grpc.StatusCode, decision.code),
                                 f"slo.deadline_ms: {decision.message} (selection.accuracy_floor "
                                 f"{adm.accuracy_floor:g}; {len(jobs)} requests in service; tokens/s: {rates})",
                                 retry_after_s=decision.retry_after_s)
            candidate = await self.served_as(entry, decision.strategy) if entry is not None else adm
            try:
                self.pipeline.admit(candidate, check_deadline=False)
            except StageError as exc:
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                return self._accept(await self._own_reductions(adm, entry, exc), entry)
            await self._apply({rid: decision.assignment.choice[rid] for rid in decision.changed})
            # What the model itself predicts (its times scale with the slowdown it was given)
            predicted_s = now - adm.arrival + (decision.assignment.finish[adm.request_id] - now) / self._slow
            self._predicted[adm.request_id] = (adm.arrival, predicted_s)
            log.debug("request %s admitted as %s: predicted %.3f s at slowdown %.2f, %d in service",
                      adm.request_id, decision.strategy, predicted_s, self._slow, len(jobs))
            if decision.strategy != FULL or decision.changed:
                self.stats.fitted += 1
            return self._accept(candidate, entry)

    async def _admit_plainly(self, adm: Admitted, entry: Entry | None) -> Admitted:
        try:
            self.pipeline.admit(adm)
        except StageError as exc:
            if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return self._accept(await self._own_reductions(adm, entry, exc), entry)
        return self._accept(adm, entry)

    def _accept(self, adm: Admitted, entry: Entry | None) -> Admitted:
        self.accepted(adm, entry)
        return adm

    async def _own_reductions(self, adm: Admitted, entry: Entry | None, refusal: StageError) -> Admitted:
        """The request's own reductions, most accurate first, the first admission accepts."""
        options = [] if entry is None else sorted(
            (o for sid, o in entry.options.items() if sid != FULL),
            key=lambda o: (-o.strategy.accuracy, o.strategy.encode_tokens + o.strategy.prefill_tokens, o.strategy.id))
        for opt in options:
            candidate = await self.served_as(entry, opt.strategy.id)
            try:
                self.pipeline.admit(candidate)
            except StageError:
                continue
            self.stats.fitted += 1
            return candidate
        self.stats.refused += 1
        if entry is None:
            raise refusal
        raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{refusal.message}; no input reduction allowed by selection with a profiled accuracy "
                         f">= selection.accuracy_floor {adm.accuracy_floor:g} meets it either "
                         f"({len(options)} candidates tried)", retry_after_s=refusal.retry_after_s)

    # ---- queued requests ---------------------------------------------------------------
    async def _apply(self, changes: dict[str, str]) -> int:
        """Serve each queued request with its new strategy; returns how many changed."""
        applied = 0
        for rid, sid in changes.items():
            progress, entry = self.served.get(rid), self.entries.get(rid)
            if progress is None or entry is None or sid not in entry.options or not self._reassignable(rid, progress):
                continue
            target = await self.served_as(entry, sid)
            if not self._reassignable(rid, progress):  # it began while its inputs were prepared
                continue
            progress.reassigned = target
            encodes = [(t, inst) for t, (stage, inst) in progress.tasks.items() if stage == "encode"]
            taken = 0
            for task_id, inst in encodes:
                try:
                    taken += await self.pipeline.cluster.queue("encode", inst).cancel(
                        task_id, if_queued=True, code="ABORTED", message="inputs reassigned")
                except Exception as exc:  # noqa: BLE001 - the queue backend: leave this request as it is
                    log.warning("reassigning %s: %s", rid, exc)
            if encodes and not taken:  # a worker began: it keeps its inputs
                progress.reassigned = None
                progress.encode_started = True
                self.stats.lost_races += 1
                continue
            applied += 1
            log.info("request %s reassigned to %s", rid, sid)
        self.stats.reassigned += applied
        return applied

    async def tick(self) -> int:
        """Reassign when a deadline of the queue is at risk at the measured capacities (the
        program's fast path keeps the current assignment when every deadline is met)."""
        if not any(self._reassignable(r, p) for r, p in self.served.items()):
            return 0
        async with self._lock:
            capacity = self.capacity()
            if not capacity:
                return 0
            now, jobs = time.time(), self.jobs()
            price = self.load_price.price(now) if self.load_price is not None else 0.0
            changes = await self._solve(tick_changes, jobs, now, capacity, order=self.order(jobs),
                                        time_limit_s=self.time_limit_s, flow=self.flow, price=price)
            return await self._apply(changes)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.tick()
            except Exception:  # the loop must live; the next round decides afresh
                log.exception("selection tick failed")

    def full_accuracy(self) -> float:
        entry = self.profile.accuracy.get("full") if self.profile is not None else None
        return entry.accuracy if entry is not None else 0.0


def _full_cost(prompt: Any) -> dict[str, int]:
    media = sum(i.num_tokens for i in prompt.items)
    return {"reduction": FULL, "media_tokens": media, "prompt_tokens": len(prompt.input_ids)}


def reductions_proto(adm: Admitted, full_accuracy: float) -> prism_pb2.Reductions:
    """What was dropped or shrunk, for the response's last message."""
    r = adm.reduction
    if r is None:
        allowed = adm.allowed is not None and adm.allowed.allows_any
        return prism_pb2.Reductions(strategy="full", image_scale=1.0,
                                    expected_accuracy=full_accuracy if allowed else 0.0, description="nothing")
    return prism_pb2.Reductions(
        strategy=r.id, dropped_images=list(r.dropped_images), image_scale=r.image_scale,
        audio_seconds=r.audio_seconds or 0.0,
        dropped_modalities=[MODALITY[m] for m in sorted(r.dropped_modalities)],
        expected_accuracy=adm.expected_accuracy or 0.0, description=r.describe())


def reduction_json(adm: Admitted) -> str:
    return json.dumps(adm.reduction.as_dict()) if adm.reduction is not None else ""


def _reduced(adm: Admitted, reduction: Any, accuracy: float) -> Admitted:
    """`adm` with `reduction` applied, prepared exactly as an unreduced request."""
    from prism.models.reduce import prepare_reduced

    done = prepare_reduced(adm.model.adapter, adm.model.processor, adm.source, list(adm.media), reduction,
                           add_generation_prompt=adm.add_generation_prompt)
    return dataclasses.replace(adm, prompt=done.prompt, reduction=reduction, expected_accuracy=accuracy)


def with_stored_reduction(adm: Admitted, text: str, accuracy: float) -> Admitted:
    """A taken-over request with the reduction chosen when it was accepted."""
    if not text:
        return adm
    from prism.models.reduce import Reduction

    return _reduced(adm, Reduction.from_dict(json.loads(text)), accuracy)


__all__ = ["MAX_CHANGES", "Entry", "Option", "Selector", "Stats", "reduction_json", "reductions_proto",
           "with_stored_reduction"]
