"""The one interface every model family implements.

A family adapter knows a checkpoint's processor, its media towers, how the language model's
prompt positions are computed (1-D RoPE or M-RoPE with a rope delta) and where the decoder and
the LM head live. The engines (prism/engine) only talk to this interface, so no engine code
branches on model names; families register themselves by `config.model_type` in
prism/models/registry.py.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

IMAGE = "image"
AUDIO = "audio"


class InputError(ValueError):
    """A request's input is unusable; `field` names the request field at fault."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


@dataclass
class MediaItem:
    """One processed media item.

    `tensors` are the processor outputs the tower needs (pixel_values, image_grid_thw,
    input_features, feature_attention_mask...); `meta` the small ones the prompt pass needs too
    (image_grid_thw for M-RoPE); `num_tokens` the placeholder tokens it fills in the prompt.
    """

    modality: str
    num_tokens: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PreparedPrompt:
    """A request after processing: prompt ids (placeholders expanded) and its media items in
    prompt order."""

    input_ids: list[int]
    items: list[MediaItem]

    def tokens_of(self, modality: str) -> int:
        return sum(i.num_tokens for i in self.items if i.modality == modality)


@dataclass(frozen=True)
class KvLayout:
    """Shape of the language model's KV cache."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, itemsize: int = 4) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize


class FamilyAdapter(abc.ABC):
    """A model family behind Prism's one interface. Instances are cheap: they hold the
    checkpoint's config, never weights."""

    #: Adapter name reported to clients, e.g. "llava".
    family: ClassVar[str]
    #: `config.model_type` values this adapter serves.
    model_types: ClassVar[tuple[str, ...]]
    #: Media modalities the family accepts.
    modalities: ClassVar[frozenset[str]]
    #: Number of position rows the decoder takes: 1 (RoPE) or 3 (M-RoPE).
    position_dims: ClassVar[int] = 1

    def __init__(self, model_dir: str | Path, config: Any):
        self.model_dir = Path(model_dir)
        self.config = config

    # ---- checkpoint -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def model_class(self) -> type[nn.Module]:
        """The transformers class that loads the whole checkpoint."""

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def max_context(self) -> int:
        return int(self.text_config.max_position_embeddings)

    @property
    def kv_layout(self) -> KvLayout:
        tc = self.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return KvLayout(tc.num_hidden_layers, tc.num_key_value_heads, head_dim)

    @property
    @abc.abstractmethod
    def placeholder_token_ids(self) -> dict[str, int]:
        """Token id that marks each embedding row of a media item, per modality."""

    @abc.abstractmethod
    def encoder_modules(self) -> list[str]:
        """Attribute paths of the media towers and projectors (dropped by LM-only stages)."""

    def language_model_path(self) -> str:
        """Attribute path of the decoder stack (embed_tokens, layers, norm)."""
        return "model.language_model"

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.language_model_path())

    def lm_head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # ---- front door: processing without weights ---------------------------------------
    @abc.abstractmethod
    def media_placeholder(self, modality: str) -> str:
        """Text that stands for one media item of `modality` in a raw prompt."""

    def load_processor(self) -> Any:
        from prism.models.processors import load_processor

        return load_processor(self.model_dir)

    @abc.abstractmethod
    def prepare(self, processor: Any, text: str, images: Sequence[Any], audios: Sequence[Any]) -> PreparedPrompt:
        """Run the processor on formatted `text` (one placeholder per media item) and decoded
        media (PIL images; float32 mono numpy audio at the processor's rate), returning prompt
        ids and per-item processed tensors."""

    def audio_sampling_rate(self, processor: Any) -> int:
        return int(processor.feature_extractor.sampling_rate)

    def reduction_kinds(self) -> frozenset[str]:
        """The input reductions that make this family's requests cheaper, offered under overload
        within what a caller allows (prism/models/reduce.py names the kinds: "drop_modality",
        "drop_images", "downscale_images", "trim_audio"). A family offers a kind only where it
        saves tokens. The default offers none: requests are served as asked."""
        return frozenset()

    # ---- encoder stage ------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, model: nn.Module, items: Sequence[MediaItem]) -> list[torch.Tensor]:
        """Embeddings `[num_tokens, hidden]` for each item (all of one modality), in order."""

    # ---- prefill stage -------------------------------------------------------------------
    def prompt_positions(self, model: nn.Module, input_ids: torch.Tensor,
                         items: Sequence[MediaItem]) -> tuple[torch.Tensor, int]:
        """Positions of the prompt tokens, shape `[position_dims, L]`, and the rope delta: the
        position of token i >= L is i + delta. Computed per request; nothing is kept on the
        module."""
        return torch.arange(input_ids.shape[0]).unsqueeze(0), 0


def split_rows(t: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split `t` along dim 0 into pieces of `sizes` rows (checked)."""
    if sum(sizes) != t.shape[0]:
        raise ValueError(f"cannot split {t.shape[0]} rows into {list(sizes)}")
    return list(torch.split(t, list(sizes), dim=0))


def check_placeholders(input_ids: Sequence[int], token_id: int, items: Sequence[MediaItem], modality: str) -> None:
    """The prompt must hold exactly as many placeholder tokens as the items' embeddings."""
    want = sum(i.num_tokens for i in items if i.modality == modality)
    have = sum(1 for t in input_ids if t == token_id)
    if want != have:
        raise InputError("prompt", f"{have} {modality} placeholder tokens for {want} {modality} embeddings")
