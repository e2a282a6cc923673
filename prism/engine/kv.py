"""Preallocated per-slot KV buffers for continuous-batching decode.

Each layer has `k` and `v` buffers of shape [slots, kv_heads, max_len, head_dim], allocated (and
touched) once. A decode step writes each row's new key and value at that row's own position and
attends over a view of the buffers with a per-row mask; nothing is concatenated per step.
"""
from __future__ import annotations

import torch

from prism.models.base import KvLayout

KEY = 1
VALUE = 2


class SlotKV:
    def __init__(self, layout: KvLayout, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        if slots < 1 or max_len < 2:
            raise ValueError("slots must be >= 1 and max_len >= 2")
        self.layout, self.slots, self.max_len = layout, slots, max_len
        shape = (slots, layout.num_kv_heads, max_len, layout.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layout.num_layers)]

    @property
    def nbytes(self) -> int:
        return 2 * sum(t.numel() * t.element_size() for t in self.k)

    def destination(self, slot: int, layer: int, part: int, start: int, tokens: int) -> torch.Tensor:
        """The view `[tokens, kv_heads, head_dim]` where an imported chunk of `tokens` rows
        starting at `start` lands (a strided view into the slot buffer)."""
        if not 0 <= layer < self.layout.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.layout.num_layers})")
        if part not in (KEY, VALUE):
            raise ValueError(f"part must be KEY or VALUE, not {part}")
        if start < 0 or tokens < 0 or start + tokens > self.max_len:
            raise ValueError(f"tokens [{start}, {start + tokens}) exceed the slot length {self.max_len}")
        buf = (self.k if part == KEY else self.v)[layer]
        return buf[slot, :, start : start + tokens].transpose(0, 1)

    def move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.k, *self.v):
            buf[dst, :, :length].copy_(buf[src, :, :length])


class StepCache:
    """What the decoder layers see as `past_key_values` during one decode step: `update`
    writes the step's keys and values at each row's position and returns the rows' whole KV."""

    def __init__(self, kv: SlotKV, rows: slice | torch.Tensor, write_pos: torch.Tensor, kv_len: int):
        self.kv, self.rows, self.kv_len = kv, rows, kv_len
        self.write_pos = write_pos
        if isinstance(rows, slice):
            self.row_index = torch.arange(rows.start, rows.stop, device=write_pos.device)
        else:
            self.row_index = rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kb, vb = self.kv.k[layer_idx], self.kv.v[layer_idx]
        kb[self.row_index, :, self.write_pos] = key_states[:, :, 0]
        vb[self.row_index, :, self.write_pos] = value_states[:, :, 0]
        return kb[self.rows, :, : self.kv_len], vb[self.rows, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len - 1
