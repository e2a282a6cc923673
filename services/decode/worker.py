"""Decode worker: takes decode tasks from the stage queue while slots are free, imports each
request's KV from the prefill worker named in its task straight into a reserved slot (layer by
layer, while prefill may still be computing), and runs the continuous batch: every step
generates one token for each active request; requests join and leave between steps."""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from prism.engine.decode import DecodeEngine, DecodeSpec, Finish, NoFreeSlot, PromptTooLong, TokenEvent
from prism.engine.sampling import Sampling
from prism.queue.base import TaskState, WorkItem, WorkQueue
from prism.runtime.stagework import ComputeThread
from prism.v1 import common_pb2, stages_pb2
from prism.wire import KvReceiver, fetch_kv_method

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
                 channel_for: Callable[[str], grpc.aio.Channel], *, name: str, fetch_timeout_s: float):
        self.queue, self.engine, self.compute = queue, engine, compute
        self.channel_for = channel_for
        self.name = name
        self.fetch_timeout_s = fetch_timeout_s
        self.outputs: dict[str, asyncio.Queue] = {}
        self._imports: dict[str, asyncio.Task] = {}
        self._awaiting_slot = 0  # imports taken from the queue that have not reserved a slot yet
        self._cancelled: set[str] = set()
        self._slot_freed = asyncio.Event()
        self._work = asyncio.Event()
        self._stopping = False

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
        try:
            while True:
                while self.engine.free_slots - self._awaiting_slot <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                item = await self.queue.get()
                if item is None:
                    break
                self._awaiting_slot += 1
                self._imports[item.task_id] = asyncio.create_task(self._import(item))
            if self._imports:
                await asyncio.gather(*self._imports.values(), return_exceptions=True)
        finally:
            self._stopping = True
            self._work.set()
            await stepper

    async def _import(self, item: WorkItem) -> None:
        rid = item.task_id
        reserved = False
        awaiting = True
        try:
            if await self.queue.is_cancelled(rid):
                await self.queue.ack(rid)
                return
            try:
                req = stages_pb2.DecodeRequest.FromString(item.payload)
            except Exception as exc:
                raise ImportFailed("INVALID_ARGUMENT", f"undecodable decode task: {exc}") from None
            if not req.prefill_address:
                raise ImportFailed("INVALID_ARGUMENT", "prefill_address: required")
            if req.sampling.max_new_tokens < 1:
                raise ImportFailed("INVALID_ARGUMENT", "sampling.max_new_tokens: must be >= 1")
            await self.queue.set_state(rid, TaskState.TRANSFERRING, worker=self.name)
            fetch = fetch_kv_method(self.channel_for(req.prefill_address))
            receiver: KvReceiver | None = None
            layout = self.engine.lm.layout
            try:
                async for msg in fetch(stages_pb2.FetchKvRequest(request_id=rid), timeout=self.fetch_timeout_s):
                    if receiver is None:
                        if msg.kind != "header":
                            raise ValueError("the KV stream did not start with its header")
                        await self.compute.run(self.engine.reserve, rid, msg.header.prompt_tokens)
                        reserved, awaiting = True, False
                        self._awaiting_slot -= 1
                        receiver = KvReceiver(functools.partial(self.engine.kv_destination, rid),
                                              num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads,
                                              head_dim=layout.head_dim, dtype=self.engine.lm.dtype,
                                              max_tokens=self.engine.max_len)
                    receiver.feed(msg)
                if receiver is None:
                    raise ValueError("the KV stream was empty")
                first_token, rope_delta = receiver.finish().first_token, receiver.header.rope_delta
            except grpc.aio.AioRpcError as exc:
                raise ImportFailed(exc.code().name, f"fetching KV from {req.prefill_address}: {exc.details()}") from None
            except (NoFreeSlot, PromptTooLong, ValueError) as exc:
                code = ("RESOURCE_EXHAUSTED" if isinstance(exc, NoFreeSlot)
                        else "INVALID_ARGUMENT" if isinstance(exc, PromptTooLong) else "INTERNAL")
                raise ImportFailed(code, str(exc)) from None
            s = req.sampling
            spec = DecodeSpec(rid, first_token, rope_delta,
                              Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, seed=s.seed),
                              s.max_new_tokens, frozenset(req.stop_token_ids))
            done = await self.compute.run(self.engine.activate, spec)
            reserved = False
            if done is not None:
                self._emit(rid, done)
                await self.queue.set_state(rid, TaskState.DONE)
            else:
                await self.queue.set_state(rid, TaskState.RUNNING)
                self._work.set()
            await self.queue.ack(rid)
        except ImportFailed as exc:
            self._emit(rid, exc.failure)
            await self.queue.set_state(rid, TaskState.FAILED, code=exc.failure.code, message=exc.failure.message)
            await self.queue.ack(rid)
        except asyncio.CancelledError:
            await self.queue.ack(rid)
        finally:
            if awaiting:
                self._awaiting_slot -= 1
            if reserved:
                await self.compute.run(self.engine.release, rid)
            self._imports.pop(rid, None)
            self._slot_freed.set()

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
                events = await self.compute.run(self.engine.step)
            except Exception as exc:
                log.exception("decode step failed")
                for rid in list(self.outputs):
                    if await self.compute.run(self.engine.release, rid):
                        self._emit(rid, Failure("INTERNAL", f"decode step failed: {exc}"))
                        await self.queue.set_state(rid, TaskState.FAILED, code="INTERNAL", message=str(exc))
                self._slot_freed.set()
                continue
            for event in events:
                self._emit(event.request_id, event)
                if event.finish is not None:
                    self._slot_freed.set()
                    await self.queue.set_state(event.request_id, TaskState.DONE)
