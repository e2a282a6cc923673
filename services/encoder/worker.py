"""Encoder worker: takes encode tasks from the stage queue, batches media items across requests
up to a token budget, runs the tower in the compute thread, and holds the embeddings until the
prefill worker pulls them."""
from __future__ import annotations

import collections
import logging
import time

import torch
from google.protobuf.message import DecodeError

from prism.engine.encoder import EncoderEngine, take_media_batch
from prism.models.base import MediaItem
from prism.queue.base import TaskState, WorkItem, WorkQueue
from prism.runtime.convert import item_from_input
from prism.runtime.stagework import ComputeThread, HeldOutputs
from prism.runtime.metrics import observe_batch
from prism.runtime.telemetry import record_task
from prism.v1 import stages_pb2

log = logging.getLogger(__name__)


class EncoderWorker:
    def __init__(self, queue: WorkQueue, engine: EncoderEngine, compute: ComputeThread, *,
                 max_batch_tokens: int, held_ttl_s: float, name: str):
        self.queue, self.engine, self.compute = queue, engine, compute
        self.max_batch_tokens = max_batch_tokens
        self.held: HeldOutputs[list[torch.Tensor]] = HeldOutputs(held_ttl_s)
        self.name = name
        self._carry: tuple[WorkItem, list[MediaItem]] | None = None
        #: Media items per tower batch, most recent last (for tests and the admin view).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=256)

    async def _parse(self, item: WorkItem) -> list[MediaItem] | None:
        try:
            req = stages_pb2.EncodeRequest.FromString(item.payload)
        except DecodeError as exc:
            await self.queue.dead_letter(item.task_id, f"payload: undecodable EncodeRequest: {exc}")
            return None
        try:
            if not req.items:
                raise ValueError("items: no media to encode")
            return [item_from_input(m, f"items[{i}]") for i, m in enumerate(req.items)]
        except ValueError as exc:
            await self._fail(item.task_id, "INVALID_ARGUMENT", str(exc))
        return None

    async def _fail(self, task_id: str, code: str, message: str) -> None:
        await self.queue.set_state(task_id, TaskState.FAILED, code=code, message=message)
        await self.queue.ack(task_id)

    async def _next_batch(self) -> list[tuple[WorkItem, list[MediaItem]]] | None:
        batch = []
        if self._carry is not None:
            batch.append(self._carry)
            self._carry = None
        while True:
            item = await self.queue.get(timeout=0 if batch else None)
            if item is None:
                return batch or None
            items = await self._parse(item)
            if items is None:
                continue
            pending = [(k, sum(m.num_tokens for m in its)) for k, (_, its) in enumerate([*batch, (item, items)])]
            if len(take_media_batch(pending, self.max_batch_tokens, len(pending))) < len(pending) or (
                    0 < self.compute.max_batch < len(pending)):  # the compute share's bound
                self._carry = (item, items)
                return batch
            batch.append((item, items))

    async def run(self) -> None:
        """Serve the queue until it is closed."""
        while (batch := await self._next_batch()) is not None:
            live = []
            for item, items in batch:
                if await self.queue.is_cancelled(item.task_id):
                    await self.queue.ack(item.task_id)
                else:
                    live.append((item, items))
                    await self.queue.set_state(item.task_id, TaskState.RUNNING, worker=self.name)
            if live:
                await self._encode(live)
            self.held.expire()

    async def _encode(self, batch: list[tuple[WorkItem, list[MediaItem]]]) -> None:
        """One tower pass over the items of every request in the batch."""
        self.batch_sizes.append(len(batch))
        observe_batch("encode", self.name, len(batch))
        wall = time.time()
        try:
            per_request, compute_s, cpu_s = await self.compute.timed(self.engine.encode_batch, [items for _, items in batch])
        except Exception as exc:
            log.exception("encode batch of %d requests failed", len(batch))
            for item, _ in batch:
                await self._fail(item.task_id, "INTERNAL", f"encoder failed: {exc}")
            return
        compute_ms, cpu_ms = compute_s * 1000, cpu_s * 1000
        items_total = sum(len(items) for _, items in batch)
        task_tokens = [sum(m.num_tokens for m in items) for _, items in batch]
        tokens_total = sum(task_tokens)
        ended = time.time()
        for (item, items), mine, tokens in zip(batch, per_request, task_tokens):
            record_task("encode", item, wall, ended, {
                "prism.batch_size": len(batch), "prism.media_items": len(items),
                "prism.image_count": sum(1 for m in items if m.modality == "image"),
                "prism.audio_count": sum(1 for m in items if m.modality == "audio"),
                "prism.media_tokens": tokens, "prism.batch_tokens": tokens_total, "prism.compute_ms": compute_ms,
                "prism.compute_cpu_ms": cpu_ms},
                instance=self.name, tokens=tokens)
            self.held.publish(item.task_id, mine)
            await self.queue.set_state(item.task_id, TaskState.READY, compute_ms=compute_ms, worker=self.name,
                                       item_tokens=[int(e.shape[0]) for e in mine], batch_items=items_total,
                                       batch_tokens=tokens_total, batch=len(batch), compute_cpu_ms=cpu_ms)
            await self.queue.ack(item.task_id)

    async def fetched(self, request_id: str) -> None:
        """The downstream worker has pulled this request's output: release it."""
        await self.held.release(request_id, self.queue)
