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


ADAPT_MODES = ("variants", "pipeline")


@dataclass(frozen=True)
class AdaptOptions:
    """The adaptation loop (issue 7): every `adapt_period_s` the arrival-rate forecast is handed to
    the adaptation core's `Adapter`, and a better configuration (variants, their cores, batch
    bounds, replicas and traffic shares) is applied in place by the `ConfigApplier`."""

    adapt: bool = field(default=False, metadata={"help": "run the adaptation loop (needs --adapt-profile and --adapt-slo-ms)"})
    adapt_profile: str = field(default="", metadata={
        "help": 'variants file {"variants": [{name, stage, accuracy, table: {cores: {batch: ms}}}]}: each variant\'s '
                "profiled latency; names are the served variants' (stage \"pipeline\": a whole-pipeline variant)"})
    adapt_mode: str = field(default="variants", metadata={
        "help": "variants: one stage (or the whole pipeline) served by a mix of variants (InfAdapter); "
                "pipeline: per stage a variant, batch, cores and replicas (IPA)"})
    adapt_slo_ms: float = field(default=0.0, metadata={"help": "end-to-end latency objective the configuration must meet"})
    adapt_period_s: float = field(default=10.0, metadata={"help": "seconds between re-solves"})
    adapt_window_s: float = field(default=5.0, metadata={"help": "forecast: arrivals are counted in windows of this many seconds"})
    adapt_windows: int = field(default=6, metadata={"help": "forecast: the line is fitted to this many complete windows"})
    adapt_margin: float = field(default=0.1, metadata={"help": "forecast: safety margin over the predicted rate"})
    adapt_horizon_s: float = field(default=10.0, metadata={"help": "forecast: seconds ahead the rate is predicted for"})
    adapt_min_gain: float = field(default=0.5, metadata={"help": "cores (objective units) a cheaper configuration must save"})
    adapt_stable_steps: int = field(default=2, metadata={"help": "solves in a row a cheaper configuration must win before it is applied"})
    adapt_accuracy_weight: float = field(default=10.0, metadata={"help": "cores one whole unit of accuracy is worth"})
    adapt_cost_weight: float = field(default=1.0, metadata={"help": "weight of one core in the objective"})
    adapt_max_replicas: int = field(default=4, metadata={"help": "most workers per (stage, variant)"})
    adapt_batches: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "batch bounds a worker may be given"})
    adapt_cores: tuple[int, ...] = field(default=(1, 2, 4), metadata={"help": "cores a worker may be given"})
    adapt_total_cores: int = field(default=16, metadata={"help": "most cores of all workers together"})
    adapt_headroom: float = field(default=0.1, metadata={"help": "capacity must exceed the forecast rate by this fraction"})
    adapt_min_accuracy: float = field(default=0.0, metadata={"help": "the configuration's expected accuracy is at least this"})
    adapt_stop_delay_s: float = field(default=20.0, metadata={
        "help": "seconds a variant left out of the configuration keeps its idle workers before they are drained "
                "(taken back meanwhile: nothing restarts); never drained before the kept variants have live workers"})

    def __post_init__(self) -> None:
        check(self.adapt_mode in ADAPT_MODES, "adapt_mode", f"must be one of {', '.join(ADAPT_MODES)}")
        check(not self.adapt or self.adapt_slo_ms > 0, "adapt_slo_ms", "must be > 0 with --adapt")
        check(self.adapt_slo_ms >= 0, "adapt_slo_ms", "must be >= 0")
        check(not self.adapt or bool(self.adapt_profile), "adapt_profile", "required with --adapt")
        for name in ("adapt_period_s", "adapt_window_s"):
            check(getattr(self, name) > 0, name, "must be > 0")
        for name in ("adapt_margin", "adapt_horizon_s", "adapt_min_gain", "adapt_accuracy_weight",
                     "adapt_cost_weight", "adapt_headroom", "adapt_stop_delay_s"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("adapt_windows", "adapt_stable_steps", "adapt_max_replicas", "adapt_total_cores"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("adapt_batches", "adapt_cores"):
            check(bool(getattr(self, name)) and min(getattr(self, name)) >= 1, name, "needs integers >= 1")
        check(0 <= self.adapt_min_accuracy <= 1, "adapt_min_accuracy", "must be in [0, 1]")
        if self.adapt_profile:
            check(Path(self.adapt_profile).is_file(), "adapt_profile", f"{self.adapt_profile} is not a file")
            try:
                stages = self.profiles()
            except (ValueError, KeyError, TypeError) as exc:
                check(False, "adapt_profile", str(exc))
            check(self.adapt_mode != "variants" or len(stages) == 1, "adapt_profile",
                  f"mode variants adapts one stage, the file has {sorted(stages)}")

    def profiles(self) -> dict:
        """The variants file's profiles by stage ({stage: [VariantProfile]})."""
        from services.scheduler.core.adapt import load_profile

        out: dict = {}
        for v in load_profile(self.adapt_profile):
            out.setdefault(v.stage, []).append(v)
        if not out:
            raise ValueError("no variants")
        return out

    def adapter(self, clock=None):
        """A fresh `Adapter` for these options (its forecaster, settings, bounds and weights)."""
        import time as _time

        from services.scheduler.core.adapt import Adapter, AdapterSettings, Bounds, RateForecaster, Weights

        settings = AdapterSettings(slo_ms=self.adapt_slo_ms, period_s=self.adapt_period_s, horizon_s=self.adapt_horizon_s,
                                   min_gain=self.adapt_min_gain, stable_steps=self.adapt_stable_steps, mode=self.adapt_mode)
        bounds = Bounds(max_replicas={"*": self.adapt_max_replicas}, batches={"*": self.adapt_batches},
                        cores={"*": self.adapt_cores}, total_cores=self.adapt_total_cores,
                        headroom=self.adapt_headroom, min_accuracy=self.adapt_min_accuracy)
        return Adapter(self.profiles(), settings, bounds, Weights(self.adapt_accuracy_weight, self.adapt_cost_weight),
                       RateForecaster(self.adapt_window_s, self.adapt_windows, self.adapt_margin),
                       clock=clock or _time.monotonic)


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
        "help": "CPU cores the stages share, bounding how much of their work overlaps; work is then measured in the workers' CPU seconds, so the program shares the cores itself (0: each stage its own device or cores, wall-clock rates; e.g. 2 for single-threaded stage processes on two cores)"})
    selection_price: float = field(default=1.0, metadata={
        "help": "accuracy the selection trades per second of work while arrivals overload a stage, per unit of "
                "overload: price = this x (offered load - 1), so requests arrive reduced before deadlines force it "
                "(never below their floors); 0: reduce only to meet deadlines"})
    selection_price_window_s: float = field(default=10.0, metadata={
        "help": "seconds of arrivals the offered load is measured over (the selection's price): the work of "
                "those after the first over the time since it (at least 1 s), so a burst is priced from its "
                "second arrival"})
    selection_feedback: bool = field(default=True, metadata={
        "help": "the selection's capacities divided by how much later than predicted its requests finish (the "
                "--selection-feedback-quantile over the last --selection-feedback-window served, and those in service already past their "
                "prediction): what its model leaves out is charged to the work; off: the measured capacities as they are"})
    selection_feedback_window: int = field(default=128, metadata={
        "help": "how many served requests the feedback remembers: longer than a burst, so what the last burst "
                "taught is not forgotten in the quiet after it (a short memory swings between bursts)"})
    selection_feedback_quantile: float = field(default=0.9, metadata={
        "help": "which quantile of those ratios the capacities are divided by (0.5: the median; higher: a margin "
                "for the model's spread, refusing or reducing more so that fewer admitted requests finish late)"})
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
    adapt: AdaptOptions = field(default_factory=AdaptOptions, metadata={"help": "adaptation loop (variants, cores, batch, replicas)"})

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
        if self.adapt.adapt and self.variants:
            served = {name for name, _, _ in self.variant_list()}
            named = {v.name for vs in self.adapt.profiles().values() for v in vs}
            check(named <= served, "adapt_profile", f"variants {sorted(named - served)} are not served (--variants)")
        check(not self.selection_profile or Path(self.selection_profile).is_file(), "selection_profile",
              f"{self.selection_profile} is not a file")
        check(self.selection_parallelism == 0 or self.selection_parallelism >= 1, "selection_parallelism",
              f"must be 0 (unbounded) or >= 1, got {self.selection_parallelism}")
        check(self.selection_price >= 0, "selection_price", f"must be >= 0, got {self.selection_price}")
        check(self.selection_feedback_window >= 8, "selection_feedback_window",
              f"must be >= 8 (the requests it needs before it acts), got {self.selection_feedback_window}")
        check(0.0 <= self.selection_feedback_quantile <= 1.0, "selection_feedback_quantile",
              f"must be in [0, 1], got {self.selection_feedback_quantile}")
        check(self.selection_price_window_s > 0, "selection_price_window_s",
              f"must be > 0, got {self.selection_price_window_s}")
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

    def selection_slowdown(self):
        """The selection's closed-loop correction (`core.selection_jobs.Slowdown`), or None."""
        if not self.selection_feedback:
            return None
        from services.scheduler.core.selection_jobs import Slowdown

        return Slowdown(window=self.selection_feedback_window, quantile=self.selection_feedback_quantile)

    def selection_load_price(self):
        """The selection's price of work under overload (`core.selection_jobs.LoadPrice`), or None."""
        if not self.selection_price:
            return None
        from services.scheduler.core.selection_jobs import LoadPrice

        return LoadPrice(self.selection_price, self.selection_price_window_s)

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
