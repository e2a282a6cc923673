"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT with patch merging, and M-RoPE positions.

The prompt's 3-D positions and rope delta are computed per request by the model's pure
`get_rope_index`; the delta travels with the KV cache, nothing is kept on the module.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from prism.models.base import IMAGE, FamilyAdapter, MediaItem, PreparedPrompt, check_placeholders, split_rows
from prism.models.registry import register


@register
class QwenVLAdapter(FamilyAdapter):
    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    modalities = frozenset({IMAGE})
    position_dims = 3

    @property
    def model_class(self) -> type[nn.Module]:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    @property
    def placeholder_token_ids(self) -> dict[str, int]:
        return {IMAGE: int(self.config.image_token_id)}

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def encoder_modules(self) -> list[str]:
        return ["model.visual"]

    def media_placeholder(self, modality: str) -> str:
        return "<|vision_start|><|image_pad|><|vision_end|>"

    def reduction_kinds(self) -> frozenset[str]:
        # native resolution: an image's tokens scale with its area, so a downscaled image costs less
        from prism.models.reduce import DOWNSCALE_IMAGES, DROP_IMAGES, DROP_MODALITY

        return frozenset({DOWNSCALE_IMAGES, DROP_IMAGES, DROP_MODALITY})

    def prepare(self, processor: Any, text: str, images: Sequence[Any], audios: Sequence[Any]) -> PreparedPrompt:
        out = processor(text=[text], images=list(images) or None, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        items: list[MediaItem] = []
        if images:
            grid = out["image_grid_thw"]
            patches = split_rows(out["pixel_values"], grid.prod(-1).tolist())
            for i, pixels in enumerate(patches):
                g = grid[i : i + 1]
                tokens = int(g.prod()) // self.merge_size**2
                items.append(MediaItem(IMAGE, tokens, {"pixel_values": pixels, "image_grid_thw": g}, {"image_grid_thw": g}))
        check_placeholders(ids, self.placeholder_token_ids[IMAGE], items, IMAGE)
        return PreparedPrompt(ids, items)

    def encode(self, model: nn.Module, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        pixels = torch.cat([i.tensors["pixel_values"] for i in items])
        grid = torch.cat([i.tensors["image_grid_thw"] for i in items])
        out = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
        return list(out.pooler_output)

    def prompt_positions(self, model: nn.Module, input_ids: torch.Tensor,
                         items: Sequence[MediaItem]) -> tuple[torch.Tensor, int]:
        if not items:
            return torch.arange(input_ids.shape[0]).unsqueeze(0).expand(3, -1), 0
        token_types = (input_ids == self.placeholder_token_ids[IMAGE]).to(torch.int32)
        grid = torch.cat([i.meta["image_grid_thw"] for i in items])
        positions, delta = model.model.get_rope_index(
            input_ids.unsqueeze(0), mm_token_type_ids=token_types.unsqueeze(0), image_grid_thw=grid
        )
        return positions[:, 0, :], int(delta.reshape(-1)[0])
