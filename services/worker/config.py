"""Configuration of a worker hosting several stages in one process (stage colocation)."""
from __future__ import annotations

from dataclasses import dataclass, field

from prism.engine.batching import MAX_PADDING
from prism.models.loading import ModelOptions
from prism.runtime.backend import QueueOptions
from prism.runtime.config import check
from prism.runtime.server import ServerConfig
from services.decode.config import DecodeConfig
from services.encoder.config import EncoderConfig
from services.prefill.config import PrefillConfig

STAGES = ("encode", "prefill", "decode")


@dataclass(frozen=True)
class WorkerConfig:
    """One process hosting `stages` on one gRPC server, sharing weights and compute; co-hosted
    stages hand embeddings and KV to each other in memory."""

    model: ModelOptions = field(metadata={"help": "checkpoint"})
    stages: str = field(default="encode,prefill,decode", metadata={"help": "comma-separated stages to host: encode, prefill, decode"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "gRPC server"})
    queue: QueueOptions = field(default_factory=QueueOptions, metadata={"help": "stage queues and worker registry"})
    slots: int = field(default=16, metadata={"help": "decode: requests decoded at once (KV slots preallocated)"})
    max_len: int = field(default=2048, metadata={"help": "decode: tokens per slot, prompt plus generated"})
    encode_batch_tokens: int = field(default=4096, metadata={"help": "encode: media tokens per tower batch across requests"})
    prefill_batch_tokens: int = field(default=2048, metadata={"help": "prefill: padded prompt tokens per batch across requests"})
    prefill_max_padding: float = field(default=MAX_PADDING, metadata={"help": "prefill: padding a batch may carry, a fraction of its real prompt tokens"})
    queue_depth: int = field(default=256, metadata={"help": "tasks that may wait in each stage queue of this worker"})
    held_ttl_s: float = field(default=120.0, metadata={"help": "seconds held embeddings and KV wait for the next stage"})
    fetch_wait_s: float = field(default=60.0, metadata={"help": "seconds a fetch waits for an output to be ready"})
    upstream_timeout_s: float = field(default=300.0, metadata={"help": "seconds allowed to pull one input from another worker"})
    chunk_bytes: int = field(default=1 << 20, metadata={"help": "bytes per streamed embedding or KV chunk"})
    encode_capacity: float = field(default=0.0, metadata={"help": "advertised encode throughput, tokens/s (0: profiled online)"})
    prefill_capacity: float = field(default=0.0, metadata={"help": "advertised prefill throughput, tokens/s (0: profiled online)"})
    decode_capacity: float = field(default=0.0, metadata={"help": "advertised full-batch decode throughput, tokens/s (0: profiled online)"})

    def __post_init__(self) -> None:
        names = self.stage_list
        check(bool(names) and all(n in STAGES for n in names) and len(set(names)) == len(names), "stages",
              f"must be distinct names among {', '.join(STAGES)}, got {self.stages!r}")
        self.stage_configs()  # validates every stage's own fields

    @property
    def stage_list(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.stages.split(",") if s.strip())

    def stage_configs(self) -> dict[str, object]:
        common = dict(model=self.model, server=self.server, queue=self.queue, queue_depth=self.queue_depth)
        capacity = {"encode": self.encode_capacity, "prefill": self.prefill_capacity, "decode": self.decode_capacity}
        made: dict[str, object] = {}
        for name in self.stage_list:
            if name == "encode":
                made[name] = EncoderConfig(**common, capacity=capacity[name], max_batch_tokens=self.encode_batch_tokens,
                                           held_ttl_s=self.held_ttl_s, fetch_wait_s=self.fetch_wait_s,
                                           chunk_bytes=self.chunk_bytes)
            elif name == "prefill":
                made[name] = PrefillConfig(**common, capacity=capacity[name], held_ttl_s=self.held_ttl_s,
                                           fetch_wait_s=self.fetch_wait_s,
                                           upstream_timeout_s=self.upstream_timeout_s, chunk_bytes=self.chunk_bytes,
                                           max_batch_tokens=self.prefill_batch_tokens,
                                           max_padding=self.prefill_max_padding)
            else:
                made[name] = DecodeConfig(**common, capacity=capacity[name], slots=self.slots, max_len=self.max_len,
                                          upstream_timeout_s=self.upstream_timeout_s)
        return made
