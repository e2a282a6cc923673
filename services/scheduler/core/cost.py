"""A request's cost and the latency model that admission and placement share.

`RequestCost` is what the scheduler knows about a request before any stage runs: token counts
per stage and its objectives. `estimate_path` turns a chosen path (instances per stage) and the
pending work on it (`LoadBook`) into an `Estimate`:

* encode: per encoder used, (pending + the tokens assigned there) / capacity; the request's
  encode finishes with the slowest of them (items on different encoders run in parallel);
* prefill: (pending + prompt tokens) / capacity, after encode (TTFT = encode + prefill);
* decode: starts at max(TTFT, time until a slot frees) and takes max_new_tokens x per-token
  time, where per-token time = batch / decode capacity: the batch (the requests decoding there,
  this one included, at most decode_slots) shares the instance's measured throughput.
  With n decode tasks on an instance of S slots holding P pending tokens, a slot frees after
  about (n - S + 1) x (P / n) / capacity seconds (0 while n < S).

Everything is O(stages + encoders used); nothing walks the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from services.scheduler.core.load import LoadBook
from services.scheduler.core.routing import Instance

__all__ = ["Estimate", "RequestCost", "estimate_path"]


@dataclass(frozen=True)
class RequestCost:
    """What one request costs per stage, and what it asks for.

    `media` optionally lists the tokens of each media item (image or audio clip); when given,
    `image_tokens` defaults to their sum. Without `media`, a request with image tokens is one
    item. `deadline` is absolute, in the same clock as the `now` passed to admission.
    """

    request_id: str
    priority: int = 0
    deadline: float | None = None
    ttft_target_s: float | None = None
    image_tokens: int = 0
    prompt_tokens: int = 0
    max_new_tokens: int = 0
    media: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        media = tuple(int(m) for m in self.media)
        if any(m < 0 for m in media):
            raise ValueError("media token counts must be >= 0")
        if media and not self.image_tokens:
            object.__setattr__(self, "image_tokens", sum(media))
        elif media and sum(media) != self.image_tokens:
            raise ValueError(f"image_tokens={self.image_tokens} but media sum to {sum(media)}")
        object.__setattr__(self, "media", media)
        for name in ("image_tokens", "prompt_tokens", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def media_costs(self) -> tuple[int, ...]:
        """Tokens per media item (one item of `image_tokens` when `media` is not given)."""
        if self.media:
            return self.media
        return (self.image_tokens,) if self.image_tokens else ()

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this request runs through, in order (no encode without media)."""
        return ("encode", "prefill", "decode") if self.image_tokens else ("prefill", "decode")

    def cost(self, stage: str) -> int:
        """Tokens of work at `stage`."""
        if stage == "encode":
            return self.image_tokens
        if stage == "prefill":
            return self.prompt_tokens
        if stage == "decode":
            return self.max_new_tokens
        raise ValueError(f"unknown stage {stage!r}")


@dataclass(frozen=True)
class Estimate:
    """Estimated latencies of one request on one path, seconds from now."""

    encode_s: float
    """Until the request's last media item is encoded (0 without media)."""
    prefill_s: float
    """Prefill's own part: (pending + prompt tokens) / capacity."""
    ttft_s: float
    """encode_s + prefill_s."""
    slot_wait_s: float
    """Until a decode slot frees on the chosen decode instance (0 with a free slot)."""
    decode_s: float
    """max_new_tokens x per-token time."""
    finish_s: float
    """max(ttft_s, slot_wait_s) + decode_s: when the last token is out."""

    @property
    def ttft_ms(self) -> float:
        """ttft_s in milliseconds."""
        return self.ttft_s * 1e3

    @property
    def finish_ms(self) -> float:
        """finish_s in milliseconds."""
        return self.finish_s * 1e3


def estimate_path(
    req: RequestCost,
    encoders: Sequence[Instance],
    prefill: Instance,
    decode: Instance,
    book: LoadBook,
    *,
    idle: bool = False,
) -> Estimate:
    """Estimates `req` on the path (`encoders` one per media item, `prefill`, `decode`).

    With ``idle=True`` the pending work is ignored: the request's own service time, the floor
    no amount of waiting can lower.
    """
    encode_s = 0.0
    costs = req.media_costs
    if costs:
        if len(encoders) != len(costs):
            raise ValueError(f"{len(costs)} media items but {len(encoders)} encoders")
        first = encoders[0]
        if all(e is first for e in encoders):  # the common case: one encoder
            assigned = {first.name: (first, req.image_tokens)}
        else:
            assigned = {}
            for enc, cost in zip(encoders, costs):
                prev = assigned.get(enc.name)
                assigned[enc.name] = (enc, cost + (prev[1] if prev else 0))
        for name, (enc, tokens) in assigned.items():
            pending = 0 if idle else book.pending("encode", name)
            encode_s = max(encode_s, (pending + tokens) / enc.capacity["encode"])
    pending = 0 if idle else book.pending("prefill", prefill.name)
    prefill_s = (pending + req.prompt_tokens) / prefill.capacity["prefill"]
    ttft_s = encode_s + prefill_s

    cap = decode.capacity["decode"]
    slots = decode.decode_slots
    slot_wait_s = 0.0
    batch = 1
    if not idle:
        n = book.slots_used(decode.name)
        batch = min(slots, n + 1)
        if n >= slots:
            slot_wait_s = (n - slots + 1) * (book.pending("decode", decode.name) / n) / cap
    decode_s = req.max_new_tokens * batch / cap
    finish_s = max(ttft_s, slot_wait_s) + decode_s
    return Estimate(encode_s, prefill_s, ttft_s, slot_wait_s, decode_s, finish_s)
