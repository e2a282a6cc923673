"""Encoder core: media items (of one or more requests) through the family's tower and
projector, one batch per modality, results in input order."""
from __future__ import annotations

from typing import Sequence

import torch

from prism.models.base import MediaItem
from prism.models.loading import LoadedModel


class EncoderEngine:
    def __init__(self, loaded: LoadedModel):
        self.adapter, self.model = loaded.adapter, loaded.model
        self.device = loaded.device

    @torch.inference_mode()
    def encode(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """Embeddings [num_tokens, hidden] for each item, in order."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for modality in sorted({i.modality for i in items}):
            idx = [n for n, i in enumerate(items) if i.modality == modality]
            moved = [
                MediaItem(items[n].modality, items[n].num_tokens,
                          {k: t.to(self.device) for k, t in items[n].tensors.items()}, items[n].meta)
                for n in idx
            ]
            for n, emb in zip(idx, self.adapter.encode(self.model, moved)):
                if emb.shape[0] != items[n].num_tokens:
                    raise ValueError(f"item {n}: tower gave {emb.shape[0]} rows for {items[n].num_tokens} tokens")
                out[n] = emb
        return out  # type: ignore[return-value]
