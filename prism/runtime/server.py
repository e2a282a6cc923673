"""`StageServer`: the gRPC aio server bootstrap every Prism process uses.

It builds a `grpc.aio.server` with Prism's message size limits and the OpenTelemetry server
interceptor (health and reflection excluded), registers the stage's servicers, serves
``grpc.health.v1`` (SERVING for ``""`` and each service) and reflection, and drains on
SIGTERM/SIGINT:

1. health turns NOT_SERVING (load balancers and the scheduler stop sending work);
2. the drain hooks run concurrently (e.g. the worker closes its queue and finishes its
   in-flight tasks) while the server still accepts calls — downstream stages may still need
   to pull this worker's outputs (``FetchEmbeddings``/``FetchKv``);
3. health ``Watch`` streams are ended and ``server.stop(remaining grace)`` lets the remaining
   calls finish, cancelling whatever is still running when the grace (``drain_grace_s``,
   counted from the start of the drain) runs out.

A second signal during a drain stops the server at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from prism.runtime.config import check
from prism.runtime.procs import write_port_file
from prism.runtime.telemetry import DEFAULT_MAX_MESSAGE_BYTES, channel_options, untraced_methods_filter

__all__ = ["DrainHook", "Registrar", "ServerConfig", "StageServer", "format_address"]

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]
"""Registers servicers on a server, e.g. ``lambda s: add_EncoderServiceServicer_to_server(x, s)``."""
DrainHook = Callable[[], Awaitable[None]]
"""Awaited during a drain, e.g. a worker's "stop taking work and finish in-flight tasks"."""


def default_worker_name() -> str:
    """``<hostname>-<pid>``: unique per process, readable in logs and responses."""
    return f"{socket.gethostname()}-{os.getpid()}"


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed (``[::1]:50051``)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How a Prism process serves gRPC. Embed it as a field of a stage's config."""

    host: str = dataclasses.field(
        default="127.0.0.1",
        metadata={"help": "address to listen on; 0.0.0.0 or :: to accept remote connections"},
    )
    port: int = dataclasses.field(
        default=0, metadata={"help": "port to listen on; 0 picks a free one (see --port-file)"}
    )
    advertise_host: str = dataclasses.field(
        default="",
        metadata={"help": "host other processes dial this one on, as registered for the scheduler "
                          "and peers; 'auto': the address this machine's hostname resolves to (a "
                          "container's IP in compose, the pod IP in Kubernetes); empty: the listen "
                          "address (loopback when listening on all interfaces)"},
    )
    port_file: Path | None = dataclasses.field(
        default=None,
        metadata={"help": "once serving, write the bound port to this file (atomically); "
                          "how `prism up` and tests find a port-0 server"},
    )
    max_message_bytes: int = dataclasses.field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        metadata={"help": "largest gRPC message sent or received, bytes"},
    )
    drain_grace_s: float = dataclasses.field(
        default=30.0,
        metadata={"help": "on SIGTERM, seconds allowed for in-flight work to finish before "
                          "the remaining calls are cancelled"},
    )
    otel: bool = dataclasses.field(
        default=True, metadata={"help": "trace incoming calls with OpenTelemetry"}
    )
    metrics_port: int = dataclasses.field(
        default=-1,
        metadata={"help": "serve Prometheus metrics on http://HOST:PORT/metrics; 0 picks a free port; "
                          "-1: none"},
    )
    tls_cert: Path | None = dataclasses.field(
        default=None,
        metadata={"help": "PEM certificate this process presents, as server and to its peers; without it "
                          "gRPC is plain text (for loopback development: the log says so)"},
    )
    tls_key: Path | None = dataclasses.field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: Path | None = dataclasses.field(
        default=None,
        metadata={"help": "PEM certificate of the deployment's CA: callers must present a certificate it "
                          "signed (mutual TLS; set on stage services), and peers dialled are checked against it"},
    )
    tls_server_name: str = dataclasses.field(
        default="prism",
        metadata={"help": "name every certificate of the deployment carries (subject alternative name): "
                          "peers are dialled by address and checked under this name"},
    )
    worker_name: str = dataclasses.field(
        default_factory=default_worker_name,
        metadata={"help": "this worker's name in responses, logs and traces "
                          "(default: hostname-pid)"},
    )

    def __post_init__(self) -> None:
        check(bool(self.host.strip()), "host", "must not be empty")
        check(0 <= self.port <= 65535, "port", f"must be in 0..65535, got {self.port}")
        check(-1 <= self.metrics_port <= 65535, "metrics_port", f"must be -1 (off) or in 0..65535, got {self.metrics_port}")
        check(self.max_message_bytes >= 1024, "max_message_bytes",
              f"must be at least 1024, got {self.max_message_bytes}")
        check(self.drain_grace_s >= 0, "drain_grace_s",
              f"must be >= 0, got {self.drain_grace_s}")
        check(bool(self.worker_name.strip()), "worker_name", "must not be empty")
        check((self.tls_cert is None) == (self.tls_key is None), "tls_key", "tls_cert and tls_key go together")
        check(self.tls_ca is None or self.tls_cert is not None, "tls_ca", "needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            path = getattr(self, name)
            check(path is None or Path(path).is_file(), name, f"{path} is not a file")


class _DrainingHealthServicer(health.aio.HealthServicer):
    """grpc's aio health servicer whose ``Watch`` streams end (OK, after NOT_SERVING was sent)
    when the server stops, so that open watchers do not hold ``server.stop`` for the whole
    grace period."""

    def __init__(self) -> None:
        super().__init__()
        self._closing = asyncio.Event()

    def close_watches(self) -> None:
        self._closing.set()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
            if closing.done() and not watch.done():
                # Let a status change that was just notified reach the peer first.
                await asyncio.wait({watch}, timeout=0.1)
        finally:
            for task in (watch, closing):
                if not task.done():
                    task.cancel()
            await asyncio.gather(watch, closing, return_exceptions=True)
        if watch.done() and not watch.cancelled() and watch.exception() is not None:
            raise watch.exception()  # type: ignore[misc]


class StageServer:
    """A gRPC aio server with health, reflection, tracing and SIGTERM drain.

    Args:
        config: listening address, limits, grace, tracing switch.
        service_names: full names of the services the registrars add (e.g.
            ``"prism.v1.EncoderService"``), marked SERVING and listed by reflection.
        registrars: callables adding servicers to the server.
        drain_hooks: awaited concurrently on drain (more with `add_drain_hook`).
        tracer_provider: for the server interceptor (default: the global one).
        interceptors: extra server interceptors, after the OpenTelemetry one.
        options: extra ``grpc.aio.server`` options (override the defaults).
        handle_signals: install SIGTERM/SIGINT handlers that drain (needs the main thread).
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        service_names: Sequence[str] = (),
        registrars: Sequence[Registrar] = (),
        drain_hooks: Sequence[DrainHook] = (),
        tracer_provider: trace.TracerProvider | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        options: Sequence[tuple[str, Any]] = (),
        handle_signals: bool = True,
    ) -> None:
        self._config = config
        self._service_names = tuple(service_names)
        self._registrars = tuple(registrars)
        self._drain_hooks: list[DrainHook] = list(drain_hooks)
        self._tracer_provider = tracer_provider
        self._interceptors = tuple(interceptors)
        self._options = tuple(options)
        self._handle_signals = handle_signals
        self._server: grpc.aio.Server | None = None
        self._metrics = None  # the Prometheus HTTP server (metrics_port >= 0)
        self.metrics_port = 0  # its bound port
        self._health: _DrainingHealthServicer | None = None
        self._port: int | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._force_task: asyncio.Task[None] | None = None
        self._signals: list[signal.Signals] = []

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> ServerConfig:
        return self._config

    @property
    def server(self) -> grpc.aio.Server:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server

    @property
    def health(self) -> health.aio.HealthServicer:
        if self._health is None:
            raise RuntimeError("server not started")
        return self._health

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to dial this server (loopback when listening on all interfaces)."""
        host = self._config.advertise_host or self._config.host
        if host == "auto":
            import socket

            host = socket.gethostbyname(socket.gethostname())
        if host in ("0.0.0.0", "::", "[::]"):
            host = "127.0.0.1"
        return format_address(host, self.port)

    @property
    def draining(self) -> bool:
        return self._drain_task is not None

    def add_drain_hook(self, hook: DrainHook) -> None:
        """Adds an async callable awaited (concurrently with the others) on drain."""
        self._drain_hooks.append(hook)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> int:
        """Binds, registers everything, starts serving, marks health SERVING, writes the port
        file if configured, installs the signal handlers. Returns the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        cfg = self._config
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if cfg.otel:
            interceptors.append(aio_server_interceptor(
                tracer_provider=self._tracer_provider, filter_=untraced_methods_filter()))
        interceptors.extend(self._interceptors)
        # SO_REUSEPORT off: a second server on a fixed port must fail, not share its traffic.
        options = (("grpc.so_reuseport", 0), *self._options)
        server = grpc.aio.server(
            interceptors=interceptors or None,
            options=channel_options(cfg.max_message_bytes, options),
        )
        for register in self._registrars:
            register(server)
        health_servicer = _DrainingHealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = format_address(cfg.host, cfg.port)
        from prism.runtime.tls import server_credentials

        credentials = server_credentials(cfg)
        try:
            if credentials is None:
                log.warning("serving gRPC in plain text on %s (no --tls-cert): for loopback development only", address)
                port = server.add_insecure_port(address)
            else:
                log.info("serving gRPC over %s on %s", "mutual TLS" if cfg.tls_ca else "TLS", address)
                port = server.add_secure_port(address, credentials)
        except RuntimeError as e:  # grpc raises on bind failure (older versions returned 0)
            raise RuntimeError(f"could not bind {address}: {e}") from e
        if port == 0:
            raise RuntimeError(f"could not bind {address}")
        for name in ("", *self._service_names):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._server, self._health, self._port = server, health_servicer, port
        if cfg.metrics_port >= 0:
            from prism.runtime.metrics import serve

            self._metrics, self.metrics_port = serve(cfg.metrics_port, cfg.host)
            log.info("metrics on http://%s/metrics", format_address(cfg.host, self.metrics_port))
        if self._handle_signals:  # before the port file: whoever reads it may SIGTERM us
            self._install_signal_handlers()
        if cfg.port_file is not None:
            write_port_file(cfg.port_file, port)
        log.info("serving %s on %s", ", ".join(self._service_names) or "(no services)",
                 format_address(cfg.host, port),
                 extra={"worker": cfg.worker_name, "port": port})
        return port

    async def drain(self) -> None:
        """Drains and stops the server (see the module docstring). Idempotent: concurrent
        and later calls wait for the same drain."""
        if self._server is None:
            raise RuntimeError("server not started")
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        task = self._drain_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # we were cancelled; a forced stop cancels the drain
                raise

    async def stop(self, grace: float | None = 0) -> None:
        """Stops now: health NOT_SERVING, then ``server.stop(grace)`` without drain hooks."""
        if self._server is None:
            return
        assert self._health is not None
        await self._health.enter_graceful_shutdown()
        self._health.close_watches()
        await self._server.stop(grace)
        self._remove_signal_handlers()
        self._stop_metrics()

    def _stop_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None

    async def wait(self) -> None:
        """Returns once the server has stopped (and the drain, if any, has finished)."""
        await self.server.wait_for_termination()
        self._stop_metrics()
        task = self._drain_task
        if task is not None:
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():  # we were cancelled, not the drain
                    raise

    async def __aenter__(self) -> StageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)

    async def _drain(self) -> None:
        assert self._server is not None and self._health is not None
        loop = asyncio.get_running_loop()
        grace = self._config.drain_grace_s
        started = loop.time()
        log.info("draining (grace %.1fs)", grace, extra={"worker": self._config.worker_name})
        await self._health.enter_graceful_shutdown()
        hooks = list(self._drain_hooks)
        if hooks:
            gathered = asyncio.gather(*(hook() for hook in hooks), return_exceptions=True)
            try:
                results = await asyncio.wait_for(gathered, timeout=grace)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                log.warning("drain hooks did not finish within %.1fs", grace)
            else:
                for hook, result in zip(hooks, results, strict=True):
                    if isinstance(result, BaseException):
                        log.error("drain hook %r failed", hook, exc_info=result)
        self._health.close_watches()
        remaining = max(0.0, grace - (loop.time() - started))
        await self._server.stop(remaining)
        self._remove_signal_handlers()
        log.info("stopped after %.2fs", loop.time() - started,
                 extra={"worker": self._config.worker_name})

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (ValueError, RuntimeError, NotImplementedError) as e:
                log.warning("cannot handle %s here (%s); no drain on signal", sig.name, e)
                continue
            self._signals.append(sig)

    def _remove_signal_handlers(self) -> None:
        if not self._signals:
            return
        loop = asyncio.get_running_loop()
        for sig in self._signals:
            loop.remove_signal_handler(sig)
        self._signals.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._drain_task is None:
            log.info("received %s: draining", sig.name)
            self._drain_task = asyncio.ensure_future(self._drain())
        elif self._force_task is None:
            log.warning("received %s again: stopping now", sig.name)
            self._force_task = asyncio.ensure_future(self._force_stop())

    async def _force_stop(self) -> None:
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        await self.stop(0)
