"""Deadline-driven input reduction at admission (MOSEL-style modality selection).

When admission refuses a request because it would miss its deadline (or TTFT target), and its
caller allowed reductions, the selector tries the request's candidate reductions
(`prism.models.reduce`: the family's concrete options, measured exactly through its processor)
whose profiled accuracy (`prism profile`) is at or above the caller's floor, most accurate
first (then cheapest), and serves the first one admission accepts under the current load. When
none fits, the request is refused before any work is spent on it. A request that allows nothing
is never changed. Reassigning the strategies of other queued requests is not done here yet.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
from typing import Any

import grpc

from prism.v1 import common_pb2, prism_pb2
from services.scheduler.intake import Admitted
from services.scheduler.pipeline import Pipeline, StageError

MODALITY = {"image": common_pb2.MODALITY_IMAGE, "audio": common_pb2.MODALITY_AUDIO}


class Selector:
    def __init__(self, profile: Any, pipeline: Pipeline, executor: concurrent.futures.Executor):
        self.profile = profile
        self.pipeline = pipeline
        self.executor = executor

    def wants(self, adm: Admitted) -> bool:
        return (self.profile is not None and bool(self.profile.accuracy) and adm.allowed is not None
                and adm.allowed.allows_any and bool(adm.media))

    def options(self, adm: Admitted) -> list[tuple[Any, Any]]:
        """(strategy, prepared reduced request) pairs above the floor, most accurate first, then
        cheapest. Each candidate is prepared once: its exact token costs come from that."""
        from prism.models.reduce import candidates, prepare_reduced, prompt_cost

        adapter, processor = adm.model.adapter, adm.model.processor
        prepared = {}
        for r in candidates(adapter, processor, list(adm.media), adm.allowed):
            if not r.is_full:  # the full request was just refused
                prepared[r.id] = prepare_reduced(adapter, processor, adm.source, list(adm.media), r,
                                                 add_generation_prompt=adm.add_generation_prompt)
        costs = [prompt_cost(p.prompt, p.reduction) for p in prepared.values()]
        strategies = self.profile.strategies_for(costs, decode_tokens=adm.max_new_tokens)
        ok = [s for s in strategies if s.accuracy >= adm.accuracy_floor]
        ok.sort(key=lambda s: (-s.accuracy, s.encode_tokens + s.prefill_tokens, s.id))
        return [(s, prepared[s.id]) for s in ok]

    @staticmethod
    def reduced(adm: Admitted, reduction: Any, accuracy: float) -> Admitted:
        """The request with `reduction` applied, prepared exactly as an unreduced one."""
        from prism.models.reduce import prepare_reduced

        done = prepare_reduced(adm.model.adapter, adm.model.processor, adm.source, list(adm.media), reduction,
                               add_generation_prompt=adm.add_generation_prompt)
        return dataclasses.replace(adm, prompt=done.prompt, reduction=reduction, expected_accuracy=accuracy)

    async def select(self, adm: Admitted, refusal: StageError) -> Admitted:
        """A reduced request that admission accepts, or StageError(RESOURCE_EXHAUSTED)."""
        options = await asyncio.get_running_loop().run_in_executor(self.executor, self.options, adm)
        for strategy, done in options:
            candidate = dataclasses.replace(adm, prompt=done.prompt, reduction=done.reduction,
                                            expected_accuracy=strategy.accuracy)
            try:
                self.pipeline.admit(candidate)
            except StageError:
                continue
            return candidate
        raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"{refusal.message}; no input reduction allowed by selection with a profiled accuracy "
                         f">= selection.accuracy_floor {adm.accuracy_floor:g} meets it either "
                         f"({len(options)} candidates tried)", retry_after_s=refusal.retry_after_s)

    def full_accuracy(self) -> float:
        entry = self.profile.accuracy.get("full") if self.profile is not None else None
        return entry.accuracy if entry is not None else 0.0


def reductions_proto(adm: Admitted, full_accuracy: float) -> prism_pb2.Reductions:
    """What was dropped or shrunk, for the response's last message."""
    r = adm.reduction
    if r is None:
        allowed = adm.allowed is not None and adm.allowed.allows_any
        return prism_pb2.Reductions(strategy="full", image_scale=1.0,
                                    expected_accuracy=full_accuracy if allowed else 0.0, description="nothing")
    return prism_pb2.Reductions(
        strategy=r.id, dropped_images=list(r.dropped_images), image_scale=r.image_scale,
        audio_seconds=r.audio_seconds or 0.0,
        dropped_modalities=[MODALITY[m] for m in sorted(r.dropped_modalities)],
        expected_accuracy=adm.expected_accuracy or 0.0, description=r.describe())


def reduction_json(adm: Admitted) -> str:
    return json.dumps(adm.reduction.as_dict()) if adm.reduction is not None else ""


def with_stored_reduction(adm: Admitted, text: str, accuracy: float) -> Admitted:
    """A taken-over request with the reduction chosen when it was accepted."""
    if not text:
        return adm
    from prism.models.reduce import Reduction

    return Selector.reduced(adm, Reduction.from_dict(json.loads(text)), accuracy)
