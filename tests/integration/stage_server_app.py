"""A tiny Prism process for runtime tests: a fake `PrismService` on a `StageServer`.

Run as ``python -m tests.integration.stage_server_app --port 0 --port-file F [...]`` from the
repository root. ``Generate`` streams ``max_new_tokens`` (default 3) tokens, one every
``--token-delay-s``; its drain hook waits for the streams in flight, like a stage worker
finishing its tasks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator

import grpc

from prism.runtime.config import check, config_from_cli
from prism.runtime.server import ServerConfig, StageServer
from prism.runtime.telemetry import setup_logging, setup_tracing
from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc

SERVICE_NAME = prism_pb2.DESCRIPTOR.services_by_name["PrismService"].full_name

log = logging.getLogger("stage_server_app")


@dataclasses.dataclass(frozen=True)
class AppConfig:
    """Fake Prism front door for runtime tests."""

    server: ServerConfig = dataclasses.field(default_factory=ServerConfig)
    token_delay_s: float = dataclasses.field(
        default=0.05, metadata={"help": "seconds between streamed tokens"}
    )
    log_level: str = dataclasses.field(default="INFO", metadata={"help": "log level"})

    def __post_init__(self) -> None:
        check(self.token_delay_s >= 0, "token_delay_s", "must be >= 0")


class FakePrismServicer(prism_pb2_grpc.PrismServiceServicer):
    """Streams counting tokens; tracks streams in flight for the drain hook."""

    def __init__(self, token_delay_s: float = 0.0) -> None:
        self.token_delay_s = token_delay_s
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Generate(
        self, request: prism_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prism_pb2.GenerateResponse]:
        if request.HasField("chat"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chat input not supported")
        n = request.sampling.max_new_tokens or 3
        self.in_flight += 1
        self._idle.clear()
        try:
            for i in range(n):
                if i:
                    await asyncio.sleep(self.token_delay_s)
                last = i == n - 1
                yield prism_pb2.GenerateResponse(
                    request_id=request.request_id,
                    token_ids=[i],
                    text=f"t{i} ",
                    finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0,
                )
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def GenerateUnary(
        self, request: prism_pb2.GenerateUnaryRequest, context: grpc.aio.ServicerContext
    ) -> prism_pb2.GenerateUnaryResponse:
        if not request.request.prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is required")
        return prism_pb2.GenerateUnaryResponse(
            request_id=request.request.request_id, text=request.request.prompt.upper()
        )

    async def ListModels(
        self, request: prism_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> prism_pb2.ListModelsResponse:
        return prism_pb2.ListModelsResponse(
            models=[prism_pb2.ModelInfo(name="tiny", family="llava",
                                        modalities=[common_pb2.MODALITY_TEXT])],
            default_model="tiny",
        )

    async def wait_idle(self) -> None:
        """Drain hook: returns once no stream is in flight."""
        await self._idle.wait()
        log.info("no streams in flight")


async def main(config: AppConfig) -> None:
    setup_logging("stage-server-app", config.log_level, static={"worker": config.server.worker_name})
    provider = setup_tracing("stage-server-app", instance_id=config.server.worker_name)
    log.info("started", extra={"glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")})
    servicer = FakePrismServicer(config.token_delay_s)
    server = StageServer(
        config.server,
        service_names=[SERVICE_NAME],
        registrars=[lambda s: prism_pb2_grpc.add_PrismServiceServicer_to_server(servicer, s)],
        drain_hooks=[servicer.wait_idle],
        tracer_provider=provider,
    )
    await server.start()
    await server.wait()
    log.info("exiting")


if __name__ == "__main__":
    asyncio.run(main(config_from_cli(AppConfig, env_prefix="PRISM_TESTAPP")))
