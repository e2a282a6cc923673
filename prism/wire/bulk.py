"""Fast path for the bulk tensor streams (``FetchKv``, ``FetchEmbeddings``).

Python gRPC moves one ``bytes`` object per message. The plain path builds a protobuf message
around a tensor's bytes, which copies the data three or four times on each side (tensor to
bytes, into the message, out by ``SerializeToString``; ``FromString`` and every read of
``.data`` on receive). This module cuts that to what is unavoidable:

* **send**: :func:`encode_kv_chunk` / :func:`encode_embeddings_chunk` hand-encode the
  protobuf wire format of a ``FetchKvResponse`` / ``FetchEmbeddingsResponse`` straight into one
  new ``bytes`` object: the header is written, then the tensor (any strides, any device) is
  copied *once* into place. The servicer yields those bytes; a pass-through response serializer
  (:func:`add_bulk_servicer_to_server`) hands them to gRPC as they are.
* **receive**: :func:`parse_fetch_kv_response` / :func:`parse_fetch_embeddings_response` are
  response deserializers that parse the message into views whose tensor data is a zero-copy
  ``memoryview`` of the received bytes; :class:`KvReceiver` and :class:`EmbeddingsReceiver`
  validate each chunk and copy it once, into its final place (e.g. a decode slot's KV buffer).

The bytes are canonical protobuf, except that the chunk's dtype varint may carry redundant
continuation bytes (legal protobuf, accepted by every conforming parser) so that the tensor data
starts 8-byte aligned in the message: received views are then aligned for every dtype.

Memory: each message is a fresh ~1 MiB allocation. With glibc's default malloc these come from
``mmap`` and are returned to the OS when freed, so every message page-faults its buffer in again
(~2 GB/s instead of ~20 GB/s memcpy). Start servers and workers with the environment variable
``GLIBC_TUNABLES`` set to :data:`GLIBC_TUNABLES` (``malloc_tunables_env()`` builds that env for
launchers): allocations below 32 MiB then come from the heap, which is kept (not trimmed), so
message buffers reuse already-touched memory. glibc reads it at process start only.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import torch
from google.protobuf.message import DecodeError

from prism.v1 import stages_pb2
from prism.wire.tensors import (
    DEFAULT_CHUNK_BYTES,
    ChunkAssembler,
    TensorChunkView,
    dtype_from_proto,
    dtype_name,
    dtype_to_proto,
    iter_row_ranges,
    numpy_view,
    tensor_bytes,
)

#: Value for the ``GLIBC_TUNABLES`` environment variable that keeps message buffers touched.
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"

#: Methods whose responses take the pass-through serializer by default.
BULK_METHODS = frozenset({"FetchKv", "FetchEmbeddings"})
FETCH_KV_METHOD = "/prism.v1.PrefillService/FetchKv"
FETCH_EMBEDDINGS_METHOD = "/prism.v1.EncoderService/FetchEmbeddings"

KEY = stages_pb2.KV_PART_KEY
VALUE = stages_pb2.KV_PART_VALUE

_MASK64 = (1 << 64) - 1
_ALIGN = 8
_SMALL = 64 * 1024  # below this, b"".join is as cheap as the in-place write


def malloc_tunables_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with :data:`GLIBC_TUNABLES` merged into its
    ``GLIBC_TUNABLES`` variable (other tunables kept). Pass it to ``subprocess`` launchers."""
    out = dict(os.environ if env is None else env)
    ours = {p.split("=", 1)[0] for p in GLIBC_TUNABLES.split(":")}
    keep = [p for p in out.get("GLIBC_TUNABLES", "").split(":") if p and p.split("=", 1)[0] not in ours]
    out["GLIBC_TUNABLES"] = ":".join([*keep, GLIBC_TUNABLES])
    return out


def malloc_tunables_active(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process's environment carries the malloc tunables (log a hint when not)."""
    have = set((os.environ if env is None else env).get("GLIBC_TUNABLES", "").split(":"))
    return set(GLIBC_TUNABLES.split(":")) <= have


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def _varint_len(v: int) -> int:
    v &= _MASK64
    n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


def _put_varint(out: bytearray, v: int, width: int = 0) -> None:
    """Append ``v`` (negative: 64-bit two's complement) as a varint of ``width`` bytes (0:
    minimal). Extra width is redundant continuation bytes, which parsers must accept."""
    v &= _MASK64
    n = max(width, _varint_len(v))
    for _ in range(n - 1):
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_scalar(out: bytearray, field: int, v: int) -> None:
    """A varint field, omitted when 0 (proto3 canonical form)."""
    if v:
        out.append(field << 3)
        _put_varint(out, v)


def _tensor_chunk_fields(dtype: int, shape: Sequence[int], offset: int, dtype_width: int = 0) -> bytes:
    """TensorChunk fields 1-3, canonical except that the dtype varint takes ``dtype_width``
    bytes when that is more than it needs (redundant continuation bytes)."""
    out = bytearray()
    if dtype:
        out.append(0x08)
        _put_varint(out, dtype, dtype_width)
    if shape:
        packed = bytearray()
        for d in shape:
            _put_varint(packed, d)
        out.append(0x12)
        _put_varint(out, len(packed))
        out += packed
    _put_scalar(out, 3, offset)
    return bytes(out)


def _header(
    outer: Sequence[tuple[bytes, int]], dtype: int, shape: Sequence[int], offset: int, nbytes: int, align: int
) -> bytes:
    """Wire bytes preceding the data of a TensorChunk nested in ``outer`` length-delimited
    fields (outermost first; each ``(fields before it, one-byte tag)``).

    With ``align`` > 1 (at most 8) the TensorChunk's dtype varint is widened with redundant
    continuation bytes so that the header length, hence the data's position in the message, is
    a multiple of ``align``. Length varints stay minimal: some parsers (upb) reject length
    varints longer than 5 bytes, while all accept scalar varints of up to 10 bytes.
    """

    def build(dtype_width: int) -> bytes:
        inner = bytearray(_tensor_chunk_fields(dtype, shape, offset, dtype_width))
        if nbytes:  # empty bytes are omitted, as proto3 does
            inner.append(0x22)
            _put_varint(inner, nbytes)
        parts = [bytes(inner)]
        size = len(inner) + nbytes
        for prefix, tag in reversed(outer):
            piece = bytearray(prefix)
            piece.append(tag)
            _put_varint(piece, size)
            size += len(piece)
            parts.append(bytes(piece))
        return b"".join(reversed(parts))

    header = build(0)
    if not (1 < align <= 8 and nbytes and dtype):
        return header
    width = _varint_len(dtype)
    for _ in range(4):  # widening can lengthen an outer length varint: re-check
        short = -len(header) % align
        if not short:
            break
        width = 1 + (width - 1 + short) % align
        header = build(width)
    return header


try:  # CPython: a bytes object can be created uninitialized and filled before anyone sees it.
    _bytes_new = ctypes.pythonapi.PyBytes_FromStringAndSize
    _bytes_new.restype, _bytes_new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_ssize_t]
    _bytes_ptr = ctypes.pythonapi.PyBytes_AsString
    _bytes_ptr.restype, _bytes_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object]
except (AttributeError, OSError):  # pragma: no cover - other interpreters
    _bytes_new = _bytes_ptr = None


def _write_tensor(dst: torch.Tensor, t: torch.Tensor) -> None:
    """Copy ``t`` (any strides, any device) into ``dst``, a uint8 tensor of its byte size."""
    shape = tuple(t.shape) or (1,)
    if t.device.type == "cpu":
        src = numpy_view(t).reshape(shape)
        np.copyto(dst.numpy().view(src.dtype).reshape(shape), src, casting="no")
    else:  # device to host, straight into the message
        dst.view(t.dtype).view(shape).copy_(t.reshape(shape))


def _with_data(header: bytes, t: torch.Tensor) -> bytes:
    """``header + raw bytes of t`` as one new bytes object, copying the tensor once."""
    t = t.detach()
    n = t.numel() * t.element_size()
    if _bytes_new is None or n < _SMALL:
        return b"".join((header, tensor_bytes(t)))
    h = len(header)
    out = _bytes_new(None, h + n)
    addr = _bytes_ptr(out)
    ctypes.memmove(addr, header, h)
    dst = torch.frombuffer((ctypes.c_char * n).from_address(addr + h), dtype=torch.uint8)
    _write_tensor(dst, t)
    return out


def _check_chunk(t: torch.Tensor, offset: int) -> int:
    if t.dim() == 0:
        raise ValueError("a chunk needs at least one dimension (rows)")
    if offset < 0:
        raise ValueError(f"chunk offset must be non-negative, not {offset}")
    return dtype_to_proto(t.dtype, field="chunk.dtype")


def encode_tensor_chunk(t: torch.Tensor, offset: int = 0, *, align: int = _ALIGN) -> bytes:
    """Wire bytes of ``TensorChunk(dtype, shape=t.shape, offset, data=t's bytes)``."""
    dtype = _check_chunk(t, offset)
    return _with_data(_header((), dtype, t.shape, offset, t.numel() * t.element_size(), align), t)


def encode_kv_chunk(layer: int, part: int, t: torch.Tensor, offset: int, *, align: int = _ALIGN) -> bytes:
    """Wire bytes of ``FetchKvResponse(chunk=KvChunk(layer, part, TensorChunk(...)))``.

    ``t`` is ``[tokens, kv_heads, head_dim]`` (any strides, e.g. ``k[0].transpose(0, 1)[t0:t1]``
    of a ``[1, heads, seq, dim]`` cache) holding tokens ``offset .. offset + tokens``. With
    ``align`` the data starts at a multiple of ``align`` bytes into the message (1: canonical
    bytes, identical to ``SerializeToString``).
    """
    if t.dim() != 3:
        raise ValueError(f"KV chunk must be [tokens, kv_heads, head_dim], not {list(t.shape)}")
    if part not in (KEY, VALUE):
        raise ValueError(f"part must be KV_PART_KEY or KV_PART_VALUE, not {part}")
    dtype = _check_chunk(t, offset)
    kv = bytearray()
    _put_scalar(kv, 1, layer)
    _put_scalar(kv, 2, part)
    outer = ((b"", 0x12), (bytes(kv), 0x1A))
    return _with_data(_header(outer, dtype, t.shape, offset, t.numel() * t.element_size(), align), t)


def encode_embeddings_chunk(
    item: int, total_rows: int, t: torch.Tensor, offset: int, *, align: int = _ALIGN
) -> bytes:
    """Wire bytes of ``FetchEmbeddingsResponse(item, total_rows, chunk=TensorChunk(...))`` for
    rows ``offset .. offset + len(t)`` of item ``item``'s ``[total_rows, hidden]`` embedding."""
    dtype = _check_chunk(t, offset)
    head = bytearray()
    _put_scalar(head, 1, item)
    _put_scalar(head, 2, total_rows)
    outer = ((bytes(head), 0x1A),)
    return _with_data(_header(outer, dtype, t.shape, offset, t.numel() * t.element_size(), align), t)


def iter_kv_layer(
    layer: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    start: int = 0,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """Encoded ``FetchKvResponse`` chunks for one layer: ``keys`` and ``values`` are
    ``[tokens, kv_heads, head_dim]`` (any strides) holding tokens ``start .. start + tokens``."""
    if keys.shape != values.shape:
        raise ValueError(f"keys {list(keys.shape)} and values {list(values.shape)} differ in shape")
    row_bytes = keys[0].numel() * keys.element_size() if keys.dim() == 3 and keys.shape[0] else 1
    for part, t in ((KEY, keys), (VALUE, values)):
        for a, b in iter_row_ranges(t.shape[0], row_bytes, max_chunk_bytes):
            yield encode_kv_chunk(layer, part, t[a:b], start + a)


def iter_embeddings(
    item: int, emb: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Encoded ``FetchEmbeddingsResponse`` chunks of one item's ``[rows, hidden]`` embedding."""
    if emb.dim() < 1:
        raise ValueError("an embedding needs at least one dimension (rows)")
    row_bytes = emb[0].numel() * emb.element_size() if emb.shape[0] else 1
    for a, b in iter_row_ranges(emb.shape[0], row_bytes, max_chunk_bytes):
        yield encode_embeddings_chunk(item, emb.shape[0], emb[a:b], a)


# --------------------------------------------------------------------------------------------
# Parsing (zero-copy)
# --------------------------------------------------------------------------------------------


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise ValueError("malformed protobuf: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise ValueError("malformed protobuf: varint longer than 10 bytes")


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _fields(buf, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field, wire_type, a, b)`` for each field in ``buf[pos:end]``: a varint's value in
    ``a``; a length-delimited field's extent as ``a:b``; fixed-width fields are skipped."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wt = key >> 3, key & 7
        if field == 0:
            raise ValueError("malformed protobuf: field number 0")
        if wt == 0:
            v, pos = _varint(buf, pos, end)
            yield field, 0, v, 0
        elif wt == 2:
            n, pos = _varint(buf, pos, end)
            if n > end - pos:
                raise ValueError("malformed protobuf: length exceeds the message")
            yield field, 2, pos, pos + n
            pos += n
        elif wt in (1, 5):
            pos += 8 if wt == 1 else 4
            if pos > end:
                raise ValueError("malformed protobuf: truncated fixed-width field")
        else:
            raise ValueError(f"malformed protobuf: unsupported wire type {wt}")


class _ChunkState:
    __slots__ = ("data", "dtype", "offset", "shape")

    def __init__(self) -> None:
        self.dtype, self.shape, self.offset, self.data = 0, [], 0, (0, 0)

    def merge(self, buf, a: int, b: int) -> _ChunkState:
        for f, wt, x, y in _fields(buf, a, b):
            if f == 1 and wt == 0:
                self.dtype = _i32(x)
            elif f == 2 and wt == 2:  # packed
                pos = x
                while pos < y:
                    v, pos = _varint(buf, pos, y)
                    self.shape.append(_i64(v))
            elif f == 2 and wt == 0:  # unpacked element
                self.shape.append(_i64(x))
            elif f == 3 and wt == 0:
                self.offset = _i64(x)
            elif f == 4 and wt == 2:
                self.data = (x, y)
        return self

    def view(self, mv: memoryview) -> TensorChunkView:
        return TensorChunkView(self.dtype, tuple(self.shape), self.offset, mv[self.data[0] : self.data[1]])


def _buffers(data) -> tuple[object, memoryview]:
    mv = memoryview(data)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return (data if isinstance(data, bytes) else mv), mv


def parse_tensor_chunk(data) -> TensorChunkView:
    """Parse ``TensorChunk`` wire bytes into a view (data not copied, not yet validated)."""
    buf, mv = _buffers(data)
    return _ChunkState().merge(buf, 0, len(mv)).view(mv)


@dataclass(frozen=True, slots=True)
class KvChunkView:
    """Parsed ``KvChunk``: ``chunk`` data is a view of the received bytes."""

    layer: int
    part: int
    chunk: TensorChunkView


@dataclass(frozen=True, slots=True)
class FetchKvView:
    """Parsed ``FetchKvResponse``: exactly one of header, chunk, trailer is set (``kind``)."""

    header: stages_pb2.KvHeader | None = None
    chunk: KvChunkView | None = None
    trailer: stages_pb2.KvTrailer | None = None

    @property
    def kind(self) -> str | None:
        return (
            "header"
            if self.header is not None
            else "chunk"
            if self.chunk is not None
            else ("trailer" if self.trailer is not None else None)
        )


@dataclass(frozen=True, slots=True)
class EmbeddingsChunkView:
    """Parsed ``FetchEmbeddingsResponse``: ``chunk`` data is a view of the received bytes."""

    item: int
    total_rows: int
    chunk: TensorChunkView


def parse_fetch_kv_response(data: bytes) -> FetchKvView:
    """Response deserializer for ``FetchKv``: parses (canonical or not) ``FetchKvResponse``
    bytes with protobuf semantics (last oneof member wins, repeated sub-messages merge, unknown
    fields skipped). ``ValueError`` on malformed bytes."""
    buf, mv = _buffers(data)
    kind, small, layer, part, chunk = 0, [], 0, 0, None
    for f, wt, a, b in _fields(buf, 0, len(mv)):
        if f not in (1, 2, 3) or wt != 2:
            continue
        if f != kind:  # switching oneof member clears the previous one
            kind, small, layer, part, chunk = f, [], 0, 0, None
        if f == 2:
            for g, wt2, x, y in _fields(buf, a, b):
                if g == 1 and wt2 == 0:
                    layer = _i32(x)
                elif g == 2 and wt2 == 0:
                    part = _i32(x)
                elif g == 3 and wt2 == 2:
                    chunk = (chunk or _ChunkState()).merge(buf, x, y)
        else:
            small.append(mv[a:b])
    try:
        if kind == 1:
            return FetchKvView(header=stages_pb2.KvHeader.FromString(b"".join(small)))
        if kind == 3:
            return FetchKvView(trailer=stages_pb2.KvTrailer.FromString(b"".join(small)))
    except DecodeError as e:
        raise ValueError(
            f"malformed protobuf in FetchKvResponse.{'header' if kind == 1 else 'trailer'}: {e}"
        ) from None
    if kind == 2:
        return FetchKvView(chunk=KvChunkView(layer, part, (chunk or _ChunkState()).view(mv)))
    return FetchKvView()


def parse_fetch_embeddings_response(data: bytes) -> EmbeddingsChunkView:
    """Response deserializer for ``FetchEmbeddings`` (zero-copy; see
    :func:`parse_fetch_kv_response`)."""
    buf, mv = _buffers(data)
    item, total, chunk = 0, 0, None
    for f, wt, a, b in _fields(buf, 0, len(mv)):
        if f == 1 and wt == 0:
            item = _i32(a)
        elif f == 2 and wt == 0:
            total = _i64(a)
        elif f == 3 and wt == 2:
            chunk = (chunk or _ChunkState()).merge(buf, a, b)
    return EmbeddingsChunkView(item, total, (chunk or _ChunkState()).view(mv))


# --------------------------------------------------------------------------------------------
# Receivers: validate and place chunks
# --------------------------------------------------------------------------------------------

KvDestination = Callable[[int, int, int, int], torch.Tensor]


def _kind(msg) -> str | None:
    return msg.WhichOneof("kind") if hasattr(msg, "WhichOneof") else msg.kind


class KvReceiver:
    """Consumes one ``FetchKv`` stream (parsed views or plain ``FetchKvResponse`` messages).

    ``destination(layer, part, start, tokens)`` returns the ``[tokens, kv_heads, head_dim]`` view
    where those tokens land, e.g. ``functools.partial(slot_kv.destination, slot)``; without it,
    buffers are allocated (:meth:`tensor`). The header is checked against any expected
    ``num_layers``/``num_kv_heads``/``head_dim``/``dtype`` and ``max_tokens`` (always pass them
    for a peer you do not control); every chunk is validated before it is copied, and the trailer
    is accepted only once every token of every layer arrived.
    """

    def __init__(
        self,
        destination: KvDestination | None = None,
        *,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        dtype: torch.dtype | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self._destination = destination
        self._expect = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        self._dtype, self._max_tokens = dtype, max_tokens
        self.header: stages_pb2.KvHeader | None = None
        self.trailer: stages_pb2.KvTrailer | None = None
        self._asm: dict[tuple[int, int], ChunkAssembler] = {}
        self.bytes_received = 0

    def _on_header(self, h) -> None:
        if self.header is not None:
            raise ValueError("FetchKv: a second header")
        for name, want in self._expect.items():
            got = getattr(h, name)
            if got < 1 or (want is not None and got != want):
                raise ValueError(f"header.{name} is {got}; expected {want if want is not None else '>= 1'}")
        tdtype = dtype_from_proto(h.dtype, field="header.dtype")
        if self._dtype is not None and tdtype != self._dtype:
            raise ValueError(f"header.dtype is {dtype_name(h.dtype)}; expected {self._dtype}")
        if h.prompt_tokens < 0 or (self._max_tokens is not None and h.prompt_tokens > self._max_tokens):
            raise ValueError(f"header.prompt_tokens is {h.prompt_tokens}; the limit is {self._max_tokens}")
        shape = (h.prompt_tokens, h.num_kv_heads, h.head_dim)
        for layer in range(h.num_layers):
            for part in (KEY, VALUE):
                f = f"chunk(layer={layer}, part={stages_pb2.KvPart.Name(part)})"
                if self._destination is None:
                    self._asm[layer, part] = ChunkAssembler(shape, tdtype, field=f)
                    continue
                out = self._destination(layer, part, 0, h.prompt_tokens)
                if tuple(out.shape) != shape or out.dtype != tdtype:
                    raise ValueError(
                        f"destination for layer {layer} is {list(out.shape)} {out.dtype}; the KV is {list(shape)} {tdtype}"
                    )
                self._asm[layer, part] = ChunkAssembler(out=out, field=f)
        self.header = h

    def feed(self, msg) -> str:
        """Take one message (a :class:`FetchKvView`, a ``FetchKvResponse`` or its wire bytes);
        returns its kind ("header", "chunk" or "trailer")."""
        if isinstance(msg, (bytes, bytearray, memoryview)):
            msg = parse_fetch_kv_response(msg)
        kind = _kind(msg)
        if self.trailer is not None:
            raise ValueError(f"FetchKv: {kind} after the trailer")
        if kind == "header":
            self._on_header(msg.header)
        elif kind == "chunk":
            if self.header is None:
                raise ValueError("FetchKv: a chunk before the header")
            c = msg.chunk
            asm = self._asm.get((c.layer, c.part))
            if asm is None:
                raise ValueError(
                    f"chunk.layer {c.layer} / chunk.part {c.part} out of range ({self.header.num_layers} layers, KEY or VALUE)"
                )
            asm.add(c.chunk)
            self.bytes_received += len(c.chunk.data)
        elif kind == "trailer":
            if self.header is None:
                raise ValueError("FetchKv: the trailer before the header")
            missing = [(k, a.missing()) for k, a in self._asm.items() if not a.complete]
            if missing:
                (layer, part), gaps = missing[0]
                raise ValueError(
                    f"FetchKv: trailer before all KV arrived (layer {layer} {stages_pb2.KvPart.Name(part)} "
                    f"misses tokens {gaps}; {len(missing)} parts incomplete)"
                )
            self.trailer = msg.trailer
        else:
            raise ValueError("FetchKv: empty message (no header, chunk or trailer)")
        return kind

    def layer_complete(self, layer: int) -> bool:
        """Whether keys and values of ``layer`` fully arrived."""
        return all(self._asm[layer, p].complete for p in (KEY, VALUE)) if self.header else False

    @property
    def complete(self) -> bool:
        return self.trailer is not None

    def tensor(self, layer: int, part: int) -> torch.Tensor:
        """The ``[tokens, heads, dim]`` destination of a layer's keys or values."""
        return self._asm[layer, part].out

    def finish(self) -> stages_pb2.KvTrailer:
        """Call when the stream ended: the trailer, or ``ValueError`` if it never came."""
        if self.trailer is None:
            raise ValueError("FetchKv: the stream ended before the trailer")
        return self.trailer

    def consume(self, stream: Iterable) -> stages_pb2.KvTrailer:
        for msg in stream:
            self.feed(msg)
        return self.finish()

    async def consume_async(self, stream: AsyncIterable) -> stages_pb2.KvTrailer:
        async for msg in stream:
            self.feed(msg)
        return self.finish()


class EmbeddingsReceiver:
    """Consumes one ``FetchEmbeddings`` stream into per-item ``[rows, hidden]`` tensors.

    ``expected_rows[i]`` (the encode task's ``item_tokens``) bounds and checks each item;
    ``destination(item, rows)`` may supply where an item lands (else it is allocated).
    """

    def __init__(
        self,
        destination: Callable[[int, int], torch.Tensor] | None = None,
        *,
        expected_rows: Sequence[int] | None = None,
        hidden: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._destination, self._hidden, self._dtype = destination, hidden, dtype
        self._expected = None if expected_rows is None else [int(r) for r in expected_rows]
        self._asm: dict[int, ChunkAssembler] = {}
        self.bytes_received = 0

    def feed(self, msg) -> int:
        """Validate and place one message's chunk (an :class:`EmbeddingsChunkView`, a
        ``FetchEmbeddingsResponse`` or its wire bytes); returns its item index."""
        if isinstance(msg, (bytes, bytearray, memoryview)):
            msg = parse_fetch_embeddings_response(msg)
        item, total, chunk = msg.item, msg.total_rows, msg.chunk
        f = f"item[{item}].chunk"
        asm = self._asm.get(item)
        if asm is None:
            if item < 0 or (self._expected is not None and item >= len(self._expected)):
                raise ValueError(f"item {item} out of range")
            if total < 0 or (self._expected is not None and total != self._expected[item]):
                want = self._expected[item] if self._expected is not None else ">= 0"
                raise ValueError(f"item[{item}].total_rows is {total}; expected {want}")
            tdtype = dtype_from_proto(chunk.dtype, field=f"{f}.dtype")
            if self._dtype is not None and tdtype != self._dtype:
                raise ValueError(f"{f}.dtype is {dtype_name(chunk.dtype)}; expected {self._dtype}")
            row = tuple(chunk.shape[1:])
            if self._hidden is not None and row != (self._hidden,):
                raise ValueError(f"{f}.shape {list(chunk.shape)}: rows must be [{self._hidden}]")
            if self._destination is not None:
                asm = ChunkAssembler((total, *row), tdtype, out=self._destination(item, total), field=f)
            else:
                asm = ChunkAssembler((total, *row), tdtype, field=f)
            self._asm[item] = asm
        elif total != asm.rows:
            raise ValueError(f"item[{item}].total_rows changed from {asm.rows} to {total}")
        asm.add(chunk)
        self.bytes_received += len(chunk.data)
        return item

    def finish(self) -> list[torch.Tensor]:
        """All items, in order, once complete (``ValueError`` for missing items or rows)."""
        n = len(self._expected) if self._expected is not None else len(self._asm)
        out = []
        for i in range(n):
            if i not in self._asm:
                if self._expected is not None and self._expected[i] == 0:
                    out.append(torch.empty(0, self._hidden or 0, dtype=self._dtype or torch.float32))
                    continue
                raise ValueError(f"FetchEmbeddings: item {i} never arrived")
            out.append(self._asm[i].result())
        return out


# --------------------------------------------------------------------------------------------
# gRPC plumbing
# --------------------------------------------------------------------------------------------


def passthrough_serializer(msg) -> bytes:
    """Response serializer for bulk methods: pre-encoded bytes pass through; messages (headers,
    trailers) are serialized as usual."""
    if isinstance(msg, bytes):
        return msg
    if isinstance(msg, (bytearray, memoryview)):
        return bytes(msg)
    return msg.SerializeToString()


class _Capture:
    """Stands in for a server to capture what a generated ``add_*_to_server`` registers."""

    def __init__(self) -> None:
        self.service: str | None = None
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers) -> None:
        self.service, self.handlers = service, dict(handlers)


def bulk_method_handlers(
    add_to_server: Callable, servicer, bulk_methods: Iterable[str] = BULK_METHODS
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """The service name and method handlers that the generated ``add_to_server`` would register
    for ``servicer``, with :func:`passthrough_serializer` on the methods in ``bulk_methods``."""
    cap = _Capture()
    add_to_server(servicer, cap)
    if cap.service is None:
        raise RuntimeError(f"{add_to_server!r} registered no method handlers")
    bulk = set(bulk_methods) & set(cap.handlers)
    if not bulk:
        raise ValueError(f"none of {sorted(bulk_methods)} is a method of {cap.service}")
    handlers = {
        name: h._replace(response_serializer=passthrough_serializer) if name in bulk else h
        for name, h in cap.handlers.items()
    }
    return cap.service, handlers


def add_bulk_servicer_to_server(
    add_to_server: Callable, servicer, server, bulk_methods: Iterable[str] = BULK_METHODS
) -> None:
    """Like ``add_PrefillServiceServicer_to_server(servicer, server)`` (pass that function as
    ``add_to_server``), but the bulk methods may yield pre-encoded bytes (:func:`iter_kv_layer`,
    :func:`iter_embeddings`) as well as messages. Works for ``grpc.server`` and ``grpc.aio``."""
    service, handlers = bulk_method_handlers(add_to_server, servicer, bulk_methods)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    if hasattr(server, "add_registered_method_handlers"):
        server.add_registered_method_handlers(service, handlers)


def bulk_unary_stream(channel, method: str, request_serializer: Callable, parser: Callable):
    """A unary-stream callable on ``channel`` (sync or aio) whose responses are parsed by
    ``parser`` (zero-copy views) instead of protobuf's ``FromString``."""
    return channel.unary_stream(
        method, request_serializer=request_serializer, response_deserializer=parser, _registered_method=True
    )


def fetch_kv_method(channel):
    """``FetchKv`` callable yielding :class:`FetchKvView` (``call(FetchKvRequest(...))``)."""
    return bulk_unary_stream(
        channel, FETCH_KV_METHOD, stages_pb2.FetchKvRequest.SerializeToString, parse_fetch_kv_response
    )


def fetch_embeddings_method(channel):
    """``FetchEmbeddings`` callable yielding :class:`EmbeddingsChunkView`."""
    return bulk_unary_stream(
        channel,
        FETCH_EMBEDDINGS_METHOD,
        stages_pb2.FetchEmbeddingsRequest.SerializeToString,
        parse_fetch_embeddings_response,
    )


__all__ = [
    "BULK_METHODS",
    "FETCH_EMBEDDINGS_METHOD",
    "FETCH_KV_METHOD",
    "GLIBC_TUNABLES",
    "KEY",
    "VALUE",
    "EmbeddingsChunkView",
    "EmbeddingsReceiver",
    "FetchKvView",
    "KvChunkView",
    "KvReceiver",
    "add_bulk_servicer_to_server",
    "bulk_method_handlers",
    "bulk_unary_stream",
    "encode_embeddings_chunk",
    "encode_kv_chunk",
    "encode_tensor_chunk",
    "fetch_embeddings_method",
    "fetch_kv_method",
    "iter_embeddings",
    "iter_kv_layer",
    "malloc_tunables_active",
    "malloc_tunables_env",
    "parse_fetch_embeddings_response",
    "parse_fetch_kv_response",
    "parse_tensor_chunk",
    "passthrough_serializer",
]
