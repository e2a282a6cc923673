"""Model families by `config.model_type`: the only place a checkpoint is matched to code."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig

from prism.models.base import FamilyAdapter

_ADAPTERS: dict[str, type[FamilyAdapter]] = {}


def register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def _load_builtin() -> None:
    # Importing the modules registers their adapters.
    from prism.models import llava, qwen2_audio, qwen_vl  # noqa: F401


def adapter_for(model_dir: str | Path) -> FamilyAdapter:
    """The family adapter for the checkpoint in `model_dir`."""
    _load_builtin()
    config = AutoConfig.from_pretrained(str(model_dir))
    try:
        cls = _ADAPTERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"model_type {config.model_type!r} in {model_dir} is not supported; "
            f"supported: {sorted(_ADAPTERS)}"
        ) from None
    return cls(model_dir, config)


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)
