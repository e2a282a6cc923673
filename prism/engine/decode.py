"""Continuous-batching decode core.

Requests join between any two steps and leave at any step. Their KV lives in preallocated
per-slot buffers (prism.engine.kv.SlotKV); active requests are kept in slots [0, B) so a step
attends over a plain view of the buffers: a finished request's slot is refilled by moving the
highest active one down, and imports reserve the highest free slots. When a hole cannot be
filled (an import still owns it) the step gathers the active rows instead.

Thread safety: `write_kv` for a reserved request may run concurrently with `step`; every
other method must be called from one thread at a time.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from prism.engine.kv import SlotKV
from prism.engine.lm import LanguageModel
from prism.engine.sampling import Sampling, select_tokens


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


class NoFreeSlot(RuntimeError):
    """Every decode slot is taken."""


class PromptTooLong(ValueError):
    """The prompt leaves no room in a slot for generated tokens."""


@dataclass(frozen=True)
class DecodeSpec:
    """What decoding a request needs once its KV is imported."""

    request_id: str
    first_token: int
    rope_delta: int
    sampling: Sampling
    #: Tokens to generate in all, the first (made by prefill) included.
    max_new_tokens: int
    stop_ids: frozenset[int]


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int | None
    finish: Finish | None


@dataclass
class _Seq:
    spec: DecodeSpec
    slot: int
    length: int  # tokens in the cache; the next token is written at this index
    last_token: int
    generated: int = 1  # the first token counts


@dataclass
class _Reservation:
    slot: int
    prompt_tokens: int
    done_layers: set[int] = field(default_factory=set)


class DecodeEngine:
    def __init__(self, lm: LanguageModel, slots: int, max_len: int):
        self.lm = lm
        self.kv = SlotKV(lm.layout, slots, max_len, lm.dtype, lm.device)
        self.max_len = max_len
        self._free: set[int] = set(range(slots))
        self._reserved: dict[str, _Reservation] = {}
        self._active: dict[str, _Seq] = {}
        self._lock = threading.Lock()

    # ---- admission -------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def active_ids(self) -> list[str]:
        """Requests in the running batch."""
        with self._lock:
            return list(self._active)

    def reserve(self, request_id: str, prompt_tokens: int) -> int:
        """Reserve a slot for a request whose KV is about to be imported."""
        if prompt_tokens < 1 or prompt_tokens + 1 > self.max_len:
            raise PromptTooLong(f"prompt of {prompt_tokens} tokens does not fit a {self.max_len}-token slot")
        with self._lock:
            if request_id in self._reserved or request_id in self._active:
                raise ValueError(f"request {request_id} already holds a slot")
            if not self._free:
                raise NoFreeSlot(f"all {self.kv.slots} decode slots are taken")
            slot = max(self._free)
            self._free.remove(slot)
            self._reserved[request_id] = _Reservation(slot, prompt_tokens)
            return slot

    def is_reserved(self, request_id: str) -> bool:
        """True while a slot is reserved for the request and its KV not yet activated."""
        with self._lock:
            return request_id in self._reserved

    def kv_destination(self, request_id: str, layer: int, part: int, start: int, tokens: int) -> torch.Tensor:
        """Where an imported KV chunk lands: a [tokens, kv_heads, head_dim] view."""
        res = self._reserved[request_id]
        if start + tokens > res.prompt_tokens:
            raise ValueError(f"KV chunk [{start}, {start + tokens}) beyond the prompt's {res.prompt_tokens} tokens")
        return self.kv.destination(res.slot, layer, part, start, tokens)

    def write_kv(self, request_id: str, layer: int, part: int, start: int, rows: torch.Tensor) -> None:
        self.kv_destination(request_id, layer, part, start, rows.shape[0]).copy_(rows)

    def activate(self, spec: DecodeSpec) -> TokenEvent | None:
        """Join the running batch with an imported KV. Returns a finish event at once when the
        first token already ends the request."""
        with self._lock:
            res = self._reserved.pop(spec.request_id)
            finish = self._finish_reason(spec, spec.first_token, 1, res.prompt_tokens)
            if finish is not None:
                self._free.add(res.slot)
                return TokenEvent(spec.request_id, None, finish)
            self._active[spec.request_id] = _Seq(spec, res.slot, res.prompt_tokens, spec.first_token)
            return None

    def release(self, request_id: str) -> bool:
        """Free a request's slot now (cancelled, failed or finished). True if it held one."""
        with self._lock:
            held = self._reserved.pop(request_id, None) or self._active.pop(request_id, None)
            if held is None:
                return False
            self._free.add(held.slot)
            return True

    # ---- stepping --------------------------------------------------------------------
    def _finish_reason(self, spec: DecodeSpec, token: int, generated: int, length: int) -> Finish | None:
        if token in spec.stop_ids:
            return Finish.STOP
        if generated >= spec.max_new_tokens or length + 1 >= self.max_len:
            return Finish.LENGTH
        return None

    def _layout(self) -> tuple[list[_Seq], slice | torch.Tensor]:
        seqs = sorted(self._active.values(), key=lambda s: s.slot)
        batch = len(seqs)
        holes = sorted(s for s in self._free if s < batch)
        movers = [s for s in reversed(seqs) if s.slot >= batch]
        for hole, seq in zip(holes, movers):
            self.kv.move(seq.slot, hole, seq.length)
            self._free.remove(hole)
            self._free.add(seq.slot)
            seq.slot = hole
        seqs.sort(key=lambda s: s.slot)
        if seqs[-1].slot == batch - 1:
            return seqs, slice(0, batch)
        return seqs, torch.tensor([s.slot for s in seqs], device=self.lm.device)

    def step(self) -> list[TokenEvent]:
        """Generate one token for every active request."""
        with self._lock:
            if not self._active:
                return []
            seqs, rows = self._layout()
            tokens = torch.tensor([s.last_token for s in seqs])
            lengths = torch.tensor([s.length for s in seqs])
            deltas = torch.tensor([s.spec.rope_delta for s in seqs])
            logits = self.lm.decode_step(tokens, lengths, deltas, self.kv, rows)
            chosen = select_tokens(logits, [s.spec.sampling for s in seqs], [s.generated for s in seqs])
            events = []
            for seq, token in zip(seqs, chosen):
                seq.length += 1
                seq.generated += 1
                seq.last_token = token
                finish = self._finish_reason(seq.spec, token, seq.generated, seq.length)
                events.append(TokenEvent(seq.spec.request_id, token, finish))
                if finish is not None:
                    del self._active[seq.spec.request_id]
                    self._free.add(seq.slot)
            return events
