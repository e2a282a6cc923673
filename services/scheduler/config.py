"""Scheduler (front door) configuration."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prism.runtime.config import check
from prism.runtime.server import ServerConfig
from services.scheduler.intake import Limits


@dataclass(frozen=True)
class SchedulerConfig:
    """The front door: admission, media processing, orchestration of the stages."""

    model_dir: Path = field(metadata={"help": "checkpoint directory (its processor and config; no weights are loaded)"})
    encoder: str = field(metadata={"help": "encoder service address host:port"})
    prefill: str = field(metadata={"help": "prefill service address host:port"})
    decode: str = field(metadata={"help": "decode service address host:port"})
    model_name: str = field(default="", metadata={"help": "name clients use for the model (default: the directory name)"})
    max_context: int = field(default=0, metadata={"help": "prompt plus generated tokens per request; set to the decode --max-len (0: the model's)"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "gRPC server"})
    limits: Limits = field(default_factory=Limits, metadata={"help": "request limits"})

    def __post_init__(self) -> None:
        check((Path(self.model_dir) / "config.json").is_file(), "model_dir", f"{self.model_dir} has no config.json")
        for name in ("encoder", "prefill", "decode"):
            check(":" in getattr(self, name), name, "must be host:port")
        check(self.max_context >= 0, "max_context", "must be >= 0")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name
