"""What every stage service shares: the compute thread, the bridge from a task RPC to the
stage's work queue, and held outputs awaiting pickup by the downstream stage."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from prism.queue.base import (DuplicateTask, QueueClosed, QueueFull, TaskEvent, TaskState, UnknownTask, WorkItem,
                              WorkQueue)

log = logging.getLogger(__name__)
T = TypeVar("T")


class ComputeThread:
    """One thread that runs a stage's model work, so the event loop keeps serving streams.
    Work is serialized in submission order."""

    def __init__(self, name: str, torch_threads: int = 0):
        from prism.runtime.compute import ComputeShare, allowed_cpus

        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        import torch

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
            self._pool.submit(torch.set_num_threads, torch_threads).result()
        #: CPUs the process was allowed at start: the cores a share may name.
        self.allowed_cpus = allowed_cpus()
        #: The compute share in effect (in-place vertical scaling: `apply`), and changes so far.
        self.share = ComputeShare(threads=self._pool.submit(torch.get_num_threads).result(), cpus=self.allowed_cpus)
        self.generation = 0
        self._cpu_mark = time.process_time()  # the process's CPU clock when the last timed call ended

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def timed(self, fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
        """`run`, with the call's wall seconds (measured on the compute thread) and the process's
        CPU seconds since the previous timed call ended: this work and all the process did
        around it (pulling its inputs, serving its outputs, the event loop), every thread's. What
        the work costs when it has the cores to itself, whoever else was competing for them."""
        out, wall, ended_cpu = await self.run(_timed_call, fn, *args)
        cpu, self._cpu_mark = ended_cpu - self._cpu_mark, ended_cpu
        return out, wall, cpu

    @property
    def max_batch(self) -> int:
        """The batch bound of the share in effect (0: the stage worker's own limit)."""
        return self.share.max_batch

    async def apply(self, share: Any) -> Any:
        """Change the compute share in place: runs on the compute thread after the batch in
        progress and before the next (`prism.runtime.compute`). Returns the share applied."""
        from prism.runtime.compute import apply_here

        await self.run(apply_here, share)
        self.share = share
        self.generation += 1
        log.info("compute share now %d threads on CPUs %s, max batch %s", share.threads, list(share.cpus),
                 share.max_batch or "unbounded")
        return share

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)


def _timed_call(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """`fn(*args)`, its wall seconds and the process's CPU clock when it ended."""
    wall = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time()


def work_item(header: Any, payload: bytes) -> WorkItem:
    """A queue item from a task's `TaskHeader` and its serialized task."""
    return WorkItem(
        task_id=header.request_id,
        payload=payload,
        priority=header.priority,
        deadline_unix_ms=header.deadline_unix_ms,
        trace_context=dict(header.trace_context),
    )


async def enqueue_and_watch(queue: WorkQueue, item: WorkItem, context: grpc.aio.ServicerContext,
                            respond: Callable[[TaskEvent], Any]) -> AsyncIterator[Any]:
    """Put `item` in the stage queue and stream `respond(event)` for each state change until
    the task is READY or DONE. FAILED aborts the call with the worker's status; a caller that
    goes away cancels the task."""
    try:
        await queue.put(item)
    except QueueFull as exc:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"stage queue is full: {exc}")
    except DuplicateTask:
        await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"header.request_id: task {item.task_id} is already queued here")
    except QueueClosed:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is draining; retry on another")
    finished = False
    try:
        async for event in queue.watch(item.task_id):
            if event.state == TaskState.FAILED:
                finished = True
                code = getattr(grpc.StatusCode, str(event.detail.get("code", "INTERNAL")), grpc.StatusCode.INTERNAL)
                await context.abort(code, str(event.detail.get("message", "stage failed")))
            if event.state == TaskState.CANCELLED:
                finished = True
                await context.abort(grpc.StatusCode.CANCELLED, str(event.detail.get("message", "task cancelled")))
            yield respond(event)
            if event.state in (TaskState.READY, TaskState.DONE):
                finished = True
                return
    finally:
        if not finished:
            await queue.cancel(item.task_id, code="CANCELLED", message="caller went away")


async def submit_task(queue: WorkQueue, request: Any, context: grpc.aio.ServicerContext,
                      respond: Callable[[TaskEvent], Any]) -> AsyncIterator[Any]:
    """A task RPC (Encode, Prefill): validate the header, queue the task, stream its states."""
    if not request.header.request_id:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "header.request_id: required")
    item = work_item(request.header, request.SerializeToString())
    async for response in enqueue_and_watch(queue, item, context, respond):
        yield response


class HeldOutputs(Generic[T]):
    """Outputs a stage holds for the downstream worker to pull, by request id. A fetch waits
    for the output to be published; unfetched outputs expire after `ttl_s`."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[float, T]] = {}
        self._waiters: dict[str, asyncio.Event] = {}

    def __len__(self) -> int:
        return len(self._items)

    def publish(self, request_id: str, value: T) -> None:
        self._items[request_id] = (time.monotonic(), value)
        self._waiters.setdefault(request_id, asyncio.Event()).set()

    def peek(self, request_id: str) -> T | None:
        entry = self._items.get(request_id)
        return entry[1] if entry else None

    async def wait(self, request_id: str, timeout: float) -> T | None:
        """The output, waiting up to `timeout` s for it to be published; None if it never was."""
        if request_id not in self._items:
            event = self._waiters.setdefault(request_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                self._waiters.pop(request_id, None)
                return None
        return self.peek(request_id)

    def pop(self, request_id: str) -> T | None:
        self._waiters.pop(request_id, None)
        entry = self._items.pop(request_id, None)
        return entry[1] if entry else None

    async def release(self, request_id: str, queue: WorkQueue) -> None:
        """The downstream worker pulled the output: drop it and mark the task DONE."""
        self.pop(request_id)
        try:
            await queue.set_state(request_id, TaskState.DONE)
        except UnknownTask:
            pass

    def expire(self) -> list[str]:
        """Drop outputs older than the TTL; returns their request ids."""
        now = time.monotonic()
        old = [rid for rid, (t, _) in self._items.items() if now - t > self.ttl_s]
        for rid in old:
            self.pop(rid)
        return old


class Channels:
    """One traced aio channel per upstream address, opened on first use; over mutual TLS when
    the process has a certificate (`ServerConfig.tls_cert`), else plain text."""

    def __init__(self, server_config: Any):
        from prism.runtime.tls import peer_tls

        self.max_message_bytes = server_config.max_message_bytes
        self._tls = peer_tls(server_config)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def __call__(self, address: str) -> grpc.aio.Channel:
        from prism.runtime.telemetry import instrumented_channel

        if address not in self._channels:
            tls = self._tls
            self._channels[address] = instrumented_channel(
                address, tls.options() if tls else (), max_message_bytes=self.max_message_bytes,
                credentials=tls.credentials() if tls else None)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


@dataclass
class StageApp:
    """A stage service ready to serve: what `serve_stage` (or a test) needs to run it."""

    service_name: str
    register: Callable[[grpc.aio.Server], None]
    queue: WorkQueue | None = None
    run_worker: Callable[[], Any] | None = None
    on_stop: Callable[[], Any] | None = None
    #: The servicer, worker and engine, for inspection by tests and admin tools.
    parts: dict[str, Any] = field(default_factory=dict)
    #: Further services registered by `register` (reported on health too).
    extra_services: tuple[str, ...] = ()
    #: Server interceptors of this service (after the OpenTelemetry one), e.g. API keys.
    interceptors: tuple[Any, ...] = ()


class RunningStage:
    """A started StageServer with its worker task."""

    def __init__(self, server: Any, app: StageApp):
        self.server, self.app = server, app
        self.worker_task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def drain_worker(self) -> None:
        """A stage worker: close its queue and finish what it took. A service without a queue
        (the scheduler) keeps its loops running until it stops: in-flight calls need them."""
        if self.app.queue is not None:
            await self.app.queue.close()
            if self.worker_task is not None:
                await self.worker_task

    async def stop(self) -> None:
        """Drain (no new work, finish what was taken) and stop."""
        await self.server.drain()
        if self.worker_task is not None and not self.worker_task.done():
            self.worker_task.cancel()
        if self.app.on_stop is not None:
            await self.app.on_stop()


async def start_stage(server_config: Any, app: StageApp, *, handle_signals: bool = True) -> RunningStage:
    """Start serving `app`: health, reflection and tracing come from StageServer; the worker
    consumes the queue; draining closes the queue and waits for the worker's taken work."""
    from prism.runtime.server import StageServer

    running: RunningStage
    server = StageServer(server_config, service_names=[app.service_name, *app.extra_services], registrars=[app.register],
                         drain_hooks=[lambda: running.drain_worker()], handle_signals=handle_signals,
                         interceptors=app.interceptors)
    running = RunningStage(server, app)
    await server.start()
    if app.run_worker is not None:
        running.worker_task = asyncio.create_task(app.run_worker())
    return running


async def serve_stage(server_config: Any, app: StageApp) -> None:
    """Serve `app` until SIGTERM (then drain and stop)."""
    running = await start_stage(server_config, app)
    try:
        await running.server.wait()
    finally:
        if running.worker_task is not None and not running.worker_task.done():
            running.worker_task.cancel()
        if app.on_stop is not None:
            await app.on_stop()
