"""LLaVA: a CLIP vision tower and projector in front of a decoder-only language model."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from prism.models.base import IMAGE, FamilyAdapter, InputError, MediaItem, PreparedPrompt, check_placeholders
from prism.models.registry import register


@register
class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_types = ("llava",)
    modalities = frozenset({IMAGE})

    @property
    def model_class(self) -> type[nn.Module]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    @property
    def placeholder_token_ids(self) -> dict[str, int]:
        return {IMAGE: int(self.config.image_token_id)}

    def encoder_modules(self) -> list[str]:
        return ["model.vision_tower", "model.multi_modal_projector"]

    def media_placeholder(self, modality: str) -> str:
        return "<image>"

    def reduction_kinds(self) -> frozenset[str]:
        # every image fills the same number of tokens whatever its resolution: downscaling
        # saves nothing, dropping images does
        from prism.models.reduce import DROP_IMAGES, DROP_MODALITY

        return frozenset({DROP_IMAGES, DROP_MODALITY})

    def prepare(self, processor: Any, text: str, images: Sequence[Any], audios: Sequence[Any]) -> PreparedPrompt:
        out = processor(text=text, images=list(images) or None, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        image_id = self.placeholder_token_ids[IMAGE]
        items: list[MediaItem] = []
        if images:
            per_image, rem = divmod(sum(1 for t in ids if t == image_id), len(images))
            if rem or per_image == 0:
                raise InputError("prompt", f"{len(images)} images do not match the image placeholders in the prompt")
            pixels = out["pixel_values"]
            items = [MediaItem(IMAGE, per_image, {"pixel_values": pixels[i : i + 1]}) for i in range(len(images))]
        check_placeholders(ids, image_id, items, IMAGE)
        return PreparedPrompt(ids, items)

    def encode(self, model: nn.Module, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        pixels = torch.cat([i.tensors["pixel_values"] for i in items]).to(model.dtype)
        out = model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
        )
        return [f.reshape(-1, f.shape[-1]) for f in out.pooler_output]
