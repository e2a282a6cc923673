"""PrismService, the public front door: a thin gRPC adapter over intake and the pipeline."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc

from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc
from services.scheduler.intake import Admitted, Limits, RequestError, ServedModel, admit
from services.scheduler.pipeline import Pipeline, StageError

MODALITY = {"image": common_pb2.MODALITY_IMAGE, "audio": common_pb2.MODALITY_AUDIO}


class PrismServicer(prism_pb2_grpc.PrismServiceServicer):
    def __init__(self, models: dict[str, ServedModel], default_model: str, limits: Limits, pipeline: Pipeline):
        self.models, self.default_model, self.limits = models, default_model, limits
        self.pipeline = pipeline
        # Processing (media decoding, image processors, tokenizer) runs off the event loop.
        self._intake = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="intake")

    async def _admit(self, request: prism_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> Admitted:
        remaining = context.time_remaining()
        grpc_deadline = time.time() + remaining if remaining is not None else None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._intake, admit, request, self.models, self.default_model, self.limits, grpc_deadline
            )
        except RequestError as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))

    async def Generate(self, request: prism_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        admitted = await self._admit(request, context)
        try:
            async for message in self.pipeline.run(admitted):
                yield message
        except StageError as exc:
            await context.abort(exc.code, exc.message)

    async def GenerateUnary(self, request: prism_pb2.GenerateUnaryRequest, context: grpc.aio.ServicerContext):
        admitted = await self._admit(request.request, context)
        out = prism_pb2.GenerateUnaryResponse(request_id=admitted.request_id)
        texts = []
        try:
            async for message in self.pipeline.run(admitted):
                out.token_ids.extend(message.token_ids)
                texts.append(message.text)
                if message.finish_reason:
                    out.finish_reason = message.finish_reason
                    out.timing.CopyFrom(message.timing)
                    out.usage.CopyFrom(message.usage)
        except StageError as exc:
            await context.abort(exc.code, exc.message)
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
