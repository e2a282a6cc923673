"""Decode worker: takes decode tasks from the stage queue while slots are free, imports each
request's KV from the prefill worker named in its task straight into a reserved slot (layer by
layer, while prefill may still be computing), and runs the continuous batch: every step
generates one token for each active request; requests join and leave between steps."""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from prism.engine.decode import DecodeEngine, DecodeSpec, Finish, NoFreeSlot, PromptTooLong, TokenEvent
from prism.engine.sampling import Sampling
from prism.queue.base import TaskState, UnknownTask, WorkItem, WorkQueue
from prism.runtime.host import LocalPeers
from prism.runtime.stagework import ComputeThread
from prism.runtime.metrics import observe_batch
from prism.runtime.telemetry import record_task
from prism.v1 import common_pb2, stages_pb2
from prism.wire import KvReceiver, fetch_kv_method
from services.prefill.outbox import KvFailed

log = logging.getLogger(__name__)

FINISH_TO_PROTO = {Finish.STOP: common_pb2.FINISH_REASON_STOP, Finish.LENGTH: common_pb2.FINISH_REASON_LENGTH}


@dataclass(frozen=True)
class Failure:
    code: str
    message: str


class ImportFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.failure = Failure(code, message)


class DecodeWorker:
    def __init__(self, queue: WorkQueue, engine: DecodeEngine, compute: ComputeThread,
                 channel_for: Callable[[str], grpc.aio.Channel], *, name: str, fetch_timeout_s: float,
                 peers: LocalPeers | None = None):
        self.queue, self.engine, self.compute = queue, engine, compute
        self.peers = peers or LocalPeers()
        self._generated: dict[str, int] = {}  # tokens published per request (the first counts)
        self._compute_s: dict[str, list[float]] = {}  # each request's share of its steps' compute: [wall, cpu] s
        self._traced: dict[str, tuple[WorkItem, float, float]] = {}  # item, began, KV import seconds
        #: Active requests per step, most recent last (for tests and the admin view).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=256)
        self.channel_for = channel_for
        self.name = name
        self.fetch_timeout_s = fetch_timeout_s
        self.outputs: dict[str, asyncio.Queue] = {}
        self._imports: dict[str, asyncio.Task] = {}
        self._awaiting: set[str] = set()  # imports taken from the queue that have not reserved a slot yet
        self._cancelled: set[str] = set()
        self._slot_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._stopping = False
        self._outbox: asyncio.Queue[TokenEvent | None] = asyncio.Queue()  # token events to publish

    # ---- the servicer's side -----------------------------------------------------------
    def open(self, request_id: str) -> asyncio.Queue:
        """A channel that receives the request's TokenEvents, then a final TokenEvent with a
        finish reason or a Failure."""
        chan: asyncio.Queue = asyncio.Queue()
        self.outputs[request_id] = chan
        return chan

    async def cancel(self, request_id: str) -> None:
        """The caller went away: stop the import or drop the request from the batch now."""
        self.outputs.pop(request_id, None)
        await self.queue.cancel(request_id, code="CANCELLED", message="caller went away")
        task = self._imports.get(request_id)
        if task is not None:
            task.cancel()
        else:
            self._cancelled.add(request_id)
            self._work.set()

    def _emit(self, request_id: str, event: TokenEvent | Failure) -> None:
        chan = self.outputs.get(request_id)
        if chan is not None:
            chan.put_nowait(event)
        if isinstance(event, Failure) or event.finish is not None:
            self.outputs.pop(request_id, None)

    # ---- intake ------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve the queue until it is closed and the batch has drained."""
        stepper = asyncio.create_task(self._step_loop())
        publisher = asyncio.create_task(self._publisher())
        try:
            while True:
                while self.engine.free_slots - len(self._awaiting) <= 0 or self._at_share_bound():
                    self._slot_freed.clear()
                    if self._at_share_bound():  # the bound may be raised in place: look again soon
                        try:
                            await asyncio.wait_for(self._slot_freed.wait(), 0.05)
                        except asyncio.TimeoutError:
                            pass
                    else:
                        await self._slot_freed.wait()
                item = await self.queue.get()
                if item is None:
                    break
                self._awaiting.add(item.task_id)
                self._imports[item.task_id] = asyncio.create_task(self._import(item))
            if self._imports:
                await asyncio.gather(*self._imports.values(), return_exceptions=True)
        finally:
            self._stopping = True
            self._work.set()
            await stepper
            self._outbox.put_nowait(None)
            await publisher

    def _at_share_bound(self) -> bool:
        """The compute share's `max_batch` (in-place vertical scaling) bounds the sequences
        decoded at once: no new one is taken while that many are active or importing."""
        bound = self.compute.max_batch
        return bool(bound) and self.engine.num_active + len(self._awaiting) >= bound

    async def _import(self, item: WorkItem) -> None:
        rid = item.task_id
        try:
            if await self.queue.is_cancelled(rid):
                await self.queue.ack(rid)
                return
            try:
                req = stages_pb2.DecodeRequest.FromString(item.payload)
            except DecodeError as exc:
                await self.queue.dead_letter(rid, f"payload: undecodable DecodeRequest: {exc}")
                return
            if not req.prefill_address:
                raise ImportFailed("INVALID_ARGUMENT", "prefill_address: required")
            if req.sampling.max_new_tokens < 1:
                raise ImportFailed("INVALID_ARGUMENT", "sampling.max_new_tokens: must be >= 1")
            await self.queue.set_state(rid, TaskState.TRANSFERRING, worker=self.name)
            began = time.time()
            local = self.peers.local("prefill", req.prefill_address)
            try:
                kv_id = req.prefill_task_id or rid
                if local is not None:
                    first_token, rope_delta = await self._import_local(rid, kv_id, local)
                else:
                    first_token, rope_delta = await self._import_remote(rid, kv_id, req.prefill_address)
            except grpc.aio.AioRpcError as exc:
                code = "UNAVAILABLE" if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) else exc.code().name
                raise ImportFailed(code, f"fetching KV from {req.prefill_address}: {exc.details()}") from None
            except KvFailed as exc:
                raise ImportFailed(exc.code, f"prefill failed: {exc.message}") from None
            except (NoFreeSlot, PromptTooLong, ValueError) as exc:
                code = ("RESOURCE_EXHAUSTED" if isinstance(exc, NoFreeSlot)
                        else "INVALID_ARGUMENT" if isinstance(exc, PromptTooLong) else "INTERNAL")
                raise ImportFailed(code, str(exc)) from None
            self._traced[rid] = (item, began, time.time() - began)
            s = req.sampling
            spec = DecodeSpec(rid, first_token, rope_delta,
                              Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, seed=s.seed),
                              s.max_new_tokens, frozenset(req.stop_token_ids))
            done = await self.compute.run(self.engine.activate, spec)
            self._generated[rid] = 1
            if done is not None:
                self._emit(rid, done)
                self._outbox.put_nowait(done)
            else:
                await self.queue.set_state(rid, TaskState.RUNNING, worker=self.name)
                self._work.set()
            await self.queue.ack(rid)
        except ImportFailed as exc:
            self._emit(rid, exc.failure)
            await self.queue.set_state(rid, TaskState.FAILED, code=exc.failure.code, message=exc.failure.message)
            await self.queue.ack(rid)
        except asyncio.CancelledError:
            await self.queue.ack(rid)
        finally:
            self._awaiting.discard(rid)
            if self.engine.is_reserved(rid):  # the import did not finish: give the slot back
                await self.compute.run(self.engine.release, rid)
            self._imports.pop(rid, None)
            self._slot_freed.set()

    async def _reserve(self, rid: str, prompt_tokens: int) -> None:
        await self.compute.run(self.engine.reserve, rid, prompt_tokens)
        self._awaiting.discard(rid)

    async def _import_remote(self, rid: str, kv_id: str, address: str) -> tuple[int, int]:
        """Pull the KV over gRPC straight into the reserved slot (zero-copy parse)."""
        fetch = fetch_kv_method(self.channel_for(address))
        receiver: KvReceiver | None = None
        layout = self.engine.lm.layout
        async for msg in fetch(stages_pb2.FetchKvRequest(request_id=kv_id), timeout=self.fetch_timeout_s):
            if receiver is None:
                if msg.kind != "header":
                    raise ValueError("the KV stream did not start with its header")
                await self._reserve(rid, msg.header.prompt_tokens)
                receiver = KvReceiver(functools.partial(self.engine.kv_destination, rid),
                                      num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                                      head_dim=layout.head_dim, dtype=self.engine.lm.dtype,
                                      max_tokens=self.engine.max_len)
            receiver.feed(msg)
        if receiver is None:
            raise ValueError("the KV stream was empty")
        return receiver.finish().first_token, receiver.header.rope_delta

    async def _import_local(self, rid: str, kv_id: str, prefill) -> tuple[int, int]:
        """Co-hosted prefill: copy each layer from its outbox into the slot as it is made."""
        outbox = await prefill.held.wait(kv_id, self.fetch_timeout_s)
        if outbox is None:
            raise ImportFailed("UNAVAILABLE", f"no KV held for {kv_id} by this worker")
        try:
            await self._reserve(rid, outbox.meta.prompt_tokens)
            async for event in outbox.follow():
                if event[0] == "layer":
                    _, layer, keys, values = event
                    self.engine.write_kv(rid, layer, 1, 0, keys)
                    self.engine.write_kv(rid, layer, 2, 0, values)
                else:
                    return event[1], outbox.meta.rope_delta
            raise ValueError("the local KV ended without its first token")
        finally:
            await prefill.fetched(kv_id)

    async def _publish(self, events: list[TokenEvent]) -> bool:
        """Token events of one request ride on its task's state: RUNNING with ``tokens`` and
        the ``index`` of the first in the output (the first token, from prefill, is index 0),
        DONE with the finish reason. Returns False when the task ended elsewhere."""
        rid = events[0].request_id
        index = self._generated.get(rid, 1)
        tokens = [int(e.token) for e in events if e.token is not None]
        finish = events[-1].finish
        self._generated[rid] = index + len(tokens)
        try:
            if finish is not None:
                self._generated.pop(rid, None)
                compute_ms, cpu_ms = (x * 1000 for x in self._compute_s.pop(rid, (0.0, 0.0)))
                traced = self._traced.pop(rid, None)
                if traced is not None:
                    record_task("decode", traced[0], traced[1], time.time(), {
                        "prism.generated_tokens": index + len(tokens), "prism.kv_import_ms": traced[2] * 1000,
                        "prism.compute_ms": compute_ms, "prism.compute_cpu_ms": cpu_ms,
                        "prism.finish_reason": str(finish)},
                        instance=self.name, tokens=index + len(tokens) - 1)
                # compute_ms (compute_cpu_ms): its share of the steps it was in (a batched step
                # split evenly), wall (process CPU) time
                return await self.queue.set_state(rid, TaskState.DONE, tokens=tokens, index=index,
                                                  finish=int(FINISH_TO_PROTO[finish]), worker=self.name,
                                                  compute_ms=compute_ms, compute_cpu_ms=cpu_ms)
            live = not tokens or await self.queue.set_state(rid, TaskState.RUNNING, tokens=tokens, index=index)
        except UnknownTask:  # the task record is gone (expired or the queue was wiped)
            live = False
        if not live:
            # The task ended elsewhere (cancelled by the scheduler): free its slot at once.
            self._generated.pop(rid, None)
            self._compute_s.pop(rid, None)
            self._traced.pop(rid, None)
            self._cancelled.add(rid)
            self._work.set()
        return live

    async def _publisher(self) -> None:
        """Publishes token events off the step loop, so a step never waits for the queue: the
        events of one request in order (merged when several are waiting), requests in parallel."""
        while True:
            batch = [await self._outbox.get()]
            while not self._outbox.empty():
                batch.append(self._outbox.get_nowait())
            stop = batch[-1] is None
            by_request: dict[str, list[TokenEvent]] = {}
            for event in batch:
                if event is not None:
                    by_request.setdefault(event.request_id, []).append(event)
            results = await asyncio.gather(*(self._publish(events) for events in by_request.values()),
                                           return_exceptions=True)
            for rid, result in zip(by_request, results):
                if isinstance(result, Exception):  # never let one request's failure stop every stream
                    await self._publish_failed(rid, result)
            if stop:
                return

    async def _publish_failed(self, rid: str, exc: Exception) -> None:
        """Tokens of `rid` could not be published: drop it from the batch and fail its task with
        UNAVAILABLE, so that the scheduler retries it from the tokens it relayed."""
        log.error("publishing the tokens of %s failed: %s", rid, exc)
        self._generated.pop(rid, None)
        self._traced.pop(rid, None)
        self._cancelled.add(rid)
        self._work.set()
        try:
            await self.queue.set_state(rid, TaskState.FAILED, code="UNAVAILABLE", message=f"token events lost: {exc}")
        except Exception as again:  # the queue itself is unreachable: the reaper or a retry ends it
            log.error("could not fail %s: %s", rid, again)

    # ---- the batch ---------------------------------------------------------------------
    async def _step_loop(self) -> None:
        while True:
            if self._cancelled:
                for rid in list(self._cancelled):
                    self._cancelled.discard(rid)
                    if await self.compute.run(self.engine.release, rid):
                        self._slot_freed.set()
            if self.engine.num_active == 0:
                if self._stopping:
                    return
                self._work.clear()
                await self._work.wait()
                continue
            try:
                events, step_s, step_cpu_s = await self.compute.timed(self.engine.step)
            except Exception as exc:
                log.exception("decode step failed")
                for rid in self.engine.active_ids():
                    self._traced.pop(rid, None)
                    self._compute_s.pop(rid, None)
                    if await self.compute.run(self.engine.release, rid):
                        self._emit(rid, Failure("INTERNAL", f"decode step failed: {exc}"))
                        await self.queue.set_state(rid, TaskState.FAILED, code="INTERNAL", message=str(exc))
                self._slot_freed.set()
                continue
            self.batch_sizes.append(len(events))
            observe_batch("decode", self.name, len(events))
            for event in events:  # each request's share of the step's compute
                share = self._compute_s.setdefault(event.request_id, [0.0, 0.0])
                share[0] += step_s / len(events)
                share[1] += step_cpu_s / len(events)
                self._emit(event.request_id, event)
                self._outbox.put_nowait(event)
                if event.finish is not None:
                    self._slot_freed.set()
