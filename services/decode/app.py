"""Wiring of the decode service: config -> model -> slot KV engine -> queue -> worker -> servicer."""
from __future__ import annotations

from prism.engine.decode import DecodeEngine
from prism.engine.lm import LanguageModel
from prism.models.loading import LANGUAGE
from prism.runtime.config import ConfigError
from prism.runtime.host import HostContext
from prism.runtime.stagework import Channels, StageApp
from prism.v1 import stages_pb2_grpc
from services.decode.config import DecodeConfig
from services.decode.servicer import DecodeServicer
from services.decode.worker import DecodeWorker

DECODE_ATTENTION = "sdpa"


async def build(config: DecodeConfig, host: HostContext) -> StageApp:
    compute = host.compute
    # Decode attends over slot buffers with per-row 4-D masks, which SDPA takes on every device;
    # flash-attn's kernels do not (prefill, with plain causal masks, uses flash-attn on CUDA).
    lm = LanguageModel(await host.load(config.model, frozenset({LANGUAGE}), DECODE_ATTENTION))
    if config.max_len > lm.adapter.max_context:
        raise ConfigError("max_len", f"{config.max_len} exceeds the model's context of {lm.adapter.max_context}")
    engine = await compute.run(DecodeEngine, lm, config.slots, config.max_len)
    queue = host.queue("decode", config.queue_depth)
    channels = Channels(config.server)
    worker = DecodeWorker(queue, engine, compute, channels, name=host.instance,
                          fetch_timeout_s=config.upstream_timeout_s, peers=host.peers)
    servicer = DecodeServicer(queue, worker)

    async def on_stop() -> None:
        await channels.close()

    return StageApp("prism.v1.DecodeService", lambda s: stages_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, s),
                    queue, worker.run, on_stop, {"servicer": servicer, "worker": worker, "engine": engine})
