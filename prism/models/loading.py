"""Load a checkpoint for one stage: the whole model through `from_pretrained`, then drop the
submodules the stage never runs (the language model in the encoder, the towers in prefill and
decode)."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prism.models.base import FamilyAdapter
from prism.models.registry import adapter_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ENCODER = "encode"
LANGUAGE = "language"


def attention_implementation(device: torch.device) -> str:
    """flash-attn 2 when CUDA and the package are present, SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass
class LoadedModel:
    adapter: FamilyAdapter
    model: nn.Module
    device: torch.device
    dtype: torch.dtype


def _drop(model: nn.Module, path: str) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if hasattr(parent, name):
        setattr(parent, name, None)


def load_model(model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
               parts: frozenset[str] = frozenset({ENCODER, LANGUAGE}), attn: str | None = None) -> LoadedModel:
    """Load `model_dir` keeping only `parts` ({"encode", "language"}). `attn` overrides the
    attention implementation (default: `attention_implementation(device)`)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    adapter = adapter_for(model_dir)
    dev = torch.device(device)
    model = adapter.model_class.from_pretrained(
        str(model_dir), dtype=DTYPES[dtype], attn_implementation=attn or attention_implementation(dev)
    )
    if ENCODER not in parts:
        for path in adapter.encoder_modules():
            _drop(model, path)
    if LANGUAGE not in parts:
        _drop(model, adapter.language_model_path())
        model.lm_head = None
    model.to(dev).eval()
    log.info("loaded %s (%s) as %s on %s, parts=%s", model_dir, adapter.family, dtype, dev, sorted(parts))
    return LoadedModel(adapter, model, dev, DTYPES[dtype])


@dataclass(frozen=True)
class ModelOptions:
    """Which checkpoint a stage serves and how it runs it."""

    model_dir: Path = field(metadata={"help": "Local checkpoint directory (loaded with from_pretrained)."})
    dtype: str = field(default="float32", metadata={"help": "Weights and activations: float32, bfloat16 or float16."})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda:0."})
    threads: int = field(default=0, metadata={"help": "torch intra-op threads for this stage; 0 keeps torch's default."})
    variant: str = field(default="", metadata={"help": "Variant name this worker serves in a deployment of several "
                                                        "variants of the model (the scheduler's --variants); empty: "
                                                        "the only one."})

    def __post_init__(self) -> None:
        from prism.runtime.config import check

        check(Path(self.model_dir).is_dir(), "model_dir", f"{self.model_dir} is not a directory")
        check((Path(self.model_dir) / "config.json").is_file(), "model_dir", f"{self.model_dir} has no config.json")
        check(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        check(self.threads >= 0, "threads", "must be >= 0")
        check(self.variant == "" or (self.variant.replace("-", "").replace("_", "").replace(".", "").isalnum()
                                     and len(self.variant) <= 64),
              "variant", f"use 1..64 letters, digits, '-', '_' or '.', got {self.variant!r}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            check(False, "device", str(exc))

    def load(self, parts: frozenset[str], attn: str | None = None) -> LoadedModel:
        return load_model(self.model_dir, dtype=self.dtype, device=self.device, parts=parts, attn=attn)
