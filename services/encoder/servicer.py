"""EncoderService: a thin gRPC adapter over the encoder worker and its queue."""
from __future__ import annotations

import grpc

from prism.queue.base import TaskEvent, WorkQueue
from prism.runtime.stagework import submit_task
from prism.v1 import stages_pb2, stages_pb2_grpc
from prism.wire import iter_embeddings
from services.encoder.worker import EncoderWorker


class EncoderServicer(stages_pb2_grpc.EncoderServiceServicer):
    def __init__(self, queue: WorkQueue, worker: EncoderWorker, *, chunk_bytes: int, fetch_wait_s: float):
        self.queue, self.worker = queue, worker
        self.chunk_bytes, self.fetch_wait_s = chunk_bytes, fetch_wait_s

    def _respond(self, event: TaskEvent) -> stages_pb2.EncodeResponse:
        return stages_pb2.EncodeResponse(
            state=int(event.state), item_tokens=event.detail.get("item_tokens", []),
            compute_ms=event.detail.get("compute_ms", 0.0), worker=self.worker.name,
            batch_tokens=event.detail.get("batch_tokens", 0), compute_cpu_ms=event.detail.get("compute_cpu_ms", 0.0),
        )

    async def Encode(self, request: stages_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        async for response in submit_task(self.queue, request, context, self._respond):
            yield response

    async def FetchEmbeddings(self, request: stages_pb2.FetchEmbeddingsRequest, context: grpc.aio.ServicerContext):
        embeddings = await self.worker.held.wait(request.request_id, self.fetch_wait_s)
        if embeddings is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no embeddings held for {request.request_id!r}")
        for index, emb in enumerate(embeddings):
            for encoded in iter_embeddings(index, emb, max_chunk_bytes=self.chunk_bytes):
                yield encoded  # pre-encoded FetchEmbeddingsResponse (one copy from the tensor)
        await self.worker.fetched(request.request_id)
