"""Stage costs measured on the loaded model through Prism's own cores.

* encode: a batch of b seeded random images of ``image_side`` pixels square (or, for a family
  without images, b seeded random clips of ``audio_seconds``), each a request of one item, through
  ``EncoderEngine.encode_batch``; tokens are the media tokens of the batch;
* prefill: b prompts of ``prompt_tokens`` text tokens through ``PrefillEngine.run_batch``;
  tokens are b x ``prompt_tokens``;
* decode: b requests prefilled (``decode_context`` tokens each) into reserved slots of a
  ``DecodeEngine``, then single ``step`` calls; a call is one step of b tokens.

Each call is warmed up ``warmup`` times, then timed ``repeats`` times; the median is kept
(``StageCost``; CUDA is synchronised around each call).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from prism.engine.decode import DecodeEngine, DecodeSpec
from prism.engine.sampling import Sampling
from prism.models.base import AUDIO, IMAGE, PreparedPrompt
from prism.profiling.engines import Engines
from prism.profiling.schema import STAGES, StageCost

__all__ = ["CostSettings", "DEFAULT_BATCH_SIZES", "measure_costs", "measure_stage", "text_ids", "timed_median"]

DEFAULT_BATCH_SIZES = (1, 4, 8)

#: Filler text for the prefill and decode prompts (tokenised, repeated, cut to length).
_FILLER = ("the quick brown fox jumps over the lazy dog while a small bird sings about the weather "
           "and the river runs past seven old houses ")


@dataclass(frozen=True)
class CostSettings:
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    image_side: int = 224
    audio_seconds: float = 4.0
    prompt_tokens: int = 128
    decode_context: int = 128
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(sorted({int(b) for b in self.batch_sizes})))
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be integers >= 1, not {self.batch_sizes}")
        for name in ("image_side", "prompt_tokens", "decode_context", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.warmup < 0 or not self.audio_seconds > 0:
            raise ValueError("warmup must be >= 0 and audio_seconds > 0")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_median(call: Callable[[], Any], *, warmup: int, repeats: int, device: str = "cpu") -> float:
    """Median seconds of `call` over `repeats` timed runs after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _media_prompt(engines: Engines, settings: CostSettings, seed: int) -> PreparedPrompt:
    """One request of one seeded random media item, prepared by the family's processor."""
    adapter, rng = engines.adapter, np.random.default_rng(seed)
    if IMAGE in adapter.modalities:
        from PIL import Image

        side = settings.image_side
        image = Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8))
        return adapter.prepare(engines.processor, adapter.media_placeholder(IMAGE), [image], [])
    rate = adapter.audio_sampling_rate(engines.processor)
    clip = (rng.standard_normal(int(rate * settings.audio_seconds)) * 0.1).astype(np.float32)
    return adapter.prepare(engines.processor, adapter.media_placeholder(AUDIO), [], [clip])


def text_ids(engines: Engines, length: int) -> list[int]:
    """`length` ordinary text token ids (no special or placeholder ids)."""
    tok = engines.tokenizer
    ids = tok(_FILLER, add_special_tokens=False)["input_ids"]
    bad = set(getattr(tok, "all_special_ids", []) or []) | set(engines.adapter.placeholder_token_ids.values())
    ids = [i for i in ids if i not in bad]
    if not ids:
        raise ValueError("the tokenizer gives no ordinary tokens for the filler text")
    return (ids * (length // len(ids) + 1))[:length]


def _encode_cost(engines: Engines, batch: int, s: CostSettings) -> StageCost:
    prompts = [_media_prompt(engines, s, s.seed + i) for i in range(batch)]
    tokens = sum(p.items[0].num_tokens for p in prompts)
    items = [p.items for p in prompts]
    sec = timed_median(lambda: engines.encoder.encode_batch(items), warmup=s.warmup, repeats=s.repeats,
                       device=engines.device)
    return _stage_cost(sec, tokens, s.repeats)


def _prefill_cost(engines: Engines, batch: int, s: CostSettings) -> StageCost:
    plan = engines.prefill.plan(text_ids(engines, s.prompt_tokens), [])
    plans, media, samplings = [plan] * batch, [{}] * batch, [Sampling()] * batch
    sinks = [lambda layer, k, v: None] * batch
    sec = timed_median(lambda: engines.prefill.run_batch(plans, media, samplings, sinks), warmup=s.warmup,
                       repeats=s.repeats, device=engines.device)
    return _stage_cost(sec, batch * s.prompt_tokens, s.repeats)


def _decode_cost(engines: Engines, batch: int, s: CostSettings) -> StageCost:
    steps = s.warmup + s.repeats
    engine = DecodeEngine(engines.lm, slots=batch, max_len=s.decode_context + steps + 2)
    plan = engines.prefill.plan(text_ids(engines, s.decode_context), [])
    ids = [f"p{i}" for i in range(batch)]
    for rid in ids:
        engine.reserve(rid, plan.prompt_tokens)
    firsts = engines.prefill.run_batch([plan] * batch, [{}] * batch, [Sampling()] * batch,
                                       [Engines.slot_sink(engine, rid) for rid in ids])
    for rid, first in zip(ids, firsts):
        # no stop ids and room for every step: the batch stays whole while it is timed
        engine.activate(DecodeSpec(rid, first, plan.rope_delta, Sampling(), steps + 2, frozenset()))

    def step() -> None:
        if len(engine.step()) != batch:
            raise RuntimeError("decode batch shrank while being timed")

    sec = timed_median(step, warmup=s.warmup, repeats=s.repeats, device=engines.device)
    for rid in ids:
        engine.release(rid)
    return _stage_cost(sec, batch, s.repeats)


def _stage_cost(seconds: float, tokens: int, samples: int) -> StageCost:
    ms = max(seconds * 1000.0, 1e-6)  # a positive time even on a clock too coarse for the call
    return StageCost(ms_per_token=ms / tokens, ms_per_call=ms, tokens_per_call=tokens, samples=samples)


_MEASURE = {"encode": _encode_cost, "prefill": _prefill_cost, "decode": _decode_cost}


def measure_stage(engines: Engines, stage: str, batch: int, settings: CostSettings = CostSettings()) -> StageCost:
    """One stage's cost at one batch size (see the module docstring)."""
    if stage not in _MEASURE:
        raise ValueError(f"{stage!r} is not a stage; use {list(STAGES)}")
    return _MEASURE[stage](engines, batch, settings)


def measure_costs(engines: Engines, settings: CostSettings = CostSettings(), *,
                  stages: Sequence[str] = STAGES) -> dict[str, dict[int, StageCost]]:
    """Every stage's cost at every batch size of `settings`: {stage: {batch: StageCost}}."""
    with torch.inference_mode():
        return {stage: {b: measure_stage(engines, stage, b, settings) for b in settings.batch_sizes}
                for stage in stages}
