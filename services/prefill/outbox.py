"""The KV cache of one prompt pass, held for the decode worker and streamed layer by layer:
the compute thread adds each layer as the decoder finishes it, and a FetchKv stream sends
every layer as soon as it is there, while later layers are still being computed."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KvMeta:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    prompt_tokens: int
    rope_delta: int
    dtype: torch.dtype


class KvOutbox:
    def __init__(self, meta: KvMeta, loop: asyncio.AbstractEventLoop):
        self.meta = meta
        self.loop = loop
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.first_token: int | None = None
        self.error: tuple[str, str] | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def sink(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Called from the compute thread with layer `layer`'s [tokens, heads, dim] KV."""
        self.loop.call_soon_threadsafe(self._add, layer, keys, values)

    def _add(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if layer != len(self.layers):
            self.fail("INTERNAL", f"layer {layer} arrived out of order")
            return
        self.layers.append((keys, values))
        self._notify()

    def finish(self, first_token: int) -> None:
        self.first_token = first_token
        self._notify()

    def fail(self, code: str, message: str) -> None:
        self.error = (code, message)
        self._notify()

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers)

    async def follow(self):
        """Yields ("layer", index, k, v) for each layer as it arrives, then ("first", token);
        raises KvFailed if the prompt pass fails."""
        sent = 0
        while True:
            changed = self._changed
            while sent < len(self.layers):
                k, v = self.layers[sent]
                yield ("layer", sent, k, v)
                sent += 1
            if self.error is not None:
                raise KvFailed(*self.error)
            if self.first_token is not None and sent == self.meta.num_layers:
                yield ("first", self.first_token)
                return
            await changed.wait()


class KvFailed(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message
