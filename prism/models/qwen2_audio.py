"""Qwen2-Audio: a Whisper-style audio encoder and projector in front of Qwen2.

There is no public audio-features method; `encode` follows `Qwen2AudioModel.forward` (tower,
projector, keep each clip's first `output_length` rows).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from prism.models.base import AUDIO, FamilyAdapter, MediaItem, PreparedPrompt, check_placeholders
from prism.models.registry import register


def _output_lengths(feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    after_conv = (feature_lengths - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


@register
class Qwen2AudioAdapter(FamilyAdapter):
    family = "qwen2_audio"
    model_types = ("qwen2_audio",)
    modalities = frozenset({AUDIO})

    @property
    def model_class(self) -> type[nn.Module]:
        from transformers import Qwen2AudioForConditionalGeneration

        return Qwen2AudioForConditionalGeneration

    @property
    def placeholder_token_ids(self) -> dict[str, int]:
        return {AUDIO: int(self.config.audio_token_id)}

    def encoder_modules(self) -> list[str]:
        return ["model.audio_tower", "model.multi_modal_projector"]

    def media_placeholder(self, modality: str) -> str:
        return "<|audio_bos|><|AUDIO|><|audio_eos|>"

    def reduction_kinds(self) -> frozenset[str]:
        # a clip's tokens scale with its length (25 per second)
        from prism.models.reduce import DROP_MODALITY, TRIM_AUDIO

        return frozenset({TRIM_AUDIO, DROP_MODALITY})

    def prepare(self, processor: Any, text: str, images: Sequence[Any], audios: Sequence[Any]) -> PreparedPrompt:
        kwargs: dict[str, Any] = {}
        if audios:
            kwargs = {"audio": list(audios), "sampling_rate": self.audio_sampling_rate(processor)}
        out = processor(text=text, return_tensors="pt", **kwargs)
        ids = out["input_ids"][0].tolist()
        items: list[MediaItem] = []
        if audios:
            feats, mask = out["input_features"], out["feature_attention_mask"]
            _, lengths = _output_lengths(mask.sum(-1))
            items = [
                MediaItem(AUDIO, int(lengths[i]), {"input_features": feats[i : i + 1], "feature_attention_mask": mask[i : i + 1]})
                for i in range(len(audios))
            ]
        check_placeholders(ids, self.placeholder_token_ids[AUDIO], items, AUDIO)
        return PreparedPrompt(ids, items)

    def encode(self, model: nn.Module, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        tower = model.model.audio_tower
        feats = torch.cat([i.tensors["input_features"] for i in items]).to(model.dtype)
        mask = torch.cat([i.tensors["feature_attention_mask"] for i in items])
        conv_lengths, out_lengths = _output_lengths(mask.sum(-1))
        batch, _, mel_len = feats.shape
        max_len = (mel_len - 2) // 2 + 1
        valid = (torch.arange(max_len).unsqueeze(0) < conv_lengths.unsqueeze(1)).to(torch.long)
        attn = create_bidirectional_mask(
            config=tower.config, inputs_embeds=torch.zeros(batch, max_len, 1, dtype=feats.dtype), attention_mask=valid
        )
        hidden = tower(feats, attention_mask=attn).last_hidden_state
        projected = model.model.multi_modal_projector(hidden)
        return [projected[i, : int(out_lengths[i])] for i in range(batch)]
