"""Where a process's stage queues, worker registry and request store live: Redis (a deployment
of several processes) or memory (one process hosting the scheduler and its workers, and unit
tests). Both the scheduler and the workers build theirs from the same `QueueOptions`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from prism.queue.base import SHARED, WorkQueue
from prism.queue.memory import InMemoryWorkQueue
from prism.runtime.config import check

__all__ = ["Backend", "QueueOptions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueueOptions:
    """The stage queues and the worker registry shared by the scheduler and its workers."""

    redis_url: str = field(default="", metadata={
        "help": "Redis holding the stage queues, the worker registry and accepted requests "
                "(redis://host:port/db); empty keeps them in this process (single-process use)"})
    namespace: str = field(default="prism", metadata={"help": "prefix of every Redis key this deployment uses"})
    heartbeat_s: float = field(default=1.0, metadata={"help": "seconds between a worker's registry heartbeats"})
    worker_ttl_s: float = field(default=3.0, metadata={
        "help": "a worker without a heartbeat for this long is dead: its queued tasks move to other workers "
                "and its in-progress requests are retried"})
    max_attempts: int = field(default=3, metadata={"help": "deliveries of one task before it is dead-lettered"})
    prefetch: int = field(default=8, metadata={"help": "tasks a worker reads ahead from its Redis queue to order them by deadline"})
    shared_queues: bool = field(default=False, metadata={
        "help": "one queue per stage, read by every worker of the stage, instead of one per worker: the stage's "
                "backlog is then one Redis stream ({namespace}:q:{stage}:shared, group 'workers') that an external "
                "autoscaler such as KEDA can watch, and a stage may scale to zero (work waits there). Set it alike "
                "on the scheduler and every worker; needs redis_url"})

    def __post_init__(self) -> None:
        check(not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
              "redis_url", "must be redis://, rediss:// or unix://")
        check(bool(self.namespace) and ":" not in self.namespace, "namespace", "must be non-empty, without ':'")
        check(self.heartbeat_s > 0, "heartbeat_s", "must be > 0")
        check(self.worker_ttl_s > 2 * self.heartbeat_s, "worker_ttl_s", "must be more than twice heartbeat_s")
        check(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        check(self.prefetch >= 1, "prefetch", "must be >= 1")
        check(not self.shared_queues or bool(self.redis_url), "shared_queues", "needs redis_url (queues in Redis)")


class Backend:
    """Queues (one per stage and worker instance), the registry and the request store of one
    deployment. In memory mode, every holder of the same `Backend` object shares them (the
    scheduler and the workers of one process)."""

    def __init__(self, options: QueueOptions):
        self.options = options
        self._client: Any = None
        self._queues: dict[tuple[str, str], WorkQueue] = {}
        self._registry: Any = None
        self._store: Any = None

    @property
    def durable(self) -> bool:
        return bool(self.options.redis_url)

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions that mean "the queue backend is unreachable" (Redis down or
        restarting, past the client's own retries): callers turn them into UNAVAILABLE."""
        errors: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
        if self.durable:
            from redis.exceptions import RedisError

            errors += (RedisError,)
        return errors

    @property
    def client(self) -> Any:
        """The asyncio Redis client (None in memory mode)."""
        if self._client is None and self.durable:
            from prism.queue.redis_queue import connect

            self._client = connect(self.options.redis_url)
        return self._client

    def queue(self, stage: str, instance: str, *, max_depth: int = 1024, consumer: str | None = None) -> WorkQueue:
        """The queue of `stage` on worker `instance` (created on first use, then shared); with
        shared queues, whatever `instance` is, the stage's one queue. `consumer`: the worker
        reading it (the shared queue is read by many)."""
        if self.options.shared_queues:
            instance = SHARED
        else:
            consumer = None  # a worker's own queue has one consumer: the worker
        key = (stage, instance, consumer)
        if key not in self._queues:
            if self.durable:
                from prism.queue.redis_queue import RedisWorkQueue

                # A worker of a shared queue reads one entry ahead: more would hold back work that
                # another (idle) worker could start now.
                prefetch = 1 if self.options.shared_queues and consumer else self.options.prefetch
                self._queues[key] = RedisWorkQueue(
                    self.client, namespace=self.options.namespace, stage=stage, instance=instance,
                    consumer=consumer, max_depth=max_depth, max_attempts=self.options.max_attempts, prefetch=prefetch)
            else:
                self._queues[key] = InMemoryWorkQueue(max_depth=max_depth, max_attempts=self.options.max_attempts)
        return self._queues[key]

    @property
    def registry(self) -> Any:
        if self._registry is None:
            if self.durable:
                from prism.queue.registry import RedisRegistry

                self._registry = RedisRegistry(self.client, namespace=self.options.namespace)
            else:
                from prism.queue.registry import InMemoryRegistry

                self._registry = InMemoryRegistry()
        return self._registry

    @property
    def store(self) -> Any:
        if self._store is None:
            if self.durable:
                from prism.queue.requests import RedisRequestStore

                self._store = RedisRequestStore(self.client, namespace=self.options.namespace)
            else:
                from prism.queue.requests import InMemoryRequestStore

                self._store = InMemoryRequestStore()
        return self._store

    async def close(self) -> None:
        for (_, _, consumer), q in self._queues.items():
            await q.close()
            if consumer is not None:  # a worker leaving a shared queue: no reader left behind
                try:
                    await q.retire()
                except self.errors as exc:
                    log.warning("could not remove consumer %s: %s", consumer, exc)
        self._queues.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
