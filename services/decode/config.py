"""Decode service configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

from prism.models.loading import ModelOptions
from prism.runtime.backend import QueueOptions
from prism.runtime.config import check
from prism.runtime.server import ServerConfig


@dataclass(frozen=True)
class DecodeConfig:
    """The decode stage: a continuous batch over preallocated per-slot KV buffers."""

    model: ModelOptions = field(metadata={"help": "checkpoint"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "gRPC server"})
    queue: QueueOptions = field(default_factory=QueueOptions, metadata={"help": "stage queues and worker registry"})
    capacity: float = field(default=0.0, metadata={
        "help": "this worker's throughput for its stage, tokens/s (e.g. from `prism profile`), advertised to the scheduler; 0: the scheduler profiles it online"})
    slots: int = field(default=16, metadata={"help": "requests decoded at once (KV slots preallocated)"})
    max_len: int = field(default=2048, metadata={"help": "tokens per slot: prompt plus generated; at most the model's context"})
    queue_depth: int = field(default=256, metadata={"help": "decode tasks that may wait in this worker's queue"})
    upstream_timeout_s: float = field(default=300.0, metadata={"help": "seconds allowed to pull a request's KV from prefill"})

    def __post_init__(self) -> None:
        check(self.capacity >= 0, "capacity", "must be >= 0")
        check(self.slots >= 1, "slots", "must be >= 1")
        check(self.max_len >= 2, "max_len", "must be >= 2")
        check(self.queue_depth >= 1, "queue_depth", "must be >= 1")
        check(self.upstream_timeout_s > 0, "upstream_timeout_s", "must be > 0")
