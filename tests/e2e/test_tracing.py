"""One trace per request across processes: the services run as processes exporting by OTLP to a
receiver in this test; a request sent with a W3C `traceparent` yields one trace holding the
scheduler's Generate span (child of the caller's) and every stage's queue-wait and work spans
(children of the Generate span, across the Redis hops), each from its own service."""
from __future__ import annotations

import re
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from prism.launch import Deployment, DeploymentOptions
from prism.v1 import prism_pb2_grpc
from tests.conftest import png_bytes
from tests.integration.cluster import chat
from tests.integration.test_metrics import scrape

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping (service, span) pairs."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((attrs.get("service.name", ""), s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[str, object]]:
        with self.lock:
            return [(svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
def receiver(monkeypatch):
    recv = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(recv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield recv
    server.stop(0)


def metrics_port(log: Path) -> int:
    """The port a process bound for ``--metrics-port 0``, from its ``metrics on http://...`` log line
    (a port picked free beforehand may be taken by another process before the child binds it)."""
    found = re.search(r"metrics on http://[^\s\"]*:(\d+)/metrics", log.read_text())
    assert found, f"no metrics line in {log}"
    return int(found.group(1))


def test_one_request_one_trace_across_processes_and_redis(tiny_models, receiver, tmp_path):
    """...and each process's /metrics counted it: the scheduler one OK request, each stage one task."""
    parts = ("scheduler", "encode", "prefill", "decode")
    options = DeploymentOptions(model_dir=tiny_models["llava"], layout="split", threads=1, slots=2, max_len=512,
                                log_dir=tmp_path, extra_args={p: ["--metrics-port", "0"] for p in parts})
    with Deployment(options) as d:
        ports = {p: metrics_port(tmp_path / ("scheduler.log" if p == "scheduler" else f"{p}-1.log")) for p in parts}
        with grpc.insecure_channel(d.address) as channel:
            stub = prism_pb2_grpc.PrismServiceStub(channel)
            traceparent = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
            chunks = list(stub.Generate(chat("trace me", [png_bytes(3)], 5), metadata=(("traceparent", traceparent),),
                                        timeout=60))
        assert chunks[-1].finish_reason
        stage_names = {"prism.queue.encode", "prism.encode", "prism.queue.prefill", "prism.prefill",
                       "prism.queue.decode", "prism.decode"}
        until = time.monotonic() + 20
        while time.monotonic() < until:  # the processes export every 100 ms
            got = receiver.of_trace(TRACE_ID)
            if stage_names <= {s.name for _, s in got} and any(s.name.endswith("/Generate") for _, s in got):
                break
            time.sleep(0.2)
        scraped = {p: scrape(port) for p, port in ports.items()}

    def series(part: str, name: str) -> dict[tuple, float]:
        return {labels: v for (n, labels), v in scraped[part].items() if n == name}

    assert [v for labels, v in series("scheduler", "prism_requests_total").items()
            if ("outcome", "OK") in labels] == [1.0]
    assert list(series("scheduler", "prism_generated_tokens_total").values()) == [5.0]
    assert series("scheduler", "prism_stage_tasks_total") == {}
    for stage in ("encode", "prefill", "decode"):  # each process counts its own stage's task, once
        tasks = series(stage, "prism_stage_tasks_total")
        assert list(tasks.values()) == [1.0] and ("stage", stage) in next(iter(tasks)), (stage, tasks)
    got = receiver.of_trace(TRACE_ID)
    generate = [(svc, s) for svc, s in got if s.name == "/prism.v1.PrismService/Generate"]
    assert len(generate) == 1, sorted(s.name for _, s in got)
    svc, root = generate[0]
    assert svc == "prism-scheduler" and root.parent_span_id.hex() == CALLER_SPAN
    stages = {s.name: (svc, s) for svc, s in got if s.name in stage_names}
    assert set(stages) == stage_names
    for name, (svc, span) in stages.items():
        assert span.parent_span_id == root.span_id, name
        assert svc != "prism-scheduler", (name, svc)  # recorded by the worker that did the work
    assert len({svc for svc, _ in stages.values()}) >= 3  # the encode, prefill and decode processes
