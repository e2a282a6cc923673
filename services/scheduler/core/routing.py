"""Routing: which worker instance runs a stage task (after ModServe, arXiv 2502.00937).

* `route` sends a stage task to the least-loaded instance hosting the stage, by the pending
  tokens the scheduler itself assigned (`LoadBook`), preferring instances with a free decode
  slot for decode.
* `split_images` spreads the media items of ONE request over the encoder instances (greedy
  longest-processing-time first), so that a request's images are encoded in parallel.

Both are O(instances) (plus O(items log items) for the split); neither looks at the queued
requests. The caller passes the instances it believes live (registry heartbeats) and may name
more to avoid in ``exclude`` (e.g. one that just failed this request).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from services.scheduler.core.load import STAGES, LoadBook

__all__ = ["Instance", "NoInstance", "candidates", "route", "split_images"]


class NoInstance(LookupError):
    """No live, non-draining instance can serve `stage`."""

    def __init__(self, stage: str, detail: str = "") -> None:
        self.stage = stage
        msg = f"no live, non-draining instance serves stage {stage!r}"
        super().__init__(f"{msg}: {detail}" if detail else msg)


@dataclass(frozen=True)
class Instance:
    """A registered worker instance.

    `capacity` maps each hosted stage to its profiled throughput in tokens per second (image
    or audio tokens for encode, prompt tokens for prefill, generated tokens of the whole
    decode batch with every slot busy for decode). An instance hosting several stages is
    *colocated*: stages run in one process and hand data over in memory.
    """

    name: str
    address: str
    stages: frozenset[str]
    capacity: Mapping[str, float] = field(hash=False)
    decode_slots: int = 0
    draining: bool = False
    #: The model variant it serves (empty: the deployment names no variants); a request's
    #: stages all run on instances of its variant.
    variant: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("Instance.name must be non-empty")
        stages = frozenset(self.stages)
        unknown = stages.difference(STAGES)
        if not stages or unknown:
            raise ValueError(f"Instance {self.name}: stages must be a non-empty subset of {STAGES}, "
                             f"got {sorted(stages)}")
        capacity = MappingProxyType({str(k): float(v) for k, v in self.capacity.items()})
        for stage in stages:
            if not capacity.get(stage, 0.0) > 0.0:
                raise ValueError(f"Instance {self.name}: capacity[{stage!r}] must be > 0 tokens/s")
        if self.decode_slots < 0 or ("decode" in stages and self.decode_slots < 1):
            raise ValueError(f"Instance {self.name}: a decode instance needs decode_slots >= 1")
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "capacity", capacity)

    def cap(self, stage: str) -> float:
        """Tokens per second for `stage` (0.0 when not hosted)."""
        return self.capacity.get(stage, 0.0)

    def hosts(self, stages: Iterable[str]) -> bool:
        """True when this instance hosts every stage in `stages`."""
        return self.stages.issuperset(stages)

    def per_token_s(self) -> float:
        """Seconds per generated token of one decode request in a full batch (the most it takes)."""
        return self.decode_slots / self.capacity["decode"]


def candidates(stage: str, instances: Iterable[Instance], exclude: Collection[str] = ()) -> list[Instance]:
    """The non-draining instances hosting `stage` and not named in `exclude`."""
    return [i for i in instances if stage in i.stages and not i.draining and i.name not in exclude]


def route(
    stage: str, instances: Iterable[Instance], book: LoadBook, *, exclude: Collection[str] = ()
) -> Instance:
    """Chooses the instance for a `stage` task.

    Among the non-draining instances hosting `stage` (and not in `exclude`): the one with the
    least pending tokens of that stage; ties go to the most capacity, then the smallest name.
    For decode, instances with a free slot come first; when none has one, the least pending.

    Raises:
        NoInstance: no instance can serve the stage.
    """
    best: Instance | None = None
    best_key: tuple | None = None
    decode = stage == "decode"
    for inst in instances:
        if inst.draining or stage not in inst.stages or inst.name in exclude:
            continue
        name = inst.name
        # Full decode instances rank after every instance with a free slot.
        full = decode and book.slots_used(name) >= inst.decode_slots
        key = (full, book.pending(stage, name), -inst.capacity[stage], name)
        if best_key is None or key < best_key:
            best, best_key = inst, key
    if best is None:
        raise NoInstance(stage)
    return best


def split_images(
    costs: Sequence[int],
    instances: Iterable[Instance],
    book: LoadBook,
    *,
    exclude: Collection[str] = (),
) -> list[Instance]:
    """Assigns each media item of one request to an encoder instance; returns one per item.

    Greedy longest-processing-time: items in decreasing cost, each to the encoder that would
    finish it soonest, i.e. the least (pending + already assigned + item) / capacity (least
    pending + assigned tokens when capacities are equal). Ties: most capacity, then name.
    Two equal images on two idle encoders go one to each.

    Raises:
        NoInstance: some item needs encoding and no encoder can serve.
    """
    if not costs:
        return []
    encoders = candidates("encode", instances, exclude)
    if not encoders:
        raise NoInstance("encode")
    if len(encoders) == 1:
        return [encoders[0]] * len(costs)
    load = [float(book.pending("encode", e.name)) for e in encoders]
    caps = [e.capacity["encode"] for e in encoders]
    names = [e.name for e in encoders]
    order = sorted(range(len(costs)), key=lambda k: (-costs[k], k))
    out: list[Instance | None] = [None] * len(costs)
    span = range(len(encoders))
    for k in order:
        cost = costs[k]
        j = min(span, key=lambda j: ((load[j] + cost) / caps[j], -caps[j], names[j]))
        load[j] += cost
        out[k] = encoders[j]
    return out  # type: ignore[return-value]
