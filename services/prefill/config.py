"""Prefill service configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

from prism.engine.batching import MAX_PADDING
from prism.models.loading import ModelOptions
from prism.runtime.backend import QueueOptions
from prism.runtime.config import check
from prism.runtime.server import ServerConfig


@dataclass(frozen=True)
class PrefillConfig:
    """The prefill stage: the prompt pass; holds each request's KV for the decode worker."""

    model: ModelOptions = field(metadata={"help": "checkpoint"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "gRPC server"})
    queue: QueueOptions = field(default_factory=QueueOptions, metadata={"help": "stage queues and worker registry"})
    capacity: float = field(default=0.0, metadata={
        "help": "this worker's throughput for its stage, tokens/s (e.g. from `prism profile`), advertised to the scheduler; 0: the scheduler profiles it online"})
    queue_depth: int = field(default=256, metadata={"help": "prefill tasks that may wait in this worker's queue"})
    held_ttl_s: float = field(default=120.0, metadata={"help": "seconds a KV cache waits for decode to pull it before it is dropped"})
    fetch_wait_s: float = field(default=60.0, metadata={"help": "seconds a FetchKv call waits for the prompt pass to start"})
    upstream_timeout_s: float = field(default=120.0, metadata={"help": "seconds allowed to pull a request's embeddings"})
    chunk_bytes: int = field(default=1 << 20, metadata={"help": "bytes per streamed KV chunk"})
    max_batch_tokens: int = field(default=2048, metadata={"help": "padded prompt tokens per prefill batch across requests"})
    max_padding: float = field(default=MAX_PADDING, metadata={
        "help": "padding a prefill batch may carry, as a fraction of its real prompt tokens: a request joins a batch only while the padding stays within it (prompts of very different lengths run one after the other; every request of a batch waits for its longest)"})

    def __post_init__(self) -> None:
        check(self.capacity >= 0, "capacity", "must be >= 0")
        check(self.queue_depth >= 1, "queue_depth", "must be >= 1")
        check(self.max_batch_tokens >= 1, "max_batch_tokens", "must be >= 1")
        check(self.max_padding >= 0, "max_padding", "must be >= 0")
        check(self.held_ttl_s > 0, "held_ttl_s", "must be > 0")
        check(self.fetch_wait_s > 0, "fetch_wait_s", "must be > 0")
        check(self.upstream_timeout_s > 0, "upstream_timeout_s", "must be > 0")
        check(4096 <= self.chunk_bytes <= self.server.max_message_bytes // 2, "chunk_bytes",
              "must be in [4096, max_message_bytes / 2]")
