"""python -m services.scheduler --model-dir DIR --encoder H:P --prefill H:P --decode H:P [...]"""
from __future__ import annotations

import asyncio

from prism.runtime.config import config_from_cli
from prism.runtime.main import setup_process
from prism.runtime.stagework import Channels, serve_stage
from prism.runtime.telemetry import inject_trace_context
from prism.v1 import prism_pb2_grpc
from services.scheduler.config import SchedulerConfig
from services.scheduler.intake import ServedModel
from services.scheduler.pipeline import Pipeline, StageAddresses
from services.scheduler.servicer import PrismServicer


async def main(config: SchedulerConfig) -> None:
    model = await asyncio.to_thread(ServedModel.load, config.served_name, config.model_dir, config.max_context)
    channels = Channels(config.server.max_message_bytes)
    pipeline = Pipeline(StageAddresses(config.encoder, config.prefill, config.decode), channels,
                        lambda: dict(inject_trace_context()))
    servicer = PrismServicer({model.name: model}, model.name, config.limits, pipeline)
    await serve_stage(config.server, "prism.v1.PrismService",
                      lambda s: prism_pb2_grpc.add_PrismServiceServicer_to_server(servicer, s), None, None,
                      on_stop=channels.close)


if __name__ == "__main__":
    cfg = config_from_cli(SchedulerConfig, env_prefix="PRISM_SCHEDULER", prog="python -m services.scheduler")
    setup_process("prism-scheduler", cfg.server.worker_name)
    asyncio.run(main(cfg))
