"""The profile file of deadline-driven modality selection (after MOSEL, arXiv 2310.18481).

``prism profile`` measures, offline, what the scheduler's selection
(services/scheduler/core/selection.py) needs to trade accuracy for work under overload:

* per stage (``encode``, ``prefill``, ``decode``) and batch size, the measured milliseconds per
  token (:class:`StageCost`); for decode a call is one step of the whole batch (one token per
  request), so ``ms_per_call`` is the milliseconds per step at that batch;
* per reduction id (prism/models/reduce.py: ``"full"``, ``"drop_images:1"``,
  ``"image_scale:0.5"``, ``"audio_keep:0.5"``, ``"drop:image"``...) the accuracy measured on an eval set
  or supplied by the user (:class:`AccuracyEntry`), and where it came from (:class:`AccuracySource`).

The file is JSON, ``"version": 1``::

    {"version": 1,
     "model": {"name": "tiny-llava", "family": "llava", "dtype": "float32", "device": "cpu"},
     "costs": {"encode": {"1": {"ms_per_token": 0.02, "ms_per_call": 1.3, "tokens_per_call": 64,
                                "samples": 3}, "4": {...}},
               "prefill": {...}, "decode": {...}},
     "accuracy": {"full": {"accuracy": 0.83, "n": 40}, "drop_images:1": {"accuracy": 0.7, "n": 12}},
     "source": {"kind": "eval", "path": "eval.jsonl", "sha256": "...", "examples": 40,
                "max_new_tokens": 16, "allow": "all"},
     "settings": {"image_side": 224, ...}}

:func:`load` validates every field and names the one at fault (:class:`ProfileError`);
:meth:`Profile.strategies_for` turns a request's candidate reductions, with their exact token
costs (``reduce.cost``), into the selection's ``Strategy`` objects.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

__all__ = [
    "VERSION", "STAGES", "ProfileError", "StageCost", "AccuracyEntry", "AccuracySource", "ModelInfo",
    "Profile", "load", "save", "check_reduction_id",
]

VERSION = 1
STAGES = ("encode", "prefill", "decode")
SOURCE_KINDS = ("eval", "file")

#: The reduction ids of prism/models/reduce.py.
_REDUCTION_ID = re.compile(
    r"^(full|drop_images:[1-9][0-9]*|image_scale:[0-9.e+-]+|audio_keep:[0-9.e+-]+|drop:(image|audio))$")


class ProfileError(ValueError):
    """A profile is invalid; `field` names the field at fault (a dotted path)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def check_reduction_id(rid: Any, field_name: str) -> str:
    """`rid` if it is a reduction id of prism/models/reduce.py, else a ProfileError."""
    if not isinstance(rid, str) or not _REDUCTION_ID.match(rid):
        raise ProfileError(field_name, f"{rid!r} is not a reduction id (full, drop_images:K, image_scale:S, "
                                       "audio_keep:F, drop:image, drop:audio)")
    return rid


def _finite(value: Any, field_name: str, *, positive: bool = False, lo: float | None = None,
            hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProfileError(field_name, f"{value!r} is not a finite number")
    if positive and not value > 0:
        raise ProfileError(field_name, f"{value!r} must be > 0")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ProfileError(field_name, f"{value!r} is outside [{lo}, {hi}]")
    return float(value)


def _int(value: Any, field_name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ProfileError(field_name, f"{value!r} is not an integer >= {minimum}")
    return int(value)


def _str(value: Any, field_name: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or not (empty or value):
        raise ProfileError(field_name, f"{value!r} is not a {'' if empty else 'non-empty '}string")
    return value


def _mapping(value: Any, field_name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(field_name, f"expected an object, got {type(value).__name__}")
    return value


def _get(d: Mapping[str, Any], key: str, prefix: str) -> Any:
    name = f"{prefix}.{key}" if prefix else key
    if key not in d:
        raise ProfileError(name, "missing")
    return d[key]


def _no_extra(d: Mapping[str, Any], allowed: Iterable[str], prefix: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise ProfileError(f"{prefix}.{extra[0]}" if prefix else extra[0], "unknown field")


@dataclass(frozen=True)
class StageCost:
    """One stage at one batch size: the median time of a call (an encoder batch, a prefill
    batch, a decode step), the tokens a call handles, and their ratio."""

    ms_per_token: float
    ms_per_call: float
    tokens_per_call: int
    samples: int

    def __post_init__(self) -> None:
        _finite(self.ms_per_token, "ms_per_token", positive=True)
        _finite(self.ms_per_call, "ms_per_call", positive=True)
        _int(self.tokens_per_call, "tokens_per_call", minimum=1)
        _int(self.samples, "samples", minimum=1)

    def as_dict(self) -> dict[str, Any]:
        return {"ms_per_token": self.ms_per_token, "ms_per_call": self.ms_per_call,
                "tokens_per_call": self.tokens_per_call, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> "StageCost":
        d = _mapping(d, prefix)
        keys = ("ms_per_token", "ms_per_call", "tokens_per_call", "samples")
        _no_extra(d, keys, prefix)
        return cls(ms_per_token=_finite(_get(d, "ms_per_token", prefix), f"{prefix}.ms_per_token", positive=True),
                   ms_per_call=_finite(_get(d, "ms_per_call", prefix), f"{prefix}.ms_per_call", positive=True),
                   tokens_per_call=_int(_get(d, "tokens_per_call", prefix), f"{prefix}.tokens_per_call", minimum=1),
                   samples=_int(_get(d, "samples", prefix), f"{prefix}.samples", minimum=1))


@dataclass(frozen=True)
class AccuracyEntry:
    """Accuracy of one reduction id; `n` the eval examples it was measured on (None when
    supplied by the user)."""

    accuracy: float
    n: int | None = None

    def __post_init__(self) -> None:
        _finite(self.accuracy, "accuracy", lo=0.0, hi=1.0)
        if self.n is not None:
            _int(self.n, "n", minimum=1)

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "n": self.n}

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> "AccuracyEntry":
        d = _mapping(d, prefix)
        _no_extra(d, ("accuracy", "n"), prefix)
        n = d.get("n")
        return cls(accuracy=_finite(_get(d, "accuracy", prefix), f"{prefix}.accuracy", lo=0.0, hi=1.0),
                   n=None if n is None else _int(n, f"{prefix}.n", minimum=1))


@dataclass(frozen=True)
class AccuracySource:
    """Where the accuracies came from: an eval set (``kind="eval"``) or a user-supplied accuracy
    file (``kind="file"``), by path and SHA-256 of its bytes."""

    kind: str
    path: str
    sha256: str
    examples: int | None = None
    max_new_tokens: int | None = None
    allow: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ProfileError("source.kind", f"{self.kind!r} is not one of {list(SOURCE_KINDS)}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ProfileError("source.sha256", f"{self.sha256!r} is not a hex SHA-256")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "examples": self.examples,
                "max_new_tokens": self.max_new_tokens, "allow": self.allow}

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "source") -> "AccuracySource":
        d = _mapping(d, prefix)
        keys = ("kind", "path", "sha256", "examples", "max_new_tokens", "allow")
        _no_extra(d, keys, prefix)
        opt = {}
        for key in ("examples", "max_new_tokens"):
            v = d.get(key)
            opt[key] = None if v is None else _int(v, f"{prefix}.{key}", minimum=1)
        allow = d.get("allow")
        return cls(kind=_str(_get(d, "kind", prefix), f"{prefix}.kind"),
                   path=_str(_get(d, "path", prefix), f"{prefix}.path"),
                   sha256=_str(_get(d, "sha256", prefix), f"{prefix}.sha256"),
                   allow=None if allow is None else _str(allow, f"{prefix}.allow", empty=True), **opt)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    dtype: str
    device: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family, "dtype": self.dtype, "device": self.device}

    @classmethod
    def from_dict(cls, d: Any, prefix: str = "model") -> "ModelInfo":
        d = _mapping(d, prefix)
        _no_extra(d, ("name", "family", "dtype", "device"), prefix)
        return cls(**{k: _str(_get(d, k, prefix), f"{prefix}.{k}") for k in ("name", "family", "dtype", "device")})


def _freeze_costs(costs: Mapping[str, Mapping[int, StageCost]]) -> Mapping[str, Mapping[int, StageCost]]:
    out = {}
    for stage, per_batch in costs.items():
        if stage not in STAGES:
            raise ProfileError(f"costs.{stage}", f"not a stage; use {list(STAGES)}")
        frozen = {}
        for batch, entry in per_batch.items():
            b = _int(batch, f"costs.{stage}.{batch}", minimum=1)
            if not isinstance(entry, StageCost):
                raise ProfileError(f"costs.{stage}.{batch}", "not a StageCost")
            frozen[b] = entry
        out[stage] = MappingProxyType(dict(sorted(frozen.items())))
    return MappingProxyType(out)


@dataclass(frozen=True)
class Profile:
    """A model's measured stage costs and per-reduction accuracies (see the module docstring).

    ``accuracy`` is empty (no accuracy measured: no strategy is offered) or holds ``"full"``:
    the selection always keeps the full-input strategy of a request."""

    model: ModelInfo
    costs: Mapping[str, Mapping[int, StageCost]]
    accuracy: Mapping[str, AccuracyEntry] = field(default_factory=dict)
    source: AccuracySource | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    version: int = VERSION
    tables: Mapping[str, Any] = field(default_factory=dict)
    """Offline strategy tables (prism/profiling/tables.py; optional): ``size`` ("images" or
    "audio_seconds"), ``floors``, ``decode_tokens`` and ``rows`` {size: {floor: the cheapest
    reduction id meeting it, or None}}."""

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise ProfileError("version", f"{self.version!r} is not supported; this Prism reads version {VERSION}")
        object.__setattr__(self, "costs", _freeze_costs(self.costs))
        acc = {}
        for rid, entry in self.accuracy.items():
            check_reduction_id(rid, f"accuracy.{rid}")
            if not isinstance(entry, AccuracyEntry):
                raise ProfileError(f"accuracy.{rid}", "not an AccuracyEntry")
            acc[rid] = entry
        if acc and "full" not in acc:
            raise ProfileError("accuracy.full", "missing: accuracies must include the full input's")
        object.__setattr__(self, "accuracy", MappingProxyType(acc))
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "tables", _check_tables(self.tables))

    # ---- reading it ----------------------------------------------------------------------
    def batch_sizes(self, stage: str) -> list[int]:
        return list(self.costs.get(stage, {}))

    def ms_per_token(self, stage: str, batch: int = 1) -> float:
        """Milliseconds per token of `stage` at `batch`: the measured batch size closest to it
        (the smaller on a tie)."""
        per_batch = self.costs.get(stage)
        if not per_batch:
            raise KeyError(f"profile has no {stage!r} costs")
        nearest = min(per_batch, key=lambda b: (abs(b - batch), b))
        return per_batch[nearest].ms_per_token

    def strategies_for(self, costs: Iterable[Mapping[str, Any]], decode_tokens: int = 0, *,
                       batch: int | None = None) -> list[Any]:
        """`selection.Strategy` objects for a request's candidate reductions.

        `costs` are the exact token costs of each candidate, as ``prism.models.reduce.cost``
        gives them (``reduction``, ``media_tokens``, ``prompt_tokens``): the encode stage
        embeds ``media_tokens``, prefill runs ``prompt_tokens``, decode makes `decode_tokens`
        (the request's max_new_tokens). A reduction without an accuracy in this profile is not
        offered. With `batch`, each strategy also carries ``work_s``: its tokens times the
        measured ms per token at that batch size (nearest measured), in seconds."""
        from services.scheduler.core.selection import Strategy

        out = []
        for c in costs:
            rid = str(c["reduction"])
            entry = self.accuracy.get(rid)
            if entry is None:
                continue
            tokens = {"encode": int(c["media_tokens"]), "prefill": int(c["prompt_tokens"]),
                      "decode": int(decode_tokens)}
            work = None
            if batch is not None:
                work = {s: (n * self.ms_per_token(s, batch) / 1000.0 if n else 0.0) for s, n in tokens.items()}
            out.append(Strategy(rid, entry.accuracy, encode_tokens=tokens["encode"],
                                prefill_tokens=tokens["prefill"], decode_tokens=tokens["decode"], work_s=work))
        return out

    # ---- JSON -------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model": self.model.as_dict(),
            "costs": {s: {str(b): c.as_dict() for b, c in per.items()} for s, per in self.costs.items()},
            "accuracy": {rid: e.as_dict() for rid, e in self.accuracy.items()},
            "source": None if self.source is None else self.source.as_dict(),
            "settings": dict(self.settings),
            "tables": {k: v for k, v in self.tables.items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> "Profile":
        d = _mapping(d, "profile")
        _no_extra(d, ("version", "model", "costs", "accuracy", "source", "settings", "tables"), "")
        version = _get(d, "version", "")
        if version != VERSION:
            raise ProfileError("version", f"{version!r} is not supported; this Prism reads version {VERSION}")
        model = ModelInfo.from_dict(_get(d, "model", ""))
        costs_raw = _mapping(_get(d, "costs", ""), "costs")
        costs: dict[str, dict[int, StageCost]] = {}
        for stage in STAGES:
            per = _mapping(_get(costs_raw, stage, "costs"), f"costs.{stage}")
            if not per:
                raise ProfileError(f"costs.{stage}", "no batch sizes")
            costs[stage] = {}
            for key, entry in per.items():
                if not (isinstance(key, str) and key.isdigit() and int(key) >= 1):
                    raise ProfileError(f"costs.{stage}.{key}", "batch size must be an integer >= 1")
                costs[stage][int(key)] = StageCost.from_dict(entry, f"costs.{stage}.{key}")
        _no_extra(costs_raw, STAGES, "costs")
        acc_raw = _mapping(_get(d, "accuracy", ""), "accuracy")
        accuracy = {check_reduction_id(rid, f"accuracy.{rid}"): AccuracyEntry.from_dict(e, f"accuracy.{rid}")
                    for rid, e in acc_raw.items()}
        source_raw = _get(d, "source", "")
        source = None if source_raw is None else AccuracySource.from_dict(source_raw)
        settings = _mapping(_get(d, "settings", ""), "settings")
        tables = _mapping(d.get("tables", {}), "tables")
        return cls(model=model, costs=costs, accuracy=accuracy, source=source, settings=dict(settings),
                   tables=dict(tables))


def _check_tables(t: Mapping[str, Any]) -> Mapping[str, Any]:
    t = _mapping(t, "tables")
    if not t:
        return MappingProxyType({})
    _no_extra(t, ("size", "floors", "decode_tokens", "rows"), "tables")
    if t.get("size") not in ("images", "audio_seconds"):
        raise ProfileError("tables.size", f"{t.get('size')!r} is not images or audio_seconds")
    floors = t.get("floors")
    if not isinstance(floors, (list, tuple)) or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in floors):
        raise ProfileError("tables.floors", "must be a list of numbers in [0, 1]")
    rows = _mapping(t.get("rows"), "tables.rows")
    for size, row in rows.items():
        for floor, rid in _mapping(row, f"tables.rows.{size}").items():
            if rid is not None:
                check_reduction_id(rid, f"tables.rows.{size}.{floor}")
    return MappingProxyType({"size": t["size"], "floors": list(floors), "decode_tokens": int(t.get("decode_tokens", 0)),
                             "rows": {str(k): dict(v) for k, v in rows.items()}})


def load(path: str | Path) -> Profile:
    """Read and validate a profile file; a ProfileError names the field at fault."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ProfileError("profile", f"{path} is not JSON: {exc}") from None
    return Profile.from_dict(data)


def save(profile: Profile, path: str | Path) -> Path:
    """Write `profile` as indented JSON (creating the parent directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.as_dict(), indent=2, sort_keys=False) + "\n")
    return path
