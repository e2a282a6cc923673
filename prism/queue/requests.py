"""Accepted-request store: what the scheduler has promised to answer, and every token it has
produced so far, durable so that a restarted scheduler picks accepted requests up and no token
is lost or duplicated.

A record is *open* (``accepted``/``running``) until `finish` makes it ``done``/``failed``; then
all its keys expire after a TTL. Tokens are stored as chunks ``(index, tokens, text)``, exactly
the pieces the client was sent, so a client re-attaching with `watch_chunks` gets the rest of its
stream. `append_tokens` is idempotent by token position: a retried request regenerating tokens
it already produced stores only the new ones. Exactly one scheduler drives an open request: the
holder of its lease (`claim`, `renew`); writes may be fenced with ``owner=``.

Two implementations: `InMemoryRequestStore` here (injectable monotonic clock for leases and
TTLs) and `RedisRequestStore` in `prism.queue.requests_redis` (re-exported here; keys
``{ns}:req:{id}`` hash, ``{ns}:req:{id}:chunks`` stream, ``{ns}:req:{id}:owner`` lease with PX,
``{ns}:requests:open`` set; Lua makes accept, append, claim, renew and finish atomic). Payloads
are raw bytes, control data plain strings; nothing is pickled. Pure Python: no gRPC, no
protobuf.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import heapq
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "FINISHED", "OPEN", "STATUSES", "Chunk", "InMemoryRequestStore", "NotOwner", "RequestFinished",
    "RequestRecord", "RequestStore", "RequestStoreError", "UnknownRequest",
]  # and RedisRequestStore, re-exported lazily (see __getattr__ at the end)

OPEN = frozenset({"accepted", "running"})
FINISHED = frozenset({"done", "failed"})
STATUSES = OPEN | FINISHED
_SETTABLE = ("code", "message", "finish", "attempt", "deadline")


class RequestStoreError(Exception):
    """Base class of the store's errors."""


class UnknownRequest(RequestStoreError, KeyError):
    def __str__(self) -> str:
        return f"unknown request {self.args[0]!r}" if self.args else "unknown request"


class RequestFinished(RequestStoreError):
    """Tokens were appended to a request that is already done or failed."""


class NotOwner(RequestStoreError):
    """A fenced write (``owner=``) by a scheduler that does not hold the request's lease."""


class Chunk(NamedTuple):
    index: int
    """Position of the first token."""
    tokens: list[int]
    text: str


def _num(name: str, value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")
    return value


def _check_id(request_id: Any) -> str:
    if not isinstance(request_id, str) or not request_id or len(request_id) > 1024:
        raise ValueError("request_id must be a non-empty string of at most 1024 characters")
    if not request_id.isprintable() or request_id.endswith((":chunks", ":owner")):
        raise ValueError(f"request_id must be printable and not end in ':chunks'/':owner': {request_id!r}")
    return request_id


@dataclass
class RequestRecord:
    """One accepted request."""

    request_id: str
    payload: bytes
    """The serialized public request proto; opaque here."""
    accepted_at: float = dataclasses.field(default_factory=time.time)
    """Unix epoch seconds."""
    deadline: float | None = None
    """Absolute Unix epoch seconds, None for none."""
    owner: str = ""
    """The scheduler instance that last claimed it (its lease may have expired since)."""
    status: str = "accepted"
    code: str = ""
    """On failed: a gRPC status code name."""
    message: str = ""
    finish: int = 0
    """On done: the finish reason."""
    attempt: int = 0
    """Incremented each time another scheduler takes it over."""
    n_tokens: int = 0
    """Tokens stored so far (filled by the store; ignored by `accept`)."""
    n_chunks: int = 0
    """Chunks stored so far (filled by the store; ignored by `accept`)."""

    def __post_init__(self) -> None:
        _check_id(self.request_id)
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise ValueError(f"payload must be bytes, not {type(self.payload).__name__}")
        self.payload = bytes(self.payload)
        self.accepted_at = _num("accepted_at", self.accepted_at)
        self.deadline = _num("deadline", self.deadline, optional=True)
        for name in ("owner", "code", "message"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {sorted(STATUSES)}, not {self.status!r}")
        for name in ("finish", "attempt", "n_tokens", "n_chunks"):
            _int(name, getattr(self, name))

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _check_tokens(tokens: Sequence[int]) -> list[int]:
    out = list(tokens)
    for t in out:
        _int("token", t)
    return out


def _check_fields(status: str, fields: dict[str, Any]) -> None:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {sorted(STATUSES)}, not {status!r}")
    unknown = set(fields) - set(_SETTABLE)
    if unknown:
        raise ValueError(f"set_status: unknown fields {sorted(unknown)} (settable: {_SETTABLE})")
    for name in ("code", "message"):
        if name in fields and not isinstance(fields[name], str):
            raise ValueError(f"{name} must be a string")
    for name in ("finish", "attempt"):
        if name in fields:
            _int(name, fields[name])
    if "deadline" in fields:
        _num("deadline", fields["deadline"], optional=True)


def _strip_replayed(text: str, replayed: list[str] | None) -> str:
    """The part of `text` (covering tokens from `index`) not already stored: when the stored
    chunks starting at `index` line up, their text is a prefix to drop; otherwise keep it all."""
    if replayed is None:
        return text
    prefix = "".join(replayed)
    return text[len(prefix):] if text.startswith(prefix) else text


class RequestStore(abc.ABC):
    """Durable accepted requests and their streamed output. All methods are coroutines."""

    @abc.abstractmethod
    async def accept(self, record: RequestRecord, *, lease_s: float | None = None) -> bool:
        """Stores a new open record. False (nothing changed) when an open record has this id:
        accepting is idempotent. A finished record with this id is replaced (its chunks too).
        With `lease_s` and ``record.owner``, the owner also takes the lease (as `claim`)."""

    @abc.abstractmethod
    async def get(self, request_id: str) -> RequestRecord | None:
        """The record (with `n_tokens`, `n_chunks`), None when unknown or expired."""

    @abc.abstractmethod
    async def set_status(self, request_id: str, status: str, **fields: Any) -> bool:
        """Sets the status and any of ``code, message, finish, attempt, deadline``. A finished
        status goes through `finish` (default TTL). False when unknown or already finished."""

    @abc.abstractmethod
    async def append_tokens(self, request_id: str, index: int, tokens: Sequence[int], text: str = "",
                            *, owner: str | None = None) -> int:
        """Stores tokens at positions ``[index, index + len(tokens))`` once; returns how many
        were new. Positions already stored are skipped (a retry regenerating them); the new
        ones form one chunk whose text is `text` less the text of the stored chunks from
        `index` on, when that is a prefix of it. A text-only append (no tokens) at the end is
        stored once. With `owner`, only the lease holder may append.

        Raises:
            ValueError: a gap: `index` is past the stored count.
            UnknownRequest, RequestFinished, NotOwner.
        """

    @abc.abstractmethod
    async def chunks(self, request_id: str, start_chunk: int = 0) -> list[Chunk]:
        """Stored chunks from number `start_chunk` on (empty when unknown)."""

    async def tokens(self, request_id: str, start: int = 0) -> list[int]:
        """Stored token ids from position `start` on."""
        return [t for c in await self.chunks(request_id) for t in c.tokens][start:]

    @abc.abstractmethod
    def watch_chunks(self, request_id: str, start_chunk: int = 0) -> AsyncIterator[Chunk]:
        """Yields the stored chunks from `start_chunk` on, then each new one, and ends once the
        record is finished (or deleted/expired). Raises UnknownRequest when it is unknown."""

    @abc.abstractmethod
    async def unfinished(self) -> list[RequestRecord]:
        """Open (accepted/running) records, oldest first."""

    @abc.abstractmethod
    async def claim(self, request_id: str, owner: str, lease_s: float) -> bool:
        """Takes (or extends) the lease on an open request: True when `owner` holds it now,
        False when another owner's lease is still running, or it is unknown or finished."""

    @abc.abstractmethod
    async def renew(self, owner: str, lease_s: float) -> int:
        """Extends the leases of all open requests `owner` holds (also re-taking one whose lease
        lapsed while nobody else claimed it); returns how many."""

    @abc.abstractmethod
    async def owner_of(self, request_id: str) -> str | None:
        """The current lease holder, None when no lease is running."""

    @abc.abstractmethod
    async def finish(self, request_id: str, status: str, *, code: str = "", message: str = "",
                     finish: int = 0, ttl_s: float | None = None, owner: str | None = None) -> bool:
        """Marks the record done/failed, drops its lease, ends its watchers, and makes all its
        keys expire after `ttl_s` (the store's default when None). False when unknown or already
        finished. With `owner`, only the lease holder may finish (else NotOwner)."""

    @abc.abstractmethod
    async def delete(self, request_id: str) -> bool:
        """Removes the record and its chunks now; False when unknown."""


def _check_finish(status: str, ttl_s: float | None, default: float) -> float:
    if status not in FINISHED:
        raise ValueError(f"finish status must be one of {sorted(FINISHED)}, not {status!r}")
    ttl = default if ttl_s is None else _num("ttl_s", ttl_s)
    if ttl <= 0:
        raise ValueError("ttl_s must be > 0")
    return ttl


def _check_lease(lease_s: float) -> float:
    lease = _num("lease_s", lease_s)
    if lease <= 0:
        raise ValueError("lease_s must be > 0")
    return lease


@dataclass(eq=False)
class _Entry:
    record: RequestRecord
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    ntok: int = 0
    lease_owner: str | None = None
    lease_until: float = 0.0
    expires_at: float | None = None
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class InMemoryRequestStore(RequestStore):
    """A store in this process. `clock` (monotonic seconds) decides leases and finished TTLs."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, finished_ttl_s: float = 600.0):
        self._clock = clock
        self.finished_ttl_s = float(finished_ttl_s)
        self._entries: dict[str, _Entry] = {}
        self._expiry: list[tuple[float, int, str, _Entry]] = []
        self._seq = 0

    def _sweep(self) -> None:
        now = self._clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, _, rid, entry = heapq.heappop(self._expiry)
            if self._entries.get(rid) is entry:
                del self._entries[rid]
                entry.notify()

    def _entry(self, request_id: str) -> _Entry | None:
        self._sweep()
        return self._entries.get(request_id)

    def _holder(self, e: _Entry) -> str | None:
        return e.lease_owner if e.lease_owner is not None and e.lease_until > self._clock() else None

    def _fence(self, e: _Entry, owner: str | None) -> None:
        if owner is not None and self._holder(e) != owner:
            raise NotOwner(f"{e.record.request_id}: lease held by {self._holder(e)!r}, not {owner!r}")

    async def accept(self, record: RequestRecord, *, lease_s: float | None = None) -> bool:
        if record.finished:
            raise ValueError("accept: record status must be accepted or running")
        lease = None if lease_s is None else _check_lease(lease_s)
        old = self._entry(record.request_id)
        if old is not None and not old.record.finished:
            return False
        entry = _Entry(dataclasses.replace(record, n_tokens=0, n_chunks=0))
        if lease is not None and record.owner:
            entry.lease_owner, entry.lease_until = record.owner, self._clock() + lease
        self._entries[record.request_id] = entry
        if old is not None:
            old.notify()
        return True

    async def get(self, request_id: str) -> RequestRecord | None:
        e = self._entry(request_id)
        if e is None:
            return None
        return dataclasses.replace(e.record, n_tokens=e.ntok, n_chunks=len(e.chunks))

    async def set_status(self, request_id: str, status: str, **fields: Any) -> bool:
        _check_fields(status, fields)
        if status in FINISHED:
            fin = {k: fields[k] for k in ("code", "message", "finish") if k in fields}
            return await self.finish(request_id, status, **fin)
        e = self._entry(request_id)
        if e is None or e.record.finished:
            return False
        for name, value in fields.items():
            setattr(e.record, name, value if name != "deadline" or value is None else float(value))
        e.record.status = status
        return True

    async def append_tokens(self, request_id: str, index: int, tokens: Sequence[int], text: str = "",
                            *, owner: str | None = None) -> int:
        index, toks = _int("index", index), _check_tokens(tokens)
        e = self._entry(request_id)
        if e is None:
            raise UnknownRequest(request_id)
        if e.record.finished:
            raise RequestFinished(f"{request_id} is {e.record.status}")
        self._fence(e, owner)
        n = e.ntok
        if index > n:
            raise ValueError(f"{request_id}: gap: append at token {index} but {n} stored")
        if index + len(toks) <= n:
            if toks or not text or index != n:
                return 0
            if e.chunks and e.chunks[-1] == Chunk(n, [], text):
                return 0
            replayed = None
        elif index < n and text:
            starts = [c for c in e.chunks if c.index >= index]
            replayed = [c.text for c in starts] if starts and starts[0].index == index else None
        else:
            replayed = None
        new = toks[n - index:]
        e.chunks.append(Chunk(n, new, _strip_replayed(text, replayed)))
        e.ntok = n + len(new)
        e.notify()
        return len(new)

    async def chunks(self, request_id: str, start_chunk: int = 0) -> list[Chunk]:
        e = self._entry(request_id)
        return [] if e is None else [Chunk(c.index, list(c.tokens), c.text) for c in e.chunks[start_chunk:]]

    async def watch_chunks(self, request_id: str, start_chunk: int = 0) -> AsyncIterator[Chunk]:
        e = self._entry(request_id)
        if e is None:
            raise UnknownRequest(request_id)
        k = _int("start_chunk", start_chunk)
        while True:
            while k < len(e.chunks):
                c = e.chunks[k]
                k += 1
                yield Chunk(c.index, list(c.tokens), c.text)
            if e.record.finished or self._entry(request_id) is not e:
                return
            await e.changed.wait()

    async def unfinished(self) -> list[RequestRecord]:
        self._sweep()
        recs = [await self.get(rid) for rid, e in self._entries.items() if not e.record.finished]
        return sorted((r for r in recs if r is not None), key=lambda r: (r.accepted_at, r.request_id))

    async def claim(self, request_id: str, owner: str, lease_s: float) -> bool:
        lease = _check_lease(lease_s)
        if not owner:
            raise ValueError("owner must be non-empty")
        e = self._entry(request_id)
        if e is None or e.record.finished:
            return False
        holder = self._holder(e)
        if holder is not None and holder != owner:
            return False
        e.lease_owner, e.lease_until = owner, self._clock() + lease
        if e.record.owner != owner:
            if e.record.owner:
                e.record.attempt += 1
            e.record.owner = owner
        return True

    async def renew(self, owner: str, lease_s: float) -> int:
        lease = _check_lease(lease_s)
        self._sweep()
        n = 0
        for e in self._entries.values():
            holder = self._holder(e)
            if not e.record.finished and (holder == owner or (holder is None and e.record.owner == owner)):
                e.lease_owner, e.lease_until = owner, self._clock() + lease
                n += 1
        return n

    async def owner_of(self, request_id: str) -> str | None:
        e = self._entry(request_id)
        return None if e is None else self._holder(e)

    async def finish(self, request_id: str, status: str, *, code: str = "", message: str = "",
                     finish: int = 0, ttl_s: float | None = None, owner: str | None = None) -> bool:
        ttl = _check_finish(status, ttl_s, self.finished_ttl_s)
        _check_fields(status, {"code": code, "message": message, "finish": finish})
        e = self._entry(request_id)
        if e is None or e.record.finished:
            return False
        self._fence(e, owner)
        e.record.status, e.record.code, e.record.message, e.record.finish = status, code, message, finish
        e.lease_owner = None
        e.expires_at = self._clock() + ttl
        self._seq += 1
        heapq.heappush(self._expiry, (e.expires_at, self._seq, request_id, e))
        e.notify()
        return True

    async def delete(self, request_id: str) -> bool:
        e = self._entry(request_id)
        if e is None:
            return False
        del self._entries[request_id]
        e.notify()
        return True


def __getattr__(name: str) -> Any:
    # The Redis implementation lives in its own module (which imports this one); re-exported here.
    if name == "RedisRequestStore":
        from prism.queue.requests_redis import RedisRequestStore

        return RedisRequestStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
