"""Scheduler (front door) configuration."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from prism.runtime.backend import QueueOptions
from prism.runtime.config import check
from prism.runtime.server import ServerConfig
from services.scheduler.core.quota import KeyRing, KeyRingError
from services.scheduler.intake import Limits

PLACEMENTS = ("adaptive", "split", "colocated")


@dataclass(frozen=True)
class Policy:
    """How the scheduler admits, places and scales."""

    placement: str = field(default="adaptive", metadata={
        "help": "adaptive (colocated path at low load, split under bursts), split, or colocated"})
    colocate_below: float = field(default=0.5, metadata={
        "help": "adaptive: take the colocated path while that worker's utilisation is below this"})
    colocate_stall_ms: float = field(default=100.0, metadata={
        "help": "adaptive: not the colocated path when its prompt pass would stall that worker's running decodes longer than this"})
    encode_queue_tokens: int = field(default=0, metadata={"help": "back-pressure: most pending media tokens in the encode stage (0: unbounded)"})
    prefill_queue_tokens: int = field(default=0, metadata={"help": "back-pressure: most pending prompt tokens in the prefill stage (0: unbounded)"})
    decode_queue_tokens: int = field(default=0, metadata={"help": "back-pressure: most pending tokens to generate in the decode stage (0: unbounded)"})
    max_inflight: int = field(default=0, metadata={"help": "most requests in flight (0: unbounded)"})
    request_attempts: int = field(default=3, metadata={"help": "tries per request when workers are lost"})
    min_replicas: int = field(default=1, metadata={"help": "autoscaling: fewest workers per stage"})
    max_replicas: int = field(default=4, metadata={"help": "autoscaling: most workers per stage"})
    target_utilisation: float = field(default=0.8, metadata={"help": "autoscaling: load per replica as a fraction of its capacity"})
    scale_out_cooldown_s: float = field(default=10.0, metadata={"help": "autoscaling: seconds between scale-outs of a stage"})
    scale_in_cooldown_s: float = field(default=60.0, metadata={"help": "autoscaling: seconds of low load before removing a replica"})
    autoscale_window_s: float = field(default=10.0, metadata={"help": "autoscaling: window of the load and SLO-attainment measures"})
    encode_capacity: float = field(default=2000.0, metadata={"help": "media tokens/s an encoder is assumed to do until it is profiled"})
    prefill_capacity: float = field(default=2000.0, metadata={"help": "prompt tokens/s a prefill worker is assumed to do until it is profiled"})
    decode_capacity: float = field(default=200.0, metadata={"help": "generated tokens/s of a full decode batch, assumed until profiled"})

    def __post_init__(self) -> None:
        check(self.placement in PLACEMENTS, "placement", f"must be one of {', '.join(PLACEMENTS)}")
        check(0 < self.colocate_below <= 1, "colocate_below", "must be in (0, 1]")
        check(self.colocate_stall_ms >= 0, "colocate_stall_ms", "must be >= 0")
        for name in ("encode_queue_tokens", "prefill_queue_tokens", "decode_queue_tokens", "max_inflight"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        check(self.request_attempts >= 1, "request_attempts", "must be >= 1")
        check(0 <= self.min_replicas <= self.max_replicas, "min_replicas", "must be in [0, max_replicas]")
        check(self.max_replicas >= 1, "max_replicas", "must be >= 1")
        check(0 < self.target_utilisation <= 1, "target_utilisation", "must be in (0, 1]")
        check(self.scale_out_cooldown_s >= 0, "scale_out_cooldown_s", "must be >= 0")
        check(self.scale_in_cooldown_s >= 0, "scale_in_cooldown_s", "must be >= 0")
        check(self.autoscale_window_s > 0, "autoscale_window_s", "must be > 0")
        for name in ("encode_capacity", "prefill_capacity", "decode_capacity"):
            check(getattr(self, name) > 0, name, "must be > 0")

    @property
    def capacity(self) -> dict[str, float]:
        return {"encode": self.encode_capacity, "prefill": self.prefill_capacity, "decode": self.decode_capacity}

    @property
    def queue_tokens(self) -> dict[str, int]:
        return {s: n for s, n in (("encode", self.encode_queue_tokens), ("prefill", self.prefill_queue_tokens),
                                  ("decode", self.decode_queue_tokens)) if n}


@dataclass(frozen=True)
class SchedulerConfig:
    """The front door: admission, media processing, placement and routing of stage tasks to
    the workers registered in the queue backend, autoscaling advice, the admin API."""

    model_dir: Path = field(metadata={"help": "checkpoint directory (its processor and config; no weights are loaded)"})
    model_name: str = field(default="", metadata={"help": "name clients use for the model (default: the directory name)"})
    max_context: int = field(default=0, metadata={"help": "prompt plus generated tokens per request; set to the decode --max-len (0: the model's)"})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "gRPC server"})
    queue: QueueOptions = field(default_factory=QueueOptions, metadata={"help": "stage queues and worker registry"})
    limits: Limits = field(default_factory=Limits, metadata={"help": "request limits"})
    policy: Policy = field(default_factory=Policy, metadata={"help": "admission, placement and autoscaling"})
    worker_wait_s: float = field(default=120.0, metadata={"help": "seconds to wait at start-up for a worker of every stage"})
    selection_profile: str = field(default="", metadata={
        "help": "profile written by `prism profile`: the accuracy of each input reduction; without it no request's inputs are reduced"})
    selection_overlap: bool = field(default=True, metadata={
        "help": "selection's model: the stages overlap as a flow shop (split workers); off: one server, every stage of every request in series"})
    selection_parallelism: float = field(default=0.0, metadata={
        "help": "cores or devices the stages share, bounding how much of their work overlaps (0: each stage its own; e.g. 2 for single-threaded stage processes on two cores)"})
    api_keys: str = field(default="", metadata={
        "help": 'API keys, as JSON {"keys": [{"name", "sha256", "rate_per_s", "burst", "max_concurrent", "admin"}]} '
                "(hashes only: `prism keys new` makes a key and its entry), usually from the environment "
                "(PRISM_SCHEDULER_API_KEYS); with keys from here or api_keys_file, every call needs one"})
    api_keys_file: Path | None = field(default=None, metadata={"help": "a file holding the API keys' JSON (see api_keys)"})
    variants: str = field(default="", metadata={
        "help": "variants of the model served side by side, NAME=DIR[:ACCURACY],... (e.g. small=models/a:0.71,"
                "large=models/b:0.83): each a whole pipeline of its own workers started with --variant NAME; "
                "ACCURACY (in [0, 1]) defaults to the full accuracy in DIR/prism-profile.json; requests pin one "
                "(`variant`) or take any at or above their accuracy floor. Not with shared queues"})
    request_lease_s: float = field(default=10.0, metadata={
        "help": "an accepted request whose scheduler has not renewed its lease this long is taken over by another (or a restarted) scheduler"})

    def __post_init__(self) -> None:
        check((Path(self.model_dir) / "config.json").is_file(), "model_dir", f"{self.model_dir} has no config.json")
        check(self.max_context >= 0, "max_context", "must be >= 0")
        check(self.worker_wait_s >= 0, "worker_wait_s", "must be >= 0")
        check(self.request_lease_s > 0, "request_lease_s", "must be > 0")
        try:
            self.variant_list()
        except ValueError as exc:
            check(False, "variants", str(exc))
        check(not (self.variants and self.queue.shared_queues), "variants",
              "a stage's shared queue would mix the variants' tasks: use per-worker queues")
        check(not self.selection_profile or Path(self.selection_profile).is_file(), "selection_profile",
              f"{self.selection_profile} is not a file")
        check(self.selection_parallelism == 0 or self.selection_parallelism >= 1, "selection_parallelism",
              f"must be 0 (unbounded) or >= 1, got {self.selection_parallelism}")
        check(self.api_keys_file is None or Path(self.api_keys_file).is_file(), "api_keys_file",
              f"{self.api_keys_file} is not a file")
        try:
            self.key_ring()
        except KeyRingError as exc:
            check(False, "api_keys_file" if self.api_keys_file else "api_keys", str(exc))

    def key_ring(self) -> KeyRing:
        """The API keys of `api_keys` and `api_keys_file` together (none: the door is open)."""
        keys = list(KeyRing.from_json(self.api_keys).keys) if self.api_keys.strip() else []
        if self.api_keys_file is not None:
            keys += list(KeyRing.from_json(Path(self.api_keys_file).read_text()).keys)
        return KeyRing(keys)

    def selection_flow(self):
        """The selection program's model of the stages (`core.selection.Flow`, or None: serial)."""
        if not self.selection_overlap:
            return None
        from services.scheduler.core.selection import Flow

        return Flow(parallelism=self.selection_parallelism or math.inf)

    def variant_list(self) -> list[tuple[str, Path, float]]:
        """The variants as (name, checkpoint directory, accuracy); empty without variants."""
        import json

        from services.scheduler.core.variants import parse_variants

        out = []
        for name, directory, accuracy in parse_variants(self.variants):
            path = Path(directory)
            if not (path / "config.json").is_file():
                raise ValueError(f"variant {name}: {directory} has no config.json")
            if accuracy is None:
                profile = path / "prism-profile.json"
                try:
                    accuracy = float(json.loads(profile.read_text())["accuracy"]["full"]["accuracy"])
                except (OSError, KeyError, TypeError, ValueError):
                    raise ValueError(f"variant {name}: no accuracy given and none in {profile}") from None
            out.append((name, path, accuracy))
        return out

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).resolve().name
