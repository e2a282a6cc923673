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

    # ---- batched prefill (several prompts in one pass) ---------------------------------
    def _batch_mask(self, lengths: torch.Tensor, total: int):
        """Attention mask for prompts right-padded to `total`: causal within each row, padding
        keys hidden. A 4D [B, 1, total, total] mask in the form the attention implementation
        takes (bool for SDPA, additive for eager); a 2D padding mask for flash attention, which
        builds its own varlen layout. Padding query rows still see their row's real keys, so no
        row is fully masked."""
        idx = torch.arange(total, device=self.device)
        valid = idx.unsqueeze(0) < lengths.unsqueeze(1)  # [B, keys]
        config = self.decoder.config
        impl = str(getattr(config, "_attn_implementation", "sdpa") or "sdpa")
        if "flash" in impl:
            return valid.to(torch.long)
        causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # [queries, keys]

        def form(allowed: torch.Tensor) -> torch.Tensor:
            mask = (allowed.unsqueeze(0) & valid.unsqueeze(1)).unsqueeze(1)
            if impl == "eager":
                return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                    ~mask, torch.finfo(self.dtype).min)
            return mask

        full = form(causal)
        layer_types = getattr(config, "layer_types", None) or []
        window = getattr(config, "sliding_window", None)
        if "sliding_attention" in layer_types and window:
            near = (idx.unsqueeze(1) - idx.unsqueeze(0)) < int(window)
            return {"full_attention": full, "sliding_attention": form(causal & near)}
        return full

    @torch.inference_mode()
    def prefill_batch(self, input_ids: Sequence[torch.Tensor], media: Sequence[Mapping[str, Sequence[torch.Tensor]]],
                      positions: Sequence[torch.Tensor], on_layer: LayerCallback) -> torch.Tensor:
        """Several prompts in one pass, right-padded to the longest. `on_layer` gets each
        layer's batched keys and values [B, kv_heads, longest, head_dim] (rows past a prompt's
        length are padding). Returns logits at each row's last real token [B, vocab].

        Prompts of equal length need no mask (plain causal attention, as `prefill`)."""
        if not (len(input_ids) == len(media) == len(positions)) or not input_ids:
            raise ValueError("prefill_batch needs one media mapping and one position tensor per prompt")
        lengths = [int(ids.shape[0]) for ids in input_ids]
        total = max(lengths)
        rows = [self.prompt_embeddings(ids, m)[0] for ids, m in zip(input_ids, media)]
        embeds = rows[0].new_zeros(len(rows), total, rows[0].shape[-1])
        pos = []
        for b, (row, p) in enumerate(zip(rows, positions)):
            embeds[b, : row.shape[0]] = row
            p = p.to(self.device)
            pad = total - p.shape[1]
            if pad:  # padding continues past the row's highest position; it is never attended
                tail = p.max() + 1 + torch.arange(pad, device=self.device)
                p = torch.cat([p, tail.unsqueeze(0).expand(p.shape[0], pad)], dim=1)
            pos.append(p)
        stacked = torch.stack(pos)  # [B, P, L]
        position_ids = stacked.permute(1, 0, 2) if self.position_dims > 1 else stacked[:, 0]
        lens = torch.tensor(lengths, device=self.device)
        mask = None if min(lengths) == total else self._batch_mask(lens, total)
        cache = _StreamingCache(self.decoder.config, on_layer)
        out = self.decoder(inputs_embeds=embeds, position_ids=position_ids, attention_mask=mask,
                           past_key_values=cache, use_cache=True)
        last = out.last_hidden_state[torch.arange(len(rows), device=self.device), lens - 1]
        return self.head(last)
