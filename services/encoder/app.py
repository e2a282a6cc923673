"""Wiring of the encoder service: config -> model -> queue -> worker -> servicer."""
from __future__ import annotations

from prism.engine.encoder import EncoderEngine
from prism.models.loading import ENCODER
from prism.runtime.host import HostContext
from prism.runtime.stagework import StageApp
from prism.v1 import stages_pb2_grpc
from prism.wire import add_bulk_servicer_to_server
from services.encoder.config import EncoderConfig
from services.encoder.servicer import EncoderServicer
from services.encoder.worker import EncoderWorker


async def build(config: EncoderConfig, host: HostContext) -> StageApp:
    engine = EncoderEngine(await host.load(config.model, frozenset({ENCODER})))
    queue = host.queue("encode", config.queue_depth)
    worker = EncoderWorker(queue, engine, host.compute, max_batch_tokens=config.max_batch_tokens,
                           held_ttl_s=config.held_ttl_s, name=host.instance)
    servicer = EncoderServicer(queue, worker, chunk_bytes=config.chunk_bytes, fetch_wait_s=config.fetch_wait_s)
    return StageApp("prism.v1.EncoderService", lambda s: add_bulk_servicer_to_server(stages_pb2_grpc.add_EncoderServiceServicer_to_server, servicer, s),
                    queue, worker.run, None, {"servicer": servicer, "worker": worker, "engine": engine})
