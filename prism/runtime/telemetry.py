"""Tracing and logging setup shared by every Prism process.

* `setup_tracing(service_name)` installs an SDK `TracerProvider` whose resource names the
  service. Spans are exported over OTLP only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set; otherwise nothing leaves the process.
  The exporter comes from the optional package ``opentelemetry-exporter-otlp-proto-grpc``
  (or ``-proto-http`` with ``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf``); without it a
  warning is logged and spans are not exported.
* `instrumented_channel(target)` opens a `grpc.aio` channel carrying the OpenTelemetry client
  interceptors (which propagate ``traceparent`` in the call metadata), with Prism's message
  size limits.
* `inject_trace_context` / `extract_trace_context` move W3C trace context through a
  ``dict[str, str]`` (`TaskHeader.trace_context`, `WorkItem.trace_context`), and
  `span_from_trace_context` continues such a trace in a worker.
* `setup_logging(service)` writes one JSON object per line, with ``trace_id``/``span_id``
  when logged inside a span.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import IO, Any

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "JsonLogFormatter",
    "channel_options",
    "extract_trace_context",
    "inject_trace_context",
    "instrumented_channel",
    "setup_logging",
    "setup_tracing",
    "record_task",
    "span_from_trace_context",
    "untraced_methods_filter",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default send/receive limit for Prism channels and servers (gRPC's own default is 4 MiB)."""

_W3C = TraceContextTextMapPropagator()


# ---------------------------------------------------------------------------- tracing


def untraced_methods_filter() -> Any:
    """OpenTelemetry gRPC filter that traces everything but health checks and reflection.

    Excluding health matters beyond noise: instrumentation-grpc 0.66b2's aio server
    interceptor breaks handlers that stream with ``context.write()``, which grpc health's aio
    ``Watch`` does (see docs FIELD-NOTES).
    """
    return filters.negate(
        filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
    )


def _otlp_exporter(environ: Mapping[str, str]) -> Any | None:
    """The OTLP span exporter the environment asks for, or None (with a warning) when its
    package is not installed."""
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip().lower()
    if protocol == "grpc":
        module, package = ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
                           "opentelemetry-exporter-otlp-proto-grpc")
    elif protocol == "http/protobuf":
        module, package = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                           "opentelemetry-exporter-otlp-proto-http")
    else:
        log.warning("unsupported OTLP protocol %r; spans will not be exported", protocol)
        return None
    try:
        mod = __import__(module, fromlist=["OTLPSpanExporter"])
    except ImportError:
        log.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but %s is not installed; spans will not be "
            "exported (pip install %s)", package, package,
        )
        return None
    return mod.OTLPSpanExporter()  # reads endpoint, headers... from the environment


def setup_tracing(
    service_name: str,
    *,
    instance_id: str | None = None,
    processors: Sequence[SpanProcessor] = (),
    set_global: bool = True,
    environ: Mapping[str, str] | None = None,
) -> TracerProvider:
    """Creates (and by default installs globally) the process's tracer provider.

    Args:
        service_name: the ``service.name`` resource attribute, e.g. ``"prism-encoder"``.
        instance_id: the ``service.instance.id`` attribute (e.g. the worker name).
        processors: extra span processors (tests pass a `SimpleSpanProcessor` over an
            `InMemorySpanExporter`).
        set_global: install as the global tracer provider. OpenTelemetry allows that once
            per process; later calls keep the first provider (and log a warning).
        environ: the environment to read (default ``os.environ``).

    Returns the provider; pass it to `StageServer`/`instrumented_channel` to be explicit.
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SDK_DISABLED`` are honoured by the SDK.
    """
    env = os.environ if environ is None else environ
    attributes: dict[str, Any] = {"service.name": service_name}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(resource=Resource.create(attributes))
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        exporter = _otlp_exporter(env)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    for processor in processors:
        provider.add_span_processor(processor)
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel/server options with Prism's message size limits, plus `extra` (which
    override same-named defaults)."""
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
    }
    opts.update(dict(extra))
    return list(opts.items())


def instrumented_channel(
    target: str,
    options: Sequence[tuple[str, Any]] = (),
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tracer_provider: trace.TracerProvider | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    credentials: grpc.ChannelCredentials | None = None,
    tracing: bool = True,
) -> grpc.aio.Channel:
    """Opens a `grpc.aio` channel to `target` with the OpenTelemetry client interceptors.

    Each call gets a client span and carries ``traceparent`` so the server's span joins the
    caller's trace. Health and reflection calls are not traced. `options` override the
    message-size defaults. Must be called with a running event loop (grpc.aio's rule).
    """
    all_interceptors: list[grpc.aio.ClientInterceptor] = []
    if tracing:
        all_interceptors.extend(
            aio_client_interceptors(tracer_provider=tracer_provider,
                                    filter_=untraced_methods_filter())
        )
    all_interceptors.extend(interceptors)
    opts = channel_options(max_message_bytes, options)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=opts,
                                       interceptors=all_interceptors or None)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=all_interceptors or None)


def inject_trace_context(
    carrier: MutableMapping[str, str] | None = None,
    context: otel_context.Context | None = None,
) -> dict[str, str] | MutableMapping[str, str]:
    """Writes the W3C trace context (``traceparent``, ``tracestate``) of `context` (default:
    the current one) into `carrier` (default: a new dict) and returns it. Empty when there is
    no valid span."""
    out: MutableMapping[str, str] = {} if carrier is None else carrier
    _W3C.inject(out, context=context)
    return out


def extract_trace_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The OpenTelemetry context carried by a W3C trace-context mapping (an empty mapping gives
    a context without a parent span)."""
    return _W3C.extract(dict(carrier or {}))


@contextlib.contextmanager
def span_from_trace_context(
    name: str,
    carrier: Mapping[str, str] | None,
    *,
    tracer: trace.Tracer | None = None,
    kind: trace.SpanKind = trace.SpanKind.CONSUMER,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[trace.Span]:
    """Starts (and makes current) a span continuing the trace in `carrier` — e.g. a worker
    processing a `WorkItem`: ``with span_from_trace_context("encode", item.trace_context):``.
    """
    tracer = tracer or trace.get_tracer("prism")
    with tracer.start_as_current_span(
        name, context=extract_trace_context(carrier), kind=kind, attributes=dict(attributes or {})
    ) as span:
        yield span


def record_task(stage: str, item: Any, started: float, ended: float, attributes: Mapping[str, Any] | None = None,
                *, instance: str = "", tokens: int = 0, tracer: trace.Tracer | None = None) -> None:
    """Records, in the trace its scheduler put in the queue message (`WorkItem.trace_context`),
    how a stage handled one task: ``prism.queue.<stage>`` from when it was queued
    (`WorkItem.enqueued_at`) to when the worker began it, then ``prism.<stage>`` from then to
    its end, carrying `attributes` (batch size, token counts...). Times are Unix epoch seconds.
    Spans are recorded after the fact, so one batched call gives each of its requests its own
    span in its own trace. Nothing is exported unless tracing is configured. The same task goes
    to the process's metrics (`prism.runtime.metrics.observe_task`): its wait, work and tokens."""
    from prism.runtime.metrics import observe_task

    tracer = tracer or trace.get_tracer("prism")
    parent = extract_trace_context(getattr(item, "trace_context", None))
    base = {"prism.task_id": item.task_id, "prism.stage": stage, "prism.attempt": getattr(item, "attempt", 1)}
    queued = float(getattr(item, "enqueued_at", 0.0) or 0.0)
    observe_task(stage, instance, started - queued if 0 < queued <= started else -1.0, ended - started, tokens)
    ns = 1_000_000_000
    if 0 < queued <= started:
        tracer.start_span(f"prism.queue.{stage}", context=parent, kind=trace.SpanKind.CONSUMER, attributes=base,
                          start_time=int(queued * ns)).end(end_time=int(started * ns))
    span = tracer.start_span(f"prism.{stage}", context=parent, kind=trace.SpanKind.CONSUMER,
                             attributes={**base, **dict(attributes or {})}, start_time=int(started * ns))
    span.end(end_time=int(max(ended, started) * ns))


# ---------------------------------------------------------------------------- logging

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


class JsonLogFormatter(logging.Formatter):
    """Formats a record as one JSON object: ``ts`` (UTC ISO 8601), ``level``, ``service``,
    ``logger``, ``msg``, ``trace_id``/``span_id`` (hex, inside a sampled span), ``exc`` and
    any ``extra={...}`` fields."""

    def __init__(self, service: str, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._service = service
        self._static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self._service,
            **self._static,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = format(ctx.trace_id, "032x")
            out["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(
    service: str,
    level: str | int = "INFO",
    *,
    stream: IO[str] | None = None,
    static: Mapping[str, Any] | None = None,
) -> logging.Handler:
    """Configures the root logger to write JSON lines to `stream` (default stderr).

    Replaces a handler installed by an earlier call (idempotent); `static` fields (e.g.
    ``{"worker": name}``) go on every line. Returns the handler.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_prism_json", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter(service, static))
    handler._prism_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
