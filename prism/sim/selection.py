"""Modality selection (MOSEL) in the simulator: the live selector's decisions on simulated requests.

`SimSelector` is `services/scheduler/selector.py` without gRPC: every request being served is a
`core.selection_jobs.Served` built from the simulated request's state, and the jobs, serving
order, arrival job and periodic check are the shared functions of `core.selection_jobs`; an
arrival with a deadline is decided by `core.selection.admit_with_selection` (the queue's
reassignable requests may change), one without a deadline by admission alone (then the
request's own reductions, most accurate first), exactly as the live `Selector.admit`. A
reassignment takes back the request's encode tasks only while no worker took them (else the
race is lost and the request keeps its inputs); its next attempt serves the new inputs.

Reductions are computed from the request's image count and the profile's tokens per image
instead of a processor (`reductions`, the image part of `prism.models.reduce.candidates`: scales
0.75/0.5/0.25 with tokens in proportion to the area, dropping the last k images, dropping every
image; full first, then strictly fewer media tokens). Accuracies per reduction id come from a
`prism profile` file (`prism.profiling.schema.Profile`) or a plain ``{reduction_id: accuracy}``
file (`load_selection_profile`). Pure: no gRPC, Redis or torch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prism.profiling.schema import AccuracyEntry, ModelInfo, Profile, ProfileError, check_reduction_id
from prism.profiling.schema import load as load_profile
from services.scheduler.core.selection import FULL, Flow, Strategy, admit_with_selection
from services.scheduler.core.selection_jobs import (
    LoadPrice,
    Served,
    arrival_price,
    job_of,
    new_job,
    offered,
    serving_order,
    tick_changes,
)

__all__ = ["DOWNSCALE_IMAGES", "DROP_IMAGES", "DROP_MODALITY", "IMAGE_SCALES", "Inputs", "SelectionConfig",
           "SelectionStats", "SimReduce", "SimSelector", "load_selection_profile", "profile_from_accuracy",
           "reductions"]

#: Reduction kinds (equal to `prism.models.reduce`'s, which imports torch; a unit test checks).
DROP_MODALITY, DROP_IMAGES, DOWNSCALE_IMAGES = "drop_modality", "drop_images", "downscale_images"
IMAGE_SCALES = (0.75, 0.5, 0.25)


@dataclass(frozen=True)
class SimReduce:
    """What a simulated request allows (`prism_pb2.Selection`, the SDK's `Reduce`; images only)."""

    drop_images: bool = False
    """Drop some of several images, keeping at least max(1, min_images)."""
    min_images: int = 0
    downscale_images: bool = False
    min_scale: float = 0.25
    drop_all_images: bool = False
    """``"image"`` in drop_modalities: every image dropped (only with min_images 0)."""

    def __post_init__(self) -> None:
        if self.min_images < 0:
            raise ValueError(f"min_images: {self.min_images} is negative")
        if not (math.isfinite(self.min_scale) and 0 < self.min_scale <= 1):
            raise ValueError(f"min_scale: {self.min_scale} is outside (0, 1]")

    @property
    def allows_any(self) -> bool:
        return self.drop_images or self.downscale_images or self.drop_all_images


@dataclass(frozen=True)
class Inputs:
    """A request's images as served under one reduction."""

    reduction: str
    images: int
    tokens_per_image: int
    prompt_tokens_per_image: int

    @property
    def media_tokens(self) -> int:
        return self.images * self.tokens_per_image


def reductions(kinds: frozenset[str], num_images: int, allowed: SimReduce | None, tokens_per_image: int,
               prompt_tokens_per_image: int) -> list[Inputs]:
    """The reductions a family offering `kinds` has for a request of `num_images` images that
    `allowed` permits: full first, then strictly decreasing media tokens (module docstring)."""
    full = Inputs(FULL, num_images, tokens_per_image, prompt_tokens_per_image)
    if allowed is None or not allowed.allows_any or not num_images:
        return [full]
    options: list[Inputs] = []
    if DOWNSCALE_IMAGES in kinds and allowed.downscale_images:
        for s in IMAGE_SCALES:
            if s >= allowed.min_scale:
                t = round(tokens_per_image * s * s)
                p = round(prompt_tokens_per_image * t / tokens_per_image) if tokens_per_image else prompt_tokens_per_image
                options.append(Inputs(f"image_scale:{s:g}", num_images, t, p))
    if DROP_IMAGES in kinds and allowed.drop_images:
        keep = max(1, allowed.min_images)
        options += [Inputs(f"drop_images:{k}", num_images - k, tokens_per_image, prompt_tokens_per_image)
                    for k in range(1, num_images - keep + 1)]
    if DROP_MODALITY in kinds and allowed.drop_all_images and allowed.min_images == 0:
        options.append(Inputs("drop:image", 0, tokens_per_image, prompt_tokens_per_image))
    out, last = [full], full.media_tokens
    for o in sorted((o for o in options if not o.images or o.tokens_per_image >= 1), key=lambda o: -o.media_tokens):
        if o.media_tokens < last:
            out.append(o)
            last = o.media_tokens
    return out


def profile_from_accuracy(accuracy: dict[str, float], *, name: str = "simulated") -> Profile:
    """A selection profile holding only accuracies per reduction id (the simulator takes stage
    costs from its own profile)."""
    entries = {check_reduction_id(rid, f"accuracy.{rid}"): AccuracyEntry(float(a)) for rid, a in accuracy.items()}
    return Profile(ModelInfo(name, "simulated", "-", "-"), {}, entries)


def load_selection_profile(path: str | Path) -> Profile:
    """A `prism profile` file, or a JSON ``{reduction_id: accuracy}`` (e.g. published results);
    ProfileError names the field at fault."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError("selection_profile", f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "version" in data:
        return load_profile(path)
    if not isinstance(data, dict) or not data:
        raise ProfileError("selection_profile", "expected a prism profile or {reduction_id: accuracy}")
    flat = {k: (v["accuracy"] if isinstance(v, dict) and "accuracy" in v else v) for k, v in data.items()
            if not k.startswith("_")}  # "_source" and the like: notes
    return profile_from_accuracy(flat, name=Path(path).stem)


@dataclass(frozen=True)
class SelectionConfig:
    """The simulated scheduler's selection (``--selection-profile`` and its options)."""

    profile: Profile
    """Accuracy per reduction id; with none, no request's inputs change."""
    kinds: frozenset[str] = frozenset({DROP_IMAGES, DROP_MODALITY})
    """Reductions the simulated model's family offers (LLaVA: drop images; Qwen-VL: downscale too)."""
    every_s: float = 0.25
    """The periodic check (live ``Selector.every_s``)."""
    overlap: bool = True
    """The program's model: stages overlapping (``--selection-overlap``); off: in series."""
    parallelism: float = 0.0
    """Cores or devices the stages share (``--selection-parallelism``; 0: each stage its own)."""
    time_limit_s: float | None = None
    """The solver's time limit (live: 0.01 s); None: solved to optimality, deterministic."""
    max_changes: int = 3
    """Reassignments per request at most (live ``MAX_CHANGES``)."""
    price: float = 1.0
    """The price of work under overload (``--selection-price``; 0: reduce only to meet deadlines)."""
    price_window_s: float = 10.0
    """Seconds of arrivals the offered load is measured over (``--selection-price-window-s``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", frozenset(self.kinds))
        if self.kinds - {DROP_IMAGES, DROP_MODALITY, DOWNSCALE_IMAGES}:
            raise ValueError(f"kinds: {sorted(self.kinds)} holds unknown reduction kinds")
        if self.every_s <= 0 or self.max_changes < 0:
            raise ValueError("every_s must be > 0 and max_changes >= 0")
        if not (self.parallelism == 0 or self.parallelism >= 1):
            raise ValueError(f"parallelism: must be 0 or >= 1, got {self.parallelism}")
        if self.time_limit_s is not None and not self.time_limit_s > 0:
            raise ValueError("time_limit_s must be > 0 or None")
        if not self.price >= 0 or not self.price_window_s > 0:
            raise ValueError("price must be >= 0 and price_window_s > 0")

    @property
    def enabled(self) -> bool:
        return bool(self.profile.accuracy)

    def flow(self) -> Flow | None:
        return Flow(parallelism=self.parallelism or math.inf) if self.overlap else None

    def full_accuracy(self) -> float | None:
        entry = self.profile.accuracy.get(FULL)
        return entry.accuracy if entry is not None else None


@dataclass
class SelectionStats:
    decisions: int = 0
    fitted: int = 0
    refused: int = 0
    reassigned: int = 0
    lost_races: int = 0
    log: list[tuple] = field(default_factory=list)
    """(request id, time, admit_with_selection's Admit) per program decision on an arrival."""


@dataclass(frozen=True)
class Choice:
    """What an accepted arrival is served with."""

    inputs: Inputs
    strategy: str
    accuracy: float | None
    options: dict[str, tuple[Strategy, Inputs]] | None


class Refused(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class SimSelector:
    """The live `Selector` on a simulated scheduler (`sim`: the `Simulator`, for its clock,
    admission, load book, routable instances, costs and task queues)."""

    def __init__(self, config: SelectionConfig, sim: Any):
        self.config, self.sim = config, sim
        self.flow = config.flow()
        self.load_price = LoadPrice(config.price, config.price_window_s) if config.price else None
        self.served: dict[str, Any] = {}  # request id -> the simulator's request state, accepted and not finished
        self.stats = SelectionStats()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def wants(self, r: Any) -> bool:
        return self.enabled and r.reduce is not None and r.reduce.allows_any and r.num_images > 0

    # ---- a request's options -----------------------------------------------------------
    def full_inputs(self, r: Any) -> Inputs:
        p = self.sim.profile
        return Inputs(FULL, r.num_images, p.tokens_per_image, p.prompt_tokens_per_image)

    def options(self, r: Any) -> dict[str, tuple[Strategy, Inputs]] | None:
        """Its strategies and their inputs (live `Selector._options`), or None when it allows nothing."""
        if not self.wants(r):
            return None
        p = self.sim.profile
        cands = reductions(self.config.kinds, r.num_images, r.reduce, p.tokens_per_image, p.prompt_tokens_per_image)
        by_id = {c.reduction: c for c in cands}
        costs = [{"reduction": c.reduction, "media_tokens": c.media_tokens,
                  "prompt_tokens": r.text_tokens + c.images * c.prompt_tokens_per_image} for c in cands]
        full = costs[0]
        strategies = offered(self.config.profile.strategies_for(costs, decode_tokens=r.max_new_tokens),
                             r.accuracy_floor, media_tokens=full["media_tokens"],
                             prompt_tokens=full["prompt_tokens"], decode_tokens=r.max_new_tokens)
        return {sid: (s, by_id[sid]) for sid, s in strategies.items()}

    # ---- the program's view ------------------------------------------------------------
    def capacity(self) -> dict[str, float]:
        cap: dict[str, float] = {}
        for inst in self.sim.routable:
            if not inst.draining:
                for stage in inst.stages:
                    cap[stage] = cap.get(stage, 0.0) + inst.capacity[stage]
        return cap

    def reassignable(self, st: Any) -> bool:
        return (st.options is not None and not st.encode_started and st.first_s is None
                and st.reassigned is None and st.reassignments < self.config.max_changes)

    @staticmethod
    def begun(st: Any) -> bool:
        return st.encode_started or st.encode_done or st.first_s is not None

    def state(self, st: Any) -> Served:
        return Served(st.req.request_id, st.cost.deadline, st.req.priority, st.req.accuracy_floor,
                      st.req.max_new_tokens, media_tokens=st.inputs.media_tokens,
                      prompt_tokens=st.cost.prompt_tokens, current=st.strategy,
                      options=None if st.options is None else {sid: s for sid, (s, _) in st.options.items()},
                      reassignable=self.reassignable(st), begun=self.begun(st),
                      encoded=not st.inputs.images or st.encode_done, prefilled=st.first_s is not None,
                      generated=self.sim.generated(st), encoding=st.encode_started,
                      prefilling=st.prefill_started)

    def jobs(self) -> list:
        return [job_of(self.state(st), seq) for seq, st in enumerate(self.served.values())]

    def order(self, jobs: list) -> list[str]:
        return serving_order(jobs, {rid for rid, st in self.served.items() if self.begun(st)}, self.flow)

    # ---- arrivals ----------------------------------------------------------------------
    def admit(self, r: Any, now: float) -> Choice:
        """An arrival's inputs (live `Selector.admit`), or `Refused` before any work."""
        opts = self.options(r)
        if r.deadline_s is None:
            return self._plainly(r, opts, now)
        capacity = self.capacity()
        if not capacity:
            return self._plainly(r, opts, now)
        full = self.full_inputs(r)
        jobs = self.jobs()
        new = new_job(r.request_id, None if opts is None else {sid: s for sid, (s, _) in opts.items()},
                      self.sim.deadline_of(r), r.accuracy_floor, r.priority, len(self.served),
                      media_tokens=full.media_tokens, prompt_tokens=r.text_tokens + full.images * full.prompt_tokens_per_image,
                      max_new_tokens=r.max_new_tokens)
        decision = admit_with_selection(jobs, new, now, capacity, order=self.order([*jobs, new]),
                                        time_limit_s=self.config.time_limit_s, flow=self.flow,
                                        price=arrival_price(self.load_price, now, new, capacity))
        self.stats.decisions += 1
        self.stats.log.append((r.request_id, now, decision))
        if not decision.ok:
            self.stats.refused += 1
            raise Refused(decision.code, f"slo.deadline_ms: {decision.message} (selection.accuracy_floor "
                                         f"{r.accuracy_floor:g})")
        choice = self._choice(r, opts, decision.strategy)
        d = self.sim.admission.admit(self.sim.cost_of(r, choice.inputs, deadline=False), now, self.sim.book,
                                     self.sim.routable)
        if not d.ok:
            if d.code != "RESOURCE_EXHAUSTED":
                raise Refused(d.code, d.message)
            return self._own_reductions(r, opts, now, d.message)
        self.apply({rid: decision.assignment.choice[rid] for rid in decision.changed})
        if decision.strategy != FULL or decision.changed:
            self.stats.fitted += 1
        return choice

    def _choice(self, r: Any, opts: dict | None, sid: str) -> Choice:
        if opts is None:
            return Choice(self.full_inputs(r), FULL, self.config.full_accuracy() if self.enabled else None, None)
        strategy, inputs = opts[sid]
        return Choice(inputs, sid, strategy.accuracy, opts)

    def _plainly(self, r: Any, opts: dict | None, now: float) -> Choice:
        choice = self._choice(r, opts, FULL)
        d = self.sim.admission.admit(self.sim.cost_of(r, choice.inputs), now, self.sim.book, self.sim.routable)
        if d.ok:
            return choice
        if d.code != "RESOURCE_EXHAUSTED":
            raise Refused(d.code, d.message)
        return self._own_reductions(r, opts, now, d.message)

    def _own_reductions(self, r: Any, opts: dict | None, now: float, message: str) -> Choice:
        ranked = [] if opts is None else sorted(
            (s for sid, (s, _) in opts.items() if sid != FULL),
            key=lambda s: (-s.accuracy, s.encode_tokens + s.prefill_tokens, s.id))
        for s in ranked:
            choice = self._choice(r, opts, s.id)
            if self.sim.admission.admit(self.sim.cost_of(r, choice.inputs), now, self.sim.book,
                                        self.sim.routable).ok:
                self.stats.fitted += 1
                return choice
        self.stats.refused += 1
        if opts is None:
            raise Refused("RESOURCE_EXHAUSTED", message)
        raise Refused("RESOURCE_EXHAUSTED", f"{message}; no input reduction allowed by selection with a profiled "
                                            f"accuracy >= selection.accuracy_floor {r.accuracy_floor:g} meets it "
                                            f"either ({len(ranked)} candidates tried)")

    def accepted(self, st: Any) -> None:
        self.served[st.req.request_id] = st

    def finished(self, request_id: str) -> None:
        self.served.pop(request_id, None)

    # ---- queued requests ---------------------------------------------------------------
    def apply(self, changes: dict[str, str]) -> int:
        """Serve each queued request with its new strategy (live `Selector._apply`)."""
        applied = 0
        for rid, sid in changes.items():
            st = self.served.get(rid)
            if st is None or st.options is None or sid not in st.options or not self.reassignable(st):
                continue
            st.reassigned = sid
            encodes = list(st.encode_tasks)
            taken = sum(1 for t in encodes if self.sim.take_back(t))
            if encodes and not taken:  # a worker began: it keeps its inputs
                st.reassigned = None
                st.encode_started = True
                self.stats.lost_races += 1
                continue
            applied += 1
            if taken:  # the attempt ends when the cancellation reaches the scheduler; the next serves `sid`
                self.sim.later(lambda st=st: self.sim.reattempt(st))
        self.stats.reassigned += applied
        return applied

    def tick(self) -> int:
        """The periodic check (live `Selector.tick`)."""
        if not any(self.reassignable(st) for st in self.served.values()):
            return 0
        capacity = self.capacity()
        if not capacity:
            return 0
        jobs = self.jobs()
        now = self.sim.clock.now
        changes = tick_changes(jobs, now, capacity, order=self.order(jobs), time_limit_s=self.config.time_limit_s,
                               flow=self.flow, price=self.load_price.price(now) if self.load_price else 0.0)
        self.stats.decisions += 1
        return self.apply(changes)
