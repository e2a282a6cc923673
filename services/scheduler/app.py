"""Wiring of the scheduler (front door): config -> served model -> pipeline -> servicer."""
from __future__ import annotations

import asyncio

from prism.runtime.stagework import Channels, StageApp
from prism.runtime.telemetry import inject_trace_context
from prism.v1 import prism_pb2_grpc
from services.scheduler.config import SchedulerConfig
from services.scheduler.intake import ServedModel
from services.scheduler.pipeline import Pipeline, StageAddresses
from services.scheduler.servicer import PrismServicer


async def build(config: SchedulerConfig) -> StageApp:
    model = await asyncio.to_thread(ServedModel.load, config.served_name, config.model_dir, config.max_context)
    channels = Channels(config.server.max_message_bytes)
    pipeline = Pipeline(StageAddresses(config.encoder, config.prefill, config.decode), channels,
                        lambda: dict(inject_trace_context()))
    servicer = PrismServicer({model.name: model}, model.name, config.limits, pipeline)
    return StageApp("prism.v1.PrismService", lambda s: prism_pb2_grpc.add_PrismServiceServicer_to_server(servicer, s),
                    on_stop=channels.close, parts={"servicer": servicer, "pipeline": pipeline})
