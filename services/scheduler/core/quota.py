"""API keys and per-key quotas of the front door (pure: no gRPC).

Keys are stored hashed: the key ring holds, per caller, a name and the SHA-256 of its key (keys
are 32 random bytes, so a fast hash is enough; lookups compare digests in constant time). The
ring is JSON, from a file or an environment variable::

    {"keys": [{"name": "team-a", "sha256": "<64 hex>", "rate_per_s": 5, "burst": 10,
               "max_concurrent": 4, "admin": false}]}

``rate_per_s`` and ``burst`` are a token bucket of requests (0: no rate limit), and
``max_concurrent`` the calls a key may have open at once (0: no limit). `new_key` makes a key
and its entry (``prism keys new``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ApiKey", "KeyRing", "KeyRingError", "Lease", "Quotas", "Throttled", "digest", "new_key"]

KEY_PREFIX = "prism_"


class KeyRingError(ValueError):
    """The key ring is malformed; the message names the entry and field."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One caller: its name (on spans and metrics), the hash of its key and its quota."""

    name: str
    sha256: str = field(repr=False)
    rate_per_s: float = 0.0
    """Requests per second, sustained (0: unlimited)."""
    burst: int = 0
    """Requests allowed at once above the rate (the bucket's size; 0: max(1, rate))."""
    max_concurrent: int = 0
    """Calls open at once (0: unlimited)."""
    admin: bool = False
    """May call the scheduler's admin service."""

    @classmethod
    def parse(cls, raw: Any, where: str) -> "ApiKey":
        if not isinstance(raw, Mapping):
            raise KeyRingError(f"{where}: must be an object")
        unknown = set(raw) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise KeyRingError(f"{where}.{sorted(unknown)[0]}: unknown field")
        name, sha = raw.get("name"), raw.get("sha256")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise KeyRingError(f"{where}.name: a non-empty string of at most 64 characters")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise KeyRingError(f"{where}.sha256: 64 lowercase hex digits (the SHA-256 of the key)")
        values = {}
        for name_, kind in (("rate_per_s", float), ("burst", int), ("max_concurrent", int)):
            value = raw.get(name_, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (kind is int and value != int(value)):
                raise KeyRingError(f"{where}.{name_}: a {'number' if kind is float else 'whole number'} >= 0")
            values[name_] = kind(value)
        admin = raw.get("admin", False)
        if not isinstance(admin, bool):
            raise KeyRingError(f"{where}.admin: true or false")
        return cls(name=name, sha256=sha, admin=admin, **values)


class KeyRing:
    """The known keys, by the digest of the key."""

    def __init__(self, keys: Iterable[ApiKey] = ()):
        self._by_digest: dict[str, ApiKey] = {}
        names = set()
        for key in keys:
            if key.name in names:
                raise KeyRingError(f"keys: the name {key.name!r} is used twice")
            if key.sha256 in self._by_digest:
                raise KeyRingError(f"keys: {key.name!r} has the same key as {self._by_digest[key.sha256].name!r}")
            names.add(key.name)
            self._by_digest[key.sha256] = key

    @classmethod
    def from_json(cls, text: str) -> "KeyRing":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyRingError(f"keys: not JSON ({exc})") from None
        if not isinstance(doc, Mapping) or not isinstance(doc.get("keys"), list):
            raise KeyRingError('keys: expected {"keys": [...]}')
        return cls(ApiKey.parse(raw, f"keys[{i}]") for i, raw in enumerate(doc["keys"]))

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return tuple(self._by_digest.values())

    @property
    def enabled(self) -> bool:
        return bool(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key's entry, or None for an unknown key (constant time in the key's value)."""
        want = digest(presented)
        found = None
        for sha, key in self._by_digest.items():
            if hmac.compare_digest(sha, want):
                found = key
        return found


def new_key(name: str, **quota: Any) -> tuple[str, dict[str, Any]]:
    """A fresh key (shown once) and its key-ring entry (which holds only its hash)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey.parse({"name": name, "sha256": digest(key), **quota}, "key")
    return key, {k: v for k, v in asdict(entry).items() if v or k in ("name", "sha256")}


@dataclass(frozen=True)
class Throttled(Exception):
    """A key is over its quota: what, and when to try again."""

    reason: str
    retry_after_s: float

    def __str__(self) -> str:
        return self.reason


class Lease:
    """One open call of a key; `release` when it ends (idempotent)."""

    def __init__(self, quotas: "Quotas", name: str):
        self._quotas, self._name, self._open = quotas, name, True

    def release(self) -> None:
        if self._open:
            self._open = False
            self._quotas._open[self._name] -= 1


class Quotas:
    """Token buckets and open-call counts per key."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._open: dict[str, int] = {}

    def open_calls(self, name: str) -> int:
        return self._open.get(name, 0)

    def acquire(self, key: ApiKey) -> Lease:
        """Admits one call of `key` or raises Throttled (nothing is consumed then)."""
        if key.max_concurrent and self._open.get(key.name, 0) >= key.max_concurrent:
            raise Throttled(f"api key {key.name!r}: {key.max_concurrent} calls already open (max_concurrent)", 1.0)
        if key.rate_per_s > 0:
            now = self._clock()
            size = float(key.burst or max(1.0, key.rate_per_s))
            tokens, at = self._buckets.get(key.name, (size, now))
            tokens = min(size, tokens + (now - at) * key.rate_per_s)
            if tokens < 1.0:
                self._buckets[key.name] = (tokens, now)
                wait = (1.0 - tokens) / key.rate_per_s
                raise Throttled(f"api key {key.name!r}: over {key.rate_per_s:g} requests/s (rate_per_s)", wait)
            self._buckets[key.name] = (tokens - 1.0, now)
        self._open[key.name] = self._open.get(key.name, 0) + 1
        return Lease(self, key.name)
