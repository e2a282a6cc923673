"""PrefillService: a thin gRPC adapter over the prefill worker and its queue."""
from __future__ import annotations

import grpc

from prism.queue.base import TaskEvent, WorkQueue
from prism.runtime.stagework import submit_task
from prism.v1 import stages_pb2, stages_pb2_grpc
from prism.wire import dtype_to_proto, iter_kv_layer
from services.prefill.outbox import KvFailed
from services.prefill.worker import PrefillWorker


class PrefillServicer(stages_pb2_grpc.PrefillServiceServicer):
    def __init__(self, queue: WorkQueue, worker: PrefillWorker, *, chunk_bytes: int, fetch_wait_s: float):
        self.queue, self.worker = queue, worker
        self.chunk_bytes, self.fetch_wait_s = chunk_bytes, fetch_wait_s

    def _respond(self, event: TaskEvent) -> stages_pb2.PrefillResponse:
        d = event.detail
        return stages_pb2.PrefillResponse(
            state=int(event.state), first_token=d.get("first_token", 0), prompt_tokens=d.get("prompt_tokens", 0),
            rope_delta=d.get("rope_delta", 0), compute_ms=d.get("compute_ms", 0.0),
            transfer_ms=d.get("transfer_ms", 0.0), worker=self.worker.name, batch_tokens=d.get("batch_tokens", 0),
            compute_cpu_ms=d.get("compute_cpu_ms", 0.0),
        )

    async def Prefill(self, request: stages_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        async for response in submit_task(self.queue, request, context, self._respond):
            yield response

    async def FetchKv(self, request: stages_pb2.FetchKvRequest, context: grpc.aio.ServicerContext):
        outbox = await self.worker.held.wait(request.request_id, self.fetch_wait_s)
        if outbox is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no KV held for {request.request_id!r}")
        m = outbox.meta
        yield stages_pb2.FetchKvResponse(header=stages_pb2.KvHeader(
            num_layers=m.num_layers, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
            prompt_tokens=m.prompt_tokens, dtype=dtype_to_proto(m.dtype), rope_delta=m.rope_delta))
        try:
            async for event in outbox.follow():
                if event[0] == "layer":
                    _, layer, keys, values = event
                    for encoded in iter_kv_layer(layer, keys, values, max_chunk_bytes=self.chunk_bytes):
                        yield encoded  # pre-encoded FetchKvResponse (one copy from the tensor)
                else:
                    yield stages_pb2.FetchKvResponse(trailer=stages_pb2.KvTrailer(first_token=event[1]))
        except KvFailed as exc:
            await context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), exc.message)
        finally:
            await self.worker.fetched(request.request_id)
