"""What a replayed request carries: prompt text of a given token count and images of the
traced count, the same bytes for every engine measured (seeded), fitted to the model served.

`ModelLimits` is what a deployment tells about its model (ListModels) plus two numbers
measured with probe requests (`prism.bench.replay.probe_limits`): text tokens per word of the
prompt text and tokens per image. `fit` turns a trace (already on the benchmark's time scale)
into requests the model can take: token counts shrunk by a factor and clipped so that prompt,
images and output fit the context, image counts clipped to the deployment's limit.

`Workload` makes the bodies: English-like words (a fixed vocabulary, seeded order) and JPEG
images of random pixels whose side follows the multimodal trace's published shape (median
about 500 px, 95th percentile over 1,000 px: a log-normal) unless a fixed side is given.
"""
from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from prism.bench.trace import TraceRequest, scale

__all__ = ["ModelLimits", "Workload", "fit", "image_side"]

_WORDS = """time person year way day thing man world life hand part child eye woman place work week
case point government company number group problem fact house river garden window mountain city
road table letter morning evening music story picture water light voice paper market field island
bright quiet early green small large warm cold heavy simple careful sudden gentle open old new good
takes finds gives tells works calls tries leaves feels brings keeps begins shows hears plays runs
moves lives holds writes stands learns changes leads reads grows opens walks wins offers remembers
and but so then while after before because although when where since until""".split()


@dataclass(frozen=True)
class ModelLimits:
    """A deployment's model as the load generator sees it."""

    max_context: int = 2048
    """Prompt (text and media tokens) plus generated tokens."""
    max_new_tokens: int = 1024
    max_images: int = 8
    tokens_per_word: float = 1.0
    """Prompt tokens per word of `Workload.text` (measured: see ``probe_limits``)."""
    prompt_overhead: int = 0
    """Tokens the chat template adds to every prompt."""
    image_tokens: int = 0
    """Prompt tokens one image takes."""

    def __post_init__(self) -> None:
        if self.max_context < 8 or self.max_new_tokens < 1 or self.max_images < 0:
            raise ValueError("max_context must be >= 8, max_new_tokens >= 1, max_images >= 0")
        if self.tokens_per_word <= 0 or self.prompt_overhead < 0 or self.image_tokens < 0:
            raise ValueError("tokens_per_word must be > 0, prompt_overhead and image_tokens >= 0")


def fit(requests: Sequence[TraceRequest], limits: ModelLimits, *, context_factor: float = 1 / 8,
        generated_factor: float = 1 / 8, min_context: int = 8, min_generated: int = 2,
        max_generated: int | None = None, margin: int = 8) -> list[TraceRequest]:
    """Requests the model can serve (module docstring): ``context_tokens`` becomes the whole
    prompt (template, images and text), ``generated_tokens`` the forced output. Token counts
    are multiplied by their factor (like ``trace.scale``), output clipped to `max_generated`
    and the model's limit, images to the deployment's, then the prompt to what is left of the
    context after the output, and images dropped (keeping at least one) where they alone
    would not fit."""
    cap_gen = min(limits.max_new_tokens, max_generated or limits.max_new_tokens)
    shrunk = scale(requests, context_factor=context_factor, generated_factor=generated_factor,
                   min_context=min_context, min_generated=min_generated, max_generated=cap_gen,
                   max_images=limits.max_images if limits.max_images > 0 else None)
    out = []
    for r in shrunk:
        room = limits.max_context - r.generated_tokens - margin - limits.prompt_overhead
        images = r.num_images if limits.max_images > 0 else 0
        while images > 1 and images * limits.image_tokens + min_context > room:
            images -= 1
        lo = images * limits.image_tokens + min_context + limits.prompt_overhead
        context = max(lo, min(r.context_tokens, room + limits.prompt_overhead))
        out.append(replace(r, context_tokens=context, num_images=images))
    return out


def image_side(rng: random.Random, median: float = 500.0, p95: float = 1050.0,
               lo: int = 64, hi: int = 2048) -> int:
    """One image side in pixels from a log-normal with the given median and 95th percentile."""
    sigma = math.log(p95 / median) / 1.6449
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


class Workload:
    """The bodies of the replayed requests (module docstring); deterministic in `seed`."""

    def __init__(self, limits: ModelLimits = ModelLimits(), *, seed: int = 0, image_side_px: int = 0,
                 jpeg_quality: int = 85):
        if image_side_px < 0:
            raise ValueError("image_side_px must be >= 0 (0: drawn from the trace's shape)")
        self.limits, self.seed, self.side, self.quality = limits, seed, image_side_px, jpeg_quality
        rng = random.Random(f"prism-bench-words:{seed}")
        self._words = [rng.choice(_WORDS) for _ in range(8192)]
        self._images: dict[tuple[int, int], bytes] = {}

    def text_tokens(self, r: TraceRequest) -> int:
        """Text tokens of `r`'s prompt: the prompt less its images and the template."""
        lim = self.limits
        return max(1, r.context_tokens - r.num_images * lim.image_tokens - lim.prompt_overhead)

    def words(self, k: int, tokens: int) -> str:
        n = max(1, int(tokens / self.limits.tokens_per_word))
        start = (k * 997) % len(self._words)
        picked = [self._words[(start + j) % len(self._words)] for j in range(n)]
        return " ".join(picked)

    def image_side(self, k: int, j: int) -> int:
        if self.side:
            return self.side
        return image_side(random.Random(f"prism-bench-side:{self.seed}:{k}:{j}"))

    def image(self, k: int, j: int) -> bytes:
        """Image `j` of request `k`: random pixels, JPEG (seeded)."""
        key = (k, j)
        if key not in self._images:
            import numpy as np
            from PIL import Image

            side = self.image_side(k, j)
            rng = np.random.default_rng([self.seed, k, j])
            # smooth-ish content: a small random image upscaled (noise would make huge JPEGs)
            small = rng.integers(0, 256, (max(2, side // 16), max(2, side // 16), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((side, side), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.quality)
            self._images[key] = buf.getvalue()
        return self._images[key]

    def images(self, k: int, r: TraceRequest) -> list[bytes]:
        return [self.image(k, j) for j in range(r.num_images)]

    def text(self, k: int, r: TraceRequest) -> str:
        return self.words(k, self.text_tokens(r))

    def messages(self, k: int, r: TraceRequest) -> list[dict]:
        """Chat messages for the Prism SDK (images first, then the text)."""
        content: list[dict] = [{"type": "image", "image": b} for b in self.images(k, r)]
        content.append({"type": "text", "text": self.text(k, r)})
        return [{"role": "user", "content": content}]
