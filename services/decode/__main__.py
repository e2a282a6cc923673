"""python -m services.decode --model-dir DIR [--slots 16 --max-len 2048 --port 0 ...]"""
from __future__ import annotations

import asyncio

from prism.engine.decode import DecodeEngine
from prism.engine.lm import LanguageModel
from prism.models.loading import LANGUAGE
from prism.queue.memory import InMemoryWorkQueue
from prism.runtime.config import ConfigError, config_from_cli
from prism.runtime.main import setup_process
from prism.runtime.stagework import Channels, ComputeThread, serve_stage
from prism.v1 import stages_pb2_grpc
from services.decode.config import DecodeConfig
from services.decode.servicer import DecodeServicer
from services.decode.worker import DecodeWorker


async def main(config: DecodeConfig) -> None:
    compute = ComputeThread("decode", config.model.threads)
    lm = LanguageModel(await compute.run(config.model.load, frozenset({LANGUAGE})))
    if config.max_len > lm.adapter.max_context:
        raise ConfigError("max_len", f"{config.max_len} exceeds the model's context of {lm.adapter.max_context}")
    engine = await compute.run(DecodeEngine, lm, config.slots, config.max_len)
    queue = InMemoryWorkQueue(max_depth=config.queue_depth)
    channels = Channels(config.server.max_message_bytes)
    worker = DecodeWorker(queue, engine, compute, channels, name=config.server.worker_name,
                          fetch_timeout_s=config.upstream_timeout_s)
    servicer = DecodeServicer(queue, worker)
    await serve_stage(config.server, "prism.v1.DecodeService",
                      lambda s: stages_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, s), queue, worker.run,
                      on_stop=channels.close)
    compute.shutdown()


if __name__ == "__main__":
    cfg = config_from_cli(DecodeConfig, env_prefix="PRISM_DECODE", prog="python -m services.decode")
    setup_process("prism-decode", cfg.server.worker_name)
    asyncio.run(main(cfg))
