"""WorkerAdminService: the RPC for in-place vertical scaling, served by every worker process
next to its stage services (a thin adapter over `ComputeThread.apply`)."""
from __future__ import annotations

import grpc

from prism.runtime.compute import ComputeShare, ShareError, resolve_share
from prism.runtime.stagework import ComputeThread
from prism.v1 import worker_pb2, worker_pb2_grpc

SERVICE_NAME = "prism.v1.WorkerAdminService"


def share_proto(share: ComputeShare) -> worker_pb2.ComputeShare:
    return worker_pb2.ComputeShare(threads=share.threads, cpus=list(share.cpus), max_batch=share.max_batch)


class WorkerAdminServicer(worker_pb2_grpc.WorkerAdminServiceServicer):
    def __init__(self, compute: ComputeThread):
        self.compute = compute

    async def SetCompute(self, request: worker_pb2.SetComputeRequest, context: grpc.aio.ServicerContext):
        want = request.share
        try:
            share = resolve_share(self.compute.share, self.compute.allowed_cpus, threads=want.threads,
                                  cpus=tuple(want.cpus), max_batch=want.max_batch)
        except ShareError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        applied = await self.compute.apply(share)
        return worker_pb2.SetComputeResponse(applied=share_proto(applied), generation=self.compute.generation)

    async def GetCompute(self, request: worker_pb2.GetComputeRequest, context: grpc.aio.ServicerContext):
        return worker_pb2.GetComputeResponse(share=share_proto(self.compute.share), generation=self.compute.generation,
                                             allowed_cpus=list(self.compute.allowed_cpus))


def register(compute: ComputeThread):
    """A registrar for `StageServer` serving the worker admin service of `compute`."""
    servicer = WorkerAdminServicer(compute)

    def add(server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerAdminServiceServicer_to_server(servicer, server)

    return add
