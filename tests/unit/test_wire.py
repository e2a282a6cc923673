"""prism.wire: dtype mapping, tensors, chunking, assembly, the hand-encoded fast path, receivers
and the gRPC helpers (a real aio server on 127.0.0.1, port 0)."""

from __future__ import annotations

import functools

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism.v1 import common_pb2, stages_pb2, stages_pb2_grpc
from prism.wire import (
    GLIBC_TUNABLES,
    KEY,
    MAX_DIMS,
    VALUE,
    ChunkAssembler,
    EmbeddingsReceiver,
    KvReceiver,
    TensorChunkView,
    add_bulk_servicer_to_server,
    chunk_tensor,
    dtype_from_proto,
    dtype_to_proto,
    encode_embeddings_chunk,
    encode_kv_chunk,
    encode_tensor_chunk,
    fetch_embeddings_method,
    fetch_kv_method,
    iter_chunks,
    iter_embeddings,
    iter_kv_layer,
    malloc_tunables_active,
    malloc_tunables_env,
    parse_fetch_embeddings_response,
    parse_fetch_kv_response,
    parse_tensor_chunk,
    passthrough_serializer,
    tensor_bytes,
    tensor_from_proto,
    tensor_to_proto,
)
from prism.wire.bulk import _put_varint

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    hi = 255 if dtype == torch.uint8 else 1 << 30
    return torch.randint(0, hi, shape, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(tensor_bytes(a)) == bytes(tensor_bytes(b))


# ------------------------------------------------------------------ dtypes and whole tensors


def test_dtype_mapping_roundtrips_every_wire_dtype():
    values = {dtype_to_proto(d) for d in DTYPES}
    assert values == set(range(1, 8))
    for d in DTYPES:
        assert dtype_from_proto(dtype_to_proto(d)) is d


def test_dtype_errors_name_the_field():
    with pytest.raises(ValueError, match=r"tensor\.dtype is unspecified"):
        dtype_from_proto(0, field="tensor.dtype")
    with pytest.raises(ValueError, match=r"chunk\.dtype: unknown DType value 99"):
        dtype_from_proto(99, field="chunk.dtype")
    with pytest.raises(ValueError, match=r"x\.dtype: torch dtype torch\.complex64 cannot travel"):
        dtype_to_proto(torch.complex64, field="x.dtype")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 4)])
def test_tensor_roundtrip(dtype, shape):
    t = rand(shape, dtype)
    msg = tensor_to_proto(t)
    assert list(msg.shape) == list(shape) and msg.dtype == dtype_to_proto(dtype)
    back = tensor_from_proto(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert same(back, t)
    assert same(tensor_from_proto(msg, copy=True), t)


def test_tensor_from_non_contiguous_and_grad_tensors():
    t = torch.randn(4, 6, requires_grad=True)
    assert same(tensor_from_proto(tensor_to_proto(t.t())), t.detach().t().contiguous())


def test_tensor_from_proto_is_a_view_of_the_message_bytes():
    data = bytes(tensor_bytes(torch.arange(6, dtype=torch.float32)))
    msg = common_pb2.Tensor(dtype=common_pb2.D_TYPE_FLOAT32, shape=[2, 3], data=data)
    t = tensor_from_proto(msg)
    t2 = tensor_from_proto(msg, copy=True)
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]] and t2.data_ptr() != t.data_ptr()


@pytest.mark.parametrize(
    "msg, match",
    [
        (
            common_pb2.Tensor(dtype=1, shape=[2, 3], data=b"\0" * 23),
            r"emb\.data has 23 bytes; shape \[2, 3\] of D_TYPE_FLOAT32 needs 24",
        ),
        (common_pb2.Tensor(dtype=1, shape=[2, -3], data=b""), r"emb\.shape\[1\] is negative \(-3\)"),
        (common_pb2.Tensor(dtype=0, shape=[1], data=b"\0"), r"emb\.dtype is unspecified"),
        (common_pb2.Tensor(dtype=42, shape=[1], data=b"\0"), r"emb\.dtype: unknown DType value 42"),
        (common_pb2.Tensor(dtype=6, shape=[1] * (MAX_DIMS + 1), data=b"\0"), r"emb\.shape has 33 dimensions"),
        (common_pb2.Tensor(dtype=6, shape=[1 << 40, 1 << 40], data=b"\0"), r"emb\.shape .* spans more than 2\*\*56"),
        (common_pb2.Tensor(dtype=6, shape=[1 << 28, 1 << 28], data=b"\0"), r"emb\.data has 1 bytes"),
        # found by atheris: no data, yet the non-zero dimensions overflow torch's strides
        (common_pb2.Tensor(dtype=1, shape=[16] * 22 + [0], data=b""), r"emb\.shape .* spans more than 2\*\*56"),
    ],
)
def test_tensor_from_proto_rejects_bad_messages(msg, match):
    with pytest.raises(ValueError, match=match):
        tensor_from_proto(msg, field="emb")


# ------------------------------------------------------------------ chunking and assembly


@HYP
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(0, 40),
    row_shape=st.lists(st.integers(0, 5), max_size=2),
    max_bytes=st.integers(1, 300),
)
def test_chunks_reassemble(dtype, rows, row_shape, max_bytes):
    t = rand((rows, *row_shape), dtype)
    chunks = list(iter_chunks(t, max_bytes))
    assert sum(c.shape[0] for c in chunks) == rows
    assert all(c.shape[0] >= 1 for c in chunks)
    row_bytes = t[0].numel() * t.element_size() if rows else 0
    assert all(len(c.data) <= max(max_bytes, row_bytes) for c in chunks)
    asm = ChunkAssembler(t.shape, dtype)
    for c in reversed(chunks):  # any order
        asm.add(common_pb2.TensorChunk.FromString(c.SerializeToString()))
    assert asm.complete
    assert same(asm.result(), t)


def test_chunk_offset_and_bad_inputs():
    t = torch.arange(12, dtype=torch.int32).view(6, 2)
    chunks = list(iter_chunks(t, 8, offset=100))
    assert [c.offset for c in chunks] == [100, 101, 102, 103, 104, 105]
    with pytest.raises(ValueError, match="0-dimensional"):
        list(iter_chunks(torch.tensor(1.0)))
    with pytest.raises(ValueError, match="max_chunk_bytes must be positive"):
        list(iter_chunks(t, 0))


def test_assembler_validates_every_chunk():
    t = torch.arange(20, dtype=torch.float32).view(10, 2)
    asm = ChunkAssembler((10, 2), torch.float32, field="emb")
    c = next(iter_chunks(t[2:5], offset=2))
    assert asm.add(c) is False and asm.rows_received == 3 and asm.missing() == [(0, 2), (5, 10)]
    with pytest.raises(ValueError, match=r"emb: rows \[3, 4\) overlap"):
        asm.add(next(iter_chunks(t[3:4], offset=3)))
    with pytest.raises(ValueError, match=r"emb: rows \[9, 11\) exceed the tensor's 10 rows"):
        asm.add(next(iter_chunks(t[:2], offset=9)))
    with pytest.raises(
        ValueError, match=r"emb\.dtype is D_TYPE_FLOAT16; the destination holds D_TYPE_FLOAT32"
    ):
        asm.add(next(iter_chunks(t[:2].half())))
    with pytest.raises(ValueError, match=r"emb\.shape \[2, 1\] does not match rows of shape \[2\]"):
        asm.add(next(iter_chunks(t[:2, :1])))
    with pytest.raises(ValueError, match=r"emb\.offset is negative"):
        asm.add(common_pb2.TensorChunk(dtype=1, shape=[1, 2], offset=-1, data=b"\0" * 8))
    with pytest.raises(ValueError, match=r"emb\.data has 7 bytes"):
        asm.add(common_pb2.TensorChunk(dtype=1, shape=[1, 2], offset=0, data=b"\0" * 7))
    with pytest.raises(ValueError, match=r"emb\.shape is empty"):
        asm.add(common_pb2.TensorChunk(dtype=1, shape=[], offset=0, data=b"\0" * 4))
    with pytest.raises(ValueError, match=r"rows \[\(0, 2\), \(5, 10\)\] never arrived"):
        asm.result()
    for c in iter_chunks(t[5:], offset=5):
        asm.add(c)
    assert asm.add(next(iter_chunks(t[:2]))) is True
    assert torch.equal(asm.result(), t)


def test_assembler_writes_into_a_strided_slot_view():
    heads, dim, max_len = 3, 4, 16
    buf = torch.zeros(2, heads, max_len, dim)
    kv = torch.randn(7, heads, dim)  # [tokens, heads, dim]
    asm = ChunkAssembler(out=buf[1, :, 5:12].transpose(0, 1))
    for c in iter_chunks(kv, 2 * heads * dim * 4):
        asm.add(c)
    assert asm.complete
    assert torch.equal(buf[1, :, 5:12], kv.transpose(0, 1))
    assert buf[0].abs().sum() == 0 and buf[1, :, :5].abs().sum() == 0 and buf[1, :, 12:].abs().sum() == 0


def test_assembler_constructor_checks():
    with pytest.raises(ValueError, match="needs shape and dtype"):
        ChunkAssembler((3,))
    with pytest.raises(ValueError, match="does not match out"):
        ChunkAssembler((3,), out=torch.zeros(4))
    with pytest.raises(ValueError, match="cannot travel"):
        ChunkAssembler((3,), torch.complex64)


# ------------------------------------------------------------------ the hand-encoded fast path

shapes_3d = st.tuples(st.integers(0, 9), st.integers(1, 4), st.integers(1, 9))
offsets = st.one_of(st.just(0), st.integers(0, 300), st.integers(0, 1 << 40))


def _kv_msg(layer, part, t, offset):
    chunk = common_pb2.TensorChunk(
        dtype=dtype_to_proto(t.dtype), shape=list(t.shape), offset=offset, data=bytes(tensor_bytes(t))
    )
    return stages_pb2.FetchKvResponse(chunk=stages_pb2.KvChunk(layer=layer, part=part, chunk=chunk))


@HYP
@given(
    dtype=st.sampled_from(DTYPES),
    shape=shapes_3d,
    layer=st.integers(0, 200),
    part=st.sampled_from([KEY, VALUE]),
    offset=offsets,
    transpose=st.booleans(),
)
def test_encoded_kv_chunk_is_valid_protobuf(dtype, shape, layer, part, offset, transpose):
    if transpose:  # a [tokens, heads, dim] view of a [heads, tokens, dim] cache
        t = rand((shape[1], shape[0], shape[2]), dtype).transpose(0, 1)
    else:
        t = rand(shape, dtype)
    expected = _kv_msg(layer, part, t, offset)
    fast = encode_kv_chunk(layer, part, t, offset)
    assert stages_pb2.FetchKvResponse.FromString(fast) == expected
    assert encode_kv_chunk(layer, part, t, offset, align=1) == expected.SerializeToString()
    for wire in (fast, expected.SerializeToString()):
        view = parse_fetch_kv_response(wire)
        assert view.kind == "chunk" and (view.chunk.layer, view.chunk.part) == (layer, part)
        c = view.chunk.chunk
        assert (c.dtype, c.shape, c.offset) == (dtype_to_proto(dtype), tuple(shape), offset)
        assert same(c.tensor(), t.contiguous())
        assert c.to_proto() == expected.chunk.chunk
    if t.numel():  # the data starts 8-byte aligned inside the message
        data = parse_fetch_kv_response(fast).chunk.chunk.data
        assert (
            torch.frombuffer(data, dtype=torch.uint8).data_ptr()
            - torch.frombuffer(fast, dtype=torch.uint8).data_ptr()
        ) % 8 == 0


@HYP
@given(
    dtype=st.sampled_from(DTYPES),
    rows=st.integers(0, 12),
    hidden=st.integers(1, 16),
    item=st.integers(0, 1 << 20),
    total=st.integers(0, 1 << 33),
    offset=offsets,
)
def test_encoded_embeddings_and_tensor_chunks_are_valid_protobuf(dtype, rows, hidden, item, total, offset):
    t = rand((rows, hidden), dtype)
    chunk = common_pb2.TensorChunk(
        dtype=dtype_to_proto(dtype), shape=[rows, hidden], offset=offset, data=bytes(tensor_bytes(t))
    )
    expected = stages_pb2.FetchEmbeddingsResponse(item=item, total_rows=total, chunk=chunk)
    fast = encode_embeddings_chunk(item, total, t, offset)
    assert stages_pb2.FetchEmbeddingsResponse.FromString(fast) == expected
    assert encode_embeddings_chunk(item, total, t, offset, align=1) == expected.SerializeToString()
    for wire in (fast, expected.SerializeToString()):
        v = parse_fetch_embeddings_response(wire)
        assert (v.item, v.total_rows) == (item, total) and v.chunk.to_proto() == chunk
    assert common_pb2.TensorChunk.FromString(encode_tensor_chunk(t, offset)) == chunk
    assert parse_tensor_chunk(chunk.SerializeToString()).to_proto() == chunk


def test_large_chunks_take_the_in_place_path_and_cuda_free_fallbacks():
    k = torch.randn(1, 12, 1000, 64)  # the benchmark model's per-layer cache
    t = k[0].transpose(0, 1)[:341]
    msg = encode_kv_chunk(5, VALUE, t, 341)
    assert stages_pb2.FetchKvResponse.FromString(msg) == _kv_msg(5, VALUE, t, 341)
    bf = k.to(torch.bfloat16)[0].transpose(0, 1)[100:400]
    assert (
        parse_fetch_kv_response(encode_kv_chunk(0, KEY, bf, 100)).chunk.chunk.to_proto()
        == _kv_msg(0, KEY, bf, 100).chunk.chunk
    )


def test_parser_follows_protobuf_semantics():
    t = torch.arange(6, dtype=torch.float32).view(2, 1, 3)
    wire = _kv_msg(2, KEY, t, 4).SerializeToString()
    unknown = b"\x78\x05" + b"\x82\x01\x03abc" + b"\x85\x01\0\0\0\0" + b"\x81\x01" + b"\0" * 8
    v = parse_fetch_kv_response(unknown + wire + unknown)
    assert v.chunk.layer == 2 and same(v.chunk.chunk.tensor(), t)
    # an unpacked repeated shape is accepted, as protobuf parsers must
    tc = b"\x08\x01\x10\x02\x10\x01\x10\x03\x18\x04\x22\x18" + bytes(tensor_bytes(t))
    assert parse_tensor_chunk(tc).shape == (2, 1, 3)
    assert common_pb2.TensorChunk.FromString(tc).shape == [2, 1, 3]
    # repeated sub-messages merge; a later oneof member replaces the earlier one
    header = stages_pb2.FetchKvResponse(header=stages_pb2.KvHeader(num_layers=3)).SerializeToString()
    header2 = stages_pb2.FetchKvResponse(header=stages_pb2.KvHeader(head_dim=7)).SerializeToString()
    merged = parse_fetch_kv_response(header + header2)
    assert merged.kind == "header" and (merged.header.num_layers, merged.header.head_dim) == (3, 7)
    assert parse_fetch_kv_response(wire + header).kind == "header"
    split = stages_pb2.FetchKvResponse(chunk=stages_pb2.KvChunk(layer=9)).SerializeToString()
    assert parse_fetch_kv_response(wire + split).chunk.layer == 9
    assert parse_fetch_kv_response(b"").kind is None
    trailer = stages_pb2.FetchKvResponse(trailer=stages_pb2.KvTrailer(first_token=42)).SerializeToString()
    assert parse_fetch_kv_response(trailer).trailer.first_token == 42
    # negative int32 / int64 fields come back signed
    neg = stages_pb2.FetchKvResponse(
        chunk=stages_pb2.KvChunk(layer=-3, chunk=common_pb2.TensorChunk(offset=-5, shape=[-1]))
    )
    nv = parse_fetch_kv_response(neg.SerializeToString())
    assert (nv.chunk.layer, nv.chunk.chunk.offset, nv.chunk.chunk.shape) == (-3, -5, (-1,))


@pytest.mark.parametrize(
    "wire, match",
    [
        (b"\x12", "truncated varint"),
        (b"\x12\x05ab", "length exceeds"),
        (b"\x12" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x0b", "unsupported wire type 3"),
        (b"\x02\x00", "field number 0"),
        (b"\x0a\x02\x08", "malformed protobuf"),
        (b"\x81\x01\x00", "truncated fixed-width"),
    ],
)
def test_parser_rejects_malformed_bytes(wire, match):
    with pytest.raises(ValueError, match=match):
        parse_fetch_kv_response(wire)


@HYP
@given(st.binary(max_size=64))
def test_parser_raises_only_value_error_on_garbage(wire):
    for parse in (parse_fetch_kv_response, parse_fetch_embeddings_response, parse_tensor_chunk):
        try:
            parse(wire)
        except ValueError:
            pass


def test_overlong_varints_written_by_the_encoder_parse_everywhere():
    # The encoder aligns data with a widened dtype varint (up to 10 bytes).
    for width in range(1, 11):
        out = bytearray(b"\x08")
        _put_varint(out, 3, width)
        assert common_pb2.TensorChunk.FromString(bytes(out)).dtype == 3
        assert parse_tensor_chunk(bytes(out)).dtype == 3


# ------------------------------------------------------------------ receivers


L, H, D, T = 3, 2, 4, 10


def kv_cache(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(1, H, T, D, generator=g).to(dtype), torch.randn(1, H, T, D, generator=g).to(dtype))
        for _ in range(L)
    ]


def kv_stream(cache, *, fast=True, max_chunk_bytes=3 * H * D * 4, tokens=T):
    yield stages_pb2.FetchKvResponse(
        header=stages_pb2.KvHeader(
            num_layers=len(cache),
            num_kv_heads=H,
            head_dim=D,
            prompt_tokens=tokens,
            dtype=dtype_to_proto(cache[0][0].dtype),
            rope_delta=-2,
        )
    )
    for layer, (k, v) in enumerate(cache):
        keys, values = k[0].transpose(0, 1), v[0].transpose(0, 1)
        if fast:
            yield from iter_kv_layer(layer, keys, values, max_chunk_bytes=max_chunk_bytes)
        else:
            for part, t in ((KEY, keys), (VALUE, values)):
                for c in iter_chunks(t, max_chunk_bytes):
                    yield stages_pb2.FetchKvResponse(
                        chunk=stages_pb2.KvChunk(layer=layer, part=part, chunk=c)
                    )
    yield stages_pb2.FetchKvResponse(trailer=stages_pb2.KvTrailer(first_token=11))


def as_views(stream):
    for m in stream:
        yield parse_fetch_kv_response(passthrough_serializer(m))


class Slots:
    """The decode engine's slot buffers: [slots, heads, max_len, dim] per layer and part."""

    def __init__(self, slots=2, max_len=16):
        self.max_len = max_len
        self.bufs = {p: [torch.zeros(slots, H, max_len, D) for _ in range(L)] for p in (KEY, VALUE)}

    def destination(self, slot, layer, part, start, tokens):
        return self.bufs[part][layer][slot, :, start : start + tokens].transpose(0, 1)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("parsed", [True, False])
def test_kv_receiver_places_a_stream_into_slot_buffers(fast, parsed):
    cache, slots = kv_cache(), Slots()
    stream = kv_stream(cache, fast=fast)
    rx = KvReceiver(
        functools.partial(slots.destination, 1),
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        dtype=torch.float32,
        max_tokens=slots.max_len,
    )
    trailer = rx.consume(as_views(stream) if parsed else stream)
    assert trailer.first_token == 11 and rx.header.rope_delta == -2 and rx.complete
    assert rx.bytes_received == 2 * L * T * H * D * 4
    for layer, (k, v) in enumerate(cache):
        assert rx.layer_complete(layer)
        assert torch.equal(slots.bufs[KEY][layer][1, :, :T], k[0])
        assert torch.equal(slots.bufs[VALUE][layer][1, :, :T], v[0])
    assert slots.bufs[KEY][0][0].abs().sum() == 0 and slots.bufs[KEY][0][1, :, T:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kv_receiver_allocates_when_no_destination(dtype):
    cache = kv_cache(dtype)
    rx = KvReceiver()
    rx.consume(as_views(kv_stream(cache)))
    assert torch.equal(rx.tensor(2, VALUE), cache[2][1][0].transpose(0, 1))


def test_kv_receiver_rejects_protocol_violations():
    cache = kv_cache()
    msgs = [parse_fetch_kv_response(passthrough_serializer(m)) for m in kv_stream(cache)]
    header, chunks, trailer = msgs[0], msgs[1:-1], msgs[-1]
    with pytest.raises(ValueError, match="a chunk before the header"):
        KvReceiver().feed(chunks[0])
    rx = KvReceiver()
    rx.feed(header)
    with pytest.raises(ValueError, match="a second header"):
        rx.feed(header)
    rx.feed(chunks[0])
    with pytest.raises(ValueError, match=r"overlap"):
        rx.feed(chunks[0])
    with pytest.raises(
        ValueError, match=r"trailer before all KV arrived \(layer 0 KV_PART_KEY misses tokens \[\(3, 10\)\]"
    ):
        rx.feed(trailer)
    with pytest.raises(ValueError, match="ended before the trailer"):
        rx.finish()
    for c in chunks[1:]:
        rx.feed(c)
    rx.feed(trailer)
    with pytest.raises(ValueError, match="chunk after the trailer"):
        rx.feed(chunks[0])
    with pytest.raises(ValueError, match="empty message"):
        KvReceiver().feed(parse_fetch_kv_response(b""))


@pytest.mark.parametrize(
    "kwargs, header, match",
    [
        ({"num_layers": 4}, {}, r"header\.num_layers is 3; expected 4"),
        ({}, {"num_kv_heads": 0}, r"header\.num_kv_heads is 0; expected >= 1"),
        ({"dtype": torch.float16}, {}, r"header\.dtype is D_TYPE_FLOAT32; expected torch\.float16"),
        ({}, {"dtype": 0}, r"header\.dtype is unspecified"),
        ({"max_tokens": 8}, {}, r"header\.prompt_tokens is 10; the limit is 8"),
    ],
)
def test_kv_receiver_checks_the_header(kwargs, header, match):
    h = {"num_layers": L, "num_kv_heads": H, "head_dim": D, "prompt_tokens": T, "dtype": 1} | header
    with pytest.raises(ValueError, match=match):
        KvReceiver(**kwargs).feed(stages_pb2.FetchKvResponse(header=stages_pb2.KvHeader(**h)))


def test_kv_receiver_rejects_bad_chunks():
    slots = Slots()
    rx = KvReceiver(functools.partial(slots.destination, 0))
    rx.feed(next(kv_stream(kv_cache())))
    bad = [
        (encode_kv_chunk(L, KEY, torch.zeros(1, H, D), 0), r"chunk\.layer 3 / chunk\.part 1 out of range"),
        (
            encode_kv_chunk(0, KEY, torch.zeros(1, H, D, dtype=torch.float16), 0),
            r"D_TYPE_FLOAT16; the destination holds D_TYPE_FLOAT32",
        ),
        (
            encode_kv_chunk(0, KEY, torch.zeros(1, H + 1, D), 0),
            r"chunk\(layer=0, part=KV_PART_KEY\)\.shape \[1, 3, 4\] does not match",
        ),
        (
            encode_kv_chunk(1, VALUE, torch.zeros(2, H, D), T - 1),
            r"rows \[9, 11\) exceed the tensor's 10 rows",
        ),
    ]
    for wire, match in bad:
        with pytest.raises(ValueError, match=match):
            rx.feed(parse_fetch_kv_response(wire))
    with pytest.raises(
        ValueError,
        match=r"destination for layer 0 is \[10, 2, 4\] torch.float32; the KV is \[10, 2, 4\] torch.float16",
    ):
        KvReceiver(functools.partial(slots.destination, 0)).feed(next(kv_stream(kv_cache(torch.float16))))


def test_embeddings_receiver():
    items = [torch.randn(5, 8), torch.randn(3, 8)]
    wire = [m for i, e in enumerate(items) for m in iter_embeddings(i, e, max_chunk_bytes=64)]
    rx = EmbeddingsReceiver(expected_rows=[5, 3], hidden=8, dtype=torch.float32)
    for m in reversed(wire):
        rx.feed(parse_fetch_embeddings_response(m))
    out = rx.finish()
    assert all(torch.equal(a, b) for a, b in zip(out, items))
    dest = torch.zeros(8, 8)
    rx = EmbeddingsReceiver(lambda item, rows: dest[:5] if item == 0 else dest[5:], expected_rows=[5, 3])
    for m in wire:
        rx.feed(stages_pb2.FetchEmbeddingsResponse.FromString(m))
    rx.finish()
    assert torch.equal(dest, torch.cat(items))
    rx = EmbeddingsReceiver(expected_rows=[5, 3], hidden=8)
    with pytest.raises(ValueError, match=r"item\[0\]\.total_rows is 4; expected 5"):
        rx.feed(parse_fetch_embeddings_response(encode_embeddings_chunk(0, 4, items[0][:1], 0)))
    with pytest.raises(ValueError, match="item 2 out of range"):
        rx.feed(parse_fetch_embeddings_response(encode_embeddings_chunk(2, 5, items[0][:1], 0)))
    with pytest.raises(ValueError, match=r"rows must be \[8\]"):
        rx.feed(parse_fetch_embeddings_response(encode_embeddings_chunk(0, 5, torch.zeros(1, 4), 0)))
    rx.feed(parse_fetch_embeddings_response(wire[0]))
    with pytest.raises(ValueError, match=r"total_rows changed from 5 to 6"):
        rx.feed(parse_fetch_embeddings_response(encode_embeddings_chunk(0, 6, items[0][:1], 4)))
    with pytest.raises(ValueError, match=r"item\[0\]\.chunk: rows \[\(2, 5\)\] never arrived"):
        rx.finish()
    for m in wire[1:3]:
        rx.feed(m)  # wire bytes are parsed on the way in
    with pytest.raises(ValueError, match=r"item 1 never arrived"):
        rx.finish()


def test_chunk_view_validation_matches_messages():
    view = TensorChunkView(1, (2, 2), 0, memoryview(b"\0" * 15))
    with pytest.raises(ValueError, match=r"kv\.data has 15 bytes"):
        chunk_tensor(view, field="kv")


def test_malloc_tunables():
    assert GLIBC_TUNABLES == "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
    env = malloc_tunables_env(
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1:glibc.pthread.rseq=0", "A": "1"}
    )
    assert env["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{GLIBC_TUNABLES}" and env["A"] == "1"
    assert malloc_tunables_active(env) and not malloc_tunables_active({})


# ------------------------------------------------------------------ over gRPC


class _Prefill(stages_pb2_grpc.PrefillServiceServicer):
    def __init__(self, cache):
        self.cache = cache

    async def FetchKv(self, request, context):
        for m in kv_stream(self.cache, fast=request.request_id == "fast"):
            yield m

    async def Prefill(self, request, context):
        yield stages_pb2.PrefillResponse(state=common_pb2.TASK_STATE_READY, first_token=5)


class _Encoder(stages_pb2_grpc.EncoderServiceServicer):
    def __init__(self, items):
        self.items = items

    async def FetchEmbeddings(self, request, context):
        for i, e in enumerate(self.items):
            for m in iter_embeddings(i, e, max_chunk_bytes=100):
                yield m


@pytest.fixture
async def bulk_server():
    cache, items = kv_cache(), [torch.randn(7, 16), torch.randn(2, 16)]
    server = grpc.aio.server()
    add_bulk_servicer_to_server(stages_pb2_grpc.add_PrefillServiceServicer_to_server, _Prefill(cache), server)
    add_bulk_servicer_to_server(stages_pb2_grpc.add_EncoderServiceServicer_to_server, _Encoder(items), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", cache, items
    await server.stop(None)


async def test_bulk_stream_over_grpc_aio(bulk_server):
    target, cache, items = bulk_server
    async with grpc.aio.insecure_channel(target) as channel:
        stub = stages_pb2_grpc.PrefillServiceStub(channel)
        # Both paths produce the same messages for a standard client...
        plain = [m async for m in stub.FetchKv(stages_pb2.FetchKvRequest(request_id="plain"))]
        fast = [m async for m in stub.FetchKv(stages_pb2.FetchKvRequest(request_id="fast"))]
        assert plain == fast and len(fast) > 2 * L + 2
        # ...non-bulk methods keep their standard serializer...
        assert [r.first_token async for r in stub.Prefill(stages_pb2.PrefillRequest())] == [5]
        # ...and the zero-copy client places the KV into slot buffers.
        slots = Slots()
        rx = KvReceiver(
            functools.partial(slots.destination, 0), num_layers=L, num_kv_heads=H, head_dim=D, max_tokens=16
        )
        call = fetch_kv_method(channel)(stages_pb2.FetchKvRequest(request_id="fast"))
        assert (await rx.consume_async(call)).first_token == 11
        assert torch.equal(slots.bufs[VALUE][2][0, :, :T], cache[2][1][0])
        erx = EmbeddingsReceiver(expected_rows=[7, 2], hidden=16)
        async for m in fetch_embeddings_method(channel)(stages_pb2.FetchEmbeddingsRequest(request_id="r")):
            erx.feed(m)
        assert all(torch.equal(a, b) for a, b in zip(erx.finish(), items))


async def test_bulk_stream_sync_client_in_thread(bulk_server):
    import asyncio

    target, cache, _ = bulk_server

    def client():
        with grpc.insecure_channel(target) as channel:
            rx = KvReceiver()
            rx.consume(fetch_kv_method(channel)(stages_pb2.FetchKvRequest(request_id="fast")))
            return rx

    rx = await asyncio.get_running_loop().run_in_executor(None, client)
    assert torch.equal(rx.tensor(1, KEY), cache[1][0][0].transpose(0, 1))


def test_bulk_handlers_need_a_bulk_method():
    from prism.wire import bulk_method_handlers

    with pytest.raises(ValueError, match="none of"):
        bulk_method_handlers(
            stages_pb2_grpc.add_DecodeServiceServicer_to_server, stages_pb2_grpc.DecodeServiceServicer()
        )
