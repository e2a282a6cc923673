"""`RedisWorkQueue`: the `WorkQueue` contract on Redis Streams, durable across the restarts of
workers and of Redis itself.

There is one queue per (stage, worker instance): the scheduler picks an instance and puts the
task into that instance's queue, and the instance consumes only its own. A deployment may
instead share one queue per stage (instance name `SHARED`): every worker of the stage reads it as
its own consumer of the group, so the stream's lag and pending entries are the stage's whole
backlog -- what an external autoscaler (KEDA's redis-streams scaler) watches. Task records and
events are shared by every queue of a namespace, so a task moved from one instance's queue to
another (`move_tasks`) keeps its watchers. Keys, all under ``{namespace}:``:

* ``q:{stage}:{instance}`` -- a Stream with the consumer group ``workers``; one entry per
  delivery attempt (task_id, payload, priority, deadline_ms, cost, attempt, enqueued_at, trace,
  attrs, and origin: the id of the task's first entry, which keeps its place in the order).
* ``dlv:{stage}:{instance}`` -- a Set of the entry ids handed out by `get` and not yet
  acknowledged. Waiting entries (the queue's depth) are ``XLEN q - SCARD dlv``: entries a worker
  has only prefetched still count as waiting.
* ``task:{task_id}`` -- a Hash: state, detail (JSON), at, stage, instance, entry (id of the live
  entry, ``""`` when none), attempt, max_attempts, ttl (ms) and the item's fields, so that the
  task can be queued again anywhere. It expires ``terminal_ttl_s`` after the task is terminal
  and its delivery acknowledged.
* ``ev:{task_id}`` -- a Stream of the task's events (state, detail JSON, at), MAXLEN ~ 10000,
  expiring with the task record.
* ``dlq:{stage}`` -- a Stream of dead letters (task_id, reason, at), MAXLEN ~ 10000.

Reclaiming a dead worker's entries and reading a queue's backlog: `prism.queue.redis_reclaim`.

Every state change is one Lua script, so checks and effects are atomic. The scripts build the
keys of a task's current queue from its record, which a single Redis server allows (not a
Redis Cluster). Attempts count hand-outs by `get`: an entry a worker prefetched but never
started does not use one up. Values are JSON (nothing is pickled); the payload stays raw bytes,
so use a client with ``decode_responses=False`` -- `connect` makes one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError, ResponseError

from prism.queue.base import (SHARED, DuplicateTask, QueueClosed, QueueFull, TaskEvent, TaskState,
                              UnknownTask, WorkItem, WorkQueue)

__all__ = ["GROUP", "SHARED", "RedisWorkQueue", "connect"]

log = logging.getLogger(__name__)

GROUP = "workers"
_DEFAULT_TTL_MS = 300_000  # fallbacks for records without their own (written by other versions)
_DEFAULT_MAX_ATTEMPTS = 3
WATCH_BLOCK_MS = 1000  # a watcher's blocking read (new events end it at once)
MAX_CONNECTIONS = 4000
"""Connections one client may open (Redis allows 10000 clients by default)."""
RESCAN_S = 5.0
"""An idle worker re-reads its own pending entries this often, to take back any entry whose
delivery reply was lost (a connection cut between the server's read and the client's)."""

# ---------------------------------------------------------------------------- Lua scripts
# ARGV[1] is always the namespace; ARGV 'ttl' and 'max' are fallbacks for records without their
# own. States: 1 QUEUED, 5 DONE, 6 FAILED, 7 CANCELLED.
_PRELUDE = r"""
local NS = ARGV[1]
local function field(h, f) return redis.call('HGET', h, f) or '' end
local function terminal(s) s = tonumber(s) return s == 5 or s == 6 or s == 7 end
local function owned_by(h, stage, inst) return field(h, 'stage') == stage and field(h, 'instance') == inst end
local function live_queue(h)  -- the keys of the queue holding the task's entry
  local tail = ':' .. field(h, 'stage') .. ':' .. field(h, 'instance')
  return NS .. ':q' .. tail, NS .. ':dlv' .. tail
end
local function unlink(q, d, id)
  redis.pcall('XACK', q, 'workers', id) redis.call('XDEL', q, id) redis.call('SREM', d, id)
end
local function unlink_live(q, d, h, id) unlink(q, d, id) redis.call('HSET', h, 'entry', '') end
local function join(a, b)  -- merges two JSON objects; keys of b win when parsed
  if b == '{}' then return a elseif a == '{}' then return b end
  return string.sub(a, 1, -2) .. ',' .. string.sub(b, 2)
end
local function emit(h, ev, state, detail, at)
  redis.call('HSET', h, 'state', state, 'detail', detail, 'at', at)
  redis.call('XADD', ev, 'MAXLEN', '~', '10000', '*', 'state', state, 'detail', detail, 'at', at)
end
local function expire(h, ev, ttl)
  ttl = tonumber(field(h, 'ttl')) or tonumber(ttl)
  redis.call('PEXPIRE', h, ttl) redis.call('PEXPIRE', ev, ttl)
end
local function settle(h, ev, ttl)  -- after a terminal state: expire once no delivery is live
  redis.call('HDEL', h, 'payload', 'trace', 'attrs')
  if field(h, 'entry') == '' then expire(h, ev, ttl) end
end
local function fail(h, ev, code, message, at, ttl, extra)
  emit(h, ev, 6, join(cjson.encode({code = code, message = message}), extra or '{}'), at)
  settle(h, ev, ttl)
end
local function dead(dlq, tid, reason, at)
  redis.call('XADD', dlq, 'MAXLEN', '~', '10000', '*', 'task_id', tid, 'reason', reason, 'at', at)
end
local function requeue(h, q, tid, attempt)  -- a new entry for the task, keeping its origin
  local f = redis.call('HMGET', h, 'payload', 'priority', 'deadline_ms', 'cost', 'enqueued_at', 'trace',
    'attrs', 'origin')
  redis.pcall('XGROUP', 'CREATE', q, 'workers', '0', 'MKSTREAM')
  local id = redis.call('XADD', q, '*', 'task_id', tid, 'payload', f[1] or '', 'priority', f[2] or '0',
    'deadline_ms', f[3] or '0', 'cost', f[4] or '0', 'attempt', attempt, 'enqueued_at', f[5] or '0',
    'trace', f[6] or '{}', 'attrs', f[7] or '{}', 'origin', f[8] or '')
  redis.call('HSET', h, 'entry', id, 'attempt', attempt)
end
-- Entry `id` of queue (q, d) against its task record: returns the attempt its hand-out would
-- be and whether it was handed out before; or nil and why, having dropped the entry (vanished
-- record or too many attempts: dead-lettered; stale entry or finished task: just dropped).
local function gate(q, d, h, ev, dlq, id, tid, at, stage, inst, ttl, max)
  if redis.call('EXISTS', h) == 0 then
    unlink(q, d, id) dead(dlq, tid, 'task record vanished', at) return nil, 'dead', 'task record vanished'
  end
  if field(h, 'entry') ~= id or not owned_by(h, stage, inst) then unlink(q, d, id) return nil, 'stale' end
  if terminal(field(h, 'state')) then unlink_live(q, d, h, id) settle(h, ev, ttl) return nil, 'terminal' end
  local attempt = tonumber(field(h, 'attempt')) or 1
  local again = redis.call('SISMEMBER', d, id) == 1
  if again then attempt = attempt + 1 end
  if attempt > (tonumber(field(h, 'max_attempts')) or tonumber(max)) then
    local reason = 'gave up after ' .. (attempt - 1) .. ' attempts'
    unlink_live(q, d, h, id)
    dead(dlq, tid, reason, at)
    fail(h, ev, 'ABORTED', reason, at, ttl)
    return nil, 'dead', reason
  end
  return attempt, again
end
"""

# KEYS q dlv task ev | ARGV ns stage inst max_depth at token max ttl | tid payload priority
# deadline_ms cost enqueued_at trace attrs
_PUT = r"""
local q, d, h, ev = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('EXISTS', h) == 1 then
  if field(h, 'token') == ARGV[6] then return 'ok' end  -- our own put, retried after a lost reply
  if not terminal(field(h, 'state')) or field(h, 'entry') ~= '' then return 'dup' end
end
redis.pcall('XGROUP', 'CREATE', q, 'workers', '0', 'MKSTREAM')
if redis.call('XLEN', q) - redis.call('SCARD', d) >= tonumber(ARGV[4]) then return 'full' end
local item = {'task_id', ARGV[9], 'payload', ARGV[10], 'priority', ARGV[11], 'deadline_ms', ARGV[12],
  'cost', ARGV[13], 'enqueued_at', ARGV[14], 'trace', ARGV[15], 'attrs', ARGV[16]}
local id = redis.call('XADD', q, '*', 'attempt', '1', unpack(item))
redis.call('DEL', h)
redis.call('HSET', h, 'stage', ARGV[2], 'instance', ARGV[3], 'entry', id, 'origin', id, 'attempt', '1',
  'max_attempts', ARGV[7], 'ttl', ARGV[8], 'token', ARGV[6], unpack(item))
redis.call('PERSIST', ev)
emit(h, ev, 1, '{}', ARGV[5])
return 'ok'
"""

# KEYS q dlv task ev dlq | ARGV ns stage inst id tid at now_ms drop_expired ttl max
_CLAIM = r"""
local q, d, h, ev, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, at = ARGV[4], ARGV[6]
local attempt, again, reason = gate(q, d, h, ev, dlq, id, ARGV[5], at, ARGV[2], ARGV[3], ARGV[9], ARGV[10])
if not attempt then return {again, reason or ''} end
local deadline = tonumber(field(h, 'deadline_ms')) or 0
if ARGV[8] == '1' and deadline > 0 and deadline <= tonumber(ARGV[7]) then
  unlink_live(q, d, h, id)
  fail(h, ev, 'DEADLINE_EXCEEDED', 'deadline passed while queued', at, ARGV[9])
  return {'expired', ''}
end
redis.call('SADD', d, id)
if again then  -- handed out before a restart of this worker: a new attempt
  redis.call('HSET', h, 'attempt', attempt)
  emit(h, ev, 1, '{"attempt":' .. attempt .. ',"redelivered":true}', at)
end
return {'ok', attempt}
"""

# KEYS q dlv task ev | ARGV ns stage inst ttl
_ACK = r"""
local q, d, h, ev = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id = field(h, 'entry')
if id == '' or not owned_by(h, ARGV[2], ARGV[3]) or redis.call('SISMEMBER', d, id) == 0 then return 0 end
unlink_live(q, d, h, id)
if terminal(field(h, 'state')) then expire(h, ev, ARGV[4]) end
return 1
"""

# KEYS q dlv task ev dlq | ARGV ns stage inst tid at ttl detail max
_NACK = r"""
local q, d, h, ev, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id = field(h, 'entry')
if id == '' or not owned_by(h, ARGV[2], ARGV[3]) or redis.call('SISMEMBER', d, id) == 0
   or terminal(field(h, 'state')) then return 0 end
unlink_live(q, d, h, id)
local attempt = tonumber(field(h, 'attempt')) or 1
if attempt >= (tonumber(field(h, 'max_attempts')) or tonumber(ARGV[8])) then
  local reason = 'gave up after ' .. attempt .. ' attempts'
  dead(dlq, ARGV[4], reason, ARGV[5])
  fail(h, ev, 'ABORTED', reason, ARGV[5], ARGV[6], ARGV[7])
  return 1
end
requeue(h, q, ARGV[4], attempt + 1)
emit(h, ev, 1, join('{"attempt":' .. (attempt + 1) .. '}', ARGV[7]), ARGV[5])
return 1
"""

# KEYS task ev | ARGV ns state detail at ttl [only_from] -> -1 unknown task, 0 already terminal
# (or not in state only_from), 1 done
_TRANSITION = r"""
local h, ev = KEYS[1], KEYS[2]
if redis.call('EXISTS', h) == 0 then return -1 end
if terminal(field(h, 'state')) then return 0 end
if ARGV[6] and ARGV[6] ~= '' and field(h, 'state') ~= ARGV[6] then return 0 end
local id = field(h, 'entry')
if id ~= '' then  -- still waiting (not handed out): it was handled elsewhere, take it out
  local q, d = live_queue(h)
  if redis.call('SISMEMBER', d, id) == 0 then unlink_live(q, d, h, id) end
end
emit(h, ev, ARGV[2], ARGV[3], ARGV[4])
if terminal(ARGV[2]) then settle(h, ev, ARGV[5]) end
return 1
"""

# KEYS q dlv dlq task ev | ARGV ns stage inst id tid reason at ttl
# id '' (dead_letter): the task's live entry, wherever it is; 0 when the task is unknown.
# id set (a bad entry of queue q): that entry, failing the task only if it is its live one.
_DEAD = r"""
local q, d, dlq, h, ev = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, reason, at = ARGV[4], ARGV[6], ARGV[7]
if id == '' then
  if redis.call('EXISTS', h) == 0 then return 0 end
  id = field(h, 'entry')
  if id ~= '' then q, d = live_queue(h) end
elseif field(h, 'entry') ~= id or not owned_by(h, ARGV[2], ARGV[3]) then
  unlink(q, d, id)
  dead(dlq, ARGV[5], reason, at)
  return 1
end
if id ~= '' then unlink_live(q, d, h, id) end
dead(dlq, ARGV[5], reason, at)
if not terminal(field(h, 'state')) then
  emit(h, ev, 6, cjson.encode({code = 'ABORTED', message = 'dead-lettered: ' .. reason}), at)
end
settle(h, ev, ARGV[8])
return 1
"""

# KEYS q dlv task ev dlq new_q | ARGV ns stage from to id tid at ttl max
_MOVE = r"""
local q, d, h, ev, dlq = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local id, tid, at = ARGV[5], ARGV[6], ARGV[7]
local attempt, why = gate(q, d, h, ev, dlq, id, tid, at, ARGV[2], ARGV[3], ARGV[8], ARGV[9])
if not attempt then return why end
unlink(q, d, id)
redis.call('HSET', h, 'instance', ARGV[4])
requeue(h, KEYS[6], tid, attempt)
emit(h, ev, 1, cjson.encode({attempt = attempt, instance = ARGV[4]}), at)
return 'moved'
"""

# KEYS q dlv task | ARGV ns stage inst id tid: puts a prefetched entry that was never handed out
# back at the end of the stream, undelivered (it keeps its origin, hence its rank).
_RELEASE = r"""
local q, d, h, id = KEYS[1], KEYS[2], KEYS[3], ARGV[4]
if field(h, 'entry') ~= id or not owned_by(h, ARGV[2], ARGV[3]) or terminal(field(h, 'state'))
   or redis.call('SISMEMBER', d, id) == 1 then return 0 end
unlink(q, d, id)
requeue(h, q, ARGV[5], tonumber(field(h, 'attempt')) or 1)
return 1
"""


class _Scripts:
    def __init__(self, client: aioredis.Redis) -> None:
        for name in ("put", "claim", "ack", "nack", "transition", "dead", "move", "release"):
            setattr(self, name, client.register_script(_PRELUDE + globals()[f"_{name.upper()}"]))


# ---------------------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True)
class _Keys:
    ns: str

    def q(self, stage: str, instance: str) -> str:
        return f"{self.ns}:q:{stage}:{instance}"

    def dlv(self, stage: str, instance: str) -> str:
        return f"{self.ns}:dlv:{stage}:{instance}"

    def task(self, task_id: str) -> list[str]:
        """The task record and its event stream."""
        return [f"{self.ns}:task:{task_id}", f"{self.ns}:ev:{task_id}"]

    def dlq(self, stage: str) -> str:
        return f"{self.ns}:dlq:{stage}"


class _Malformed(ValueError):
    pass


@dataclasses.dataclass(eq=False)
class _Entry:
    eid: bytes
    item: WorkItem
    rank: tuple


_ID = re.compile(rb"\d+-\d+")


def _id_tuple(eid: bytes) -> tuple[int, int]:
    ms, _, seq = eid.partition(b"-")
    return int(ms), int(seq)


def _parse(eid: bytes, fields: dict[bytes, bytes]) -> _Entry:
    """A queue entry as a work item; raises _Malformed naming the first bad field."""

    def get(name: str, kind: Callable[[bytes], Any], ok: Callable[[Any], bool] = lambda v: True) -> Any:
        if (raw := fields.get(name.encode())) is None:
            raise _Malformed(f"missing field {name!r}")
        try:
            value = kind(raw)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError included
            value = None
        if value is None or not ok(value):
            raise _Malformed(f"invalid field {name!r}")
        return value

    def strings(v: Any) -> bool:
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())

    item = WorkItem(task_id=get("task_id", bytes.decode, bool), payload=get("payload", bytes),
                    priority=get("priority", int), deadline_unix_ms=get("deadline_ms", int, lambda v: v >= 0),
                    cost=get("cost", int, lambda v: v >= 0), attempt=get("attempt", int, lambda v: v >= 1),
                    enqueued_at=get("enqueued_at", float, math.isfinite),
                    trace_context=get("trace", json.loads, strings), attrs=get("attrs", json.loads, strings))
    origin = fields.get(b"origin") or eid  # absent on first entries: their own id
    if not _ID.fullmatch(origin):
        raise _Malformed("invalid field 'origin'")
    deadline = float(item.deadline_unix_ms) if item.deadline_unix_ms > 0 else math.inf
    return _Entry(eid, item, (-item.priority, deadline, item.cost, _id_tuple(origin), _id_tuple(eid)))


def _entries(resp: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a one-stream XREAD/XREADGROUP reply (RESP2 list or RESP3 dict shape)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        (value,) = resp.values()
        return value[0] if value and isinstance(value[0], list) else value
    return resp[0][1]


def _at(clock: Callable[[], float]) -> str:
    return repr(float(clock()))


def _json(detail: dict[str, Any]) -> str:
    return json.dumps(detail, separators=(",", ":"), allow_nan=False)


def _event(task_id: str, fields: dict[bytes, bytes]) -> TaskEvent:
    return TaskEvent(task_id, TaskState(int(fields[b"state"])), json.loads(fields[b"detail"]),
                     float(fields[b"at"]))


async def _ensure_group(client: aioredis.Redis, key: str) -> None:
    try:
        await client.xgroup_create(key, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _check_name(name: str, value: Any, *, colon: bool = True) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be a non-empty string without whitespace, got {value!r}")
    if not colon and ":" in value:
        raise ValueError(f"{name} must not contain ':', got {value!r}")


def connect(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client for the queues: raw bytes (``decode_responses=False``), commands
    retried with jittered exponential backoff (up to ~20 s) on connection errors and timeouts --
    so a Redis restart is ridden out -- a PING before a command on a connection idle for more
    than 15 s, and up to `MAX_CONNECTIONS` connections. `options` override any of these
    (`redis.asyncio.Redis.from_url` arguments)."""
    settings: dict[str, Any] = {
        "decode_responses": False,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=25),
        "health_check_interval": 15,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        # Each watcher holds a connection for its blocking read, and under overload the scheduler
        # follows hundreds of tasks: redis-py's default pool (100) failed the 101st (soak test).
        "max_connections": MAX_CONNECTIONS,
    }
    settings.update(options)
    if settings["decode_responses"]:
        raise ValueError("decode_responses must be False: payloads are raw bytes")
    return aioredis.Redis.from_url(url, **settings)


# ---------------------------------------------------------------------------- the queue


class RedisWorkQueue(WorkQueue):
    """The queue of one stage on one worker instance, on Redis Streams (see the module docstring).

    Args:
        client: an asyncio client with ``decode_responses=False`` (see `connect`).
        namespace: prefix of every key.
        stage: the stage (``encode``, ``prefill``, ``decode``...); no ``:``.
        instance: the worker instance whose queue this is (`SHARED`: the stage's shared queue).
        consumer: the consumer name in the group (default: `instance`); a worker reading the
            shared queue uses its own name, so its pending entries are told apart from others'.
        max_depth: most waiting entries; `put` raises QueueFull beyond it.
        max_attempts: hand-outs per task, stored with the task by `put` (so the limit holds
            wherever the task moves); past them the task is dead-lettered.
        terminal_ttl_s: how long a finished task's record and events are kept once acknowledged.
        prefetch: entries read ahead into a local buffer; `get` serves the best of them.
        block_ms: longest blocking read of `get`; `close` takes effect within it.
        drop_expired: `get` fails items already past their deadline (``DEADLINE_EXCEEDED``).
        clock: wall clock in Unix seconds (deadlines and event times).

    Unlike the in-memory queue, `close()` does not fail waiting items: they are durable, and
    entries this object had prefetched are put back for another worker (or a restart) to take.
    """

    def __init__(self, client: aioredis.Redis, *, namespace: str = "prism", stage: str, instance: str,
                 consumer: str | None = None, max_depth: int = 1024, max_attempts: int = 3, terminal_ttl_s: float = 300.0,
                 prefetch: int = 8, block_ms: int = 100, drop_expired: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        if client is None or not hasattr(client, "xreadgroup"):
            raise ValueError("client must be a redis.asyncio.Redis")
        pool = getattr(client, "connection_pool", None)
        if pool is not None and pool.connection_kwargs.get("decode_responses"):
            raise ValueError("client must have decode_responses=False (payloads are raw bytes)")
        _check_name("namespace", namespace)
        _check_name("stage", stage, colon=False)
        _check_name("instance", instance)
        consumer = instance if consumer is None else consumer
        _check_name("consumer", consumer)
        for name, value in (("max_depth", max_depth), ("max_attempts", max_attempts),
                            ("prefetch", prefetch), ("block_ms", block_ms)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(terminal_ttl_s, (int, float)) or not terminal_ttl_s > 0:
            raise ValueError(f"terminal_ttl_s must be > 0, got {terminal_ttl_s!r}")
        if not callable(clock):
            raise ValueError("clock must be callable")
        self._r, self._s, self._k = client, _Scripts(client), _Keys(namespace)
        self._stage, self._instance, self._consumer = stage, instance, consumer
        self._q, self._dlv = self._k.q(stage, instance), self._k.dlv(stage, instance)
        self._dlq = self._k.dlq(stage)
        self._where = [namespace, stage, instance]  # the first ARGV of most scripts
        self._max_depth, self._max_attempts = max_depth, max_attempts
        self._ttl_ms = max(1, round(terminal_ttl_s * 1000))
        self._prefetch, self._block_ms = prefetch, block_ms
        self._drop_expired, self._clock = drop_expired, clock
        self._heap: list[tuple[tuple, int, _Entry]] = []  # the read-ahead buffer
        self._buffered: set[bytes] = set()
        self._owned: dict[bytes, str] = {}  # entry id -> task id: handed out (or being claimed) here
        self._by_task: dict[str, bytes] = {}
        self._seq = itertools.count()
        self._read_lock = asyncio.Lock()
        self._scan: bytes | None = b"0"  # cursor in our own pending entries while re-reading them
        self._scanned_at = 0.0
        self._group_ready = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    # ------------------------------------------------------------------ WorkQueue

    async def put(self, item: WorkItem) -> None:
        if self._closed:
            raise QueueClosed("the queue is closed")
        res = await self._s.put(
            keys=[self._q, self._dlv, *self._k.task(item.task_id)],
            args=[*self._where, self._max_depth, _at(self._clock), uuid.uuid4().hex, self._max_attempts,
                  self._ttl_ms, item.task_id, item.payload, item.priority, item.deadline_unix_ms, item.cost,
                  repr(float(item.enqueued_at)), _json(item.trace_context), _json(item.attrs)])
        if res == b"dup":
            raise DuplicateTask(f"task {item.task_id!r} is already queued or in progress")
        if res == b"full":
            raise QueueFull(f"queue {self._stage}/{self._instance} is full ({self._max_depth} waiting items)")

    async def get(self, timeout: float | None = None) -> WorkItem | None:
        loop = asyncio.get_running_loop()
        until = None if timeout is None else loop.time() + max(0.0, timeout)
        filled = False  # the buffer was just topped up by a blocking read
        while not self._closed:
            if not filled:
                await self._fill(None)
            item = await self._take()
            if item is not None:
                return item
            remaining = None if until is None else until - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            block = self._block_ms if remaining is None else max(1, int(remaining * 1000))
            filled = await self._fill(min(block, self._block_ms))
        return None

    async def ack(self, task_id: str) -> bool:
        self._forget_local(task_id)
        return bool(await self._s.ack(keys=[self._q, self._dlv, *self._k.task(task_id)],
                                      args=[*self._where, self._ttl_ms]))

    async def nack(self, task_id: str, **detail: Any) -> bool:
        self._forget_local(task_id)
        return bool(await self._s.nack(
            keys=[self._q, self._dlv, *self._k.task(task_id), self._dlq],
            args=[*self._where, task_id, _at(self._clock), self._ttl_ms, _json(detail), self._max_attempts]))

    async def set_state(self, task_id: str, state: TaskState, **detail: Any) -> bool:
        state = TaskState(state)
        if state is TaskState.QUEUED:
            raise ValueError("QUEUED is set by put() and nack() only")
        res = await self._transition(task_id, state, detail)
        if res < 0:
            raise UnknownTask(f"unknown task {task_id!r}")
        return res == 1

    async def state(self, task_id: str) -> TaskState | None:
        value = await self._r.hget(self._k.task(task_id)[0], "state")
        return TaskState(int(value)) if value is not None else None

    async def watch(self, task_id: str, *, replay: bool = False) -> AsyncIterator[TaskEvent]:
        """Yields the task's latest event (with `replay`: every event from its start), then
        every later one in order (none is skipped, so token-by-token progress events all
        arrive), and stops after the terminal one."""
        key = self._k.task(task_id)[1]
        latest = await self._r.xrevrange(key, count=1)
        if not latest:
            raise UnknownTask(f"unknown task {task_id!r}")
        if replay:
            cursor = b"0-0"
            event = TaskEvent(task_id, TaskState.QUEUED, {})
        else:
            cursor, fields = latest[0]
            event = _event(task_id, fields)
            yield event
        while not event.state.terminal:
            batch = _entries(await self._r.xread({key: cursor}, block=max(self._block_ms, WATCH_BLOCK_MS)))
            if not batch and not await self._r.exists(key):
                raise UnknownTask(f"task {task_id!r} was forgotten before it finished")
            for cursor, fields in batch:
                event = _event(task_id, fields)
                yield event
                if event.state.terminal:
                    return

    async def cancel(self, task_id: str, *, if_queued: bool = False, **detail: Any) -> bool:
        return await self._transition(task_id, TaskState.CANCELLED,
                                      {"code": "CANCELLED", "message": "cancelled", **detail},
                                      only_from=TaskState.QUEUED if if_queued else None) == 1

    async def is_cancelled(self, task_id: str) -> bool:
        return await self.state(task_id) is TaskState.CANCELLED

    async def dead_letter(self, task_id: str, reason: str) -> bool:
        self._forget_local(task_id)
        ok = await self._s.dead(keys=[self._q, self._dlv, self._dlq, *self._k.task(task_id)],
                                args=[*self._where, "", task_id, reason, _at(self._clock), self._ttl_ms])
        if ok:
            log.warning("dead-lettered %s: %s", task_id, reason)
        return bool(ok)

    async def dead_letters(self, limit: int = 100) -> list[tuple[str, str]]:
        """The stage's most recent dead letters (from every instance's queue), newest last."""
        if limit <= 0:
            return []
        rows = await self._r.xrevrange(self._dlq, count=limit)
        return [(f[b"task_id"].decode(errors="replace"), f[b"reason"].decode(errors="replace"))
                for _, f in reversed(rows)]

    async def depth(self) -> int:
        async with self._r.pipeline(transaction=True) as pipe:
            length, handed = await pipe.xlen(self._q).scard(self._dlv).execute()
        return max(0, length - handed)

    async def close(self) -> None:
        """Stops delivering: `get` returns None (blocked calls within ``block_ms``) and `put`
        raises QueueClosed. Waiting items stay queued (durable), and entries prefetched here are
        put back as never delivered, so `move_tasks` or a restart hands them to a worker. Tasks
        already handed out can still be acked, nacked and have their states set. Idempotent."""
        if self._closed:
            return
        self._closed = True
        async with self._read_lock:
            entries = [entry for _, _, entry in sorted(self._heap)]
            self._heap.clear()
            self._buffered.clear()
        for entry in entries:
            tid = entry.item.task_id
            try:
                await self._s.release(keys=[self._q, self._dlv, self._k.task(tid)[0]],
                                      args=[*self._where, entry.eid, tid])
            except RedisError as exc:  # still pending under our name: a restart or move_tasks takes it
                log.warning("could not put back prefetched %s: %s", tid, exc)

    async def retire(self) -> bool:
        """Removes this reader from the group once it holds no entry (a worker of a shared queue
        leaving for good: autoscaled workers would otherwise pile up as consumers). True when
        it was removed."""
        if await self._r.xpending_range(self._q, GROUP, "-", "+", 1, consumername=self._consumer):
            return False
        return bool(await self._r.xgroup_delconsumer(self._q, GROUP, self._consumer) is not None)

    # ------------------------------------------------------------------ internals

    def _forget_local(self, task_id: str) -> None:
        eid = self._by_task.pop(task_id, None)
        if eid is not None:
            self._owned.pop(eid, None)

    async def _transition(self, task_id: str, state: TaskState, detail: dict[str, Any],
                          only_from: TaskState | None = None) -> int:
        return int(await self._s.transition(
            keys=self._k.task(task_id),
            args=[self._k.ns, int(state), _json(detail), _at(self._clock), self._ttl_ms,
                  "" if only_from is None else int(only_from)]))

    async def _fill(self, block_ms: int | None) -> bool:
        """Tops the buffer up: our own pending entries first (after a start, or every RESCAN_S
        when idle), then new ones, waiting up to `block_ms` (None: not at all) when it is empty.
        Returns True when the buffer holds entries afterwards."""
        async with self._read_lock:
            if self._closed:
                return False
            if block_ms is not None and self._heap:
                return True  # another getter filled it while we waited for the lock
            if not self._group_ready:
                await _ensure_group(self._r, self._q)
                self._group_ready = True
            while self._scan is not None and len(self._heap) < self._prefetch:
                batch = await self._read(self._scan, self._prefetch - len(self._heap), None)
                if not batch:
                    self._scan, self._scanned_at = None, asyncio.get_running_loop().time()
                    break
                self._scan = batch[-1][0]
                await self._accept(batch)
            room = self._prefetch - len(self._heap)
            if room > 0:
                block = None if self._heap else block_ms
                batch = await self._read(">", room, block)
                await self._accept(batch)
                idle = asyncio.get_running_loop().time() - self._scanned_at
                if not batch and block is not None and idle >= RESCAN_S:
                    self._scan = b"0"
            return bool(self._heap)

    async def _read(self, cursor: bytes | str, count: int, block_ms: int | None) -> list:
        try:
            resp = await self._r.xreadgroup(GROUP, self._consumer, {self._q: cursor}, count=count,
                                            block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._group_ready = False  # the stream was deleted: recreate the group next time
            return []
        return _entries(resp)

    async def _accept(self, batch: list) -> None:
        for eid, fields in batch:
            if eid in self._buffered or eid in self._owned:
                continue
            entry = await _vet(self._r, self._s, self._k, self._stage, self._instance, eid, fields,
                               _at(self._clock), self._ttl_ms)
            if entry is not None:
                heapq.heappush(self._heap, (entry.rank, next(self._seq), entry))
                self._buffered.add(eid)

    async def _take(self) -> WorkItem | None:
        """Hands out the best buffered entry whose task is still live; None when none is."""
        while self._heap:
            _, _, entry = heapq.heappop(self._heap)
            self._buffered.discard(entry.eid)
            tid = entry.item.task_id
            self._owned[entry.eid] = tid
            res: list = [b"error"]
            try:
                res = await self._s.claim(
                    keys=[self._q, self._dlv, *self._k.task(tid), self._dlq],
                    args=[*self._where, entry.eid, tid, _at(self._clock), int(self._clock() * 1000),
                          int(self._drop_expired), self._ttl_ms, self._max_attempts])
            finally:
                if res[0] != b"ok":  # a hand-out lost to an error is found again by the next scan
                    self._owned.pop(entry.eid, None)
            if res[0] == b"ok":
                self._by_task[tid] = entry.eid
                return dataclasses.replace(entry.item, attempt=int(res[1]))
            if res[0] == b"dead":
                log.warning("dead-lettered %s: %s", tid, res[1].decode())
        return None


async def _vet(client: aioredis.Redis, scripts: _Scripts, keys: _Keys, stage: str, instance: str,
               eid: bytes, fields: dict[bytes, bytes], at: str, ttl_ms: int) -> _Entry | None:
    """Parses an entry read from ``q:{stage}:{instance}``; a deleted one is acked and a
    malformed one dead-lettered (its reason names the field), both returning None."""
    q, dlv = keys.q(stage, instance), keys.dlv(stage, instance)
    if not fields:  # deleted while pending
        await client.xack(q, GROUP, eid)
        await client.srem(dlv, eid)
        return None
    try:
        return _parse(eid, fields)
    except _Malformed as exc:
        tid = (fields.get(b"task_id") or b"").decode(errors="replace")
        reason = f"malformed entry {eid.decode()}: {exc}"
        log.warning("dead-lettered an entry of %s: %s", q, reason)
        await scripts.dead(keys=[q, dlv, keys.dlq(stage), *keys.task(tid)],
                           args=[keys.ns, stage, instance, eid, tid, reason, at, ttl_ms])
        return None
