"""Prefill worker: takes prefill tasks from the stage queue, pulls the request's embeddings
from the encoder named in the task, runs the prompt pass in the compute thread and holds the KV
(streamed to decode while it is computed) and the first token."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import torch
from google.protobuf.message import DecodeError

from prism.engine.batching import MAX_PADDING, take_batch
from prism.engine.prefill import PrefillEngine, PromptPlan
from prism.engine.sampling import Sampling
from prism.models.base import MediaItem
from prism.queue.base import TaskState, WorkItem, WorkQueue
from prism.runtime.convert import item_from_info
from prism.runtime.host import LocalPeers
from prism.runtime.compute import BatchBudget
from prism.runtime.stagework import ComputeThread, HeldOutputs
from prism.runtime.metrics import KV_BYTES, observe_batch
from prism.runtime.telemetry import record_task
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


@dataclass
class _Job:
    """One prefill task of a batch, from its queue item to its held KV."""

    item: WorkItem
    req: stages_pb2.PrefillRequest
    items: list[MediaItem]
    media: dict[str, list[torch.Tensor]] | None = None
    plan: PromptPlan | None = None
    outbox: KvOutbox | None = None
    transfer_ms: float = 0.0
    began: float = 0.0  # Unix seconds when the worker began it (its embeddings' transfer)

    @property
    def rid(self) -> str:
        return self.item.task_id


class PrefillWorker:
    def __init__(self, queue: WorkQueue, engine: PrefillEngine, compute: ComputeThread,
                 channel_for: Callable[[str], grpc.aio.Channel], *, held_ttl_s: float, name: str,
                 fetch_timeout_s: float, peers: LocalPeers | None = None, max_batch_tokens: int = 2048,
                 max_padding: float | None = MAX_PADDING):
        self.queue, self.engine, self.compute = queue, engine, compute
        self.channel_for = channel_for
        self.held: HeldOutputs[KvOutbox] = HeldOutputs(held_ttl_s)
        self.name = name
        self.fetch_timeout_s = fetch_timeout_s
        self.peers = peers or LocalPeers()
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding  # padding a batch may carry, a fraction of its real tokens
        self._carry: _Job | None = None
        #: Batch bound from the tasks' remaining budgets (dynamic SLOs), learnt from our batches.
        self.budget = BatchBudget()
        #: Sizes of the batches run, most recent last (for tests and the admin view).
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=256)

    async def run(self) -> None:
        """Serve the queue until it is closed: batches of tasks up to the padded token budget, with
        padding within `max_padding` of their real tokens."""
        while (batch := await self._next_batch()) is not None:
            await self._process(batch)
            for rid in self.held.expire():
                log.warning("KV of %s expired unfetched", rid)

    async def _parse(self, item: WorkItem) -> _Job | None:
        try:
            req = stages_pb2.PrefillRequest.FromString(item.payload)
        except DecodeError as exc:
            await self.queue.dead_letter(item.task_id, f"payload: undecodable PrefillRequest: {exc}")
            return None
        try:
            if not req.input_ids:
                raise ValueError("input_ids: empty prompt")
            items = [item_from_info(m, f"media[{i}]") for i, m in enumerate(req.media)]
        except ValueError as exc:
            await self._fail(item.task_id, None, StageFailure("INVALID_ARGUMENT", str(exc)))
            return None
        return _Job(item, req, items)

    async def _next_batch(self) -> list[_Job] | None:
        batch: list[_Job] = []
        if self._carry is not None:
            batch.append(self._carry)
            self._carry = None
        while True:
            item = await self.queue.get(timeout=0 if batch else None)
            if item is None:
                return batch or None
            if await self.queue.is_cancelled(item.task_id):
                await self.queue.ack(item.task_id)
                continue
            job = await self._parse(item)
            if job is None:
                continue
            pending = [(k, len(j.req.input_ids)) for k, j in enumerate([*batch, job])]
            fits = len(take_batch(pending, self.max_batch_tokens, len(pending), max_padding=self.max_padding))
            if fits < len(pending) or (batch and self._over_budget([*batch, job])):
                self._carry = job
                return batch
            batch.append(job)

    def _over_budget(self, jobs: list[_Job]) -> bool:
        """Taking `jobs` in one batch exceeds the compute share's `max_batch`, or the batch the
        tightest remaining budget among them allows (deadline minus now: the queue hands tasks
        over most urgent first, so the ones taken are the ones that bound it)."""
        now_ms = time.time() * 1000
        budgets = [j.item.deadline_unix_ms - now_ms if j.item.deadline_unix_ms else float("inf") for j in jobs]
        limit = self.budget.limit(self.compute.share.cores, budgets, self.compute.max_batch)
        return bool(limit) and len(jobs) > limit

    async def _fetch_embeddings(self, job: _Job) -> dict[str, list[torch.Tensor]]:
        req, items = job.req, job.items
        if not items:
            return {}
        sources = list(req.embedding_sources) or (
            [stages_pb2.EmbeddingSource(address=req.encoder_address, task_id=req.header.request_id,
                                        items=list(range(len(items))))] if req.encoder_address else [])
        if not sources:
            raise StageFailure("INVALID_ARGUMENT", "encoder_address: required for a request with media")
        placed: list[torch.Tensor | None] = [None] * len(items)
        for k, src in enumerate(sources):
            if not src.items or any(not 0 <= i < len(items) or placed[i] is not None for i in src.items):
                raise StageFailure("INVALID_ARGUMENT", f"embedding_sources[{k}].items: must name each media item once")
            got = await self._fetch_source(src, [items[i].num_tokens for i in src.items])
            for i, emb in zip(src.items, got):
                placed[i] = emb
        if any(p is None for p in placed):
            raise StageFailure("INVALID_ARGUMENT", "embedding_sources: some media items have no source")
        media: dict[str, list[torch.Tensor]] = {}
        for item, emb in zip(items, placed):
            media.setdefault(item.modality, []).append(emb)
        return media

    async def _fetch_source(self, src: stages_pb2.EmbeddingSource, rows: list[int]) -> list[torch.Tensor]:
        hidden = int(self.engine.lm.adapter.text_config.hidden_size)
        local = self.peers.local("encode", src.address)
        if local is not None:  # co-hosted encoder: take its tensors, no serialization
            held = await local.held.wait(src.task_id, self.fetch_timeout_s)
            if held is None:
                raise StageFailure("UNAVAILABLE", f"embeddings of {src.task_id} are not held by this worker")
            await local.fetched(src.task_id)
            if [int(e.shape[0]) for e in held] != rows or any(int(e.shape[1]) != hidden for e in held):
                raise StageFailure("INTERNAL", f"embeddings of {src.task_id} do not match the prompt's media")
            return list(held)
        receiver = EmbeddingsReceiver(expected_rows=rows, hidden=hidden)
        fetch = fetch_embeddings_method(self.channel_for(src.address))
        try:
            async for msg in fetch(stages_pb2.FetchEmbeddingsRequest(request_id=src.task_id), timeout=self.fetch_timeout_s):
                receiver.feed(msg)
            return receiver.finish()
        except ValueError as exc:
            raise StageFailure("INTERNAL", f"bad embeddings from {src.address}: {exc}") from None
        except grpc.aio.AioRpcError as exc:
            code = "UNAVAILABLE" if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE) else exc.code().name
            raise StageFailure(code, f"fetching embeddings from {src.address}: {exc.details()}") from None

    async def _prepare(self, job: _Job) -> None:
        """Pull the job's embeddings, plan its positions and open its KV outbox; RUNNING."""
        await self.queue.set_state(job.rid, TaskState.TRANSFERRING, worker=self.name)
        job.began = time.time()
        started = time.perf_counter()
        job.media = await self._fetch_embeddings(job)
        job.transfer_ms = (time.perf_counter() - started) * 1000
        job.plan = await self.compute.run(self.engine.plan, list(job.req.input_ids), job.items)
        layout = self.engine.lm.layout
        if job.req.sampling.max_new_tokens != 1:  # decode will pull the KV
            meta = KvMeta(layout.num_layers, layout.num_kv_heads, layout.head_dim, job.plan.prompt_tokens,
                          job.plan.rope_delta, self.engine.lm.dtype)
            job.outbox = KvOutbox(meta, asyncio.get_running_loop())
            self.held.publish(job.rid, job.outbox)
        await self.queue.set_state(job.rid, TaskState.RUNNING, worker=self.name, rope_delta=job.plan.rope_delta,
                                   prompt_tokens=job.plan.prompt_tokens)

    async def _process(self, batch: list[_Job]) -> None:
        ready: list[_Job] = []
        for job, outcome in zip(batch, await asyncio.gather(*(self._prepare(j) for j in batch), return_exceptions=True)):
            if isinstance(outcome, StageFailure):
                await self._fail(job.rid, job.outbox, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                ready.append(job)
        if not ready:
            return
        self.batch_sizes.append(len(ready))
        observe_batch("prefill", self.name, len(ready))
        wall = time.time()
        sinks = [j.outbox.sink if j.outbox is not None else (lambda *_: None) for j in ready]
        try:
            firsts, compute_s, cpu_s = await self.compute.timed(
                self.engine.run_batch, [j.plan for j in ready], [j.media for j in ready],
                [sampling_from_proto(j.req.sampling) for j in ready], sinks)
        except Exception as exc:
            log.exception("prefill of %s failed", [j.rid for j in ready])
            for job in ready:
                await self._fail(job.rid, job.outbox, StageFailure("INTERNAL", f"prefill failed: {exc}"))
            return
        compute_ms, cpu_ms = compute_s * 1000, cpu_s * 1000
        self.budget.record(self.compute.share.cores, len(ready), compute_ms)
        ended = time.time()
        batch_tokens = sum(j.plan.prompt_tokens for j in ready)
        for job in ready:
            record_task("prefill", job.item, job.began or wall, ended, {
                "prism.batch_size": len(ready), "prism.prompt_tokens": job.plan.prompt_tokens,
                "prism.media_items": len(job.items), "prism.embedding_transfer_ms": job.transfer_ms,
                "prism.compute_ms": compute_ms, "prism.compute_cpu_ms": cpu_ms, "prism.batch_tokens": batch_tokens},
                instance=self.name,
                tokens=job.plan.prompt_tokens)
            if job.outbox is not None:
                KV_BYTES.labels("sent", self.name).inc(job.outbox.nbytes)
        for job, first in zip(ready, firsts):
            # READY (with the first token) is recorded before the KV stream ends: decode's pull
            # then ends the task (DONE, terminal), which a later READY could no longer follow.
            await self.queue.set_state(job.rid, TaskState.READY, first_token=first, prompt_tokens=job.plan.prompt_tokens,
                                       worker=self.name,
                                       rope_delta=job.plan.rope_delta, compute_ms=compute_ms,
                                       transfer_ms=job.transfer_ms, batch=len(ready),
                                       batch_tokens=batch_tokens, compute_cpu_ms=cpu_ms)
            if job.outbox is not None:
                job.outbox.finish(first)
            await self.queue.ack(job.rid)

    async def _fail(self, rid: str, outbox: KvOutbox | None, exc: StageFailure) -> None:
        if outbox is not None:
            outbox.fail(exc.code, exc.message)
        await self.queue.set_state(rid, TaskState.FAILED, code=exc.code, message=exc.message)
        await self.queue.ack(rid)

    async def fetched(self, request_id: str) -> None:
        """The downstream worker has pulled this request's output: release it."""
        await self.held.release(request_id, self.queue)
