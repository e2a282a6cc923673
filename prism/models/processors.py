"""Processor classes Prism adds to transformers', and one generic processor loader.

Qwen2-VL and Qwen2.5-VL processors in transformers declare a video processor, and every video
processor needs torchvision, which does not load with a CPU-only torch build. The image-only
subclasses below declare just the image processor and the tokenizer (the attributes of a
``ProcessorMixin`` are read from its ``__init__`` signature), so they build, save and reload
without torchvision. Their directories name them in ``processor_config.json``; ``AutoProcessor``
does not know them, so load every model directory with :func:`load_processor`.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

__all__ = [
    "PRISM_PROCESSORS",
    "PrismQwen2VLProcessor",
    "PrismQwen2_5_VLProcessor",
    "load_processor",
    "processor_class_name",
]


class PrismQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent sets the image/video token attributes and passes (image, tokenizer, video)
        # on to ProcessorMixin, which pairs them with this class's attributes and drops the video.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


class PrismQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent sets the image/video token attributes and passes (image, tokenizer, video)
        # on to ProcessorMixin, which pairs them with this class's attributes and drops the video.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


#: Prism's own processor classes by the name saved in a model directory's processor config.
PRISM_PROCESSORS: dict[str, type[ProcessorMixin]] = {
    cls.__name__: cls for cls in (PrismQwen2VLProcessor, PrismQwen2_5_VLProcessor)
}

# Files that may name the processor class, in the order AutoProcessor consults them.
_CLASS_NAME_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


def processor_class_name(model_dir: str | Path) -> str | None:
    """The processor class a model directory was saved with, or None if it names none."""
    for name in _CLASS_NAME_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("processor_class")
            if value:
                return str(value)
    return None


def load_processor(model_dir: str | Path, **kwargs) -> ProcessorMixin:
    """Load the processor saved in ``model_dir`` (a local directory).

    The class is the one named in the directory's processor config, resolved first among
    :data:`PRISM_PROCESSORS`, then in ``transformers``; a directory that names no class falls
    back to ``AutoProcessor``. ``kwargs`` go to ``from_pretrained``.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    name = processor_class_name(model_dir)
    if name is None:
        return AutoProcessor.from_pretrained(model_dir, **kwargs)
    cls = PRISM_PROCESSORS.get(name) or getattr(transformers, name, None)
    if cls is None:
        raise ValueError(f"{model_dir}: unknown processor class {name!r}")
    return cls.from_pretrained(model_dir, **kwargs)
