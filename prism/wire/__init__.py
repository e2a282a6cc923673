"""Tensor wire codec: raw little-endian bytes plus dtype and shape, never pickle.

``prism.wire.tensors``: dtype mapping, whole tensors (``prism.v1.Tensor``), chunking along
dim 0 (``prism.v1.TensorChunk``) and validated assembly into preallocated destinations.

``prism.wire.bulk``: the fast path for ``FetchKv`` / ``FetchEmbeddings`` streams (hand-encoded
protobuf with one copy from tensor memory, zero-copy parsing on receipt, gRPC handler and
client helpers) and the malloc tunables that keep message buffers touched.

Server (a PrefillService servicer)::

    async def FetchKv(self, request, context):
        yield FetchKvResponse(header=KvHeader(num_layers=L, num_kv_heads=H, head_dim=D,
                                              prompt_tokens=T, dtype=dtype_to_proto(k.dtype)))
        for layer, (k, v) in enumerate(layers):         # k, v: [1, H, T, D]
            for msg in iter_kv_layer(layer, k[0].transpose(0, 1), v[0].transpose(0, 1)):
                yield msg                               # pre-encoded bytes
        yield FetchKvResponse(trailer=KvTrailer(first_token=tok))

    add_bulk_servicer_to_server(add_PrefillServiceServicer_to_server, servicer, server)

Client (a decode worker)::

    rx = KvReceiver(functools.partial(slot_kv.destination, slot), num_layers=L,
                    num_kv_heads=H, head_dim=D, dtype=torch.float32, max_tokens=slot_kv.max_len)
    trailer = await rx.consume_async(fetch_kv_method(channel)(FetchKvRequest(request_id=rid)))

Launch every stage process with ``GLIBC_TUNABLES`` set to :data:`GLIBC_TUNABLES` (e.g.
``subprocess.Popen(cmd, env=malloc_tunables_env())``): without it each ~1 MiB message buffer is
a fresh mmap that page-faults in again, and KV streams run about 2-3x slower.
"""

from prism.wire.bulk import (
    BULK_METHODS,
    FETCH_EMBEDDINGS_METHOD,
    FETCH_KV_METHOD,
    GLIBC_TUNABLES,
    KEY,
    VALUE,
    EmbeddingsChunkView,
    EmbeddingsReceiver,
    FetchKvView,
    KvChunkView,
    KvReceiver,
    add_bulk_servicer_to_server,
    bulk_method_handlers,
    bulk_unary_stream,
    encode_embeddings_chunk,
    encode_kv_chunk,
    encode_tensor_chunk,
    fetch_embeddings_method,
    fetch_kv_method,
    iter_embeddings,
    iter_kv_layer,
    malloc_tunables_active,
    malloc_tunables_env,
    parse_fetch_embeddings_response,
    parse_fetch_kv_response,
    parse_tensor_chunk,
    passthrough_serializer,
)
from prism.wire.tensors import (
    DEFAULT_CHUNK_BYTES,
    ITEMSIZE,
    MAX_DIMS,
    ChunkAssembler,
    RowSet,
    TensorChunkView,
    check_layout,
    check_shape,
    chunk_tensor,
    copy_into,
    dtype_from_proto,
    dtype_name,
    dtype_to_proto,
    iter_chunks,
    iter_row_ranges,
    numpy_view,
    rows_per_chunk,
    tensor_bytes,
    tensor_from_proto,
    tensor_to_proto,
)

__all__ = [
    "BULK_METHODS",
    "DEFAULT_CHUNK_BYTES",
    "FETCH_EMBEDDINGS_METHOD",
    "FETCH_KV_METHOD",
    "GLIBC_TUNABLES",
    "ITEMSIZE",
    "KEY",
    "MAX_DIMS",
    "VALUE",
    "ChunkAssembler",
    "EmbeddingsChunkView",
    "EmbeddingsReceiver",
    "FetchKvView",
    "KvChunkView",
    "KvReceiver",
    "RowSet",
    "TensorChunkView",
    "add_bulk_servicer_to_server",
    "bulk_method_handlers",
    "bulk_unary_stream",
    "check_layout",
    "check_shape",
    "chunk_tensor",
    "copy_into",
    "dtype_from_proto",
    "dtype_name",
    "dtype_to_proto",
    "encode_embeddings_chunk",
    "encode_kv_chunk",
    "encode_tensor_chunk",
    "fetch_embeddings_method",
    "fetch_kv_method",
    "iter_chunks",
    "iter_embeddings",
    "iter_kv_layer",
    "iter_row_ranges",
    "malloc_tunables_active",
    "malloc_tunables_env",
    "numpy_view",
    "parse_fetch_embeddings_response",
    "parse_fetch_kv_response",
    "parse_tensor_chunk",
    "passthrough_serializer",
    "rows_per_chunk",
    "tensor_bytes",
    "tensor_from_proto",
    "tensor_to_proto",
]
