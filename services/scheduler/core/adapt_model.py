"""Adaptation's data types: variant profiles and their latency model, configurations, bounds,
weights, and the dynamic-SLO helpers (what is left of a request's budget, the order it sets,
the batch it allows). Pure Python and numpy; the programs live in `adapt_solve`, the controller
in `adapt_control`, and `adapt` re-exports all three.

Latency model (`LatencyModel`). A variant's stage runs a batch of ``b`` requests on a worker of
``c`` cores in ``latency_ms(b, c)`` milliseconds. Measured points ``{cores: {batch: ms}}`` are
used as they are; between measured batch sizes of a measured core count the time is linearly
interpolated; everything else (other core counts, batches beyond the measured range) comes from
Sponge's model (arXiv 2404.00704)::

    l(b, c) = (alpha * b + beta) / c + gamma        alpha, beta, gamma >= 0

fitted to every measured point by non-negative least squares (``scipy.optimize.nnls``) on the
features ``(b / c, 1 / c, 1)``. With a single measured core count, ``1 / c`` and ``1`` cannot be
told apart; the fit then takes ``gamma = serial_fraction * l(b=1)`` as given (default 0: work
scales with cores, Sponge's assumption) and fits alpha and beta on what remains.

A request's latency at a stage (the programs' model) is one batch's service time plus the wait
to form the batch from arrivals at ``rate`` requests/s: ``(b - 1) / rate`` (the first request of a
batch waits for ``b - 1`` more; stage queues are shared by every worker of the stage, so the
batch forms at the stage's whole rate); at rate 0 nothing waits (``batch_wait_ms``).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
from scipy.optimize import nnls

__all__ = [
    "ADAPT_STAGES", "Bounds", "Infeasible", "LatencyModel", "Latency", "PipelineConfig", "StageChoice",
    "VariantProfile", "Weights", "batch_for_budget", "batch_wait_ms", "budget_order_key",
    "from_prism_profile", "load_profile", "remaining_budget_ms", "stage_latency_ms",
]

ADAPT_STAGES = ("encode", "prefill", "decode", "pipeline")  # "pipeline": a variant of the whole path


class Infeasible(ValueError):
    """No configuration meets the constraints; `reason` says which one and by how much."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Latency(Protocol):
    """Anything with a batch latency: a `LatencyModel` or a `VariantProfile`."""

    def latency_ms(self, batch: int, cores: int) -> float: ...


# -- latency model ---------------------------------------------------------------------------------


def _freeze_table(table: Mapping[Any, Mapping[Any, float]]) -> Mapping[int, Mapping[int, float]]:
    out = {}
    for c, row in table.items():
        if isinstance(c, bool) or int(c) != c or int(c) < 1:
            raise ValueError(f"table: cores {c!r} must be an integer >= 1")
        inner = {}
        for b, ms in row.items():
            if isinstance(b, bool) or int(b) != b or int(b) < 1:
                raise ValueError(f"table[{c}]: batch {b!r} must be an integer >= 1")
            if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
                raise ValueError(f"table[{c}][{b}]: {ms!r} ms must be finite and > 0")
            inner[int(b)] = float(ms)
        if not inner:
            raise ValueError(f"table[{c}]: no batch sizes")
        out[int(c)] = MappingProxyType(dict(sorted(inner.items())))
    if not out:
        raise ValueError("table: no measured points")
    return MappingProxyType(dict(sorted(out.items())))


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds per batch from measured points and Sponge's fitted model (module docstring).

    `table` is {cores: {batch: ms}}; `serial_fraction` in [0, 1) is the share of the batch-1 time
    that does not scale with cores, used only when a single core count was measured."""

    table: Mapping[int, Mapping[int, float]]
    serial_fraction: float = 0.0
    alpha: float = field(init=False, default=0.0)
    beta: float = field(init=False, default=0.0)
    gamma: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "table", _freeze_table(self.table))
        if not 0.0 <= self.serial_fraction < 1.0:
            raise ValueError(f"serial_fraction must be in [0, 1), got {self.serial_fraction}")
        pts = [(b, c, ms) for c, row in self.table.items() for b, ms in row.items()]
        b, c, y = (np.array(v, dtype=float) for v in zip(*pts))
        if len(self.table) > 1:
            (alpha, beta, gamma), _ = nnls(np.column_stack([b / c, 1 / c, np.ones_like(b)]), y)
        else:
            c0 = next(iter(self.table))
            row = self.table[c0]
            gamma = self.serial_fraction * row[min(row)]
            (alpha, beta), _ = nnls(np.column_stack([b / c, 1 / c]), np.maximum(y - gamma, 0.0))
        for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            object.__setattr__(self, name, float(v))

    @classmethod
    def parametric(cls, alpha: float, beta: float, gamma: float = 0.0, *, cores: Iterable[int] = (1, 2, 4),
                   batches: Iterable[int] = (1, 2, 4, 8)) -> "LatencyModel":
        """A model sampled from ``(alpha*b + beta)/c + gamma`` (tests, synthetic profiles)."""
        return cls({c: {b: (alpha * b + beta) / c + gamma for b in batches} for c in cores})

    def latency_ms(self, batch: int, cores: int) -> float:
        """Milliseconds for one batch of `batch` requests on `cores` cores (module docstring)."""
        if batch < 1 or cores < 1:
            raise ValueError(f"batch ({batch}) and cores ({cores}) must be >= 1")
        row = self.table.get(int(cores))
        if row is not None:
            if batch in row:
                return row[batch]
            bs = list(row)
            if bs[0] < batch < bs[-1]:
                hi = next(k for k, v in enumerate(bs) if v > batch)
                b0, b1 = bs[hi - 1], bs[hi]
                return row[b0] + (row[b1] - row[b0]) * (batch - b0) / (b1 - b0)
        return max((self.alpha * batch + self.beta) / cores + self.gamma, 1e-6)

    def as_dict(self) -> dict[str, Any]:
        return {"table": {str(c): {str(b): ms for b, ms in row.items()} for c, row in self.table.items()},
                "serial_fraction": self.serial_fraction}


# -- variants ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantProfile:
    """One variant of a stage (or of the whole pipeline, ``stage="pipeline"``): its accuracy and
    the latency of a batch of its stage (`LatencyModel`)."""

    name: str
    stage: str  # one of ADAPT_STAGES
    accuracy: float  # expected accuracy in [0, 1] (eval set or accuracy file)
    latency: LatencyModel

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("VariantProfile.name must not be empty")
        if self.stage not in ADAPT_STAGES:
            raise ValueError(f"VariantProfile {self.name}: stage {self.stage!r} is not one of {ADAPT_STAGES}")
        if not (isinstance(self.accuracy, (int, float)) and 0.0 <= self.accuracy <= 1.0):
            raise ValueError(f"VariantProfile {self.name}: accuracy {self.accuracy!r} is not in [0, 1]")
        if not isinstance(self.latency, LatencyModel):
            raise ValueError(f"VariantProfile {self.name}: latency must be a LatencyModel")

    def latency_ms(self, batch: int, cores: int) -> float:
        """Milliseconds for one batch of `batch` requests of this stage on `cores` cores."""
        return self.latency.latency_ms(batch, cores)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stage": self.stage, "accuracy": self.accuracy, **self.latency.as_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VariantProfile":
        """The inverse of `as_dict` (a field missing or wrong raises ValueError naming it)."""
        for key in ("name", "stage", "accuracy", "table"):
            if key not in d:
                raise ValueError(f"variant profile: {key} missing")
        table = {int(c): {int(b): float(ms) for b, ms in row.items()} for c, row in d["table"].items()}
        return cls(str(d["name"]), str(d["stage"]), float(d["accuracy"]),
                   LatencyModel(table, float(d.get("serial_fraction", 0.0))))


def from_prism_profile(profile: Any, stage: str, *, name: str | None = None, accuracy: float | None = None,
                       cores: int = 1, calls_per_request: float = 1.0, serial_fraction: float = 0.0,
                       reduction: str = "full") -> VariantProfile:
    """A variant from what ``prism profile`` wrote (prism/profiling/schema.py ``Profile``).

    The profile measures one core count (the worker's threads, `cores`): a batch of b requests
    takes ``calls_per_request * ms_per_call(b)`` (1 for encode and prefill, where a call serves the
    whole batch; the expected generated tokens for decode, where a call is one step). Accuracy is
    `accuracy` if given, else the profile's accuracy of `reduction` (the full input by default).
    `name` defaults to the model's name and dtype (``"tiny-llava/float32"``)."""
    per_batch = profile.costs.get(stage) if stage != "pipeline" else None
    if not per_batch:
        raise ValueError(f"from_prism_profile: the profile has no {stage!r} costs")
    if accuracy is None:
        entry = profile.accuracy.get(reduction)
        if entry is None:
            raise ValueError(f"from_prism_profile: the profile has no accuracy for {reduction!r}; pass accuracy=")
        accuracy = entry.accuracy
    if not calls_per_request > 0:
        raise ValueError(f"calls_per_request must be > 0, got {calls_per_request}")
    table = {cores: {b: calls_per_request * c.ms_per_call for b, c in per_batch.items()}}
    return VariantProfile(name or f"{profile.model.name}/{profile.model.dtype}", stage, float(accuracy),
                          LatencyModel(table, serial_fraction))


def load_profile(path: str | Path, *, stage: str | None = None, accuracy_path: str | Path | None = None,
                 **kwargs: Any) -> list[VariantProfile]:
    """Variants from a file: a ``prism profile`` file (one variant per stage, or only `stage`;
    `kwargs` as `from_prism_profile`), or a variants file ``{"variants": [VariantProfile.as_dict()...]}``.
    An accuracy file (``{variant name: accuracy}``) at `accuracy_path` overrides accuracies."""
    data = json.loads(Path(path).read_text())
    if "variants" in data:
        out = [VariantProfile.from_dict(v) for v in data["variants"]]
    else:
        from prism.profiling.schema import STAGES, Profile

        prof = Profile.from_dict(data)
        out = [from_prism_profile(prof, s, **kwargs) for s in ((stage,) if stage else STAGES)]
    if accuracy_path is not None:
        acc = json.loads(Path(accuracy_path).read_text())
        out = [VariantProfile(v.name, v.stage, float(acc.get(v.name, v.accuracy)), v.latency) for v in out]
    return out


# -- configurations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageChoice:
    """What serves one stage: `replicas` workers of `variant`, each of `cores` cores taking
    batches of at most `batch`; `share_rps` is the traffic it takes (None: all of the stage's)."""

    variant: str
    batch: int
    replicas: int
    cores: int
    share_rps: float | None = None

    def __post_init__(self) -> None:
        if self.batch < 1 or self.replicas < 0 or self.cores < 1:
            raise ValueError(f"StageChoice {self.variant}: batch and cores must be >= 1, replicas >= 0")

    @property
    def cost_cores(self) -> int:
        return self.replicas * self.cores


@dataclass(frozen=True)
class PipelineConfig:
    """A configuration: per stage the choice serving it (`stages`); where a stage is served by a
    mix of variants (`solve_variants`), `mixes` holds every choice with its share and `stages` the
    one with the largest share. `expected_accuracy` is the pipeline's (product over stages of the
    traffic-weighted accuracy), `cost_cores` the cores of all workers, `latency_ms` the modelled
    end-to-end latency (the worst over a mix's variants); `rate_rps` the rate it was solved for."""

    stages: Mapping[str, StageChoice]
    expected_accuracy: float
    cost_cores: int
    latency_ms: float
    mixes: Mapping[str, tuple[StageChoice, ...]] = field(default_factory=dict)
    rate_rps: float = 0.0
    objective: float = 0.0  # the program's objective (lower is better): cost - weighted accuracy

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", MappingProxyType(dict(self.stages)))
        object.__setattr__(self, "mixes", MappingProxyType({k: tuple(v) for k, v in self.mixes.items()}))

    def workers(self, stage: str) -> tuple[StageChoice, ...]:
        """Every choice serving `stage` (one, or a mix's)."""
        return self.mixes.get(stage) or (self.stages[stage],)


@dataclass(frozen=True)
class Bounds:
    """What a configuration may use. Per-stage maps fall back to their ``"*"`` entry, then to
    the default; `headroom` is the fraction by which capacity must exceed the rate."""

    max_replicas: Mapping[str, int] = field(default_factory=lambda: {"*": 4})
    batches: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: {"*": (1, 2, 4, 8)})
    cores: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: {"*": (1, 2, 4)})
    total_cores: int = 16
    headroom: float = 0.1
    min_accuracy: float = 0.0  # the pipeline's expected accuracy must be at least this
    min_replicas: int = 1  # per chosen (stage, variant)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_replicas", MappingProxyType(dict(self.max_replicas)))
        object.__setattr__(self, "batches", MappingProxyType({k: tuple(sorted(set(v))) for k, v in self.batches.items()}))
        object.__setattr__(self, "cores", MappingProxyType({k: tuple(sorted(set(v))) for k, v in self.cores.items()}))
        for name, m in (("batches", self.batches), ("cores", self.cores)):
            if any(not v or min(v) < 1 for v in m.values()):
                raise ValueError(f"Bounds.{name}: every entry needs integers >= 1")
        if any(v < 0 for v in self.max_replicas.values()):
            raise ValueError("Bounds.max_replicas: must be >= 0")
        if self.total_cores < 0 or self.headroom < 0 or self.min_replicas < 1:
            raise ValueError("Bounds: total_cores and headroom must be >= 0, min_replicas >= 1")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"Bounds.min_accuracy must be in [0, 1], got {self.min_accuracy}")

    @staticmethod
    def _get(m: Mapping[str, Any], stage: str, default: Any) -> Any:
        return m.get(stage, m.get("*", default))

    def replicas_for(self, stage: str) -> int:
        return int(self._get(self.max_replicas, stage, 4))

    def batches_for(self, stage: str) -> tuple[int, ...]:
        return tuple(self._get(self.batches, stage, (1,)))

    def cores_for(self, stage: str) -> tuple[int, ...]:
        return tuple(self._get(self.cores, stage, (1,)))


@dataclass(frozen=True)
class Weights:
    """The operator's trade: the programs minimise ``cost * cores - accuracy * expected accuracy``,
    so `accuracy` is how many cores (times `cost`) one whole unit of accuracy is worth."""

    accuracy: float = 10.0
    cost: float = 1.0

    def __post_init__(self) -> None:
        if self.accuracy < 0 or self.cost < 0 or not math.isfinite(self.accuracy + self.cost):
            raise ValueError("Weights: accuracy and cost must be finite and >= 0")


# -- request latency at a stage ------------------------------------------------------------------


def batch_wait_ms(batch: int, rate_rps: float) -> float:
    """The wait to form a batch of `batch` at `rate_rps` arrivals/s: ``(batch - 1) / rate`` (a
    batch fills at the rate it gets). 0 for a batch of 1, and 0 when nothing arrives: a batch
    size is a bound, a worker serves what is queued and never waits for a batch to fill, so at
    rate 0 no wait is owed (no request is there to wait)."""
    if batch <= 1 or rate_rps <= 0:
        return 0.0
    return 1000.0 * (batch - 1) / rate_rps


def stage_latency_ms(model: Latency, batch: int, cores: int, rate_rps: float) -> float:
    """A request's modelled latency at a stage: the batch's service time plus the batch-forming wait."""
    return model.latency_ms(batch, cores) + batch_wait_ms(batch, rate_rps)


# -- dynamic SLOs (Sponge) ---------------------------------------------------------------------------


def remaining_budget_ms(sent_unix_ms: float | None, deadline_ms: float | None, now_unix_ms: float) -> float:
    """What is left of a request's latency budget: its `deadline_ms` (relative to when its client
    sent it, `sent_unix_ms`) less the time since (network and queueing included). Without a send
    time the whole budget is left; without a deadline, infinity. Negative: already late."""
    if deadline_ms is None:
        return math.inf
    if not sent_unix_ms:
        return float(deadline_ms)
    return float(deadline_ms) - (now_unix_ms - float(sent_unix_ms))


def budget_order_key(remaining_ms: float, priority: int = 0, seq: int = 0) -> tuple[int, float, int]:
    """Sort key of a stage queue under dynamic SLOs: higher priority first, then the least
    remaining budget (no deadline: infinity, last), then arrival (`seq`)."""
    return (-priority, remaining_ms, seq)


def batch_for_budget(model: Latency, cores: int, remaining_ms: Iterable[float], batches: Iterable[int],
                     *, queued: int | None = None) -> int:
    """The largest allowed batch whose service time fits the tightest remaining budget.

    The batch takes the most urgent queued requests (`remaining_ms`, any order), so the tightest
    is their minimum. Budgets that even the smallest batch cannot meet are ignored (those requests
    are late whatever the batch); when no budget is attainable the largest batch is taken (clear
    the backlog). `queued` (default: the number of budgets) caps the batch at what is waiting."""
    sizes = sorted(set(int(b) for b in batches))
    if not sizes or sizes[0] < 1:
        raise ValueError("batch_for_budget: batches must be integers >= 1")
    budgets = list(remaining_ms)
    cap = len(budgets) if queued is None else queued
    usable = [b for b in sizes if b <= max(cap, 1)] or sizes[:1]
    floor_ms = model.latency_ms(usable[0], cores)
    attainable = [r for r in budgets if r >= floor_ms]
    if not attainable:
        return usable[-1]
    tightest = min(attainable)
    return max(b for b in usable if b == usable[0] or model.latency_ms(b, cores) <= tightest)
