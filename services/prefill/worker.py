"""Prefill worker: takes prefill tasks from the stage queue, pulls the request's embeddings
from the encoder named in the task, runs the prompt pass in the compute thread and holds the KV
(streamed to decode while it is computed) and the first token."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc
import torch

from prism.engine.prefill import PrefillEngine
from prism.engine.sampling import Sampling
from prism.models.base import MediaItem
from prism.queue.base import TaskState, WorkItem, WorkQueue
from prism.runtime.convert import item_from_info
from prism.runtime.stagework import ComputeThread, HeldOutputs
from prism.v1 import stages_pb2
from prism.wire import EmbeddingsReceiver, fetch_embeddings_method
from services.prefill.outbox import KvMeta, KvOutbox

log = logging.getLogger(__name__)


class StageFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def sampling_from_proto(s) -> Sampling:
    return Sampling(temperature=s.temperature, top_p=s.top_p or 1.0, top_k=s.top_k, seed=s.seed)


class PrefillWorker:
    def __init__(self, queue: WorkQueue, engine: PrefillEngine, compute: ComputeThread,
                 channel_for: Callable[[str], grpc.aio.Channel], *, held_ttl_s: float, name: str,
                 fetch_timeout_s: float):
        self.queue, self.engine, self.compute = queue, engine, compute
        self.channel_for = channel_for
        self.held: HeldOutputs[KvOutbox] = HeldOutputs(held_ttl_s)
        self.name = name
        self.fetch_timeout_s = fetch_timeout_s

    async def run(self) -> None:
        """Serve the queue until it is closed."""
        while (item := await self.queue.get()) is not None:
            await self._process(item)
            for rid in self.held.expire():
                log.warning("KV of %s expired unfetched", rid)

    async def _fetch_embeddings(self, req: stages_pb2.PrefillRequest, items: list[MediaItem]) -> dict[str, list[torch.Tensor]]:
        if not items:
            return {}
        if not req.encoder_address:
            raise StageFailure("INVALID_ARGUMENT", "encoder_address: required for a request with media")
        receiver = EmbeddingsReceiver(expected_rows=[i.num_tokens for i in items],
                                      hidden=int(self.engine.lm.adapter.text_config.hidden_size))
        fetch = fetch_embeddings_method(self.channel_for(req.encoder_address))
        try:
            async for msg in fetch(stages_pb2.FetchEmbeddingsRequest(request_id=req.header.request_id),
                                   timeout=self.fetch_timeout_s):
                receiver.feed(msg)
            embeddings = receiver.finish()
        except ValueError as exc:
            raise StageFailure("INTERNAL", f"bad embeddings from {req.encoder_address}: {exc}") from None
        except grpc.aio.AioRpcError as exc:
            raise StageFailure(exc.code().name, f"fetching embeddings from {req.encoder_address}: {exc.details()}") from None
        media: dict[str, list[torch.Tensor]] = {}
        for item, emb in zip(items, embeddings):
            media.setdefault(item.modality, []).append(emb)
        return media

    async def _process(self, item: WorkItem) -> None:
        rid = item.task_id
        outbox: KvOutbox | None = None
        try:
            if await self.queue.is_cancelled(rid):
                await self.queue.ack(rid)
                return
            try:
                req = stages_pb2.PrefillRequest.FromString(item.payload)
                if not req.input_ids:
                    raise ValueError("input_ids: empty prompt")
                items = [item_from_info(m, f"media[{i}]") for i, m in enumerate(req.media)]
            except ValueError as exc:
                raise StageFailure("INVALID_ARGUMENT", str(exc)) from None
            await self.queue.set_state(rid, TaskState.TRANSFERRING, worker=self.name)
            started = time.perf_counter()
            media = await self._fetch_embeddings(req, items)
            transfer_ms = (time.perf_counter() - started) * 1000
            plan = await self.compute.run(self.engine.plan, list(req.input_ids), items)
            layout = self.engine.lm.layout
            if req.sampling.max_new_tokens != 1:  # decode will pull the KV
                meta = KvMeta(layout.num_layers, layout.num_kv_heads, layout.head_dim, plan.prompt_tokens,
                              plan.rope_delta, self.engine.lm.dtype)
                outbox = KvOutbox(meta, asyncio.get_running_loop())
                self.held.publish(rid, outbox)
            await self.queue.set_state(rid, TaskState.RUNNING, worker=self.name, rope_delta=plan.rope_delta,
                                       prompt_tokens=plan.prompt_tokens)
            started = time.perf_counter()
            sink = outbox.sink if outbox is not None else (lambda *_: None)
            try:
                first = await self.compute.run(self.engine.run, plan, media, sampling_from_proto(req.sampling), sink)
            except Exception as exc:
                log.exception("prefill of %s failed", rid)
                raise StageFailure("INTERNAL", f"prefill failed: {exc}") from None
            compute_ms = (time.perf_counter() - started) * 1000
            if outbox is not None:
                outbox.finish(first)
            await self.queue.set_state(rid, TaskState.READY, first_token=first, prompt_tokens=plan.prompt_tokens,
                                       rope_delta=plan.rope_delta, compute_ms=compute_ms, transfer_ms=transfer_ms)
            await self.queue.ack(rid)
        except StageFailure as exc:
            if outbox is not None:
                outbox.fail(exc.code, exc.message)
            await self.queue.set_state(rid, TaskState.FAILED, code=exc.code, message=exc.message)
            await self.queue.ack(rid)

    async def fetched(self, request_id: str) -> None:
        """The downstream worker has pulled this request's output: release it."""
        await self.held.release(request_id, self.queue)
