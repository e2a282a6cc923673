"""Placement: run a request colocated on one instance, or split over dedicated instances.

* **colocated** -- every stage the request needs runs on one instance that hosts them all;
  embeddings and KV are handed over in memory.
* **split** -- each stage is routed on its own (`route`, and `split_images` for the media
  items), stages talk over gRPC streams.

`Placement(mode="adaptive")` (ModServe-style) takes the colocated path while the best
colocated instance is lightly used -- utilisation, its pending work time (sum over its stages
of pending tokens / capacity) over `horizon_s`, below `colocate_below` --, its estimated TTFT
is no worse than the split path's (plus `split_overhead_s` for the transfers), and, when it is
decoding other requests, this request's encode and prompt pass would not stall their decode
steps longer than `stall_budget_s` (one device serves all its stages); otherwise it splits,
which spreads bursts over the dedicated instances. ``mode="split"`` and
``mode="colocated"`` force their path when possible and fall back, saying why, when not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from services.scheduler.core.cost import Estimate, RequestCost, estimate_path
from services.scheduler.core.load import LoadBook
from services.scheduler.core.routing import Instance, NoInstance, route, split_images

__all__ = ["MODES", "Placement", "PlacementChoice"]

MODES = ("split", "colocated", "adaptive")


@dataclass(frozen=True)
class PlacementChoice:
    """Where one request runs.

    `instances` maps each stage the request needs to its instances: one per media item for
    encode (items may share an encoder), exactly one for prefill and decode.
    """

    path: str
    """``"colocated"`` or ``"split"``."""
    instances: Mapping[str, tuple[Instance, ...]]
    reason: str
    """Why this path, for logs and the ``placement`` attribute of work items."""
    estimate: Estimate
    """The estimate on the chosen path."""

    @property
    def encode(self) -> tuple[Instance, ...]:
        """Encoder per media item (empty without media)."""
        return self.instances.get("encode", ())

    @property
    def prefill(self) -> Instance:
        """The prefill instance."""
        return self.instances["prefill"][0]

    @property
    def decode(self) -> Instance:
        """The decode instance."""
        return self.instances["decode"][0]

    def names(self) -> dict[str, tuple[str, ...]]:
        """{stage: instance names}, e.g. for logs and tests."""
        return {stage: tuple(i.name for i in insts) for stage, insts in self.instances.items()}


class Placement:
    """Per-request choice between the colocated and split paths (see the module docstring)."""

    def __init__(
        self,
        mode: str = "adaptive",
        colocate_below: float = 0.5,
        *,
        horizon_s: float = 1.0,
        split_overhead_s: float = 0.0,
        stall_budget_s: float | None = 0.1,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if colocate_below < 0:
            raise ValueError("colocate_below must be >= 0")
        if horizon_s <= 0:
            raise ValueError("horizon_s must be > 0")
        if split_overhead_s < 0:
            raise ValueError("split_overhead_s must be >= 0")
        if stall_budget_s is not None and stall_budget_s < 0:
            raise ValueError("stall_budget_s must be >= 0 (None: no limit)")
        self.mode = mode
        self.colocate_below = colocate_below
        self.horizon_s = horizon_s
        self.split_overhead_s = split_overhead_s
        self.stall_budget_s = stall_budget_s

    def stall_s(self, req: RequestCost, inst: Instance) -> float:
        """How long this request's encode and prompt pass would hold `inst`'s compute, stalling
        the decode steps of the requests it is decoding (a colocated worker shares one device)."""
        work = req.prompt_tokens / inst.cap("prefill")
        if req.image_tokens and "encode" in inst.stages:
            work += req.image_tokens / inst.cap("encode")
        return work

    def utilisation(self, inst: Instance, book: LoadBook) -> float:
        """Pending work time on `inst` (sum over its stages of pending / capacity) / horizon_s."""
        name = inst.name
        work_s = sum(book.pending(s, name) / c for s, c in inst.capacity.items() if s in inst.stages)
        return work_s / self.horizon_s

    def decide(
        self,
        req: RequestCost,
        instances: Sequence[Instance],
        book: LoadBook,
        *,
        exclude: Collection[str] = (),
    ) -> PlacementChoice:
        """Chooses the path and the instances for `req`.

        Raises:
            NoInstance: some stage the request needs has no instance at all.
        """
        stages = req.stages
        coloc = self._colocated_candidate(stages, instances, book, exclude)
        if self.mode == "colocated":
            if coloc is not None:
                return self._colocated(req, coloc, book, "mode=colocated")
            split = self._split(req, instances, book, exclude)
            return self._relabel(
                split, f"mode=colocated but no instance hosts all of {'+'.join(stages)}; split")

        split = self._split(req, instances, book, exclude)
        if self.mode == "split":
            one = _single_instance(split)
            if one is None:
                return self._relabel(split, "mode=split")
            return self._force_split(req, instances, book, exclude, one, split)

        # adaptive
        one = _single_instance(split)
        if one is not None:
            return PlacementChoice("colocated", split.instances,
                                   f"split routing chose {one.name} for every stage", split.estimate)
        if coloc is None:
            return self._relabel(split, f"no instance hosts all of {'+'.join(stages)}")
        util = self.utilisation(coloc, book)
        if util >= self.colocate_below:
            return self._relabel(split, f"{coloc.name} utilisation {util:.2f} >= {self.colocate_below:g}")
        decoding = book.slots_used(coloc.name)
        if decoding and self.stall_budget_s is not None:
            stall = self.stall_s(req, coloc)
            if stall > self.stall_budget_s:
                return self._relabel(split, f"{coloc.name} decodes {decoding} requests; this prompt pass "
                                            f"would stall them {stall * 1e3:.0f} ms > {self.stall_budget_s * 1e3:.0f} ms")
        col = self._colocated(req, coloc, book, "")
        split_ttft = split.estimate.ttft_s + self.split_overhead_s
        if col.estimate.ttft_s <= split_ttft * (1 + 1e-9):
            return PlacementChoice(
                "colocated", col.instances,
                f"{coloc.name} utilisation {util:.2f} < {self.colocate_below:g}, "
                f"TTFT {col.estimate.ttft_ms:.1f} ms <= split {split_ttft * 1e3:.1f} ms",
                col.estimate)
        return self._relabel(split, f"split TTFT {split_ttft * 1e3:.1f} ms < colocated "
                                    f"{col.estimate.ttft_ms:.1f} ms on {coloc.name}")

    # -- internals -----------------------------------------------------------------------

    def _colocated_candidate(
        self, stages: Sequence[str], instances: Sequence[Instance], book: LoadBook, exclude: Collection[str]
    ) -> Instance | None:
        """The least-utilised instance hosting every stage; one with a free decode slot first."""
        best: Instance | None = None
        best_key: tuple | None = None
        for inst in instances:
            if inst.draining or inst.name in exclude or not inst.stages.issuperset(stages):
                continue
            full = book.slots_used(inst.name) >= inst.decode_slots
            key = (full, self.utilisation(inst, book), inst.name)
            if best_key is None or key < best_key:
                best, best_key = inst, key
        return best

    def _colocated(self, req: RequestCost, inst: Instance, book: LoadBook, reason: str) -> PlacementChoice:
        encoders = (inst,) * len(req.media_costs)
        insts: dict[str, tuple[Instance, ...]] = {"prefill": (inst,), "decode": (inst,)}
        if encoders:
            insts = {"encode": encoders, **insts}
        return PlacementChoice("colocated", insts, reason, estimate_path(req, encoders, inst, inst, book))

    def _split(
        self, req: RequestCost, instances: Sequence[Instance], book: LoadBook, exclude: Collection[str],
        *, avoid: Collection[str] = (),
    ) -> PlacementChoice:
        costs = req.media_costs
        encoders = tuple(split_images(costs, instances, book, exclude=exclude)) if costs else ()
        ex = set(exclude).union(avoid) if avoid else exclude
        prefill = route("prefill", instances, book, exclude=ex)
        decode = route("decode", instances, book, exclude=exclude)
        insts: dict[str, tuple[Instance, ...]] = {"prefill": (prefill,), "decode": (decode,)}
        if encoders:
            insts = {"encode": encoders, **insts}
        return PlacementChoice("split", insts, "", estimate_path(req, encoders, prefill, decode, book))

    def _force_split(
        self, req: RequestCost, instances: Sequence[Instance], book: LoadBook, exclude: Collection[str],
        one: Instance, split: PlacementChoice,
    ) -> PlacementChoice:
        """mode=split landed every stage on `one`: move prefill elsewhere if any other can."""
        try:
            other = self._split(req, instances, book, exclude, avoid=(one.name,))
        except NoInstance:
            return PlacementChoice("colocated", split.instances,
                                   f"mode=split but only {one.name} can serve; colocated", split.estimate)
        return self._relabel(other, "mode=split")

    @staticmethod
    def _relabel(choice: PlacementChoice, reason: str) -> PlacementChoice:
        return PlacementChoice("split", choice.instances, reason, choice.estimate)


def _single_instance(choice: PlacementChoice) -> Instance | None:
    """The instance when every stage of `choice` landed on the same one, else None."""
    first = choice.prefill
    for insts in choice.instances.values():
        for inst in insts:
            if inst is not first and inst.name != first.name:
                return None
    return first
