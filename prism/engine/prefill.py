"""Prefill core: the prompt pass for one request, streaming each layer's KV as it is made."""
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
