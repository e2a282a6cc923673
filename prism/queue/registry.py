"""Worker registry: which stage workers exist, where they listen, what they serve, and which of
them are alive.

A worker registers a `WorkerInfo` with a time to live and refreshes it by heartbeat (the
`Heartbeat` helper does both, in a background task). The scheduler reads `live()` to route, and
``set(known()) - {w.name for w in live()}`` to find dead workers (a SIGKILLed worker just stops
heartbeating) whose queues it must reclaim; after reclaiming it calls `forget(name)`. A worker
that exits cleanly deregisters, so it never shows up as dead.

Two implementations: `InMemoryRegistry` (unit tests, single-process deployments; injectable
monotonic clock) and `RedisRegistry` (keys ``{ns}:workers``, a hash name -> info JSON, and
``{ns}:alive:{name}``, set with a PX ttl and refreshed by each heartbeat). Pure Python: no gRPC,
no protobuf. Control data is JSON; nothing is pickled.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["STAGES", "Heartbeat", "InMemoryRegistry", "RedisRegistry", "WorkerInfo", "WorkerRegistry"]

log = logging.getLogger(__name__)

STAGES: frozenset[str] = frozenset({"encode", "prefill", "decode"})


def _check_name(field_name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field_name} must be a non-empty string")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"{field_name} must not contain whitespace or control characters: {value!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker instance tells the scheduler about itself."""

    name: str
    """Unique instance name (e.g. ``decode-0@host``); the registry key."""
    address: str
    """``host:port`` of its gRPC server (``[v6addr]:port`` for IPv6)."""
    model: str
    """Served model name."""
    stages: frozenset[str]
    """Stages it runs: a non-empty subset of ``encode``, ``prefill``, ``decode``."""
    capacity: Mapping[str, float] = field(default_factory=dict, hash=False)
    """Profiled throughput per stage, tokens/s (keys among `stages`)."""
    decode_slots: int = 0
    """Concurrent decode sequences it can hold (0 when it does not decode)."""
    pid: int = 0
    started_at: float = 0.0
    """Unix epoch seconds."""
    draining: bool = False
    """Finishing its work, takes no new requests."""
    variant: str = ""
    """Model variant it serves (empty: the deployment names no variants)."""

    def __post_init__(self) -> None:
        _check_name("name", self.name)
        if not isinstance(self.address, str):
            raise ValueError("address must be a 'host:port' string")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be 'host:port' with a port in 1..65535, not {self.address!r}")
        _check_name("model", self.model)
        if isinstance(self.stages, str) or not isinstance(self.stages, Iterable):
            raise ValueError("stages must be a set of stage names")
        stages = frozenset(self.stages)
        if not stages or not stages <= STAGES:
            raise ValueError(f"stages must be a non-empty subset of {sorted(STAGES)}, not {sorted(stages)}")
        object.__setattr__(self, "stages", stages)
        if not isinstance(self.capacity, Mapping):
            raise ValueError("capacity must be a mapping stage -> tokens/s")
        capacity: dict[str, float] = {}
        for stage, value in self.capacity.items():
            if stage not in stages:
                raise ValueError(f"capacity: {stage!r} is not one of this worker's stages {sorted(stages)}")
            if not _finite(value) or value < 0:
                raise ValueError(f"capacity[{stage!r}] must be a finite number >= 0, not {value!r}")
            capacity[stage] = float(value)
        object.__setattr__(self, "capacity", MappingProxyType(capacity))
        if not _is_int(self.decode_slots) or self.decode_slots < 0:
            raise ValueError(f"decode_slots must be an int >= 0, not {self.decode_slots!r}")
        if not _is_int(self.pid) or self.pid < 0:
            raise ValueError(f"pid must be an int >= 0, not {self.pid!r}")
        if not _finite(self.started_at) or self.started_at < 0:
            raise ValueError(f"started_at must be a finite number >= 0, not {self.started_at!r}")
        object.__setattr__(self, "started_at", float(self.started_at))
        if not isinstance(self.draining, bool):
            raise ValueError(f"draining must be a bool, not {self.draining!r}")
        if not isinstance(self.variant, str) or any(c.isspace() or not c.isprintable() for c in self.variant):
            raise ValueError(f"variant must be a string without whitespace or control characters, not {self.variant!r}")

    def to_json(self) -> str:
        return json.dumps({
            "name": self.name, "address": self.address, "model": self.model,
            "stages": sorted(self.stages), "capacity": dict(self.capacity),
            "decode_slots": self.decode_slots, "pid": self.pid, "started_at": self.started_at,
            "draining": self.draining, "variant": self.variant,
        }, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> "WorkerInfo":
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("worker info JSON must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})  # unknown keys: newer writers

    def with_draining(self, draining: bool = True) -> "WorkerInfo":
        return dataclasses.replace(self, draining=draining)


def _check_ttl(ttl_s: float) -> None:
    if not _finite(ttl_s) or ttl_s <= 0:
        raise ValueError(f"ttl_s must be a finite number > 0, not {ttl_s!r}")


class WorkerRegistry(abc.ABC):
    """Registered workers and their liveness. All methods are coroutines."""

    @abc.abstractmethod
    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        """Records `info` (replacing any previous registration of `info.name`) and marks the
        worker alive for `ttl_s` seconds."""

    @abc.abstractmethod
    async def heartbeat(self, name: str, ttl_s: float) -> bool:
        """Extends the worker's liveness to `ttl_s` from now. False when the registration or its
        liveness vanished (expired, forgotten, Redis restarted without persistence): the worker
        must `register` again (and the scheduler may already have reclaimed its queues)."""

    @abc.abstractmethod
    async def deregister(self, name: str) -> None:
        """Removes the worker entirely (clean exit): it is neither live nor known."""

    @abc.abstractmethod
    async def live(self) -> list[WorkerInfo]:
        """Registered workers whose liveness has not expired, sorted by name."""

    @abc.abstractmethod
    async def known(self) -> list[str]:
        """Names of every registered, not deregistered (nor forgotten) worker, alive or not,
        sorted."""

    @abc.abstractmethod
    async def forget(self, name: str) -> bool:
        """Drops a dead worker from `known` once its queues were reclaimed. Does nothing and
        returns False when the worker is alive (it came back, or never died)."""

    @abc.abstractmethod
    async def set_draining(self, name: str, draining: bool = True) -> bool:
        """Sets the persisted draining flag; False when `name` is not registered."""

    @abc.abstractmethod
    async def get(self, name: str) -> WorkerInfo | None:
        """The registered info (alive or not), None when not known."""


class InMemoryRegistry(WorkerRegistry):
    """A registry in this process. `clock` (monotonic seconds) decides TTLs; inject one to test."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._workers: dict[str, WorkerInfo] = {}
        self._alive_until: dict[str, float] = {}

    def _alive(self, name: str) -> bool:
        until = self._alive_until.get(name)
        if until is None:
            return False
        if until <= self._clock():
            del self._alive_until[name]
            return False
        return True

    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        self._workers[info.name] = info
        self._alive_until[info.name] = self._clock() + ttl_s

    async def heartbeat(self, name: str, ttl_s: float) -> bool:
        _check_ttl(ttl_s)
        if name not in self._workers or not self._alive(name):
            return False
        self._alive_until[name] = self._clock() + ttl_s
        return True

    async def deregister(self, name: str) -> None:
        self._workers.pop(name, None)
        self._alive_until.pop(name, None)

    async def live(self) -> list[WorkerInfo]:
        return [self._workers[n] for n in sorted(self._workers) if self._alive(n)]

    async def known(self) -> list[str]:
        return sorted(self._workers)

    async def forget(self, name: str) -> bool:
        if name not in self._workers or self._alive(name):
            return False
        del self._workers[name]
        return True

    async def set_draining(self, name: str, draining: bool = True) -> bool:
        info = self._workers.get(name)
        if info is None:
            return False
        self._workers[name] = info.with_draining(draining)
        return True

    async def get(self, name: str) -> WorkerInfo | None:
        return self._workers.get(name)

    def expire(self, name: str) -> None:
        """Test hook: ends the worker's liveness now, as a missed heartbeat would."""
        self._alive_until.pop(name, None)


# KEYS[1] = workers hash, KEYS[2] = alive key; ARGV[1] = name, ARGV[2] = ttl ms.
_HEARTBEAT = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
return redis.call('PEXPIRE', KEYS[2], ARGV[2])
"""

# KEYS[1] = workers hash, KEYS[2] = alive key; ARGV[1] = name.
_FORGET = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
"""


class RedisRegistry(WorkerRegistry):
    """A registry in Redis, shared by every process of a deployment.

    Args:
        client: a `redis.asyncio.Redis` (``decode_responses=False``).
        namespace: key prefix (``{namespace}:workers``, ``{namespace}:alive:{name}``).
    """

    def __init__(self, client: Any, namespace: str = "prism"):
        if not namespace:
            raise ValueError("namespace must be non-empty")
        self._r = client
        self.namespace = namespace
        self._workers_key = f"{namespace}:workers"
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._forget = client.register_script(_FORGET)

    def _alive_key(self, name: str) -> str:
        return f"{self.namespace}:alive:{name}"

    async def register(self, info: WorkerInfo, ttl_s: float) -> None:
        _check_ttl(ttl_s)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._workers_key, info.name, info.to_json())
            pipe.set(self._alive_key(info.name), b"1", px=max(1, int(ttl_s * 1000)))
            await pipe.execute()

    async def heartbeat(self, name: str, ttl_s: float) -> bool:
        _check_ttl(ttl_s)
        ok = await self._heartbeat(keys=[self._workers_key, self._alive_key(name)],
                                   args=[name, max(1, int(ttl_s * 1000))])
        return bool(ok)

    async def deregister(self, name: str) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hdel(self._workers_key, name)
            pipe.delete(self._alive_key(name))
            await pipe.execute()

    async def _all(self) -> dict[str, WorkerInfo]:
        raw = await self._r.hgetall(self._workers_key)
        out: dict[str, WorkerInfo] = {}
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            try:
                out[name] = WorkerInfo.from_json(value)
            except (ValueError, TypeError) as exc:
                log.warning("registry: unreadable info for worker %r: %s", name, exc)
        return out

    async def live(self) -> list[WorkerInfo]:
        workers = await self._all()
        names = sorted(workers)
        if not names:
            return []
        flags = await self._r.mget([self._alive_key(n) for n in names])
        return [workers[n] for n, flag in zip(names, flags) if flag is not None]

    async def known(self) -> list[str]:
        names = await self._r.hkeys(self._workers_key)
        return sorted(k.decode() if isinstance(k, bytes) else k for k in names)

    async def forget(self, name: str) -> bool:
        return bool(await self._forget(keys=[self._workers_key, self._alive_key(name)], args=[name]))

    async def set_draining(self, name: str, draining: bool = True) -> bool:
        from redis.exceptions import WatchError

        async with self._r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self._workers_key)
                    raw = await pipe.hget(self._workers_key, name)
                    if raw is None:
                        await pipe.unwatch()
                        return False
                    info = WorkerInfo.from_json(raw).with_draining(draining)
                    pipe.multi()
                    pipe.hset(self._workers_key, name, info.to_json())
                    await pipe.execute()
                    return True
                except WatchError:
                    continue  # a concurrent register/set_draining: read again

    async def get(self, name: str) -> WorkerInfo | None:
        raw = await self._r.hget(self._workers_key, name)
        return None if raw is None else WorkerInfo.from_json(raw)


class Heartbeat:
    """Keeps a worker registered while the ``async with`` block runs.

    ``async with Heartbeat(registry, info, ttl_s=3.0, every_s=1.0) as hb:`` registers `info`,
    then refreshes the registration every `every_s` seconds in a background task. When a
    heartbeat finds the registration gone (it expired, was forgotten, or Redis restarted without
    persistence) it registers again, keeping a draining flag set meanwhile. Errors of a beat
    (Redis unreachable, timeouts) are logged and the next beat retries; the task never dies of
    them. A clean exit (no exception) deregisters; an exception leaves the registration to
    expire, so the scheduler sees the worker as dead and reclaims its queues. Registration on
    entry is not retried: a worker that cannot reach the registry at start fails to start.
    """

    def __init__(self, registry: WorkerRegistry, info: WorkerInfo, *, ttl_s: float = 3.0,
                 every_s: float = 1.0, deregister_on_exit: bool = True):
        _check_ttl(ttl_s)
        if not 0 < every_s < ttl_s:
            raise ValueError(f"every_s must be > 0 and < ttl_s ({ttl_s}), not {every_s!r}")
        self.registry = registry
        self._info = info
        self.ttl_s = float(ttl_s)
        self.every_s = float(every_s)
        self.deregister_on_exit = deregister_on_exit
        self._task: asyncio.Task | None = None
        self.beats = 0
        """Successful beats (refreshes and re-registrations)."""
        self.failures = 0
        """Beats that raised (and were retried)."""
        self.reregistrations = 0

    @property
    def info(self) -> WorkerInfo:
        return self._info

    @property
    def name(self) -> str:
        return self._info.name

    @property
    def running(self) -> bool:
        """True while the background task beats."""
        return self._task is not None and not self._task.done()

    async def set_draining(self, draining: bool = True) -> bool:
        """Sets the draining flag here (kept across re-registrations) and in the registry."""
        self._info = self._info.with_draining(draining)
        return await self.registry.set_draining(self._info.name, draining)

    async def __aenter__(self) -> "Heartbeat":
        await self.registry.register(self._info, self.ttl_s)
        self._task = asyncio.create_task(self._run(), name=f"heartbeat:{self._info.name}")
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.stop()
        if exc_type is None and self.deregister_on_exit:
            try:
                await self.registry.deregister(self._info.name)
            except Exception as err:  # noqa: BLE001 - the registration expires anyway
                log.warning("heartbeat %s: deregister failed (%s); it will expire", self._info.name, err)

    async def stop(self) -> None:
        """Stops heartbeating without deregistering."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def beat(self) -> bool:
        """One heartbeat; registers again when the registration vanished. True when it had to."""
        name = self._info.name
        if await self.registry.heartbeat(name, self.ttl_s):
            return False
        current = await self.registry.get(name)
        if current is not None and current.draining and not self._info.draining:
            self._info = self._info.with_draining(True)  # set by an operator: keep it
        await self.registry.register(self._info, self.ttl_s)
        self.reregistrations += 1
        log.warning("heartbeat %s: registration had vanished; registered again", name)
        return True

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await asyncio.wait_for(self.beat(), timeout=self.ttl_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - transient: retried on the next beat
                self.failures += 1
                if not failing:
                    log.warning("heartbeat %s failed (%s: %s); retrying every %.1fs",
                                self._info.name, type(err).__name__, err, self.every_s)
                    failing = True
                else:
                    log.debug("heartbeat %s failed again: %s", self._info.name, err)
                continue
            self.beats += 1
            if failing:
                log.info("heartbeat %s: registry reachable again", self._info.name)
                failing = False
