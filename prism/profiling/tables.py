"""Offline strategy tables: for each job size and accuracy floor, the cheapest strategy.

A job's size is its number of images (image families; each image of the profiled side) or the
seconds of its audio clip (audio families). For each size the family's candidate reductions are
measured exactly through the processor (`prism.models.reduce.cost`), their work is the profiled
ms per token of each stage at batch 1, and `strategy_table` (an integer program per entry, HiGHS)
picks the least work strategy whose profiled accuracy is at or above the floor. The table is
written into the profile (``tables``) and printed by ``prism profile``: what an operator reads to
see what the scheduler will do to a request of a given size under a given floor when it must
shed work, and the cheapest strategy the online program starts from.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from prism.models.reduce import AUDIO, IMAGE, Allowed, candidates, cost

__all__ = ["DEFAULT_FLOORS", "build_tables"]

DEFAULT_FLOORS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
IMAGE_SIZES = tuple(range(1, 9))  # images per request
AUDIO_SIZES = (2.0, 4.0, 8.0, 16.0, 30.0)  # seconds of audio
_EVERYTHING = Allowed(drop_modalities=frozenset({IMAGE, AUDIO}), drop_images=True, min_images=0,
                      downscale_images=True, min_scale=0.25, trim_audio=True, min_audio_s=0.0)


def _media(adapter: Any, processor: Any, size: float, side: int, seed: int) -> list[tuple[str, Any]]:
    rng = np.random.default_rng(seed)
    if IMAGE in adapter.modalities:
        from PIL import Image

        return [(IMAGE, Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)))
                for _ in range(int(size))]
    rate = adapter.audio_sampling_rate(processor)
    return [(AUDIO, (rng.standard_normal(int(rate * size)) * 0.1).astype(np.float32))]


def build_tables(profile: Any, adapter: Any, processor: Any, *, image_side: int = 224, decode_tokens: int = 16,
                 floors: tuple[float, ...] = DEFAULT_FLOORS, seed: int = 0) -> dict[str, Any]:
    """The ``tables`` section of a profile (module docstring); empty without accuracies."""
    from services.scheduler.core.selection import strategy_table

    if not profile.accuracy:
        return {}
    by_images = IMAGE in adapter.modalities
    sizes = IMAGE_SIZES if by_images else AUDIO_SIZES
    jobs = {}
    for size in sizes:
        media = _media(adapter, processor, size, image_side, seed)
        text = " ".join(adapter.media_placeholder(m) for m, _ in media) + " Describe it."
        costs = [cost(adapter, processor, text, media, r) for r in candidates(adapter, processor, media, _EVERYTHING)]
        jobs[size] = profile.strategies_for(costs, decode_tokens, batch=1)
    table = strategy_table(jobs, floors)
    return {
        "size": "images" if by_images else "audio_seconds",
        "floors": list(floors),
        "decode_tokens": decode_tokens,
        "rows": {f"{size:g}": {f"{floor:g}": (None if table[(size, floor)] is None else table[(size, floor)].id)
                               for floor in floors} for size in sizes},
    }
