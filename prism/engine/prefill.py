"""Prefill core: the prompt pass for one request (or a batch of requests in one pass),
streaming each layer's KV as it is made."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from prism.engine.lm import LanguageModel
from prism.engine.sampling import Sampling, select_tokens
from prism.models.base import MediaItem

#: Receives (layer, keys, values), each a [prompt_tokens, kv_heads, head_dim] view (any strides).
KvSink = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class PromptPlan:
    input_ids: torch.Tensor
    positions: torch.Tensor
    rope_delta: int

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class PrefillEngine:
    def __init__(self, lm: LanguageModel):
        self.lm = lm

    def plan(self, input_ids: Sequence[int], items: Sequence[MediaItem]) -> PromptPlan:
        """Positions (and rope delta) of a prompt, computed per request."""
        ids = torch.tensor(list(input_ids), dtype=torch.long)
        positions, delta = self.lm.adapter.prompt_positions(self.lm.model, ids, items)
        return PromptPlan(ids, positions, delta)

    def run(self, plan: PromptPlan, media: Mapping[str, Sequence[torch.Tensor]], sampling: Sampling,
            sink: KvSink) -> int:
        """Run the prompt pass, handing each layer's KV to `sink`; returns the first token."""

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            sink(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))

        logits = self.lm.prefill(plan.input_ids, media, plan.positions, on_layer)
        return select_tokens(logits.unsqueeze(0), [sampling], [0])[0]

    def run_batch(self, plans: Sequence[PromptPlan], media: Sequence[Mapping[str, Sequence[torch.Tensor]]],
                  samplings: Sequence[Sampling], sinks: Sequence[KvSink]) -> list[int]:
        """Run several requests' prompt passes as one forward pass (right-padded to the longest
        prompt), handing each request's own per-layer KV (its real tokens only) to its sink;
        returns each request's first token. Each plan keeps its own rope delta."""
        if not (len(plans) == len(media) == len(samplings) == len(sinks)):
            raise ValueError("run_batch needs one media mapping, sampling and sink per plan")
        if not plans:
            return []
        lengths = [p.prompt_tokens for p in plans]

        def on_layer(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for b, (sink, n) in enumerate(zip(sinks, lengths)):
                sink(layer, k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1))

        logits = self.lm.prefill_batch([p.input_ids for p in plans], media, [p.positions for p in plans], on_layer)
        return select_tokens(logits, list(samplings), [0] * len(plans))
