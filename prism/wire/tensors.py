"""Tensors on the wire: raw little-endian bytes plus dtype and shape (never pickle).

* dtype mapping between ``torch.dtype`` and ``prism.v1.DType``;
* whole tensors: :func:`tensor_to_proto` / :func:`tensor_from_proto`;
* chunks along dimension 0: :func:`iter_chunks` yields ``prism.v1.TensorChunk`` messages and
  :class:`ChunkAssembler` writes received chunks into a preallocated (or caller-supplied)
  destination, validating every chunk and knowing when all rows have arrived.

Everything received may come from an untrusted peer: dtypes, shapes, offsets and byte counts
are checked before any memory is touched, and failures raise ``ValueError`` naming the field.

Receiving is zero-copy where possible: :func:`tensor_from_proto` and :func:`chunk_tensor`
return tensors that *view* the received bytes. Those bytes are immutable, so treat such tensors
as read-only (``copy=True`` or ``.clone()`` for a private, writable tensor). The parsed chunk
form of the fast bulk path (:class:`TensorChunkView`, see ``prism.wire.bulk``) is accepted
everywhere a ``TensorChunk`` message is.
"""

from __future__ import annotations

import bisect
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from prism.v1 import common_pb2

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("prism.wire assumes a little-endian host (the wire format is little-endian)")

DType = common_pb2.DType

#: Most dimensions a received tensor may declare.
MAX_DIMS = 32
#: Most elements a received shape may describe, counting its non-zero dimensions only: far beyond
#: any real tensor, and small enough that strides and byte sizes stay within int64 (a shape such
#: as [16] * 22 + [0] holds no data, yet its strides overflow).
MAX_ELEMENTS = 1 << 56

#: Default size of one chunk's data on the wire (1 MiB: fast over loopback, far below gRPC's
#: default 4 MiB receive limit).
DEFAULT_CHUNK_BYTES = 1 << 20

_TORCH_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: common_pb2.D_TYPE_FLOAT32,
    torch.float16: common_pb2.D_TYPE_FLOAT16,
    torch.bfloat16: common_pb2.D_TYPE_BFLOAT16,
    torch.int64: common_pb2.D_TYPE_INT64,
    torch.int32: common_pb2.D_TYPE_INT32,
    torch.uint8: common_pb2.D_TYPE_UINT8,
    torch.bool: common_pb2.D_TYPE_BOOL,
}
_PROTO_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in _TORCH_TO_PROTO.items()}
#: Bytes per element of each wire dtype.
ITEMSIZE: dict[int, int] = {v: torch.empty((), dtype=k).element_size() for k, v in _TORCH_TO_PROTO.items()}


def dtype_to_proto(dtype: torch.dtype, *, field: str = "dtype") -> int:
    """The ``prism.v1.DType`` value of a torch dtype; ``ValueError`` for dtypes the wire lacks."""
    try:
        return _TORCH_TO_PROTO[dtype]
    except KeyError:
        names = ", ".join(str(d).removeprefix("torch.") for d in _TORCH_TO_PROTO)
        raise ValueError(
            f"{field}: torch dtype {dtype} cannot travel on the wire (supported: {names})"
        ) from None


def dtype_from_proto(value: int, *, field: str = "dtype") -> torch.dtype:
    """The torch dtype of a ``prism.v1.DType`` value; ``ValueError`` for unspecified/unknown."""
    try:
        return _PROTO_TO_TORCH[int(value)]
    except (KeyError, TypeError, ValueError):
        if value == common_pb2.D_TYPE_UNSPECIFIED:
            raise ValueError(f"{field} is unspecified (D_TYPE_UNSPECIFIED)") from None
        raise ValueError(f"{field}: unknown DType value {value!r}") from None


def dtype_name(value: int) -> str:
    """Readable name of a DType value (for error messages)."""
    try:
        return common_pb2.DType.Name(int(value))
    except ValueError:
        return str(value)


# --------------------------------------------------------------------------------------------
# Validation and zero-copy views
# --------------------------------------------------------------------------------------------


def check_shape(shape: Sequence[int], *, field: str = "shape") -> tuple[int, ...]:
    """Validate a received shape: at most :data:`MAX_DIMS` non-negative dims. Returns a tuple."""
    if len(shape) > MAX_DIMS:
        raise ValueError(f"{field} has {len(shape)} dimensions; at most {MAX_DIMS} are allowed")
    dims = tuple(int(d) for d in shape)
    for i, d in enumerate(dims):
        if d < 0:
            raise ValueError(f"{field}[{i}] is negative ({d})")
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        raise ValueError(f"{field} {list(dims)} spans more than 2**56 elements")
    return dims


def check_layout(
    dtype: int, shape: Sequence[int], nbytes: int, *, field: str
) -> tuple[torch.dtype, tuple[int, ...]]:
    """Validate dtype, shape and byte count of received data (``field`` names the message)."""
    tdtype = dtype_from_proto(dtype, field=f"{field}.dtype")
    dims = check_shape(shape, field=f"{field}.shape")
    expected = math.prod(dims) * ITEMSIZE[int(dtype)]
    if nbytes != expected:
        raise ValueError(
            f"{field}.data has {nbytes} bytes; shape {list(dims)} of {dtype_name(dtype)} needs {expected}"
        )
    return tdtype, dims


_frombuffer_warned = False


def _frombuffer(data, dtype: torch.dtype) -> torch.Tensor:
    """1-D tensor viewing ``data`` (a non-empty bytes-like object) without copying.

    torch warns (once per process) that the buffer is not writable; that is expected here, so
    the first call silences it. Later calls skip the (not thread-safe) warnings machinery.
    """
    global _frombuffer_warned
    if _frombuffer_warned:
        return torch.frombuffer(data, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        t = torch.frombuffer(data, dtype=dtype)
    _frombuffer_warned = True
    return t


def bytes_view(data, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Zero-copy tensor of ``shape`` over bytes-like ``data`` (already validated)."""
    if len(data) == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return _frombuffer(data, dtype).view(tuple(shape))


def numpy_view(t: torch.Tensor):
    """A numpy array sharing ``t``'s memory and strides (CPU tensors; bfloat16 as int16).

    The wire path copies with numpy, not ``Tensor.copy_``: torch runs copies above ~32k elements
    on its intra-op thread pool, whose OpenMP threads then spin-wait for more work; on a small
    machine they starve gRPC's own threads (measured here: a 74 MB KV stream took 5x longer).
    """
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def copy_into(dest: torch.Tensor, src: torch.Tensor) -> None:
    """``dest[...] = src`` for same-shape, same-dtype tensors (any strides, unaligned ``src`` too),
    single-threaded through numpy on CPU, ``Tensor.copy_`` for other devices."""
    if dest.device.type == "cpu" and src.device.type == "cpu" and dest.dtype == src.dtype:
        np.copyto(numpy_view(dest), numpy_view(src), casting="no")
    else:
        dest.copy_(src)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (row-major) as a memoryview.

    Zero-copy for contiguous CPU tensors; other tensors are made contiguous (one copy) first.
    Works for every wire dtype, bfloat16 and bool included.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 0:
        return memoryview(b"")
    a = np.ascontiguousarray(numpy_view(t))
    return memoryview(a.reshape(-1).view(np.uint8))


def _data_len(data) -> int:
    return data.nbytes if isinstance(data, memoryview) else len(data)


# --------------------------------------------------------------------------------------------
# Whole tensors
# --------------------------------------------------------------------------------------------


def tensor_to_proto(t: torch.Tensor) -> common_pb2.Tensor:
    """Encode a tensor as ``prism.v1.Tensor`` (raw bytes, dtype, shape)."""
    dtype = dtype_to_proto(t.dtype, field="tensor.dtype")
    return common_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=tensor_bytes(t).tobytes())


def tensor_from_proto(msg: common_pb2.Tensor, *, field: str = "tensor", copy: bool = False) -> torch.Tensor:
    """Decode a ``prism.v1.Tensor`` after validating it; ``ValueError`` names ``field``.

    Without ``copy`` the result views the message's bytes (treat it as read-only).
    """
    data = msg.data  # one read: each access of a bytes field makes a new object
    tdtype, dims = check_layout(msg.dtype, msg.shape, len(data), field=field)
    t = bytes_view(data, tdtype, dims)
    return t.clone() if copy else t


# --------------------------------------------------------------------------------------------
# Chunks along dimension 0
# --------------------------------------------------------------------------------------------


class ChunkLike(Protocol):
    """``prism.v1.TensorChunk`` or :class:`TensorChunkView`."""

    dtype: int
    shape: Sequence[int]
    offset: int
    data: object


@dataclass(frozen=True, slots=True)
class TensorChunkView:
    """A parsed TensorChunk whose ``data`` is a zero-copy memoryview of the received bytes.

    Produced by the fast bulk-path parsers in ``prism.wire.bulk``; unvalidated until
    :meth:`tensor` (or a :class:`ChunkAssembler`) checks it.
    """

    dtype: int
    shape: tuple[int, ...]
    offset: int
    data: memoryview

    def tensor(self, *, field: str = "chunk") -> torch.Tensor:
        """Validated zero-copy tensor of this chunk (read-only)."""
        return chunk_tensor(self, field=field)

    def to_proto(self) -> common_pb2.TensorChunk:
        """The equivalent message (copies the data)."""
        return common_pb2.TensorChunk(
            dtype=self.dtype, shape=self.shape, offset=self.offset, data=bytes(self.data)
        )


Chunk = common_pb2.TensorChunk | TensorChunkView


def chunk_tensor(chunk: Chunk, *, field: str = "chunk") -> torch.Tensor:
    """Validate a chunk (dtype, shape, offset, byte count) and view its data as a tensor."""
    data = chunk.data
    tdtype, dims = check_layout(chunk.dtype, chunk.shape, _data_len(data), field=field)
    if not dims:
        raise ValueError(f"{field}.shape is empty; a chunk has at least one dimension (rows)")
    if chunk.offset < 0:
        raise ValueError(f"{field}.offset is negative ({chunk.offset})")
    return bytes_view(data, tdtype, dims)


def rows_per_chunk(row_bytes: int, max_chunk_bytes: int) -> int:
    """Rows that fit in ``max_chunk_bytes`` (at least one)."""
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, not {max_chunk_bytes}")
    return max(1, max_chunk_bytes // row_bytes) if row_bytes > 0 else sys.maxsize


def iter_row_ranges(
    rows: int, row_bytes: int, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges covering ``rows`` rows, each at most ``max_chunk_bytes`` (but at
    least one row). No ranges for zero rows."""
    step = rows_per_chunk(row_bytes, max_chunk_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def iter_chunks(
    t: torch.Tensor, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES, *, offset: int = 0
) -> Iterator[common_pb2.TensorChunk]:
    """Split ``t`` along dim 0 into ``TensorChunk`` messages of at most ``max_chunk_bytes`` of data
    (at least one row each). ``offset`` is added to every chunk's offset (for a tensor that is
    itself a slice of a larger one). A tensor with no rows yields nothing.
    """
    if t.dim() == 0:
        raise ValueError("cannot chunk a 0-dimensional tensor along dimension 0")
    if offset < 0:
        raise ValueError(f"offset must be non-negative, not {offset}")
    dtype = dtype_to_proto(t.dtype, field="chunk.dtype")
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    for start, stop in iter_row_ranges(t.shape[0], row_bytes, max_chunk_bytes):
        part = t[start:stop]
        yield common_pb2.TensorChunk(
            dtype=dtype, shape=list(part.shape), offset=offset + start, data=tensor_bytes(part).tobytes()
        )


class RowSet:
    """Disjoint half-open row ranges received so far; rejects overlaps (duplicated chunks)."""

    __slots__ = ("_starts", "_stops", "count")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []
        self.count = 0

    def add(self, start: int, stop: int, *, field: str = "chunk") -> None:
        if stop <= start:
            return
        i = bisect.bisect_right(self._starts, start)
        if (i > 0 and self._stops[i - 1] > start) or (i < len(self._starts) and self._starts[i] < stop):
            raise ValueError(f"{field}: rows [{start}, {stop}) overlap rows already received")
        self.count += stop - start
        # Merge with neighbours that touch, keeping the lists short for in-order streams.
        if i > 0 and self._stops[i - 1] == start:
            i -= 1
            start = self._starts[i]
            del self._starts[i], self._stops[i]
        if i < len(self._starts) and self._starts[i] == stop:
            stop = self._stops[i]
            del self._starts[i], self._stops[i]
        self._starts.insert(i, start)
        self._stops.insert(i, stop)

    def missing(self, total: int) -> list[tuple[int, int]]:
        """Ranges of ``[0, total)`` not received yet."""
        gaps, pos = [], 0
        for a, b in zip(self._starts, self._stops):
            if a > pos:
                gaps.append((pos, a))
            pos = max(pos, b)
        if pos < total:
            gaps.append((pos, total))
        return gaps


class ChunkAssembler:
    """Writes chunks of one tensor into a destination, validating each, until all rows arrived.

    Either give ``shape`` and ``dtype`` (a destination is allocated with ``torch.empty``) or
    ``out=``: any tensor of the whole shape, e.g. a strided view into a preallocated buffer such as
    ``kv[slot, :, t0:t1, :].transpose(0, 1)`` for a ``[tokens, heads, dim]`` stream. Chunks must
    match the destination's dtype and trailing dims, lie inside its rows and not overlap.

    >>> asm = ChunkAssembler((10, 4), torch.float32)
    >>> for c in iter_chunks(torch.ones(10, 4), 48): asm.add(c)
    >>> asm.complete
    True
    """

    def __init__(
        self,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        *,
        out: torch.Tensor | None = None,
        field: str = "chunk",
    ) -> None:
        if out is None:
            if shape is None or dtype is None:
                raise ValueError("ChunkAssembler needs shape and dtype, or out=")
            dims = check_shape(shape, field="shape")
            if not dims:
                raise ValueError("ChunkAssembler needs at least one dimension (rows)")
            dtype_to_proto(dtype)
            out = torch.empty(dims, dtype=dtype)
        else:
            if out.dim() == 0:
                raise ValueError("ChunkAssembler destination needs at least one dimension (rows)")
            if shape is not None and tuple(shape) != tuple(out.shape):
                raise ValueError(f"shape {list(shape)} does not match out {list(out.shape)}")
            if dtype is not None and dtype != out.dtype:
                raise ValueError(f"dtype {dtype} does not match out {out.dtype}")
            dtype_to_proto(out.dtype)
        self.out = out
        self.field = field
        self.rows = out.shape[0]
        self._wire_dtype = _TORCH_TO_PROTO[out.dtype]
        self._received = RowSet()

    @property
    def rows_received(self) -> int:
        return self._received.count

    @property
    def complete(self) -> bool:
        return self._received.count == self.rows

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges not received yet."""
        return self._received.missing(self.rows)

    def add(self, chunk: Chunk) -> bool:
        """Validate ``chunk`` and copy it into place. Returns :attr:`complete`."""
        f = self.field
        if chunk.dtype != self._wire_dtype:
            dtype_from_proto(chunk.dtype, field=f"{f}.dtype")  # a clear error for unknown values
            raise ValueError(
                f"{f}.dtype is {dtype_name(chunk.dtype)}; the destination holds {dtype_name(self._wire_dtype)}"
            )
        src = chunk_tensor(chunk, field=f)
        if tuple(src.shape[1:]) != tuple(self.out.shape[1:]):
            raise ValueError(
                f"{f}.shape {list(src.shape)} does not match rows of shape {list(self.out.shape[1:])}"
            )
        start, stop = int(chunk.offset), int(chunk.offset) + src.shape[0]
        if stop > self.rows:
            raise ValueError(f"{f}: rows [{start}, {stop}) exceed the tensor's {self.rows} rows")
        self._received.add(start, stop, field=f)
        if stop > start:
            copy_into(self.out[start:stop], src)
        return self.complete

    def result(self) -> torch.Tensor:
        """The destination, once every row arrived (``ValueError`` listing the gaps otherwise)."""
        if not self.complete:
            raise ValueError(f"{self.field}: rows {self.missing()} never arrived")
        return self.out
