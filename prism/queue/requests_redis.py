"""`RedisRequestStore`: the accepted-request store (`prism.queue.requests`) in Redis.

Keys, for request ``id`` in namespace ``ns``: ``{ns}:req:{id}`` (hash: the record, plus ``ntok``
and ``nchunk``, the stored token and chunk counts), ``{ns}:req:{id}:chunks`` (stream: entry
``k+1-0`` is chunk ``k`` with fields ``i`` (first token position), ``t`` (comma-separated token
ids) and ``x`` (text); `finish` adds an end marker entry with field ``end``),
``{ns}:req:{id}:owner`` (the lease: the holder's id, with a PX expiry) and ``{ns}:requests:open``
(set of open ids). Lua scripts make accept, set_status, append, claim, renew and finish atomic.
The payload is stored as raw bytes: use a client with ``decode_responses=False``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from prism.queue.requests import (
    FINISHED,
    OPEN,
    Chunk,
    NotOwner,
    RequestFinished,
    RequestRecord,
    RequestStore,
    UnknownRequest,
    _check_fields,
    _check_finish,
    _check_lease,
    _check_tokens,
    _int,
)

__all__ = ["RedisRequestStore"]

_ACCEPT = """
local st = redis.call('HGET', KEYS[1], 'status')
if st and st ~= 'done' and st ~= 'failed' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SADD', KEYS[4], ARGV[1])
if tonumber(ARGV[2]) > 0 and ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2]) end
return 1
"""

_SET_STATUS = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'done' or st == 'failed' then return 0 end
redis.call('HSET', KEYS[1], 'status', unpack(ARGV))
return 1
"""

# Returns {new tokens (or -1 unknown, -2 gap, -3 finished, -4 not owner), stored count}.
_APPEND = """
local function fld(f, name) for j = 1, #f, 2 do if f[j] == name then return f[j + 1] end end end
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {-1, 0} end
local n = tonumber(redis.call('HGET', KEYS[1], 'ntok') or '0')
if st == 'done' or st == 'failed' then return {-3, n} end
if ARGV[3] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[3] then return {-4, n} end
local index, count, text = tonumber(ARGV[1]), #ARGV - 3, ARGV[2]
if index > n then return {-2, n} end
local nchunk = tonumber(redis.call('HGET', KEYS[1], 'nchunk') or '0')
if index + count <= n then
  if count > 0 or text == '' or index ~= n then return {0, n} end
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  if last and fld(last[2], 'i') == tostring(n) and fld(last[2], 't') == '' and fld(last[2], 'x') == text then
    return {0, n}
  end
elseif index < n and text ~= '' then
  local parts, upper, found, done = {}, '+', false, false
  while not done do
    local batch = redis.call('XREVRANGE', KEYS[2], upper, '-', 'COUNT', 64)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      local i = tonumber(fld(e[2], 'i'))
      if i < index then done = true break end
      table.insert(parts, 1, fld(e[2], 'x'))
      if i == index then found = true end
      upper = '(' .. e[1]
    end
  end
  if found then
    local prefix = table.concat(parts)
    if string.sub(text, 1, #prefix) == prefix then text = string.sub(text, #prefix + 1) end
  end
end
local new = {}
for j = n - index + 1, count do new[#new + 1] = ARGV[3 + j] end
nchunk = nchunk + 1
redis.call('XADD', KEYS[2], nchunk .. '-0', 'i', n, 't', table.concat(new, ','), 'x', text)
redis.call('HSET', KEYS[1], 'ntok', n + #new, 'nchunk', nchunk)
return {#new, n + #new}
"""

_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'done' or st == 'failed' then return 0 end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local prev = redis.call('HGET', KEYS[1], 'owner')
if prev ~= ARGV[1] then
  if prev and prev ~= '' then redis.call('HINCRBY', KEYS[1], 'attempt', 1) end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
end
return 1
"""

# Keys derived from the open set's members: fine on a standalone server (not Redis Cluster).
_RENEW = """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = ARGV[1] .. id
  local lk = h .. ':owner'
  local cur = redis.call('GET', lk)
  if cur == ARGV[2] then
    redis.call('PEXPIRE', lk, ARGV[3]) n = n + 1
  elseif not cur and redis.call('HGET', h, 'owner') == ARGV[2] then
    local st = redis.call('HGET', h, 'status')
    if st == 'accepted' or st == 'running' then redis.call('SET', lk, ARGV[2], 'PX', ARGV[3]) n = n + 1 end
  end
end
return n
"""

_FINISH = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st or st == 'done' or st == 'failed' then return 0 end
if ARGV[7] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[7] then return -2 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'code', ARGV[3], 'message', ARGV[4], 'finish', ARGV[5])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[3])
local nchunk = tonumber(redis.call('HGET', KEYS[1], 'nchunk') or '0')
redis.call('XADD', KEYS[2], (nchunk + 1) .. '-0', 'end', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"""


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def _chunk(fields: Any) -> Chunk | None:
    pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2])
    f = {_s(k): v for k, v in pairs}
    if "end" in f:
        return None
    t = _s(f.get("t", b""))
    return Chunk(int(_s(f["i"])), [int(x) for x in t.split(",")] if t else [], _s(f.get("x", b"")))


class RedisRequestStore(RequestStore):
    """A store in Redis (a `redis.asyncio.Redis` with ``decode_responses=False``), shared by the
    schedulers of a deployment and durable with append-only persistence."""

    def __init__(self, client: Any, namespace: str = "prism", finished_ttl_s: float = 600.0):
        if not namespace:
            raise ValueError("namespace must be non-empty")
        kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
        if kwargs.get("decode_responses"):
            raise ValueError("RedisRequestStore needs a client with decode_responses=False (raw payloads)")
        self._r = client
        self.namespace = namespace
        self.finished_ttl_s = float(finished_ttl_s)
        self._open = f"{namespace}:requests:open"
        self._accept, self._set_status, self._append, self._claim, self._renew, self._finish = (
            client.register_script(s) for s in (_ACCEPT, _SET_STATUS, _APPEND, _CLAIM, _RENEW, _FINISH))

    def _keys(self, request_id: str) -> tuple[str, str, str]:
        h = f"{self.namespace}:req:{request_id}"
        return h, f"{h}:chunks", f"{h}:owner"

    @staticmethod
    def _record(request_id: str, raw: dict) -> RequestRecord:
        h = {_s(k): v for k, v in raw.items()}
        deadline = _s(h.get("deadline", b""))
        return RequestRecord(
            request_id=request_id, payload=h.get("payload", b""), accepted_at=float(_s(h["accepted_at"])),
            deadline=float(deadline) if deadline else None, owner=_s(h.get("owner", b"")),
            status=_s(h["status"]), code=_s(h.get("code", b"")), message=_s(h.get("message", b"")),
            finish=int(_s(h.get("finish", b"0"))), attempt=int(_s(h.get("attempt", b"0"))),
            n_tokens=int(_s(h.get("ntok", b"0"))), n_chunks=int(_s(h.get("nchunk", b"0"))))

    async def accept(self, record: RequestRecord, *, lease_s: float | None = None) -> bool:
        if record.finished:
            raise ValueError("accept: record status must be accepted or running")
        lease = 0 if lease_s is None else _ms(_check_lease(lease_s))
        fields: list[Any] = [
            "payload", record.payload, "accepted_at", repr(record.accepted_at),
            "deadline", "" if record.deadline is None else repr(record.deadline), "owner", record.owner,
            "status", record.status, "code", record.code, "message", record.message,
            "finish", record.finish, "attempt", record.attempt, "ntok", 0, "nchunk", 0]
        ok = await self._accept(keys=[*self._keys(record.request_id), self._open],
                                args=[record.request_id, lease, record.owner, *fields])
        return bool(ok)

    async def get(self, request_id: str) -> RequestRecord | None:
        raw = await self._r.hgetall(self._keys(request_id)[0])
        return self._record(request_id, raw) if raw else None

    async def set_status(self, request_id: str, status: str, **fields: Any) -> bool:
        _check_fields(status, fields)
        if status in FINISHED:
            fin = {k: fields[k] for k in ("code", "message", "finish") if k in fields}
            return await self.finish(request_id, status, **fin)
        args: list[Any] = [status]
        for name, value in fields.items():
            args += [name, "" if value is None else repr(float(value)) if name == "deadline" else value]
        return bool(await self._set_status(keys=[self._keys(request_id)[0]], args=args))

    async def append_tokens(self, request_id: str, index: int, tokens: Sequence[int], text: str = "",
                            *, owner: str | None = None) -> int:
        index, toks = _int("index", index), _check_tokens(tokens)
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        code, stored = await self._append(keys=list(self._keys(request_id)),
                                          args=[index, text.encode(), owner or "", *toks])
        if code == -1:
            raise UnknownRequest(request_id)
        if code == -2:
            raise ValueError(f"{request_id}: gap: append at token {index} but {stored} stored")
        if code == -3:
            raise RequestFinished(f"{request_id} is finished")
        if code == -4:
            raise NotOwner(f"{request_id}: {owner!r} does not hold the lease")
        return int(code)

    async def chunks(self, request_id: str, start_chunk: int = 0) -> list[Chunk]:
        start = _int("start_chunk", start_chunk)
        entries = await self._r.xrange(self._keys(request_id)[1], min=f"{start + 1}-0", max="+")
        return [c for _, f in entries if (c := _chunk(f)) is not None]

    async def watch_chunks(self, request_id: str, start_chunk: int = 0, *,
                           poll_s: float = 1.0) -> AsyncIterator[Chunk]:
        hkey, skey, _ = self._keys(request_id)
        last = f"{_int('start_chunk', start_chunk)}-0"
        if not await self._r.exists(hkey):
            raise UnknownRequest(request_id)
        while True:
            resp = await self._r.xread({skey: last}, count=256, block=_ms(poll_s))
            streams = resp.items() if isinstance(resp, dict) else (resp or [])
            got = False
            for _key, entries in streams:
                for entry_id, fields in entries:
                    got = True
                    chunk = _chunk(fields)
                    if chunk is None:
                        return
                    last = _s(entry_id)
                    yield chunk
            if not got and _s(await self._r.hget(hkey, "status") or b"") not in OPEN:
                return  # deleted or expired (the end marker went with the stream)

    async def unfinished(self) -> list[RequestRecord]:
        ids = sorted(_s(m) for m in await self._r.smembers(self._open))
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hgetall(self._keys(rid)[0])
            raws = await pipe.execute()
        out, stale = [], []
        for rid, raw in zip(ids, raws):
            if not raw:
                stale.append(rid)
                continue
            rec = self._record(rid, raw)
            if rec.status in OPEN:
                out.append(rec)
        if stale:
            await self._r.srem(self._open, *stale)
        return sorted(out, key=lambda r: (r.accepted_at, r.request_id))

    async def claim(self, request_id: str, owner: str, lease_s: float) -> bool:
        lease = _check_lease(lease_s)
        if not owner:
            raise ValueError("owner must be non-empty")
        hkey, _, okey = self._keys(request_id)
        return bool(await self._claim(keys=[hkey, okey], args=[owner, _ms(lease)]))

    async def renew(self, owner: str, lease_s: float) -> int:
        lease = _check_lease(lease_s)
        return int(await self._renew(keys=[self._open], args=[f"{self.namespace}:req:", owner, _ms(lease)]))

    async def owner_of(self, request_id: str) -> str | None:
        value = await self._r.get(self._keys(request_id)[2])
        return None if value is None else _s(value)

    async def finish(self, request_id: str, status: str, *, code: str = "", message: str = "",
                     finish: int = 0, ttl_s: float | None = None, owner: str | None = None) -> bool:
        ttl = _check_finish(status, ttl_s, self.finished_ttl_s)
        _check_fields(status, {"code": code, "message": message, "finish": finish})
        res = await self._finish(keys=[*self._keys(request_id), self._open],
                                 args=[request_id, status, code, message, finish, _ms(ttl), owner or ""])
        if res == -2:
            raise NotOwner(f"{request_id}: {owner!r} does not hold the lease")
        return bool(res)

    async def delete(self, request_id: str) -> bool:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(*self._keys(request_id))
            pipe.srem(self._open, request_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)
