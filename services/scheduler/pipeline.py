"""Drives one admitted request through the stages by putting tasks into the chosen workers'
queues and following their events: encode (media only; the items of one request may be spread
over several encoders and encoded in parallel), prefill, decode.

The decode task is queued as soon as prefill reports RUNNING, so the decode worker pulls the KV
layer by layer while the prompt pass computes later layers. The first token comes from prefill
and is relayed at once; decode publishes the rest as progress events on its task. Stop strings
are checked on the text here.

When a worker is lost mid-request (its tasks fail with UNAVAILABLE) the request is retried on
live workers: the retry's prompt is the original prompt plus every token already relayed, so the
caller's stream goes on from where it was, with no token repeated or missing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from prism.queue.base import DuplicateTask, QueueClosed, QueueFull, TaskEvent, TaskState, UnknownTask, WorkItem
from prism.runtime.convert import media_info, media_input
from prism.v1 import common_pb2, prism_pb2, stages_pb2
from services.scheduler.cluster import Cluster
from services.scheduler.core import Admission, NoInstance, Placement, PlacementChoice, RequestCost, task_share_s
from services.scheduler.intake import Admitted
from services.scheduler.textstream import TextStream

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH
RETRYABLE = {"UNAVAILABLE"}


class StageError(Exception):
    """A stage refused or failed the request; carries the status."""

    def __init__(self, code: grpc.StatusCode, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


async def abort(context: grpc.aio.ServicerContext, exc: StageError) -> None:
    """Ends the call with `exc`'s status, and its retry hint as trailing ``retry-after-ms``."""
    if exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-ms", str(max(1, round(exc.retry_after_s * 1000)))),))
    await context.abort(exc.code, exc.message)


def _status(name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, str(name), grpc.StatusCode.INTERNAL)


@dataclass
class Progress:
    """What the caller has been sent so far (survives retries)."""

    tokens: list[int] = field(default_factory=list)
    attempt: int = 0
    placement: str = ""
    first_at: float | None = None
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    tasks: dict[str, tuple[str, str]] = field(default_factory=dict)  # task id -> (stage, instance)
    booked: dict[str, str] = field(default_factory=dict)  # task id -> stage: load booked, not queued yet
    started: float = field(default_factory=time.time)
    adm: Admitted | None = None  # the request as being served (inputs as reduced now)
    encode_started: bool = False  # a worker began encoding this attempt's media
    prefill_started: bool = False  # a worker began this attempt's prompt pass
    reassigned: Admitted | None = None  # set by the selector: serve these inputs instead
    reassignments: int = 0  # attempts ended by a reassignment (not failures)

    @property
    def reassignable(self) -> bool:
        """Its inputs may still change: no token sent and no encoder began on them."""
        return not self.tokens and not self.encode_started and self.first_at is None


class Reassigned(StageError):
    """The selector changed the inputs of a request whose encoding had not started: the attempt
    ends (its queued encode tasks were taken back) and the next serves the new inputs."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.ABORTED, "inputs reassigned before encoding")


def _shares_s(tokens: int, detail: dict) -> tuple[float, float]:
    """A READY encode or prefill task's share of its batch's compute: wall and CPU seconds."""
    batch = float(detail.get("batch_tokens", 0))
    return (task_share_s(tokens, float(detail.get("compute_ms", 0.0)) / 1000, batch),
            task_share_s(tokens, float(detail.get("compute_cpu_ms", 0.0)) / 1000, batch))


class Pipeline:
    def __init__(self, cluster: Cluster, placement: Placement, admission: Admission, *,
                 inject_trace: Callable[[], dict[str, str]] = dict, max_attempts: int = 3,
                 on_finish: Callable[[Admitted, Progress, prism_pb2.GenerateResponse], None] | None = None,
                 on_admit: Callable[[RequestCost], None] | None = None):
        self.cluster = cluster
        self.placement = placement
        self.admission = admission
        self.inject_trace = inject_trace
        self.max_attempts = max_attempts
        self.on_finish = on_finish
        self.on_admit = on_admit
        self.inflight: dict[str, Progress] = {}
        self.placements: dict[str, int] = {"split": 0, "colocated": 0}

    # ---- decisions ---------------------------------------------------------------------
    @staticmethod
    def cost(adm: Admitted, sent: int = 0) -> RequestCost:
        return RequestCost(
            request_id=adm.request_id, priority=adm.priority, deadline=adm.deadline,
            ttft_target_s=adm.ttft_target_s, image_tokens=adm.image_tokens + adm.audio_tokens,
            prompt_tokens=len(adm.prompt.input_ids) + sent, max_new_tokens=max(1, adm.max_new_tokens - sent),
            media=tuple(i.num_tokens for i in adm.prompt.items))

    def admit(self, adm: Admitted, *, check_deadline: bool = True) -> None:
        """Admission control before anything is queued: raises StageError(RESOURCE_EXHAUSTED)
        with a retry hint when the request cannot meet its deadline or a stage is full.
        `check_deadline=False`: the deadline was checked already (the selector's program)."""
        cost = self.cost(adm)
        if not check_deadline:
            cost = dataclasses.replace(cost, deadline=None)
        try:
            decision = self.admission.admit(cost, time.time(), self.cluster.book, self.routable(adm))
        except NoInstance as exc:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"no live worker for the {exc.stage} stage") from None
        if not decision.ok:
            raise StageError(_status(decision.code), decision.message, retry_after_s=decision.retry_after_s)
        if self.on_admit is not None:
            self.on_admit(self.cost(adm))

    def routable(self, adm: Admitted) -> list:
        """The instances that may serve `adm`: those of its variant (all, without variants)."""
        return [i for i in self.cluster.routable if i.variant == adm.variant]

    def _choose(self, adm: Admitted, sent: int) -> PlacementChoice:
        """Where this attempt runs (a retry's workers are the live ones: the reaper has removed
        the lost one from the view)."""
        try:
            return self.placement.decide(self.cost(adm, sent), self.routable(adm), self.cluster.book)
        except NoInstance as exc:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"no live worker for the {exc.stage} stage") from None

    # ---- tasks -------------------------------------------------------------------------
    def _header(self, adm: Admitted, task_id: str, progress: Progress, choice: PlacementChoice) -> stages_pb2.TaskHeader:
        return stages_pb2.TaskHeader(
            request_id=task_id, model=adm.model.name, priority=adm.priority,
            deadline_unix_ms=int(adm.deadline * 1000) if adm.deadline else 0,
            arrival_unix_ms=int(adm.arrival * 1000), trace_context=self.inject_trace(),
            placement=choice.path, attempt=progress.attempt)

    async def _put(self, stage: str, instance: str, header: stages_pb2.TaskHeader, payload: bytes, cost: int,
                   progress: Progress, upstream: str = "") -> None:
        item = WorkItem(task_id=header.request_id, payload=payload, priority=header.priority,
                        deadline_unix_ms=header.deadline_unix_ms, trace_context=dict(header.trace_context),
                        cost=cost, attrs={"stage": stage, "upstream": upstream, "placement": header.placement,
                                          "strategy": header.strategy})
        try:
            await self.cluster.queue(stage, instance).put(item)
        except QueueFull as exc:
            raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{stage} queue of {instance} is full: {exc}",
                             retry_after_s=1.0) from None
        except (DuplicateTask, QueueClosed) as exc:
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"{stage} worker {instance}: {exc}") from None
        progress.tasks[item.task_id] = (stage, instance)
        progress.booked.pop(item.task_id, None)
        self.cluster.book.add(item.task_id, stage, instance, cost)

    async def _address(self, worker: str) -> str:
        try:
            return await self.cluster.address_of(worker)
        except NoInstance:  # it died between taking the task and now: retried on live workers
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"worker {worker} is gone") from None

    async def _events(self, task_id: str, progress: Progress, *, replay: bool = False) -> AsyncIterator[TaskEvent]:
        stage, instance = progress.tasks[task_id]
        try:
            async for event in self.cluster.queue(stage, instance).watch(task_id, replay=replay):
                worker = event.detail.get("worker")
                if self.cluster.shared and isinstance(worker, str) and worker and worker != instance:
                    # Taken from the shared queue by `worker`: its load and its output are there.
                    self.cluster.book.move(task_id, stage, worker, from_instance=instance)
                    progress.tasks[task_id] = (stage, worker)
                    instance = worker
                if stage == "encode" and event.state is TaskState.RUNNING:
                    progress.encode_started = True
                if event.state is TaskState.CANCELLED and progress.reassigned is not None:
                    self.cluster.book.finish(task_id, stage)
                    raise Reassigned()
                if event.state is TaskState.FAILED or event.state is TaskState.CANCELLED:
                    self.cluster.book.finish(task_id, stage)
                    code = str(event.detail.get("code", "INTERNAL"))
                    raise StageError(_status(code), str(event.detail.get("message", f"{stage} failed")))
                if event.state.terminal or event.state is TaskState.READY:
                    self.cluster.book.finish(task_id, stage)
                yield event
        except UnknownTask:
            self.cluster.book.finish(task_id, stage)
            raise StageError(grpc.StatusCode.UNAVAILABLE, f"{stage} task {task_id} vanished") from None

    async def _until_ready(self, task_id: str, progress: Progress) -> TaskEvent:
        async for event in self._events(task_id, progress):
            if event.state in (TaskState.READY, TaskState.DONE):
                return event
        raise StageError(grpc.StatusCode.INTERNAL, f"task {task_id} ended without output")

    async def _cancel_tasks(self, progress: Progress) -> None:
        for task_id, stage in progress.booked.items():
            self.cluster.book.finish(task_id, stage)
        progress.booked.clear()
        for task_id, (stage, instance) in list(progress.tasks.items()):
            self.cluster.book.finish(task_id, stage)
            try:
                await self.cluster.queue(stage, instance).cancel(task_id, code="CANCELLED", message="request ended")
            except UnknownTask:
                pass
            except self.cluster.backend.errors as exc:  # its worker drops it when it sees it is orphaned
                log.warning("could not cancel %s: %s", task_id, exc)
        progress.tasks.clear()

    async def cancel_attempts(self, request_id: str, below: int) -> None:
        """Cancel the tasks of a request's attempts numbered below `below` (made by a scheduler
        that died: their workers would otherwise go on computing for nobody)."""
        stages = {"encode": [f"encode{k}" for k in range(8)], "prefill": ["prefill"], "decode": ["decode"]}
        for attempt in range(1, below):
            for stage, names in stages.items():
                queue = self.cluster.records(stage)
                for name in names:
                    try:
                        await queue.cancel(f"{request_id}/a{attempt}/{name}", code="CANCELLED",
                                           message="taken over by another scheduler")
                    except UnknownTask:
                        pass

    # ---- the request -------------------------------------------------------------------
    async def run(self, adm: Admitted, progress: Progress | None = None) -> AsyncIterator[prism_pb2.GenerateResponse]:
        """Streams the response messages; raises StageError when the request fails. `progress`
        carries tokens already sent (a request resumed after a scheduler restart)."""
        progress = progress or Progress()
        progress.adm = adm
        self.inflight[adm.request_id] = progress
        text = TextStream(adm.model.processor.tokenizer, adm.stop)
        if progress.tokens:
            text.push(list(progress.tokens))
        try:
            while True:
                progress.attempt += 1
                try:
                    try:
                        async for message in self._attempt(adm, progress, text):
                            yield message
                        return
                    except self.cluster.backend.errors as exc:  # Redis unreachable past its retries
                        raise StageError(grpc.StatusCode.UNAVAILABLE, f"queue backend unavailable: {exc}") from None
                except StageError as exc:
                    await self._cancel_tasks(progress)
                    if progress.reassigned is not None:  # the selector took the queued work back
                        target, progress.reassigned = progress.reassigned, None
                        progress.reassignments += 1
                        if not progress.tokens:
                            adm = progress.adm = target
                        continue
                    failures = progress.attempt - progress.reassignments
                    retry = exc.code.name in RETRYABLE and failures < self.max_attempts
                    if not retry:
                        raise
                    log.warning("request %s attempt %d failed (%s); retrying after %d tokens",
                                adm.request_id, progress.attempt, exc.message, len(progress.tokens))
                    try:
                        await self.cluster.refresh()
                    except self.cluster.backend.errors:
                        await asyncio.sleep(1.0)  # the backend is restarting: give it a moment
        finally:
            await self._cancel_tasks(progress)
            self.inflight.pop(adm.request_id, None)

    async def _attempt(self, adm: Admitted, progress: Progress,
                       text: TextStream) -> AsyncIterator[prism_pb2.GenerateResponse]:
        sent = len(progress.tokens)
        choice = self._choose(adm, sent)
        progress.placement = choice.path
        base = f"{adm.request_id}/a{progress.attempt}"
        max_new = adm.max_new_tokens - sent
        s = adm.sampling
        sampling = common_pb2.SamplingParams(max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p,
                                             top_k=s.top_k, seed=s.seed, ignore_eos=adm.ignore_eos)
        items = adm.prompt.items
        sources: list[stages_pb2.EmbeddingSource] = []
        if progress.reassigned is not None:  # reassigned before this attempt queued anything
            raise Reassigned()
        prefill_id, decode_id = f"{base}/prefill", f"{base}/decode"
        prefill_inst, decode_inst = choice.prefill, choice.decode
        input_ids = list(adm.prompt.input_ids) + list(progress.tokens)
        need_decode = max_new > 1
        # The prefill and decode chosen now carry this request's load from now, not from when
        # its encoding is done: a burst of image requests must not all pick the same "idle" one.
        for task_id, stage, inst, cost in ((prefill_id, "prefill", prefill_inst, len(input_ids)),
                                           (decode_id, "decode", decode_inst, max_new - 1)):
            if stage == "prefill" or need_decode:
                self.cluster.book.add(task_id, stage, inst.name, cost)
                progress.booked[task_id] = stage
        progress.encode_started = progress.prefill_started = False
        if items:
            started = time.perf_counter()
            sources = await self._encode(adm, base, progress, choice)
            progress.encode_ms = (time.perf_counter() - started) * 1000
        prefill_req = stages_pb2.PrefillRequest(
            header=self._header(adm, prefill_id, progress, choice), input_ids=input_ids,
            media=[media_info(i) for i in items], sampling=sampling, embedding_sources=sources)
        await self._put("prefill", prefill_inst.name, prefill_req.header, prefill_req.SerializeToString(),
                        len(input_ids), progress)
        decode_req = stages_pb2.DecodeRequest(
            header=self._header(adm, decode_id, progress, choice), prefill_address=prefill_inst.address,
            prefill_task_id=prefill_id, sampling=sampling, stop_token_ids=sorted(adm.stop_ids))
        decode_queued = False

        async def queue_decode() -> None:
            nonlocal decode_queued
            if need_decode and not decode_queued:
                decode_queued = True
                upstream = progress.tasks[prefill_id][1]  # with shared queues, the worker that took it
                if upstream != prefill_inst.name:
                    decode_req.prefill_address = await self._address(upstream)
                await self._put("decode", decode_inst.name, decode_req.header, decode_req.SerializeToString(),
                                max_new - 1, progress, upstream=upstream)

        first = None
        async for event in self._events(prefill_id, progress):
            if event.state is TaskState.RUNNING:
                progress.prefill_started = True
                await queue_decode()
            elif event.state is TaskState.READY:
                first = int(event.detail["first_token"])
                progress.prefill_ms = float(event.detail.get("compute_ms", 0.0))
                self.cluster.record(progress.tasks[prefill_id][1], "prefill", len(input_ids),
                                    *_shares_s(len(input_ids), event.detail))
                break
        if first is None:
            raise StageError(grpc.StatusCode.INTERNAL, "prefill ended the task without a first token")
        await queue_decode()

        finish = 0
        ttft = None
        if progress.first_at is None:
            progress.first_at = time.time()
            ttft = (progress.first_at - adm.arrival) * 1000
        finish, message = self._relay(adm, progress, text, [first], ttft)
        if message is not None:
            yield message
        if not finish and len(progress.tokens) >= adm.max_new_tokens:
            finish = FINISH_LENGTH
        if not finish:
            index_base = sent  # decode's index 0 is this attempt's first token
            decode_started, decoded = time.perf_counter(), 0
            async for event in self._events(decode_id, progress, replay=True):
                decoded += len(event.detail.get("tokens", ()))
                new = [int(t) for t in event.detail.get("tokens", ())]
                index = index_base + int(event.detail.get("index", 0))
                skip = len(progress.tokens) - index  # tokens of this event already relayed
                if new and skip < 0:  # a gap: events were lost; go on from what was sent
                    raise StageError(grpc.StatusCode.UNAVAILABLE, f"decode events of {decode_id} were lost")
                if skip > 0:
                    new = new[skip:]
                if new:
                    finish, message = self._relay(adm, progress, text, new, None)
                    if message is not None:
                        yield message
                if not finish and event.state is TaskState.DONE:
                    finish = int(event.detail.get("finish", FINISH_LENGTH))
                if finish:
                    break
            if not finish:
                raise StageError(grpc.StatusCode.INTERNAL, "decode ended without a finish reason")
            decode_worker = progress.tasks[decode_id][1]  # with shared queues, the worker that took it
            # Decode throughput of that instance at the batches it ran in: its tokens over its share
            # of the steps' compute (reported by the worker), else over the wall time at the batch.
            share_s = float(event.detail.get("compute_ms", 0.0)) / 1000 if event.state is TaskState.DONE else 0.0
            if share_s > 0:
                self.cluster.record(decode_worker, "decode", decoded, share_s,
                                    float(event.detail.get("compute_cpu_ms", 0.0)) / 1000)
            else:
                batch = max(1, self.cluster.book.slots_used(decode_worker) + 1)
                self.cluster.record(decode_worker, "decode", decoded * batch, time.perf_counter() - decode_started)
        self.placements[progress.placement] = self.placements.get(progress.placement, 0) + 1
        yield self._final(adm, progress, text, finish)

    def _relay(self, adm: Admitted, progress: Progress, text: TextStream, new: list[int],
               ttft_ms: float | None) -> tuple[int, prism_pb2.GenerateResponse | None]:
        progress.tokens.extend(new)
        piece = text.push(new)
        finish = 0
        if text.stopped or any(t in adm.stop_ids for t in new):
            finish = FINISH_STOP
        elif len(progress.tokens) >= adm.max_new_tokens:
            finish = FINISH_LENGTH
        msg = prism_pb2.GenerateResponse(request_id=adm.request_id, token_ids=new, text=piece)
        if ttft_ms is not None:
            msg.timing.ttft_ms = ttft_ms
        return finish, msg

    def _final(self, adm: Admitted, progress: Progress, text: TextStream, finish: int) -> prism_pb2.GenerateResponse:
        now = time.time()
        n = len(progress.tokens)
        first_at = progress.first_at or now
        timing = prism_pb2.Timing(ttft_ms=(first_at - adm.arrival) * 1000, e2e_ms=(now - adm.arrival) * 1000,
                                  encode_ms=progress.encode_ms, prefill_ms=progress.prefill_ms,
                                  tpot_ms=(now - first_at) * 1000 / (n - 1) if n > 1 else 0.0)
        final = prism_pb2.GenerateResponse(
            request_id=adm.request_id, text=text.flush(), finish_reason=finish, timing=timing,
            usage=prism_pb2.Usage(prompt_tokens=len(adm.prompt.input_ids), image_tokens=adm.image_tokens,
                                  audio_tokens=adm.audio_tokens, generated_tokens=n),
            placement=prism_pb2.Placement(path=progress.placement, attempts=progress.attempt), variant=adm.variant)
        if self.on_finish is not None:
            self.on_finish(adm, progress, final)
        return final

    async def _encode(self, adm: Admitted, base: str, progress: Progress,
                      choice: PlacementChoice) -> list[stages_pb2.EmbeddingSource]:
        """One encode task per encoder instance chosen, holding its share of the items; all
        encoded in parallel."""
        groups: dict[str, list[int]] = {}
        by_name = {}
        for index, inst in enumerate(choice.encode):
            groups.setdefault(inst.name, []).append(index)
            by_name[inst.name] = inst
        sources = []
        for k, (name, indexes) in enumerate(groups.items()):
            task_id = f"{base}/encode{k}"
            header = self._header(adm, task_id, progress, choice)
            req = stages_pb2.EncodeRequest(header=header, items=[media_input(adm.prompt.items[i]) for i in indexes])
            await self._put("encode", name, header, req.SerializeToString(),
                            sum(adm.prompt.items[i].num_tokens for i in indexes), progress)
            sources.append(stages_pb2.EmbeddingSource(address=by_name[name].address, task_id=task_id, items=indexes))
        events = await asyncio.gather(*(self._until_ready(src.task_id, progress) for src in sources))
        for src, name in zip(sources, groups):  # with shared queues, whoever took a task holds its output
            if progress.tasks[src.task_id][1] != name:
                src.address = await self._address(progress.tasks[src.task_id][1])
        for src, event in zip(sources, events):
            tokens = sum(adm.prompt.items[i].num_tokens for i in src.items)
            self.cluster.record(progress.tasks[src.task_id][1], "encode", tokens, *_shares_s(tokens, event.detail))
        return sources
