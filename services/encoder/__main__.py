"""python -m services.encoder --model-dir DIR [--port 0 --port-file F ...]"""
from __future__ import annotations

import asyncio

from prism.engine.encoder import EncoderEngine
from prism.models.loading import ENCODER
from prism.queue.memory import InMemoryWorkQueue
from prism.runtime.config import config_from_cli
from prism.runtime.main import setup_process
from prism.runtime.stagework import ComputeThread, serve_stage
from prism.v1 import stages_pb2_grpc
from services.encoder.config import EncoderConfig
from services.encoder.servicer import EncoderServicer
from services.encoder.worker import EncoderWorker


async def main(config: EncoderConfig) -> None:
    compute = ComputeThread("encoder", config.model.threads)
    engine = EncoderEngine(await compute.run(config.model.load, frozenset({ENCODER})))
    queue = InMemoryWorkQueue(max_depth=config.queue_depth)
    worker = EncoderWorker(queue, engine, compute, max_batch_tokens=config.max_batch_tokens,
                           held_ttl_s=config.held_ttl_s, name=config.server.worker_name)
    servicer = EncoderServicer(queue, worker, chunk_bytes=config.chunk_bytes, fetch_wait_s=config.fetch_wait_s)
    await serve_stage(config.server, "prism.v1.EncoderService",
                      lambda s: stages_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s), queue, worker.run)
    compute.shutdown()


if __name__ == "__main__":
    cfg = config_from_cli(EncoderConfig, env_prefix="PRISM_ENCODER", prog="python -m services.encoder")
    setup_process("prism-encoder", cfg.server.worker_name)
    asyncio.run(main(cfg))
