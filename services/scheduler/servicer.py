"""PrismService, the public front door: a thin gRPC adapter over intake, the request store and
the pipeline.

Accepted requests are persisted (the request with its resolved seed, then every chunk sent), so
`Generate` is idempotent by `request_id`: a caller that lost its stream (a scheduler restart)
sends the same request again and gets the whole stream, stored chunks first, then the rest as
it is made. A restarted scheduler takes over the accepted requests whose owner's lease lapsed
and drives them to the end.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry import trace

from prism.queue.requests import RequestRecord, RequestStore
from prism.runtime import metrics
from prism.v1 import prism_pb2, prism_pb2_grpc, stages_pb2
from services.scheduler.core.variants import VariantError, VariantMix
from services.scheduler.intake import Admitted, Limits, RequestError, ServedModel, admit
from services.scheduler.pipeline import Pipeline, Progress, StageError, abort
from services.scheduler.selector import (
    MODALITY,
    Selector,
    reduction_json,
    reductions_proto,
    with_stored_reduction,
)

log = logging.getLogger(__name__)


class PrismServicer(prism_pb2_grpc.PrismServiceServicer):
    def __init__(self, models: dict[str, ServedModel], default_model: str, limits: Limits, pipeline: Pipeline,
                 store: RequestStore, *, owner: str, lease_s: float, profile: Any = None,
                 selection_flow: Any = None, variants: dict[str, ServedModel] | None = None,
                 mix: VariantMix | None = None, load_price: Any = None, slowdown: Any = None):
        self.models, self.default_model, self.limits = models, default_model, limits
        #: Variants of the default model served side by side (each its own pipeline of workers)
        #: and the mix that picks one for a request pinning none; None: no variants.
        self.variants, self.mix = variants, mix
        self.pipeline = pipeline
        self.store = store
        self.owner, self.lease_s = owner, lease_s
        # Processing (media decoding, image processors, tokenizer) runs off the event loop.
        self._intake = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="intake")
        self.selector = Selector(profile, pipeline, self._intake, flow=selection_flow, load_price=load_price,
                                 slowdown=slowdown)
        self._drivers: dict[str, asyncio.Task] = {}
        self._active: set[str] = set()  # requests this scheduler is driving now

    # ---- intake ------------------------------------------------------------------------
    async def _process(self, request: prism_pb2.GenerateRequest, grpc_deadline: float | None) -> Admitted:
        loop = asyncio.get_running_loop()
        if self.mix is None:
            if request.variant:
                raise RequestError("INVALID_ARGUMENT", "variant",
                                   f"unknown variant {request.variant!r}; this deployment names no variants")
            return await loop.run_in_executor(self._intake, admit, request, self.models, self.default_model,
                                              self.limits, grpc_deadline)
        if request.model and request.model not in self.models:  # the model first: NOT_FOUND as without variants
            return await loop.run_in_executor(self._intake, admit, request, self.models, self.default_model,
                                              self.limits, grpc_deadline)
        live = {i.variant for i in self.pipeline.cluster.routable if not i.draining}
        try:
            variant = self.mix.resolve(request.variant, request.selection.accuracy_floor, live)
        except VariantError as exc:
            raise RequestError("INVALID_ARGUMENT", exc.field, exc.reason) from None
        models = {self.default_model: self.variants[variant]}
        adm = await loop.run_in_executor(self._intake, admit, request, models, self.default_model,
                                         self.limits, grpc_deadline)
        return _with(adm, variant=variant)

    async def _admit(self, request: prism_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Admitted:
        remaining = context.time_remaining()
        grpc_deadline = time.time() + remaining if remaining is not None else None
        try:
            return await self._process(request, grpc_deadline)
        except RequestError as exc:
            metrics.REQUESTS.labels(self.default_model, exc.code).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    def _abort(self, context: grpc.aio.ServicerContext, exc: StageError):
        metrics.REQUESTS.labels(self.default_model, exc.code.name).inc()
        return abort(context, exc)

    # ---- streams -----------------------------------------------------------------------
    async def _stream(self, request: prism_pb2.GenerateRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[prism_pb2.GenerateResponse]:
        if request.request_id:
            existing = await self.store.get(request.request_id)
            if existing is not None:
                async for message in self._replay(existing, context):
                    yield message
                return
        adm = await self._admit(request, context)
        try:
            if self.selector.enabled:  # its inputs or queued requests' may be reduced to fit it
                adm = await self.selector.admit(adm, await self.selector.prepare(adm))
            else:
                self.pipeline.admit(adm)
        except StageError as exc:
            await self._abort(context, exc)
        trace.get_current_span().set_attributes({  # the request's span (the gRPC server span)
            "prism.request_id": adm.request_id, "prism.image_count": sum(1 for m, _ in adm.media if m == "image"),
            "prism.audio_count": sum(1 for m, _ in adm.media if m == "audio"),
            "prism.prompt_tokens": len(adm.prompt.input_ids), "prism.max_new_tokens": adm.max_new_tokens,
            "prism.deadline_s": (adm.deadline - adm.arrival) if adm.deadline else 0.0})
        stored = stages_pb2.StoredRequest(reduction=reduction_json(adm), expected_accuracy=adm.expected_accuracy or 0.0)
        stored.request.CopyFrom(request)
        stored.request.request_id = adm.request_id
        stored.request.sampling.seed = adm.sampling.seed  # a takeover must sample the same tokens
        stored.request.variant = adm.variant  # ... on the same variant
        record = RequestRecord(request_id=adm.request_id, payload=stored.SerializeToString(),
                               accepted_at=adm.arrival, deadline=adm.deadline, owner=self.owner, status="running")
        self._active.add(adm.request_id)  # before the record exists: never taken over by ourselves
        if not await self.store.accept(record, lease_s=self.lease_s):
            self._active.discard(adm.request_id)
            self.selector.finished(adm.request_id)
            async for message in self._replay(await self.store.get(adm.request_id), context):
                yield message
            return
        try:
            async for message in self._drive(adm, self.selector.accepted(adm, None)):
                yield message
        except StageError as exc:
            await self._abort(context, exc)
        finally:
            self._active.discard(adm.request_id)

    async def _drive(self, adm: Admitted, progress: Progress) -> AsyncIterator[prism_pb2.GenerateResponse]:
        """Run the pipeline, storing every chunk before it is sent; finish the record."""
        rid = adm.request_id
        self._active.add(rid)
        try:
            async for message in self.pipeline.run(progress.adm or adm, progress):
                index = len(progress.tokens) - len(message.token_ids)
                if message.token_ids or message.text:
                    await self.store.append_tokens(rid, index, list(message.token_ids), message.text)
                if message.finish_reason:  # what was served: the inputs may have been reassigned
                    message.reductions.CopyFrom(reductions_proto(progress.adm, self.selector.full_accuracy()))
                    red = message.reductions
                    trace.get_current_span().set_attributes({
                        "prism.generated_tokens": len(progress.tokens), "prism.strategy": red.strategy,
                        "prism.dropped_images": list(red.dropped_images), "prism.image_scale": red.image_scale,
                        "prism.expected_accuracy": red.expected_accuracy, "prism.placement": progress.placement,
                        "prism.attempts": progress.attempt, "prism.ttft_ms": message.timing.ttft_ms})
                    await self.store.finish(rid, "done", finish=int(message.finish_reason))
                    self.selector.completed(rid)
                    metrics.REQUESTS.labels(self.default_model, "OK").inc()
                yield message
        except StageError as exc:
            await self.store.finish(rid, "failed", code=exc.code.name, message=exc.message)
            raise
        except asyncio.CancelledError:
            # The caller went away: the request ends with it (nobody can receive the rest).
            await asyncio.shield(self.store.finish(rid, "failed", code="CANCELLED", message="caller went away"))
            raise
        finally:
            self._active.discard(rid)
            self.selector.finished(rid)

    async def _replay(self, record: RequestRecord | None,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[prism_pb2.GenerateResponse]:
        """The stored stream of an accepted request, then its live rest."""
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "request_id: the request expired")
        rid = record.request_id
        count = 0
        async for chunk in self.store.watch_chunks(rid):
            count += len(chunk.tokens)
            yield prism_pb2.GenerateResponse(request_id=rid, token_ids=chunk.tokens, text=chunk.text)
        final = await self.store.get(rid)
        if final is None or final.status == "failed":
            code = getattr(grpc.StatusCode, final.code, grpc.StatusCode.UNKNOWN) if final else grpc.StatusCode.NOT_FOUND
            await context.abort(code, final.message if final else "request_id: the request expired")
        if final.status != "done":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "request_id: the request is still running elsewhere; retry")
        yield prism_pb2.GenerateResponse(request_id=rid, finish_reason=final.finish,
                                         usage=prism_pb2.Usage(generated_tokens=count))

    async def _guarded(self, request: prism_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[prism_pb2.GenerateResponse]:
        """`_stream`, with the request store's backend being unreachable reported as UNAVAILABLE
        (the SDK resumes a stream broken that way once the backend is back)."""
        try:
            async for message in self._stream(request, context):
                yield message
        except self.pipeline.cluster.backend.errors as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"request store unavailable: {exc}")

    async def Generate(self, request: prism_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async for message in self._guarded(request, context):
            yield message

    async def GenerateUnary(self, request: prism_pb2.GenerateUnaryRequest, context: grpc.aio.ServicerContext):
        out = prism_pb2.GenerateUnaryResponse()
        texts = []
        async for message in self._guarded(request.request, context):
            out.request_id = message.request_id
            out.token_ids.extend(message.token_ids)
            texts.append(message.text)
            if message.finish_reason:
                out.finish_reason = message.finish_reason
                out.timing.CopyFrom(message.timing)
                out.usage.CopyFrom(message.usage)
                out.placement.CopyFrom(message.placement)
                out.reductions.CopyFrom(message.reductions)
                out.variant = message.variant
        out.text = "".join(texts)
        return out

    async def ListModels(self, request: prism_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        return prism_pb2.ListModelsResponse(
            default_model=self.default_model,
            models=[
                prism_pb2.ModelInfo(
                    name=m.name, family=m.adapter.family, max_context_tokens=m.max_context,
                    modalities=[MODALITY[x] for x in sorted(m.adapter.modalities)],
                    max_new_tokens_limit=self.limits.max_new_tokens,
                    max_images_per_request=self.limits.max_images if "image" in m.adapter.modalities else 0,
                    max_audios_per_request=self.limits.max_audios if "audio" in m.adapter.modalities else 0,
                )
                for m in self.models.values()
            ],
        )

    # ---- takeover ----------------------------------------------------------------------
    async def take_over(self) -> int:
        """Drive to the end every open request whose owner's lease lapsed (a scheduler that
        died): their callers re-attach with the same request_id. Returns how many."""
        taken = 0
        for record in await self.store.unfinished():
            rid = record.request_id
            if rid in self._active or rid in self._drivers or not await self.store.claim(rid, self.owner, self.lease_s):
                continue
            taken += 1
            self._drivers[rid] = asyncio.create_task(self._resume(record))
        return taken

    async def _resume(self, record: RequestRecord) -> None:
        rid = record.request_id
        try:
            stored = stages_pb2.StoredRequest.FromString(record.payload)
            try:
                adm = await self._process(stored.request, None)
                if stored.reduction:  # the same reduced inputs as when it was accepted
                    adm = await asyncio.get_running_loop().run_in_executor(
                        self._intake, with_stored_reduction, adm, stored.reduction, stored.expected_accuracy)
            except RequestError as exc:
                await self.store.finish(rid, "failed", code=exc.code, message=str(exc))
                return
            if record.deadline is not None:
                adm = _with(adm, arrival=record.accepted_at, deadline=record.deadline)
            else:
                adm = _with(adm, arrival=record.accepted_at)
            fresh = await self.store.get(rid)
            generation = max(1, fresh.attempt if fresh is not None else record.attempt + 1)
            progress = Progress(tokens=await self.store.tokens(rid), attempt=10 * generation)
            await self.pipeline.cancel_attempts(rid, progress.attempt)
            await self.store.set_status(rid, "running")
            async for _ in self._drive(adm, self.selector.accepted(adm, None, progress)):
                pass
        except StageError as exc:
            log.warning("taken-over request %s failed: %s", rid, exc.message)
        except Exception:
            log.exception("taken-over request %s failed", rid)
            await self.store.finish(rid, "failed", code="INTERNAL", message="scheduler takeover failed")
        finally:
            self._drivers.pop(rid, None)

    async def keep_leases(self, every_s: float) -> None:
        """Renew this scheduler's request leases, and take over orphans, until cancelled."""
        while True:
            try:
                await self.store.renew(self.owner, self.lease_s)
                await self.take_over()
            except Exception as exc:  # Redis restarting: the next round retries; the loop must live
                log.warning("request leases: %s", exc)
            await asyncio.sleep(every_s)

    async def stop(self) -> None:
        for task in list(self._drivers.values()):
            task.cancel()
        self._intake.shutdown(wait=False, cancel_futures=True)


def _with(adm: Admitted, **changes) -> Admitted:
    import dataclasses

    return dataclasses.replace(adm, **changes)
