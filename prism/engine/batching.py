"""How the stage workers group queued tasks into one call (no torch: the simulator uses it too).

`take_batch` is the rule of the prefill worker (padded prompts) and, through
`prism.engine.encoder.take_media_batch`, of the encoder (concatenated media).
"""
from __future__ import annotations

from typing import Hashable, Sequence, TypeVar

__all__ = ["Id", "take_batch"]

Id = TypeVar("Id", bound=Hashable)


def take_batch(pending: Sequence[tuple[Id, int]], token_budget: int, max_batch: int, *,
               padded: bool = True) -> list[Id]:
    """Ids of the requests to run together, taken in the given order (never skipping one)
    while the batch's cost stays within `token_budget` and it holds at most `max_batch`; the
    first is always taken, whatever its cost. `pending` holds (id, tokens). The cost is
    longest x count when rows are padded to the longest (prefill), else the sum of tokens
    (media concatenated for a tower)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, not {max_batch}")
    taken: list[Id] = []
    longest = total = 0
    for rid, tokens in pending:
        if len(taken) >= max_batch:
            break
        new_longest, new_total = max(longest, int(tokens)), total + int(tokens)
        cost = new_longest * (len(taken) + 1) if padded else new_total
        if taken and cost > token_budget:
            break
        taken.append(rid)
        longest, total = new_longest, new_total
    return taken
