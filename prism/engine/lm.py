"""The language-model half of a checkpoint, driven with explicit positions and caches.

Prefill runs the prompt through the decoder with a cache that hands each layer's keys and
values to a callback as soon as that layer has computed them (so they can stream while later
layers run). Decode runs one token per active row against preallocated slot buffers with
per-row positions and masks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from transformers import DynamicCache

from prism.engine.kv import SlotKV, StepCache
from prism.models.base import InputError
from prism.models.loading import LoadedModel

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class _StreamingCache(DynamicCache):
    """A DynamicCache that reports each layer's prompt keys and values once computed."""

    def __init__(self, config, on_layer: LayerCallback):
        super().__init__(config=config)
        self._on_layer = on_layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._on_layer(layer_idx, key_states, value_states)
        return out


class LanguageModel:
    def __init__(self, loaded: LoadedModel):
        self.adapter = loaded.adapter
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.decoder = self.adapter.language_model(self.model)
        self.head = self.adapter.lm_head(self.model)
        self.embed = self.decoder.get_input_embeddings()
        self.layout = self.adapter.kv_layout
        self.position_dims = self.adapter.position_dims
        self.placeholders = self.adapter.placeholder_token_ids
        self.eos_ids = self._eos_ids()

    def _eos_ids(self) -> frozenset[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.adapter.text_config, "eos_token_id", None)
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)

    def prompt_embeddings(self, input_ids: torch.Tensor, media: Mapping[str, Sequence[torch.Tensor]]) -> torch.Tensor:
        """Token embeddings with each modality's media rows scattered, in order, into its
        placeholder positions. Returns [1, L, hidden]."""
        embeds = self.embed(input_ids.to(self.device).unsqueeze(0))
        for modality, token_id in self.placeholders.items():
            rows = media.get(modality) or []
            mask = input_ids.to(self.device) == token_id
            count = int(mask.sum())
            total = sum(int(r.shape[0]) for r in rows)
            if count != total:
                raise InputError("prompt", f"{count} {modality} placeholders for {total} embedding rows")
            if count:
                embeds[0, mask] = torch.cat(list(rows)).to(self.device, embeds.dtype)
        return embeds

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        # [P, L] -> [1, L] for RoPE, [3, 1, L] for M-RoPE
        positions = positions.to(self.device)
        return positions.unsqueeze(1) if self.position_dims > 1 else positions

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, media: Mapping[str, Sequence[torch.Tensor]],
                positions: torch.Tensor, on_layer: LayerCallback) -> torch.Tensor:
        """Run the prompt pass; returns the last position's logits [vocab]."""
        embeds = self.prompt_embeddings(input_ids, media)
        cache = _StreamingCache(self.decoder.config, on_layer)
        out = self.decoder(inputs_embeds=embeds, position_ids=self._positions(positions),
                           past_key_values=cache, use_cache=True)
        return self.head(out.last_hidden_state[:, -1])[0]

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, lengths: torch.Tensor, deltas: torch.Tensor,
                    kv: SlotKV, rows: slice | torch.Tensor) -> torch.Tensor:
        """One token for each row: row i's token goes at cache index lengths[i] (position
        lengths[i] + deltas[i]). Returns logits [B, vocab]."""
        batch = tokens.shape[0]
        kv_len = int(lengths.max()) + 1
        embeds = self.embed(tokens.to(self.device).unsqueeze(1))
        lengths = lengths.to(self.device)
        pos = (lengths + deltas.to(self.device)).unsqueeze(1)
        if self.position_dims > 1:
            pos = pos.unsqueeze(0).expand(self.position_dims, batch, 1)
        mask = torch.arange(kv_len, device=self.device).unsqueeze(0) <= lengths.unsqueeze(1)
        cache = StepCache(kv, rows, lengths, kv_len)
        out = self.decoder(inputs_embeds=embeds, position_ids=pos, attention_mask=mask[:, None, None, :],
                           past_key_values=cache, use_cache=True)
        return self.head(out.last_hidden_state[:, 0])
