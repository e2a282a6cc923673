"""Worker registry and accepted-request store, each test run against the in-memory implementation
(with an injected clock) and the Redis one (a real redis-server, tiny real TTLs)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import redis.asyncio as aioredis

from prism.queue.registry import Heartbeat, InMemoryRegistry, RedisRegistry, WorkerInfo
from prism.queue.requests import (
    Chunk,
    InMemoryRequestStore,
    NotOwner,
    RedisRequestStore,
    RequestFinished,
    RequestRecord,
    UnknownRequest,
)

TTL = 0.3  # seconds: real for Redis, on the fake clock for memory


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Env:
    impl: Any
    elapse: Callable  # async (seconds) -> None: fake clock forward, or real sleep
    client: Any = None  # the raw Redis client (None for memory)


@pytest.fixture(params=["memory", "redis"])
def kind(request):
    return request.param, (request.getfixturevalue("redis_url") if request.param == "redis" else None)


async def _env(kind, make_memory, make_redis):
    name, url = kind
    if name == "memory":
        clock = FakeClock()

        async def advance(s: float) -> None:
            clock.t += s

        yield Env(make_memory(clock), advance)
        return
    client = aioredis.from_url(url)
    try:
        yield Env(make_redis(client), asyncio.sleep, client)
    finally:
        await client.aclose()


@pytest.fixture
async def reg(kind):
    async for env in _env(kind, lambda c: InMemoryRegistry(clock=c),
                          lambda r: RedisRegistry(r, namespace="t")):
        yield env


@pytest.fixture
async def store(kind):
    async for env in _env(kind, lambda c: InMemoryRequestStore(clock=c, finished_ttl_s=TTL),
                          lambda r: RedisRequestStore(r, namespace="t", finished_ttl_s=TTL)):
        yield env


def worker(name: str, /, **kw: Any) -> WorkerInfo:
    base = dict(name=name, address="127.0.0.1:50051", model="tiny-llava", stages={"prefill", "decode"},
                capacity={"prefill": 5000.0, "decode": 120}, decode_slots=8, pid=1234, started_at=time.time())
    return WorkerInfo(**{**base, **kw})


async def eventually(cond, timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not await cond():
        assert time.monotonic() < until, "condition not reached"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- worker registry


def test_worker_info_validation_and_json():
    w = worker("d0", stages=["decode"], capacity={"decode": 100})
    assert w.stages == frozenset({"decode"}) and w.capacity == {"decode": 100.0}
    assert WorkerInfo.from_json(w.to_json()) == w and WorkerInfo.from_json(w.to_json().encode()) == w
    assert hash(w) == hash(WorkerInfo.from_json(w.to_json()))
    for field, bad in [("name", ""), ("address", "nohost"), ("address", "h:99999"), ("model", ""),
                       ("stages", {"train"}), ("stages", set()), ("capacity", {"encode": 1.0}),
                       ("capacity", {"decode": -1}), ("decode_slots", -1), ("decode_slots", 1.5),
                       ("pid", "x"), ("started_at", float("nan")), ("draining", "yes")]:
        with pytest.raises(ValueError, match=field):
            worker("w", **{field: bad})


async def test_register_live_known_forget(reg):
    r = reg.impl
    a, b = worker("a"), worker("b", address="[::1]:7000", stages={"encode"}, capacity={"encode": 1.0})
    await r.register(a, TTL)
    await r.register(b, 60)
    assert await r.live() == [a, b] and await r.known() == ["a", "b"]
    assert await r.get("a") == a and await r.get("zz") is None
    assert not await r.forget("a")  # alive: not forgotten
    await reg.elapse(TTL + 0.15)
    assert await r.live() == [b]
    assert await r.known() == ["a", "b"]  # dead but known: its queues need reclaiming
    assert await r.get("a") == a
    assert await r.forget("a") and await r.known() == ["b"] and await r.get("a") is None
    await r.deregister("b")
    assert await r.live() == [] and await r.known() == []


async def test_heartbeat_expiry(reg):
    r = reg.impl
    await r.register(worker("a"), TTL)
    for _ in range(3):  # kept alive past its first TTL by heartbeats
        await reg.elapse(TTL / 2)
        assert await r.heartbeat("a", TTL)
    assert [w.name for w in await r.live()] == ["a"]
    await reg.elapse(TTL + 0.15)
    assert await r.live() == [] and await r.known() == ["a"]
    assert not await r.heartbeat("a", TTL)  # vanished: must re-register
    assert not await r.heartbeat("never", TTL)
    await r.register(worker("a"), TTL)
    assert [w.name for w in await r.live()] == ["a"]


async def test_draining_round_trips(reg):
    r = reg.impl
    await r.register(worker("a"), 60)
    assert await r.set_draining("a")
    assert (await r.get("a")).draining and (await r.live())[0].draining
    assert await r.heartbeat("a", 60) and (await r.get("a")).draining
    assert await r.set_draining("a", False) and not (await r.get("a")).draining
    assert not await r.set_draining("nobody")


async def test_heartbeat_context_reregisters_after_key_vanishes(reg):
    r = reg.impl
    info = worker("hb")
    async with Heartbeat(r, info, ttl_s=TTL, every_s=0.05) as hb:
        assert [w.name for w in await r.live()] == ["hb"]
        if reg.client is not None:  # as Redis restarted without persistence
            await reg.client.delete("t:workers", "t:alive:hb")
        else:
            await r.deregister("hb")
        assert await r.live() == [] and await r.known() == []
        await eventually(lambda: _names(r.live(), ["hb"]))
        assert hb.reregistrations == 1 and not (await r.get("hb")).draining
        # An operator drains it, then its liveness lapses: the flag survives re-registration.
        assert await r.set_draining("hb")
        if reg.client is None:
            r.expire("hb")
        else:
            await reg.client.delete("t:alive:hb")
        await eventually(lambda: _true(hb.reregistrations == 2))
        assert [w.name for w in await r.live()] == ["hb"] and (await r.get("hb")).draining
        await asyncio.sleep(TTL + 0.2)  # kept alive (Redis: past the real ttl)
        assert [w.name for w in await r.live()] == ["hb"] and hb.failures == 0
    assert await r.known() == []  # clean exit deregisters

    with pytest.raises(RuntimeError):
        async with Heartbeat(r, worker("crash"), ttl_s=TTL, every_s=0.05):
            raise RuntimeError("boom")
    assert await r.known() == ["crash"]  # a crash leaves it to expire, then be reclaimed


async def _names(coro, expected) -> bool:
    return [w.name for w in await coro] == expected


async def test_heartbeat_survives_redis_outage(redis_proc):
    client = aioredis.from_url(redis_proc.url)
    try:
        r = RedisRegistry(client)
        async with Heartbeat(r, worker("w"), ttl_s=TTL, every_s=0.05) as hb:
            redis_proc.stop()
            await asyncio.sleep(TTL + 0.3)
            assert hb.failures >= 1
            redis_proc.start()
            await eventually(lambda: _names(r.live(), ["w"]))
            await asyncio.sleep(TTL + 0.1)
            assert [w.name for w in await r.live()] == ["w"] and hb.running
    finally:
        await client.aclose()


# ---------------------------------------------------------------- request store


def rec(rid: str, **kw: Any) -> RequestRecord:
    return RequestRecord(request_id=rid, payload=b"\x00\xffproto\x80" + rid.encode(), **kw)


async def test_accept_is_idempotent(store):
    s = store.impl
    r = rec("r1", accepted_at=1.5, deadline=99.25, owner="s1")
    assert await s.accept(r)
    assert not await s.accept(rec("r1", owner="s2"))
    got = await s.get("r1")
    assert got == r and got.payload == r.payload and got.deadline == 99.25
    assert await s.get("nope") is None
    assert await s.append_tokens("r1", 0, [1, 2], "hi") == 2
    assert await s.finish("r1", "done", finish=2)
    assert await s.accept(rec("r1", accepted_at=2.0))  # finished: the id may be reused
    got = await s.get("r1")
    assert got.status == "accepted" and got.accepted_at == 2.0 and got.n_tokens == 0
    assert await s.chunks("r1") == []
    with pytest.raises(ValueError):
        await s.accept(rec("r2", status="done"))
    with pytest.raises(ValueError):
        rec("x:chunks")


async def test_append_tokens_idempotent(store):
    s = store.impl
    await s.accept(rec("r"))
    assert await s.append_tokens("r", 0, [1, 2, 3], "abc") == 3
    assert await s.append_tokens("r", 0, [1, 2, 3, 4, 5], "abcde") == 2  # a retry regenerating
    assert await s.append_tokens("r", 3, [4, 5], "de") == 0
    assert await s.append_tokens("r", 1, [2], "b") == 0
    assert await s.tokens("r") == [1, 2, 3, 4, 5] and await s.tokens("r", 3) == [4, 5]
    assert await s.chunks("r") == [Chunk(0, [1, 2, 3], "abc"), Chunk(3, [4, 5], "de")]
    with pytest.raises(ValueError, match="gap"):
        await s.append_tokens("r", 7, [8])
    assert await s.append_tokens("r", 5, [], "!") == 0  # text-only flush, stored once
    assert await s.append_tokens("r", 5, [], "!") == 0
    assert await s.append_tokens("r", 4, [5, 6, 7], "?fg") == 2  # 4 is mid-chunk: text kept whole
    assert await s.chunks("r", 2) == [Chunk(5, [], "!"), Chunk(5, [6, 7], "?fg")]
    got = await s.get("r")
    assert (got.n_tokens, got.n_chunks) == (7, 4)
    with pytest.raises(UnknownRequest):
        await s.append_tokens("nope", 0, [1])
    with pytest.raises(ValueError):
        await s.append_tokens("r", 0, [-1])


async def test_watch_chunks_live_until_finish(store):
    s = store.impl
    await s.accept(rec("w"))
    await s.append_tokens("w", 0, [10], "a")
    seen: list[Chunk] = []
    late: list[Chunk] = []

    async def follow(out, start):
        async for c in s.watch_chunks("w", start):
            out.append(c)

    t1 = asyncio.create_task(follow(seen, 0))
    await eventually(lambda: _true(len(seen) == 1))
    t2 = asyncio.create_task(follow(late, 1))
    await s.append_tokens("w", 1, [11, 12], "bc")
    await eventually(lambda: _true(len(seen) == 2 and len(late) == 1))
    await s.append_tokens("w", 3, [13], "d")
    assert await s.finish("w", "done")
    await asyncio.wait_for(asyncio.gather(t1, t2), 5)
    assert seen == [Chunk(0, [10], "a"), Chunk(1, [11, 12], "bc"), Chunk(3, [13], "d")]
    assert late == seen[1:]
    assert [c async for c in s.watch_chunks("w", 2)] == seen[2:]  # finished: replays, ends
    with pytest.raises(UnknownRequest):
        async for _ in s.watch_chunks("nope"):
            pass


async def _true(v: bool) -> bool:
    return v


async def test_claim_exclusive_and_takeover(store):
    s = store.impl
    await s.accept(rec("c", owner="A"), lease_s=TTL)
    assert await s.owner_of("c") == "A"
    assert not await s.claim("c", "B", TTL)
    assert await s.claim("c", "A", TTL)  # re-entrant
    await store.elapse(TTL / 2)
    assert await s.renew("A", TTL) == 1
    await store.elapse(TTL / 2 + 0.05)
    assert not await s.claim("c", "B", TTL)  # renewed: still A's
    await store.elapse(TTL + 0.15)
    assert await s.owner_of("c") is None
    assert await s.claim("c", "B", 60)
    got = await s.get("c")
    assert got.owner == "B" and got.attempt == 1 and await s.owner_of("c") == "B"
    assert not await s.claim("c", "A", TTL) and await s.renew("A", TTL) == 0
    with pytest.raises(NotOwner):
        await s.append_tokens("c", 0, [1], owner="A")
    assert await s.append_tokens("c", 0, [1], owner="B") == 1
    with pytest.raises(NotOwner):
        await s.finish("c", "done", owner="A")
    assert await s.finish("c", "done", owner="B")
    assert not await s.claim("c", "B", TTL)  # finished
    assert not await s.claim("nope", "B", TTL)


async def test_unfinished_lists_open_ones(store):
    s = store.impl
    for i in range(4):
        await s.accept(rec(f"u{i}", accepted_at=100.0 - i))
    assert await s.set_status("u1", "running", deadline=5.5, attempt=2)
    got = await s.get("u1")
    assert (got.status, got.deadline, got.attempt) == ("running", 5.5, 2)
    with pytest.raises(ValueError):
        await s.set_status("u1", "running", payload=b"")
    assert not await s.set_status("nope", "running")
    assert await s.finish("u2", "failed", code="INTERNAL", message="boom")
    assert await s.set_status("u3", "done", finish=1)  # a finished status goes through finish
    assert [r.request_id for r in await s.unfinished()] == ["u1", "u0"]
    assert [r.status for r in await s.unfinished()] == ["running", "accepted"]
    got = await s.get("u2")
    assert (got.status, got.code, got.message) == ("failed", "INTERNAL", "boom")
    assert (await s.get("u3")).finish == 1
    assert await s.delete("u0") and not await s.delete("u0")
    assert [r.request_id for r in await s.unfinished()] == ["u1"]


async def test_finish_expires_everything(store):
    s = store.impl
    await s.accept(rec("f", owner="A"), lease_s=60)
    await s.append_tokens("f", 0, [1, 2], "xy")
    assert await s.finish("f", "done", finish=3)
    assert not await s.finish("f", "failed")
    assert not await s.set_status("f", "running")
    with pytest.raises(RequestFinished):
        await s.append_tokens("f", 2, [3])
    got = await s.get("f")
    assert (got.status, got.finish, got.n_tokens) == ("done", 3, 2)
    assert await s.owner_of("f") is None and await s.chunks("f") == [Chunk(0, [1, 2], "xy")]
    await store.elapse(TTL + 0.3)
    assert await s.get("f") is None and await s.chunks("f") == [] and await s.unfinished() == []
    if store.client is not None:
        assert await store.client.keys("*") == []


async def test_redis_restart_keeps_accepted_requests(redis_proc):
    client = aioredis.from_url(redis_proc.url)
    s = RedisRequestStore(client)
    await s.accept(rec("keep", owner="A", accepted_at=5.0), lease_s=60)
    await s.set_status("keep", "running")
    await s.append_tokens("keep", 0, [1, 2], "é")
    await s.append_tokens("keep", 2, [3], "\U0001f600")
    await s.accept(rec("gone", accepted_at=6.0))
    await s.finish("gone", "done", ttl_s=60)
    await client.aclose()

    redis_proc.restart()

    client = aioredis.from_url(redis_proc.url)
    try:
        s = RedisRequestStore(client)
        [r] = await s.unfinished()
        assert (r.request_id, r.status, r.owner, r.payload) == ("keep", "running", "A", rec("keep").payload)
        assert await s.owner_of("keep") == "A"  # the lease survived too
        assert await s.chunks("keep") == [Chunk(0, [1, 2], "é"), Chunk(2, [3], "\U0001f600")]
        assert await s.append_tokens("keep", 0, [1, 2, 3, 4], "é\U0001f600z") == 1
        assert (await s.chunks("keep", 2)) == [Chunk(3, [4], "z")]
        assert (await s.get("gone")).status == "done"
    finally:
        await client.aclose()
