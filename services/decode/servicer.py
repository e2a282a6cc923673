"""DecodeService: a thin gRPC adapter over the decode worker and its queue."""
from __future__ import annotations

import asyncio

import grpc

from prism.queue.base import DuplicateTask, QueueClosed, QueueFull, WorkQueue
from prism.runtime.stagework import work_item
from prism.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from services.decode.worker import FINISH_TO_PROTO, DecodeWorker, Failure


class DecodeServicer(stages_pb2_grpc.DecodeServiceServicer):
    def __init__(self, queue: WorkQueue, worker: DecodeWorker):
        self.queue, self.worker = queue, worker

    async def Decode(self, request: stages_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        rid = request.header.request_id
        if not rid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header.request_id: required")
        chan = self.worker.open(rid)
        try:
            await self.queue.put(work_item(request.header, request.SerializeToString()))
        except QueueFull as exc:
            self.worker.outputs.pop(rid, None)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"decode queue is full: {exc}")
        except DuplicateTask:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"header.request_id: task {rid} is already queued here")
        except QueueClosed:
            self.worker.outputs.pop(rid, None)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is draining; retry on another")
        finished = False
        try:
            while True:
                events = [await chan.get()]
                while not chan.empty():
                    events.append(chan.get_nowait())
                tokens = [e.token for e in events if not isinstance(e, Failure) and e.token is not None]
                failure = next((e for e in events if isinstance(e, Failure)), None)
                finish = next((e.finish for e in events if not isinstance(e, Failure) and e.finish), None)
                if failure is not None:
                    finished = True
                    await context.abort(getattr(grpc.StatusCode, failure.code, grpc.StatusCode.INTERNAL), failure.message)
                yield stages_pb2.DecodeResponse(
                    state=common_pb2.TASK_STATE_DONE if finish else common_pb2.TASK_STATE_RUNNING,
                    token_ids=tokens, finish_reason=FINISH_TO_PROTO[finish] if finish else 0, worker=self.worker.name,
                )
                if finish is not None:
                    finished = True
                    return
        finally:
            if not finished:
                await asyncio.shield(self.worker.cancel(rid))
