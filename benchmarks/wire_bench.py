"""KV transfer between two processes over gRPC: plain protobuf messages vs the fast path.

Streams a 1,000-token KV cache of the ~130M-parameter benchmark model (12 layers x K,V x
[1000 tokens, 12 kv heads, 64] fp32 = 73,728 bytes/token, 73.7 MB) from a server process to a
client process, which places every chunk into preallocated, touched decode-slot buffers
(``[slots, kv_heads, max_len, head_dim]`` per layer, as ``prism.engine.kv.SlotKV`` holds them).

* plain: the servicer builds ``FetchKvResponse`` messages (``iter_chunks``); the client uses the
  generated stub (``FromString``) and reads ``chunk.data``.
* fast: the servicer yields ``iter_kv_layer`` bytes (one copy from the cache into the message);
  the client parses with ``parse_fetch_kv_response`` (zero-copy views) into the slots.

Each mode runs with and without ``GLIBC_TUNABLES`` (set in both server and client processes).
Prints one JSON report: per configuration the bytes, median seconds and GB/s over ``--runs``
runs (after one warm-up), and the fraction of the ~1.1 s prefill time the transfer takes.

Usage: python benchmarks/wire_bench.py [--runs 7] [--tokens 1000] [--chunk-bytes 1048576]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYERS, HEADS, HEAD_DIM = 12, 12, 64
PREFILL_1K_S = 1.1  # measured prompt pass of 1k tokens on this machine (FIELD-NOTES)


def make_kv(tokens: int):
    import torch

    g = torch.Generator().manual_seed(0)
    # The HF cache layout a prefill worker holds: [batch, kv_heads, seq, head_dim] per layer.
    return [
        (
            torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g),
            torch.randn(1, HEADS, tokens, HEAD_DIM, generator=g),
        )
        for _ in range(LAYERS)
    ]


async def serve(tokens: int, chunk_bytes: int) -> None:
    import grpc

    from prism.v1 import stages_pb2, stages_pb2_grpc
    from prism.wire import add_bulk_servicer_to_server, dtype_to_proto, iter_chunks, iter_kv_layer

    kv = make_kv(tokens)

    class Prefill(stages_pb2_grpc.PrefillServiceServicer):
        async def FetchKv(self, request, context):
            yield stages_pb2.FetchKvResponse(
                header=stages_pb2.KvHeader(
                    num_layers=LAYERS,
                    num_kv_heads=HEADS,
                    head_dim=HEAD_DIM,
                    prompt_tokens=tokens,
                    dtype=dtype_to_proto(kv[0][0].dtype),
                )
            )
            for layer, (k, v) in enumerate(kv):
                keys, values = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [tokens, heads, dim] views
                if request.request_id == "plain":
                    for part, t in ((stages_pb2.KV_PART_KEY, keys), (stages_pb2.KV_PART_VALUE, values)):
                        for c in iter_chunks(t, chunk_bytes):
                            yield stages_pb2.FetchKvResponse(
                                chunk=stages_pb2.KvChunk(layer=layer, part=part, chunk=c)
                            )
                else:
                    for msg in iter_kv_layer(layer, keys, values, max_chunk_bytes=chunk_bytes):
                        yield msg
            yield stages_pb2.FetchKvResponse(trailer=stages_pb2.KvTrailer(first_token=7))

    server = grpc.aio.server()
    add_bulk_servicer_to_server(stages_pb2_grpc.add_PrefillServiceServicer_to_server, Prefill(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.stop(None)


async def client(port: int, tokens: int, runs: int) -> dict:
    import grpc
    import torch

    from prism.v1 import stages_pb2, stages_pb2_grpc
    from prism.wire import KvReceiver, fetch_kv_method

    slots, max_len = 2, 1024 * ((tokens + 1023) // 1024)
    bufs = {
        part: [torch.zeros(slots, HEADS, max_len, HEAD_DIM) for _ in range(LAYERS)]  # touched once
        for part in (stages_pb2.KV_PART_KEY, stages_pb2.KV_PART_VALUE)
    }

    def destination(slot, layer, part, start, n):
        return bufs[part][layer][slot, :, start : start + n].transpose(0, 1)

    expected = make_kv(tokens)
    out = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = stages_pb2_grpc.PrefillServiceStub(channel)
        fast = fetch_kv_method(channel)
        for mode, call in (("plain", stub.FetchKv), ("fast", fast)):
            times, nbytes = [], 0
            for i in range(runs + 1):
                slot = i % slots
                rx = KvReceiver(
                    functools.partial(destination, slot),
                    num_layers=LAYERS,
                    num_kv_heads=HEADS,
                    head_dim=HEAD_DIM,
                    dtype=torch.float32,
                    max_tokens=max_len,
                )
                t0 = time.perf_counter()
                await rx.consume_async(call(stages_pb2.FetchKvRequest(request_id=mode)))
                dt = time.perf_counter() - t0
                if i:
                    times.append(dt)
                nbytes = rx.bytes_received
            for layer in (0, LAYERS - 1):  # the data landed where it belongs
                assert torch.equal(
                    bufs[stages_pb2.KV_PART_VALUE][layer][slot, :, :tokens], expected[layer][1][0]
                )
            med = statistics.median(times)
            out[mode] = {
                "bytes": nbytes,
                "median_s": round(med, 5),
                "min_s": round(min(times), 5),
                "gb_per_s": round(nbytes / med / 1e9, 3),
                "runs": len(times),
            }
    return out


def run_config(tunables: bool, args) -> dict:
    from prism.wire import malloc_tunables_env

    env = (
        malloc_tunables_env() if tunables else {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--tokens", str(args.tokens), "--chunk-bytes", str(args.chunk_bytes)]
    server = subprocess.Popen(
        [*me, "--serve", *common], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        res = subprocess.run(
            [*me, "--client", str(port), "--runs", str(args.runs), *common],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(res.stdout)
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--chunk-bytes", type=int, default=1 << 20)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args.tokens, args.chunk_bytes))
        return
    if args.client:
        print(json.dumps(asyncio.run(client(args.client, args.tokens, args.runs))))
        return
    results = {}
    for tunables in (False, True):
        for mode, r in run_config(tunables, args).items():
            r["fraction_of_prefill"] = round(r["median_s"] / (PREFILL_1K_S * args.tokens / 1000), 3)
            results[f"{mode}{'+tunables' if tunables else ''}"] = r
    report = {
        "kv": {
            "layers": LAYERS,
            "kv_heads": HEADS,
            "head_dim": HEAD_DIM,
            "tokens": args.tokens,
            "dtype": "float32",
        },
        "chunk_bytes": args.chunk_bytes,
        "cpus": os.cpu_count(),
        "prefill_s_estimate": round(PREFILL_1K_S * args.tokens / 1000, 3),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
