"""python -m services.prefill --model-dir DIR [--port 0 --port-file F ...]"""
from __future__ import annotations

import asyncio

from prism.engine.lm import LanguageModel
from prism.engine.prefill import PrefillEngine
from prism.models.loading import LANGUAGE
from prism.queue.memory import InMemoryWorkQueue
from prism.runtime.config import config_from_cli
from prism.runtime.main import setup_process
from prism.runtime.stagework import Channels, ComputeThread, serve_stage
from prism.v1 import stages_pb2_grpc
from services.prefill.config import PrefillConfig
from services.prefill.servicer import PrefillServicer
from services.prefill.worker import PrefillWorker


async def main(config: PrefillConfig) -> None:
    compute = ComputeThread("prefill", config.model.threads)
    engine = PrefillEngine(LanguageModel(await compute.run(config.model.load, frozenset({LANGUAGE}))))
    queue = InMemoryWorkQueue(max_depth=config.queue_depth)
    channels = Channels(config.server.max_message_bytes)
    worker = PrefillWorker(queue, engine, compute, channels, held_ttl_s=config.held_ttl_s,
                           name=config.server.worker_name, fetch_timeout_s=config.upstream_timeout_s)
    servicer = PrefillServicer(queue, worker, chunk_bytes=config.chunk_bytes, fetch_wait_s=config.fetch_wait_s)
    await serve_stage(config.server, "prism.v1.PrefillService",
                      lambda s: stages_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, s), queue, worker.run,
                      on_stop=channels.close)
    compute.shutdown()


if __name__ == "__main__":
    cfg = config_from_cli(PrefillConfig, env_prefix="PRISM_PREFILL", prog="python -m services.prefill")
    setup_process("prism-prefill", cfg.server.worker_name)
    asyncio.run(main(cfg))
