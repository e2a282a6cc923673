"""How the shipped A100 profiles were made: a roofline of each stage from published model and
GPU figures (``python -m prism.sim.roofline`` rewrites ``prism/sim/profiles/modserve-*.json``).

Per call, on ONE A100-80GB SXM (312 TFLOPS dense bf16, 2.039 TB/s HBM2e):

* compute time = FLOPs / (312e12 x `MFU`), FLOPs = 2 x parameters x tokens, plus attention
  (4 x layers x hidden x n^2 per sequence of n, halved when causal);
* memory time = bytes read / (2.039e12 x `MBU`): the weights once per call, plus for decode the
  KV of every sequence;
* latency = max(compute, memory) + a fixed per-call overhead (kernel launches, the engine's own
  scheduling).

TP-k instances divide that by ``tp_speedup[k] = k / (1 + TP_LOSS x (k - 1))`` (the all-reduces
of tensor parallelism cost a share of the gain). These are derived numbers, not measurements;
the files say so and cite their sources.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["A100", "MODELS", "ModelSpec", "profile_doc", "write_profiles"]

A100 = {"name": "NVIDIA A100-80GB SXM", "bf16_flops": 312e12, "hbm_bytes_per_s": 2.039e12,
        "interconnect_bytes_per_s": 25e9}
MFU = 0.5
"""Assumed fraction of peak FLOPs a large batched matmul-bound pass reaches."""
MBU = 0.7
"""Assumed fraction of HBM bandwidth a memory-bound decode step reaches."""
TP_LOSS = 0.08
OVERHEAD_MS = {"encode": 2.0, "prefill": 3.0, "decode": 2.0}


@dataclass(frozen=True)
class ModelSpec:
    key: str
    name: str
    family: str
    vit_params: float
    vit_layers: int
    vit_hidden: int
    patches_per_tile: int
    tiles_per_image: int
    tokens_per_image: int
    """Media tokens one image costs the encoder (what the scheduler books for encode)."""
    prompt_tokens_per_image: int
    llm_params: float
    llm_layers: int
    llm_hidden: int
    kv_bytes_per_token: int
    embed_bytes_per_token: int
    notes: tuple[str, ...]
    sources: tuple[dict, ...]


PAPER = {"id": "modserve", "title": "Qiu et al., ModServe: Modality- and Stage-Aware Resource Disaggregation for "
         "Scalable Multimodal Model Serving, arXiv 2502.00937 (SoCC 2025)", "url": "https://arxiv.org/abs/2502.00937",
         "used_for": "the evaluation setting (128 A100-80GB GPUs, these two models, vLLM-like TP-4 monolith), the "
                     "targets (3.3-5.5x load at SLO, 25-41.3% cost saving)"}
A100_SRC = {"id": "a100", "title": "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS dense BF16, 80GB HBM2e at "
            "2,039 GB/s (SXM)", "url": "https://www.nvidia.com/en-us/data-center/a100/",
            "used_for": "peak compute and memory bandwidth of the roofline"}

MODELS = {
    "llama32-11b-vision": ModelSpec(
        key="llama32-11b-vision", name="Llama-3.2-11B-Vision", family="cross-attention (mllama)",
        vit_params=0.8e9, vit_layers=40, vit_hidden=1280, patches_per_tile=1601, tiles_per_image=4,
        tokens_per_image=6404, prompt_tokens_per_image=44, llm_params=9.8e9, llm_layers=32, llm_hidden=4096,
        kv_bytes_per_token=2 * 32 * 8 * 128 * 2, embed_bytes_per_token=4096 * 2,
        notes=("vision tower: ViT-H/14 (32 layers) + 8 global layers, hidden 1280: ~40 x 12 x 1280^2 = 0.8B "
               "parameters (derived from the config's sizes)",
               "an image is up to 4 tiles of 560x560 px, 40x40 patches + 1 class token each: 4 x 1601 = 6404 "
               "encoder tokens (taken at the maximum, 4 tiles)",
               "text decoder: 40 layers (32 self-attention + 8 cross-attention), hidden 4096, 8 KV heads of 128: "
               "~9.8B parameters (10.6B total less the tower); KV of the 32 self-attention layers: 131,072 bytes "
               "per token in bf16",
               "image tokens do not enter the prompt (cross-attention); the K/V projections of the 8 "
               "cross-attention layers over 6404 image tokens cost ~0.86 TFLOP, as much as ~44 prompt tokens of "
               "the decoder: prompt_tokens_per_image = 44 (derived)"),
        sources=({"id": "llama32-card", "title": "Meta, Llama 3.2 Vision model card and config "
                  "(meta-llama/Llama-3.2-11B-Vision): 10.6B parameters, 560 px tiles, up to 4 tiles, 40 decoder "
                  "layers with 8 cross-attention layers, 8 KV heads", "url":
                  "https://huggingface.co/meta-llama/Llama-3.2-11B-Vision",
                  "used_for": "parameter counts, tiles and tokens per image, KV size"},
                 {"id": "nvidia-llama32", "title": "NVIDIA technical blog, Llama 3.2 full-stack optimizations: "
                  "single image input at up to 1120x1120 px, vision encoder with cross-attention text decoder",
                  "url": "https://developer.nvidia.com/blog/llama-3-2-full-stack-optimizations-unlock-high-"
                         "performance-on-nvidia-gpus/", "used_for": "image resolution and architecture"})),
    "internvl-26b": ModelSpec(
        key="internvl-26b", name="InternVL2.5-26B", family="decoder-only (ViT-MLP-LLM)",
        vit_params=5.9e9, vit_layers=45, vit_hidden=3200, patches_per_tile=1025, tiles_per_image=3,
        tokens_per_image=768, prompt_tokens_per_image=768, llm_params=19.9e9, llm_layers=48, llm_hidden=6144,
        kv_bytes_per_token=2 * 48 * 8 * 128 * 2, embed_bytes_per_token=6144 * 2,
        notes=("vision tower: InternViT-6B-448px (45 layers, hidden 3200, 5.9B parameters)",
               "an image is split into 448x448 tiles (1 to 12, plus a thumbnail when more than one), 32x32 "
               "patches + 1 class token per tile, pixel-unshuffled to 256 tokens: taken at 3 tiles per image "
               "(a 1x2 grid plus thumbnail, between the trace's median ~500 px and 95th percentile >1000 px "
               "image sides): 768 image tokens in the prompt, 3 x 1025 patches through the tower (assumed)",
               "language model: internlm2.5-20b-chat, 48 layers, hidden 6144, 8 KV heads of 128: 19.9B "
               "parameters, 196,608 KV bytes per token in bf16"),
        sources=({"id": "internvl25-card", "title": "OpenGVLab, InternVL2_5-26B model card: InternViT-6B-448px-V2_5 "
                  "+ internlm2_5-20b-chat, pixel unshuffle to a quarter of the tokens, dynamic 448x448 tiles",
                  "url": "https://huggingface.co/OpenGVLab/InternVL2_5-26B",
                  "used_for": "architecture, tiles, tokens per tile, parameter counts"},
                 {"id": "internvl-tiling", "title": "InternVL dynamic_preprocess: 1-12 tiles of 448 px chosen by "
                  "aspect ratio, thumbnail added when more than one tile", "url":
                  "https://github.com/OpenGVLab/InternVL", "used_for": "tiles per image"},
                 {"id": "trace-shape", "title": "Multimodal trace shape (/work/shared/traces/README.md, from "
                  "ModServe's trace analysis): median image side ~500 px, 95th percentile over 1,000 px",
                  "url": "https://arxiv.org/abs/2502.00937", "used_for": "the tiles-per-image assumption"})),
}


def tp_speedup(k: int) -> float:
    return round(k / (1 + TP_LOSS * (k - 1)), 4)


def _ms(flops: float, bytes_read: float, stage: str) -> float:
    compute = flops / (A100["bf16_flops"] * MFU)
    memory = bytes_read / (A100["hbm_bytes_per_s"] * MBU)
    return round(max(compute, memory) * 1000 + OVERHEAD_MS[stage], 3)


def encode_ms(m: ModelSpec, batch: int, tokens: float) -> float:
    """A tower call over `tokens` media tokens (whole images), `batch` requests."""
    images = tokens / m.tokens_per_image
    tiles = images * m.tiles_per_image
    n = m.patches_per_tile
    flops = 2 * m.vit_params * tiles * n + 4 * m.vit_layers * m.vit_hidden * n * n * tiles
    return _ms(flops, 2 * m.vit_params, "encode")


def prefill_ms(m: ModelSpec, batch: int, longest: float) -> float:
    """A prompt pass over `batch` rows padded to `longest` tokens."""
    flops = batch * (2 * m.llm_params * longest + 2 * m.llm_layers * m.llm_hidden * longest * longest)
    return _ms(flops, 2 * m.llm_params + batch * longest * m.kv_bytes_per_token, "prefill")


def decode_ms(m: ModelSpec, batch: int, context: float) -> float:
    """One step of `batch` sequences of `context` tokens."""
    flops = batch * (2 * m.llm_params + 4 * m.llm_layers * m.llm_hidden * context)
    return _ms(flops, 2 * m.llm_params + batch * context * m.kv_bytes_per_token, "decode")


def profile_doc(m: ModelSpec) -> dict:
    tp = {str(k): tp_speedup(k) for k in (1, 2, 4, 8)}
    enc_batches, grid_batches = (1, 4, 16, 64), (1, 4, 16, 64)
    return {
        "version": 1, "kind": "prism-sim-profile",
        "model": {"name": m.name, "family": m.family, "vision_params": m.vit_params, "llm_params": m.llm_params},
        "hardware": {"device": A100["name"], "shared_cores": None},
        "media": {"tokens_per_image": m.tokens_per_image, "prompt_tokens_per_image": m.prompt_tokens_per_image},
        "stages": {
            "encode": {"unit": "ms per tower call; tokens = media tokens of the call", "tp_speedup": tp, "curves": {
                str(b): [[m.tokens_per_image * k, encode_ms(m, b, m.tokens_per_image * k)] for k in (1, 4, 16, 64)
                         if k >= b] for b in enc_batches}},
            "prefill": {"unit": "ms per prompt pass; tokens = longest prompt of the batch", "tp_speedup": tp,
                        "curves": {str(b): [[t, prefill_ms(m, b, t)] for t in (64, 256, 1024, 4096, 8192)]
                                   for b in grid_batches}},
            "decode": {"unit": "ms per step; tokens = mean context per sequence", "tp_speedup": tp,
                       "curves": {str(b): [[c, decode_ms(m, b, c)] for c in (256, 1024, 4096, 8192)]
                                  for b in (1, 8, 32, 128, 256)}},
        },
        "overheads_ms": {"queue": 0.5, "event": 0.5, "client": 2.0,
                         "embed_per_token": round(m.embed_bytes_per_token / A100["interconnect_bytes_per_s"] * 1e3, 7),
                         "kv_per_token": round(m.kv_bytes_per_token / A100["interconnect_bytes_per_s"] * 1e3, 7)},
        "sources": [PAPER, A100_SRC, *m.sources],
        "derivation": [
            "DERIVED, not measured: a roofline per call (prism/sim/roofline.py, python -m prism.sim.roofline)",
            f"compute = FLOPs / (312 TFLOPS x MFU {MFU}); memory = bytes read / (2.039 TB/s x MBU {MBU}); "
            "latency = max of the two + a fixed per-call overhead "
            f"({', '.join(f'{k} {v} ms' for k, v in OVERHEAD_MS.items())})",
            "FLOPs = 2 x parameters x tokens + attention (4 x layers x hidden x n^2 per tile for the tower, "
            "2 x layers x hidden x n^2 per causal prompt, 4 x layers x hidden x context per decoded token)",
            "bytes = bf16 weights once per call + the KV of every sequence (prefill writes, decode reads)",
            f"tp_speedup[k] = k / (1 + {TP_LOSS} x (k - 1)): all-reduce losses of tensor parallelism (assumed)",
            "transfers between instances at 25 GB/s (200 Gb/s InfiniBand): embeddings hidden x 2 bytes and KV "
            "per token",
            *m.notes,
        ],
    }


def write_profiles(directory: Path | None = None) -> list[Path]:
    directory = directory or Path(__file__).parent / "profiles"
    out = []
    for m in MODELS.values():
        path = directory / f"modserve-a100-{m.key}.json"
        path.write_text(json.dumps(profile_doc(m), indent=1) + "\n")
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write_profiles():
        print(p)
