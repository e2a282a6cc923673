"""Integration tests for prism.runtime: a real StageServer on port 0, telemetry helpers, and
the process supervisor driving tests/integration/stage_server_app.py."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from prism.runtime.config import ConfigError
from prism.runtime.procs import ChildStartError, Supervisor, read_port_file, write_port_file
from prism.runtime.server import ServerConfig, StageServer
from prism.runtime.telemetry import (
    extract_trace_context,
    inject_trace_context,
    instrumented_channel,
    setup_logging,
    setup_tracing,
    span_from_trace_context,
)
from prism.v1 import common_pb2, prism_pb2, prism_pb2_grpc
from tests.integration.stage_server_app import SERVICE_NAME, FakePrismServicer

REPO = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.integration.stage_server_app"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def make_server(provider: TracerProvider, servicer: FakePrismServicer | None = None,
                **config: object) -> tuple[StageServer, FakePrismServicer]:
    servicer = servicer or FakePrismServicer(token_delay_s=0.0)
    settings: dict[str, object] = {"port": 0, "drain_grace_s": 5.0, "worker_name": "test-worker"}
    settings.update(config)
    cfg = ServerConfig(**settings)  # type: ignore[arg-type]
    server = StageServer(
        cfg,
        service_names=[SERVICE_NAME],
        registrars=[lambda s: prism_pb2_grpc.add_PrismServiceServicer_to_server(servicer, s)],
        tracer_provider=provider,
        handle_signals=False,
    )
    return server, servicer


@pytest.fixture
async def running(spans) -> AsyncIterator[tuple[StageServer, FakePrismServicer]]:
    server, servicer = make_server(spans[0])
    await server.start()
    try:
        yield server, servicer
    finally:
        await server.stop(0)


# ---------------------------------------------------------------- config


def test_server_config_validation() -> None:
    cfg = ServerConfig()
    assert cfg.port == 0 and cfg.max_message_bytes == 64 * 1024 * 1024 and cfg.otel
    assert cfg.worker_name.endswith(f"-{os.getpid()}")
    for kwargs, field in [({"port": 70000}, "port"), ({"port": -1}, "port"),
                          ({"host": " "}, "host"), ({"max_message_bytes": 10}, "max_message_bytes"),
                          ({"drain_grace_s": -1.0}, "drain_grace_s"), ({"worker_name": ""}, "worker_name")]:
        with pytest.raises(ConfigError) as err:
            ServerConfig(**kwargs)  # type: ignore[arg-type]
        assert err.value.field == field


# ---------------------------------------------------------------- serving


async def test_start_returns_bound_port_and_health_serving(running) -> None:
    server, _ = running
    assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_and_describes_services(running) -> None:
    server, _ = running
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto  # resolvable


async def test_streaming_unary_and_errors_through_interceptors(running, spans) -> None:
    server, _ = running
    async with instrumented_channel(server.address, tracer_provider=spans[0]) as ch:
        stub = prism_pb2_grpc.PrismServiceStub(ch)
        req = prism_pb2.GenerateRequest(request_id="r1", prompt="hi",
                                        sampling=common_pb2.SamplingParams(max_new_tokens=5))
        replies = [r async for r in stub.Generate(req, timeout=5)]
        assert [r.token_ids[0] for r in replies] == [0, 1, 2, 3, 4]
        assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert all(r.request_id == "r1" for r in replies)

        models = await stub.ListModels(prism_pb2.ListModelsRequest(), timeout=5)
        assert models.default_model == "tiny"

        unary = await stub.GenerateUnary(prism_pb2.GenerateUnaryRequest(
            request=prism_pb2.GenerateRequest(prompt="abc")), timeout=5)
        assert unary.text == "ABC"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GenerateUnary(prism_pb2.GenerateUnaryRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "prompt is required"
        # an abort inside an async-generator handler too
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(prism_pb2.GenerateRequest(chat=prism_pb2.Chat()), timeout=5):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_spans_join_the_callers_trace(running, spans) -> None:
    server, _ = running
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    async with instrumented_channel(server.address, tracer_provider=provider) as ch:
        stub = prism_pb2_grpc.PrismServiceStub(ch)
        with tracer.start_as_current_span("caller") as caller:
            await stub.ListModels(prism_pb2.ListModelsRequest(), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GenerateUnary(prism_pb2.GenerateUnaryRequest(), timeout=5)
        # health and reflection are not traced, from either side
        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finished = exporter.get_finished_spans()
    by_kind: dict[trace.SpanKind, list] = {}
    for span in finished:
        by_kind.setdefault(span.kind, []).append(span)
    assert not [s for s in finished if "Health" in s.name or "Reflection" in s.name]

    server_span = next(s for s in by_kind[trace.SpanKind.SERVER]
                       if s.name == "/prism.v1.PrismService/ListModels")
    client_span = next(s for s in by_kind[trace.SpanKind.CLIENT]
                       if s.name == "/prism.v1.PrismService/ListModels")
    caller_ctx = caller.get_span_context()
    assert client_span.context.trace_id == caller_ctx.trace_id
    assert server_span.context.trace_id == caller_ctx.trace_id
    assert server_span.parent is not None and server_span.parent.span_id == client_span.context.span_id
    assert server_span.attributes["rpc.service"] == SERVICE_NAME
    assert server_span.attributes["rpc.grpc.status_code"] == 0

    failed = next(s for s in by_kind[trace.SpanKind.SERVER]
                  if s.name == "/prism.v1.PrismService/GenerateUnary")
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # semconv: a caller's error (INVALID_ARGUMENT) leaves the server span UNSET
    assert failed.status.status_code == trace.StatusCode.UNSET
    failed_client = next(s for s in by_kind[trace.SpanKind.CLIENT]
                         if s.name == "/prism.v1.PrismService/GenerateUnary")
    assert failed_client.status.status_code == trace.StatusCode.ERROR


async def test_streaming_span_recorded(running, spans) -> None:
    server, _ = running
    provider, exporter = spans
    async with instrumented_channel(server.address, tracer_provider=provider) as ch:
        stub = prism_pb2_grpc.PrismServiceStub(ch)
        _ = [r async for r in stub.Generate(prism_pb2.GenerateRequest(prompt="x"), timeout=5)]
    names = {(s.kind, s.name) for s in exporter.get_finished_spans()}
    assert (trace.SpanKind.SERVER, "/prism.v1.PrismService/Generate") in names


async def test_otel_disabled_records_no_server_spans(spans) -> None:
    provider, exporter = spans
    server, _ = make_server(provider, otel=False)
    async with server:
        async with grpc.aio.insecure_channel(server.address) as ch:
            await prism_pb2_grpc.PrismServiceStub(ch).ListModels(prism_pb2.ListModelsRequest(),
                                                                 timeout=5)
    assert exporter.get_finished_spans() == ()


async def test_large_messages_within_configured_limit(spans) -> None:
    server, _ = make_server(spans[0], max_message_bytes=8 * 1024 * 1024)
    big = "x" * (6 * 1024 * 1024)  # over gRPC's 4 MiB default
    async with server:
        async with instrumented_channel(server.address, max_message_bytes=32 * 1024 * 1024) as ch:
            stub = prism_pb2_grpc.PrismServiceStub(ch)
            reply = await stub.GenerateUnary(
                prism_pb2.GenerateUnaryRequest(request=prism_pb2.GenerateRequest(prompt=big)),
                timeout=10)
            assert len(reply.text) == len(big)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GenerateUnary(prism_pb2.GenerateUnaryRequest(
                    request=prism_pb2.GenerateRequest(prompt=big + big)), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---------------------------------------------------------------- health watch and drain


async def test_health_watch_sees_not_serving_and_ends_on_drain(spans) -> None:
    server, _ = make_server(spans[0], drain_grace_s=10.0)
    await server.start()
    async with grpc.aio.insecure_channel(server.address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20)
        first = await watch.read()
        assert first.status == SERVING
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        drain = asyncio.create_task(server.drain())
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == NOT_SERVING
        assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
        assert await watch.code() == grpc.StatusCode.OK
        await asyncio.wait_for(drain, 5)
        await asyncio.wait_for(server.wait(), 5)
        assert loop.time() - t0 < 3.0  # the open Watch did not hold the 10 s grace


async def test_health_watch_cancelled_by_client_leaves_server_clean(running) -> None:
    server, _ = running
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(3):
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert (await watch.read()).status == SERVING
            watch.cancel()
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == SERVING
    await asyncio.sleep(0.05)
    assert server.health._watcher_count_by_service.get("", 0) == 0  # grpc's own bookkeeping


async def test_drain_runs_hooks_while_still_answering(spans) -> None:
    server, _ = make_server(spans[0], drain_grace_s=5.0)
    observed: list[int] = []
    release = asyncio.Event()

    async def hook() -> None:
        async with grpc.aio.insecure_channel(server.address) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
            observed.append(reply.status)
        await release.wait()

    async def failing_hook() -> None:
        raise RuntimeError("hook failed")  # logged; the drain goes on

    server.add_drain_hook(hook)
    server.add_drain_hook(failing_hook)
    await server.start()
    drain = asyncio.create_task(server.drain())
    await asyncio.sleep(0.2)
    assert server.draining and not drain.done()
    release.set()
    await asyncio.wait_for(drain, 5)
    await asyncio.wait_for(server.wait(), 5)
    assert observed == [NOT_SERVING]
    await server.drain()  # idempotent
    async with grpc.aio.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await prism_pb2_grpc.PrismServiceStub(ch).ListModels(prism_pb2.ListModelsRequest(),
                                                                 timeout=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_drain_hooks_bounded_by_grace(spans) -> None:
    server, _ = make_server(spans[0], drain_grace_s=0.3)

    async def stuck() -> None:
        await asyncio.sleep(60)

    server.add_drain_hook(stuck)
    await server.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(server.drain(), 5)
    assert loop.time() - t0 < 2.0


async def test_in_process_stream_survives_drain(spans) -> None:
    servicer = FakePrismServicer(token_delay_s=0.1)
    server, _ = make_server(spans[0], servicer, drain_grace_s=5.0)
    server.add_drain_hook(servicer.wait_idle)
    await server.start()
    async with instrumented_channel(server.address, tracer_provider=spans[0]) as ch:
        call = prism_pb2_grpc.PrismServiceStub(ch).Generate(
            prism_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_new_tokens=8)),
            timeout=10)
        first = await call.read()
        drain = asyncio.create_task(server.drain())
        rest = [r async for r in call]
        assert [first.token_ids[0]] + [r.token_ids[0] for r in rest] == list(range(8))
        await asyncio.wait_for(drain, 5)


async def test_unbindable_port_raises(running, spans) -> None:
    taken, _ = running
    server, _ = make_server(spans[0], port=taken.port)
    with pytest.raises(RuntimeError):
        await server.start()


# ---------------------------------------------------------------- telemetry helpers


def test_trace_context_round_trip_through_a_dict(spans) -> None:
    provider, exporter = spans
    tracer = provider.get_tracer("test")
    assert inject_trace_context() == {}  # no current span: nothing to carry
    with tracer.start_as_current_span("front-door") as parent:
        header = inject_trace_context()
    assert set(header) >= {"traceparent"}
    ctx = extract_trace_context(header)
    assert trace.get_current_span(ctx).get_span_context().trace_id == parent.get_span_context().trace_id
    with span_from_trace_context("encode", header, tracer=tracer, attributes={"k": 1}) as span:
        assert span.get_span_context().trace_id == parent.get_span_context().trace_id
    child = next(s for s in exporter.get_finished_spans() if s.name == "encode")
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.kind == trace.SpanKind.CONSUMER
    # an empty carrier starts a new trace
    with span_from_trace_context("orphan", {}, tracer=tracer) as span:
        assert span.get_span_context().trace_id != parent.get_span_context().trace_id


def test_setup_tracing_without_exporter_package_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="prism.runtime.telemetry"):
        provider = setup_tracing(
            "prism-test", instance_id="w1", set_global=False,
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    try:
        assert provider.resource.attributes["service.name"] == "prism-test"
        assert provider.resource.attributes["service.instance.id"] == "w1"
        try:
            import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
        except ImportError:
            assert "opentelemetry-exporter-otlp-proto-grpc" in caplog.text
    finally:
        provider.shutdown()
    quiet = setup_tracing("prism-test", set_global=False, environ={})
    quiet.shutdown()


def test_json_logging_carries_trace_ids(spans) -> None:
    provider, _ = spans
    stream = io.StringIO()
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        setup_logging("prism-test", "DEBUG", stream=stream, static={"worker": "w1"})
        setup_logging("prism-test", "DEBUG", stream=stream, static={"worker": "w1"})  # idempotent
        logger = logging.getLogger("prism.test")
        logger.info("outside %d", 1)
        with provider.get_tracer("t").start_as_current_span("s") as span:
            logger.warning("inside", extra={"task_id": "r1"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        for handler in list(root.handlers):
            if handler not in saved_handlers:
                root.removeHandler(handler)
        root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    assert lines[0]["msg"] == "outside 1" and "trace_id" not in lines[0]
    assert lines[0]["service"] == "prism-test" and lines[0]["worker"] == "w1"
    assert lines[1]["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert lines[1]["span_id"] == format(span.get_span_context().span_id, "016x")
    assert lines[1]["task_id"] == "r1" and lines[1]["level"] == "WARNING"
    assert "ValueError: boom" in lines[2]["exc"]


# ---------------------------------------------------------------- port files and supervisor


def test_write_port_file_is_atomic_and_validated(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "svc.port"
    assert read_port_file(path) is None
    write_port_file(path, 50051)
    assert read_port_file(path) == 50051
    write_port_file(path, 50052)
    assert path.read_text() == "50052\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["svc.port"]  # no temp files left
    with pytest.raises(ValueError):
        write_port_file(path, 0)


def app_args(*extra: str) -> list[str]:
    return ["--token-delay-s", "0.2", *extra]


def test_sigterm_drains_in_flight_stream_and_exits_zero(tmp_path: Path) -> None:
    grace = 15.0
    with Supervisor(tmp_path, cwd=REPO, start_timeout_s=30) as sup:
        child = sup.start_module("app", APP_MODULE,
                                 app_args("--drain-grace-s", str(grace)),
                                 health_service=SERVICE_NAME)
        assert sup.endpoints() == {"app": child.address}
        with grpc.insecure_channel(child.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30)
            assert next(watch).status == SERVING
            stream = prism_pb2_grpc.PrismServiceStub(ch).Generate(
                prism_pb2.GenerateRequest(request_id="slow",
                                          sampling=common_pb2.SamplingParams(max_new_tokens=10)),
                timeout=30)
            tokens = [next(stream).token_ids[0]]
            t0 = time.monotonic()
            child.process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            # still answering while the in-flight work drains, and saying so
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert reply.status == NOT_SERVING
            rest = list(stream)
            tokens += [r.token_ids[0] for r in rest]
            assert tokens == list(range(10))
            assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert list(watch) == []  # the Watch stream ends cleanly
            assert child.process.wait(timeout=grace) == 0
            elapsed = time.monotonic() - t0
        assert elapsed < grace
        assert 1.0 < elapsed  # it did wait for the 9 remaining tokens (~1.8 s)
    log_text = child.log_path.read_text()
    assert "received SIGTERM: draining" in log_text and "exiting" in log_text


def test_supervisor_forwards_env_and_stops_children(tmp_path: Path) -> None:
    tunables = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
    with Supervisor(tmp_path, cwd=REPO, env={"GLIBC_TUNABLES": tunables}) as sup:
        a = sup.start_module("a", APP_MODULE, app_args(),
                             env={"PRISM_TESTAPP_WORKER_NAME": "from-env"})
        b = sup.start_module("b", APP_MODULE, app_args())
        assert a.port != b.port and set(sup.endpoints()) == {"a", "b"}
        # (not /proc/PID/environ: glibc 2.36 rewrites GLIBC_TUNABLES there to the first tunable)
        with pytest.raises(ValueError):
            sup.start_module("a", APP_MODULE, app_args())
        with grpc.insecure_channel(b.address) as ch:
            models = prism_pb2_grpc.PrismServiceStub(ch).ListModels(prism_pb2.ListModelsRequest(),
                                                                    timeout=5)
            assert models.default_model == "tiny"
        assert sup.stop("b") == 0
        assert set(sup.endpoints()) == {"a"}
    assert a.returncode == 0 and b.returncode == 0
    started = [json.loads(line) for line in a.log_path.read_text().splitlines()
               if '"msg": "started"' in line]
    assert started[0]["worker"] == "from-env"
    assert started[0]["glibc_tunables"] == tunables


def test_supervisor_kills_after_grace(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path, cwd=REPO, stop_grace_s=0.5)
    child = sup.start_module("app", APP_MODULE, app_args("--drain-grace-s", "60"))
    with grpc.insecure_channel(child.address) as ch:
        stream = prism_pb2_grpc.PrismServiceStub(ch).Generate(
            prism_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(max_new_tokens=1000)),
            timeout=60)
        next(stream)  # in flight: the drain would take minutes
        t0 = time.monotonic()
        codes = sup.stop_all()
        assert codes == {"app": -signal.SIGKILL}
        assert time.monotonic() - t0 < 5


def test_supervisor_reports_a_child_that_dies(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    argv = [sys.executable, "-c",
            "import sys; print('cannot load model', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(ChildStartError) as err:
        sup.start("broken", argv)
    assert err.value.returncode == 3
    assert "cannot load model" in err.value.log_tail and "cannot load model" in str(err.value)
    assert sup.endpoints() == {}


def test_supervisor_times_out_and_kills_a_silent_child(tmp_path: Path) -> None:
    sup = Supervisor(tmp_path)
    argv = [sys.executable, "-c", "import time; print('loading...', flush=True); time.sleep(60)"]
    t0 = time.monotonic()
    with pytest.raises(ChildStartError) as err:
        sup.start("silent", argv, timeout_s=1.0)
    assert time.monotonic() - t0 < 5
    assert "no port file" in str(err.value) and "loading..." in err.value.log_tail


def test_supervisor_times_out_when_never_serving(tmp_path: Path) -> None:
    # writes a port file for a port nobody serves on
    script = ("import sys, time; from prism.runtime.procs import write_port_file; "
              "write_port_file(sys.argv[sys.argv.index('--port-file') + 1], 9); time.sleep(60)")
    sup = Supervisor(tmp_path, cwd=REPO)
    with pytest.raises(ChildStartError) as err:
        sup.start("deaf", [sys.executable, "-c", script], timeout_s=1.5)
    assert "not SERVING" in str(err.value)


def test_supervisor_usable_from_a_thread(tmp_path: Path) -> None:
    result: dict[str, object] = {}

    def run() -> None:
        with Supervisor(tmp_path, cwd=REPO) as sup:
            result["address"] = sup.start_module("app", APP_MODULE, app_args()).address

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert str(result["address"]).startswith("127.0.0.1:")
