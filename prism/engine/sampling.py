"""Token selection: greedy, or temperature / top-k / top-p with a per-request seed.

Sampling is reproducible across processes: the generator for step `s` of a request is seeded
from (seed, s), so prefill (step 0) and decode (steps 1..) need share no state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def _sample_row(logits: torch.Tensor, s: Sampling, step: int) -> int:
    scores = logits.float() / s.temperature
    if s.top_k > 0 and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if 0.0 < s.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < s.top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=_step_generator(s.seed, step)))


def select_tokens(logits: torch.Tensor, params: list[Sampling], steps: list[int]) -> list[int]:
    """One token per row of `logits` [B, vocab]; `steps[i]` is row i's output index."""
    greedy = logits.argmax(dim=-1).tolist()
    return [g if p.greedy else _sample_row(logits[i], p, steps[i]) for i, (g, p) in enumerate(zip(greedy, params))]
