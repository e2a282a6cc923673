"""A simulator profile (`prism.sim.profile`) of a local deployment, measured through Prism's
own engines: `prism profile --sim-out FILE`.

* encode: 1, 2 and 4 seeded images of `CostSettings.image_side` px in one tower call (tokens =
  their media tokens), under batch 1 (the CPU tower gains nothing from batching requests);
* prefill: at each batch size, prompts of each of `prompt_lengths` tokens (tokens = the prompt);
* decode: at each batch size, single steps at each of `contexts` tokens per slot;
* intake: the scheduler's processor on one image (decode, resize, tokenise: per-image overhead);
* transfers: embeddings (hidden x dtype bytes per token) and KV (the layout's bytes per token)
  at `transfer_bytes_per_s` (gRPC over loopback: FIELD-NOTES.md measures 0.5 to 3 GB/s).

Every call runs with `threads` torch threads, like a stage worker started with ``--threads``;
``shared_cores`` records the machine's cores so the simulator shares them between the stage
processes (processor sharing).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Sequence

import torch

from prism.profiling.cost import CostSettings, _media_prompt, measure_stage
from prism.profiling.engines import Engines
from prism.sim.profile import SimProfile, from_dict

__all__ = ["measure_sim_profile"]


def _intake_ms(engines: Engines, settings: CostSettings, repeats: int) -> float:
    times = []
    for k in range(repeats + 1):
        started = time.perf_counter()
        _media_prompt(engines, settings, settings.seed + 100 + k)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[1:])


def measure_sim_profile(engines: Engines, *, settings: CostSettings = CostSettings(),
                        prompt_lengths: Sequence[int] = (64, 256, 768), contexts: Sequence[int] = (128, 512),
                        prefill_batches: Sequence[int] = (1, 2), decode_batches: Sequence[int] = (1, 4, 8),
                        image_counts: Sequence[int] = (1, 2, 4), threads: int = 1,
                        shared_cores: int | None = None, transfer_bytes_per_s: float = 1e9,
                        overheads_ms: dict | None = None) -> SimProfile:
    """Measures the local model (module docstring) and returns a validated profile."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            enc = [measure_stage(engines, "encode", n, settings) for n in sorted(set(image_counts))]
            per_image = enc[0].tokens_per_call
            prefill = {b: [[L, measure_stage(engines, "prefill", b, replace(settings, prompt_tokens=L)).ms_per_call]
                           for L in sorted(set(prompt_lengths))] for b in sorted(set(prefill_batches))}
            decode = {b: [[c, measure_stage(engines, "decode", b, replace(settings, decode_context=c)).ms_per_call]
                          for c in sorted(set(contexts))] for b in sorted(set(decode_batches))}
            intake = _intake_ms(engines, settings, settings.repeats)
    finally:
        torch.set_num_threads(before)
    layout = engines.lm.layout
    elem = torch.finfo(engines.lm.dtype).bits // 8
    kv_bytes = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * elem
    hidden = int(engines.adapter.text_config.hidden_size) * elem
    over = {"queue": 1.0, "event": 1.0, "client": 4.0, "intake_per_image": round(intake, 3),
            "embed_per_token": round(hidden / transfer_bytes_per_s * 1e3, 7),
            "kv_per_token": round(kv_bytes / transfer_bytes_per_s * 1e3, 7)}
    over.update(overheads_ms or {})
    doc = {
        "version": 1, "kind": "prism-sim-profile",
        "model": {"name": engines.model_dir.name, "family": engines.adapter.family, "dtype": engines.dtype,
                  "device": engines.device, "threads": threads},
        "hardware": {"device": f"{engines.device} ({os.cpu_count()} cores)", "shared_cores": shared_cores},
        "media": {"tokens_per_image": per_image, "prompt_tokens_per_image": per_image},
        "stages": {
            "encode": {"curves": {"1": [[c.tokens_per_call, c.ms_per_call] for c in enc]}},
            "prefill": {"curves": {str(b): pts for b, pts in prefill.items()}},
            "decode": {"curves": {str(b): pts for b, pts in decode.items()}},
        },
        "overheads_ms": over,
        "sources": [{"id": "measured", "title": f"prism profile --sim-out on {engines.model_dir}",
                     "used_for": "every stage table and the intake time (median of "
                                 f"{settings.repeats} timed runs after {settings.warmup} warm-up)"},
                    {"id": "field-notes", "title": "/work/shared/FIELD-NOTES.md: gRPC over loopback 0.5-3 GB/s, "
                     "Redis round trips ~0.2 ms", "used_for": "transfer rate and queue/event hops (assumed)"}],
        "derivation": [f"encode: {', '.join(str(n) for n in sorted(set(image_counts)))} images of "
                       f"{settings.image_side} px per call; prefill at prompts {list(prompt_lengths)}; decode "
                       f"steps at contexts {list(contexts)}; torch threads {threads}",
                       f"transfers at {transfer_bytes_per_s / 1e9:g} GB/s: KV {kv_bytes} bytes and embeddings "
                       f"{hidden} bytes per token",
                       "queue, event and client hops assumed (1, 1 and 4 ms)"],
    }
    return from_dict(doc)
