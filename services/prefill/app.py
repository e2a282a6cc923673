"""Wiring of the prefill service: config -> model -> queue -> worker -> servicer."""
from __future__ import annotations

from prism.engine.lm import LanguageModel
from prism.engine.prefill import PrefillEngine
from prism.models.loading import LANGUAGE
from prism.runtime.host import HostContext
from prism.runtime.stagework import Channels, StageApp
from prism.v1 import stages_pb2_grpc
from prism.wire import add_bulk_servicer_to_server
from services.prefill.config import PrefillConfig
from services.prefill.servicer import PrefillServicer
from services.prefill.worker import PrefillWorker


async def build(config: PrefillConfig, host: HostContext) -> StageApp:
    engine = PrefillEngine(LanguageModel(await host.load(config.model, frozenset({LANGUAGE}))))
    queue = host.queue("prefill", config.queue_depth)
    channels = Channels(config.server)
    worker = PrefillWorker(queue, engine, host.compute, channels, held_ttl_s=config.held_ttl_s,
                           name=host.instance, fetch_timeout_s=config.upstream_timeout_s, peers=host.peers,
                           max_batch_tokens=config.max_batch_tokens, max_padding=config.max_padding)
    servicer = PrefillServicer(queue, worker, chunk_bytes=config.chunk_bytes, fetch_wait_s=config.fetch_wait_s)

    async def on_stop() -> None:
        await channels.close()

    return StageApp("prism.v1.PrefillService", lambda s: add_bulk_servicer_to_server(stages_pb2_grpc.add_PrefillServiceServicer_to_server, servicer, s),
                    queue, worker.run, on_stop, {"servicer": servicer, "worker": worker, "engine": engine})
