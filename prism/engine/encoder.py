"""Encoder core: media items (of one or more requests) through the family's tower and
projector, one batch per modality, results in input order.

`encode_batch` spans several requests: items of the same modality whose tensors can be
concatenated along their first dimension (the way every adapter's `encode` joins the items it
is given) go through one tower call. An adapter may refine this with an optional
`batch_key(item) -> Hashable | None` method: items share a call only when their keys are equal,
and `None` keeps an item to a call of its own.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from prism.engine.batching import Id, take_batch
from prism.models.base import MediaItem
from prism.models.loading import LoadedModel


def default_batch_key(item: MediaItem) -> Hashable:
    """Items can share a tower call when their tensors agree on names, dtypes and every
    dimension but the first."""
    return tuple(sorted((name, t.dtype, tuple(t.shape[1:])) for name, t in item.tensors.items()))


def take_media_batch(pending: Sequence[tuple[Id, int]], token_budget: int, max_batch: int) -> list[Id]:
    """Requests to encode together, in the given order: (id, media tokens) pairs taken while
    their summed media tokens stay within `token_budget` (media are concatenated, not padded),
    at most `max_batch`, the first always."""
    return take_batch(pending, token_budget, max_batch, padded=False)


class EncoderEngine:
    def __init__(self, loaded: LoadedModel):
        self.adapter, self.model = loaded.adapter, loaded.model
        self.device = loaded.device

    def _tower(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        moved = [
            MediaItem(i.modality, i.num_tokens, {k: t.to(self.device) for k, t in i.tensors.items()}, i.meta)
            for i in items
        ]
        return self.adapter.encode(self.model, moved)

    @torch.inference_mode()
    def encode(self, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """Embeddings [num_tokens, hidden] for each item, in order."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for modality in sorted({i.modality for i in items}):
            idx = [n for n, i in enumerate(items) if i.modality == modality]
            for n, emb in zip(idx, self._tower([items[n] for n in idx])):
                if emb.shape[0] != items[n].num_tokens:
                    raise ValueError(f"item {n}: tower gave {emb.shape[0]} rows for {items[n].num_tokens} tokens")
                out[n] = emb
        return out  # type: ignore[return-value]

    def batch_key(self, item: MediaItem) -> Hashable | None:
        hook = getattr(self.adapter, "batch_key", None)
        return hook(item) if callable(hook) else default_batch_key(item)

    @torch.inference_mode()
    def encode_batch(self, requests: Sequence[Sequence[MediaItem]]) -> list[list[torch.Tensor]]:
        """Embeddings for each request's items (as `encode` gives them one request at a
        time), with the items of all requests grouped into as few tower calls as possible."""
        flat = [(r, n, item) for r, items in enumerate(requests) for n, item in enumerate(items)]
        groups: dict[Hashable, list[int]] = {}
        for f, (_, _, item) in enumerate(flat):
            key = self.batch_key(item)
            groups.setdefault((item.modality, key) if key is not None else ("single", f), []).append(f)
        out: list[list[torch.Tensor | None]] = [[None] * len(items) for items in requests]
        for members in groups.values():
            embs = self._tower([flat[f][2] for f in members])
            if len(embs) != len(members):
                raise ValueError(f"tower gave {len(embs)} embeddings for {len(members)} items")
            for f, emb in zip(members, embs):
                r, n, item = flat[f]
                if emb.shape[0] != item.num_tokens:
                    raise ValueError(f"request {r} item {n}: tower gave {emb.shape[0]} rows for {item.num_tokens} tokens")
                out[r][n] = emb
        return out  # type: ignore[return-value]
