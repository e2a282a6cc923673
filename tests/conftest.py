"""Shared fixtures: tiny checkpoints built once per session through the real builder and saved
to disk, then loaded through the same from_pretrained path as a real checkpoint."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl", "qwen2-audio")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of its tiny checkpoint, built lazily and cached for the session."""
    from prism.models.builder import make_model

    root = tmp_path_factory.mktemp("tiny-models")
    cache: dict[str, Path] = {}

    class _Lazy(dict):
        def __missing__(self, family: str) -> Path:
            path = make_model(family, "tiny", root / family, seed=0)
            self[family] = path
            return path

    return _Lazy(cache)


def random_image(seed: int, width: int = 64, height: int = 64):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def png_bytes(seed: int, width: int = 64, height: int = 64) -> bytes:
    buf = io.BytesIO()
    random_image(seed, width, height).save(buf, "PNG")
    return buf.getvalue()


def random_audio(seed: int, seconds: float, rate: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(rate * seconds)) * 0.1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is available (CI has none; a lent GPU machine does)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server (Debian's) on a free loopback port, append-only, for the session.
    Tests that use it take `redis_url` (a fresh logical database) or `redis_proc` (to restart)."""
    from prism.runtime.redisproc import RedisProcess

    proc = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield proc
    proc.stop()


@pytest.fixture
def redis_proc(tmp_path):
    """A redis-server of this test's own (so it may be killed and restarted)."""
    from prism.runtime.redisproc import RedisProcess

    proc = RedisProcess(tmp_path / "redis").start()
    yield proc
    proc.stop()


@pytest.fixture
async def redis_url(redis_server):
    """URL of a flushed database on the session's redis-server; flushed again afterwards, so no
    test leaves a queue behind."""
    import redis.asyncio as aioredis

    url = redis_server.url
    client = aioredis.from_url(url)
    await client.flushdb()
    try:
        yield url
    finally:
        await client.flushdb()
        await client.aclose()


#: Seconds after which a still-running test dumps its asyncio tasks and thread stacks (before
#: pytest-timeout kills it at 600 s), so a rare stall leaves evidence of where it waits.
STALL_DUMP_S = float(os.environ.get("PRISM_TEST_STALL_DUMP_S", "240"))


def _dump_stall(nodeid: str, out) -> None:
    import asyncio
    import contextlib
    import faulthandler
    import gc
    import traceback

    with out.global_and_fixture_disabled() if out is not None else contextlib.nullcontext():
        err = sys.stderr
        print(f"\n===== {nodeid} still running after {STALL_DUMP_S:.0f} s: thread stacks =====", file=err, flush=True)
        faulthandler.dump_traceback(file=err, all_threads=True)
        print("===== asyncio tasks =====", file=err, flush=True)
        try:
            loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop) and not o.is_closed()]
            for loop in loops:
                for task in list(asyncio.all_tasks(loop)):
                    print(f"--- {task!r}", file=err)
                    for frame in task.get_stack(limit=12):
                        print("".join(traceback.format_stack(frame, limit=1)).rstrip(), file=err)
        except Exception as exc:  # noqa: BLE001 - the dump is best effort
            print(f"(could not list the tasks: {exc!r})", file=err)
        err.flush()


@pytest.fixture(autouse=True)
def _stall_watchdog(request):
    """Dumps a stalled test's tasks and threads to the real stderr (with pytest's capture
    suspended: what a test writes is captured, and lost if the run is killed)."""
    import threading

    out = request.config.pluginmanager.get_plugin("capturemanager")
    timer = threading.Timer(STALL_DUMP_S, _dump_stall, args=(request.node.nodeid, out))
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture
def exporter():
    """Finished spans of this process's global tracer provider (an SDK one, installed when none
    is), from this test on."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    out = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(out))
    yield out
    out.shutdown()
