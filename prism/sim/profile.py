"""The simulator's latency profile: how long each stage's call takes, by batch and tokens.

A profile is JSON, ``"version": 1, "kind": "prism-sim-profile"``::

    {"version": 1, "kind": "prism-sim-profile",
     "model": {"name": "llava-small", "family": "llava"},
     "hardware": {"device": "cpu (2 cores)", "shared_cores": 2},
     "media": {"tokens_per_image": 197, "prompt_tokens_per_image": 196},
     "stages": {
       "encode":  {"curves": {"1": [[197, 210.0], [788, 820.0]]}, "tp_speedup": {"1": 1.0}},
       "prefill": {"curves": {"1": [[64, 80.0], [512, 520.0]], "4": [[64, 210.0], [512, 1900.0]]}},
       "decode":  {"curves": {"1": [[128, 33.0], [1024, 40.0]], "16": [[128, 75.0]]}}},
     "overheads_ms": {"queue": 1.0, "event": 1.0, "client": 2.0,
                      "embed_per_token": 0.001, "kv_per_token": 0.07},
     "sources": [{"id": "measured", "title": "prism profile on this machine", "url": "",
                  "used_for": "every stage table"}],
     "derivation": ["how the numbers were obtained, one line each"]}

Each stage maps a batch size to a curve of ``[tokens, milliseconds]`` points of ONE call on an
instance of one device (one GPU, or one CPU worker process):

* ``encode``: a tower call over a batch of requests; tokens = the media tokens of the call;
* ``prefill``: a prompt pass over a batch of requests; tokens = the longest prompt of the batch
  (rows are padded to it, as `prism.engine.prefill` runs them);
* ``decode``: one step of the continuous batch; tokens = the mean context of its sequences.

`StageTable.ms` interpolates: along tokens piecewise-linearly (below the first point: the first
point's value; above the last: the last segment's slope, never falling; one point: the same at
every token count), and between batch sizes linearly (below the smallest: the smallest's curve;
above the largest: extrapolated from the two largest, never falling). ``tp_speedup`` divides the
latency of an instance spanning that many devices with tensor parallelism (``"1": 1.0`` always).
``media.tokens_per_image``: the encoder's tokens for one image; ``prompt_tokens_per_image``: the
tokens that image adds to the LLM prompt (0 for a cross-attention model). ``overheads_ms``: a
task's hop through its stage queue (``queue``), a worker's event to the scheduler (``event``),
client to scheduler and back (``client``, half each way), the scheduler's processing of each
image before admission (``intake_per_image``), and the transfers between separate
instances per token (embeddings to prefill, KV to decode). ``hardware.shared_cores``: when set,
every instance's device is a worker process on one machine with that many cores, and calls
running at once share them (processor sharing).

`load` validates every field and names the one at fault (`SimProfileError.field`).
"""
from __future__ import annotations

import bisect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = ["KIND", "STAGES", "VERSION", "SimProfile", "SimProfileError", "StageTable", "load", "loads", "save"]

VERSION = 1
KIND = "prism-sim-profile"
STAGES = ("encode", "prefill", "decode")
OVERHEADS = ("queue", "event", "client", "intake_per_image", "embed_per_token", "kv_per_token")


class SimProfileError(ValueError):
    """A profile is invalid; `field` names the field at fault (a dotted path)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def _num(value: Any, name: str, *, lo: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SimProfileError(name, f"{value!r} is not a finite number")
    if positive and not value > 0:
        raise SimProfileError(name, f"{value!r} must be > 0")
    if lo is not None and value < lo:
        raise SimProfileError(name, f"{value!r} must be >= {lo}")
    return float(value)


def _obj(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SimProfileError(name, f"expected an object, got {type(value).__name__}")
    return value


def _key_int(key: Any, name: str) -> int:
    if not isinstance(key, str) or not key.isdigit() or int(key) < 1:
        raise SimProfileError(name, f"key {key!r} is not an integer >= 1")
    return int(key)


def _no_extra(d: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
    extra = sorted(set(d) - set(allowed))
    if extra:
        raise SimProfileError(f"{prefix}.{extra[0]}" if prefix else extra[0], "unknown field")


def _interp(xs: tuple[float, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear; below the first point its value; above the last the last slope (>= 0)."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class StageTable:
    """One stage's call latency by batch size and tokens (module docstring)."""

    curves: Mapping[int, tuple[tuple[float, float], ...]]
    """{batch: ((tokens, ms), ...)} with tokens strictly increasing."""
    tp_speedup: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({1: 1.0}))

    def __post_init__(self) -> None:
        object.__setattr__(self, "curves", MappingProxyType(dict(sorted(self.curves.items()))))
        object.__setattr__(self, "tp_speedup", MappingProxyType(dict(sorted(self.tp_speedup.items()))))
        object.__setattr__(self, "_batches", tuple(self.curves))
        object.__setattr__(self, "_xy", {b: (tuple(p[0] for p in pts), tuple(p[1] for p in pts))
                                         for b, pts in self.curves.items()})

    def _curve(self, batch: int, tokens: float) -> float:
        xs, ys = self._xy[batch]  # type: ignore[attr-defined]
        return _interp(xs, ys, tokens)

    def ms(self, batch: int, tokens: float, tp: int = 1) -> float:
        """Milliseconds of one call of `batch` requests at `tokens` on a TP-`tp` instance."""
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if tp not in self.tp_speedup:
            raise ValueError(f"no tp_speedup for tp={tp}; the profile has {sorted(self.tp_speedup)}")
        batches: tuple[int, ...] = self._batches  # type: ignore[attr-defined]
        if batch <= batches[0]:
            value = self._curve(batches[0], tokens)
        elif batch >= batches[-1]:
            value = self._curve(batches[-1], tokens)
            if len(batches) > 1 and batch > batches[-1]:
                lo, hi = batches[-2], batches[-1]
                slope = max(0.0, (value - self._curve(lo, tokens)) / (hi - lo))
                value += slope * (batch - hi)
        else:
            i = bisect.bisect_right(batches, batch)
            b0, b1 = batches[i - 1], batches[i]
            y0, y1 = self._curve(b0, tokens), self._curve(b1, tokens)
            value = y0 + (y1 - y0) * (batch - b0) / (b1 - b0)
        return value / self.tp_speedup[tp]

    def as_dict(self) -> dict:
        return {"curves": {str(b): [[t, m] for t, m in pts] for b, pts in self.curves.items()},
                "tp_speedup": {str(k): v for k, v in self.tp_speedup.items()}}

    @classmethod
    def from_dict(cls, d: Any, prefix: str) -> "StageTable":
        d = _obj(d, prefix)
        _no_extra(d, ("curves", "tp_speedup", "unit"), prefix)
        if "curves" not in d:
            raise SimProfileError(f"{prefix}.curves", "missing")
        curves_in = _obj(d["curves"], f"{prefix}.curves")
        if not curves_in:
            raise SimProfileError(f"{prefix}.curves", "needs at least one batch size")
        curves: dict[int, tuple[tuple[float, float], ...]] = {}
        for key, pts in curves_in.items():
            name = f"{prefix}.curves.{key}"
            batch = _key_int(key, name)
            if not isinstance(pts, list) or not pts:
                raise SimProfileError(name, "expected a non-empty list of [tokens, ms] points")
            out = []
            for i, p in enumerate(pts):
                if not isinstance(p, (list, tuple)) or len(p) != 2:
                    raise SimProfileError(f"{name}[{i}]", f"{p!r} is not a [tokens, ms] pair")
                tok = _num(p[0], f"{name}[{i}][0]", lo=0)
                ms = _num(p[1], f"{name}[{i}][1]", positive=True)
                if out and tok <= out[-1][0]:
                    raise SimProfileError(f"{name}[{i}][0]", "tokens must increase strictly along a curve")
                out.append((tok, ms))
            curves[batch] = tuple(out)
        tp = {1: 1.0}
        if "tp_speedup" in d:
            raw = _obj(d["tp_speedup"], f"{prefix}.tp_speedup")
            tp = {_key_int(k, f"{prefix}.tp_speedup"): _num(v, f"{prefix}.tp_speedup.{k}", positive=True)
                  for k, v in raw.items()}
            if tp.get(1) != 1.0:
                raise SimProfileError(f"{prefix}.tp_speedup.1", "must be present and 1.0")
        return cls(curves, tp)


@dataclass(frozen=True)
class SimProfile:
    """A validated profile (module docstring)."""

    model: Mapping[str, Any]
    stages: Mapping[str, StageTable]
    tokens_per_image: int
    prompt_tokens_per_image: int
    hardware: Mapping[str, Any] = field(default_factory=dict)
    overheads_ms: Mapping[str, float] = field(default_factory=dict)
    sources: tuple[Mapping[str, str], ...] = ()
    derivation: tuple[str, ...] = ()

    @property
    def shared_cores(self) -> int | None:
        cores = self.hardware.get("shared_cores")
        return None if cores is None else int(cores)

    def overhead_s(self, name: str) -> float:
        return float(self.overheads_ms.get(name, 0.0)) / 1000.0

    def latency_s(self, stage: str, batch: int, tokens: float, tp: int = 1) -> float:
        """Seconds of one `stage` call (module docstring)."""
        return self.stages[stage].ms(batch, tokens, tp) / 1000.0

    def as_dict(self) -> dict:
        return {"version": VERSION, "kind": KIND, "model": dict(self.model), "hardware": dict(self.hardware),
                "media": {"tokens_per_image": self.tokens_per_image,
                          "prompt_tokens_per_image": self.prompt_tokens_per_image},
                "stages": {s: t.as_dict() for s, t in self.stages.items()},
                "overheads_ms": dict(self.overheads_ms), "sources": [dict(s) for s in self.sources],
                "derivation": list(self.derivation)}


def from_dict(doc: Any) -> SimProfile:
    """Validates a parsed profile document; raises SimProfileError naming the field."""
    doc = _obj(doc, "profile")
    _no_extra(doc, ("version", "kind", "model", "hardware", "media", "stages", "overheads_ms", "sources",
                    "derivation"), "")
    if doc.get("version") != VERSION:
        raise SimProfileError("version", f"{doc.get('version')!r} is not a supported version ({VERSION})")
    if doc.get("kind") != KIND:
        raise SimProfileError("kind", f"{doc.get('kind')!r} is not {KIND!r}")
    model = _obj(doc.get("model"), "model")
    if not isinstance(model.get("name"), str) or not model["name"]:
        raise SimProfileError("model.name", "missing or not a non-empty string")
    hardware = _obj(doc.get("hardware", {}), "hardware")
    cores = hardware.get("shared_cores")
    if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise SimProfileError("hardware.shared_cores", f"{cores!r} is not null or an integer >= 1")
    media = _obj(doc.get("media"), "media")
    _no_extra(media, ("tokens_per_image", "prompt_tokens_per_image"), "media")
    per_image = {}
    for key in ("tokens_per_image", "prompt_tokens_per_image"):
        v = media.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise SimProfileError(f"media.{key}", f"{v!r} is not an integer >= 0")
        per_image[key] = v
    stages_in = _obj(doc.get("stages"), "stages")
    _no_extra(stages_in, STAGES, "stages")
    stages = {}
    for s in STAGES:
        if s not in stages_in:
            raise SimProfileError(f"stages.{s}", "missing")
        stages[s] = StageTable.from_dict(stages_in[s], f"stages.{s}")
    over_in = _obj(doc.get("overheads_ms", {}), "overheads_ms")
    _no_extra(over_in, OVERHEADS, "overheads_ms")
    overheads = {k: _num(v, f"overheads_ms.{k}", lo=0) for k, v in over_in.items()}
    sources = doc.get("sources")
    if not isinstance(sources, list) or not sources:
        raise SimProfileError("sources", "a profile must say where its numbers come from (a non-empty list)")
    for i, src in enumerate(sources):
        src = _obj(src, f"sources[{i}]")
        for key in ("id", "title", "used_for"):
            if not isinstance(src.get(key), str) or not src[key]:
                raise SimProfileError(f"sources[{i}].{key}", "missing or not a non-empty string")
    derivation = doc.get("derivation", [])
    if not isinstance(derivation, list) or not all(isinstance(x, str) for x in derivation):
        raise SimProfileError("derivation", "expected a list of strings")
    return SimProfile(model=MappingProxyType(dict(model)), stages=MappingProxyType(stages),
                      tokens_per_image=per_image["tokens_per_image"],
                      prompt_tokens_per_image=per_image["prompt_tokens_per_image"],
                      hardware=MappingProxyType(dict(hardware)), overheads_ms=MappingProxyType(overheads),
                      sources=tuple(MappingProxyType(dict(s)) for s in sources), derivation=tuple(derivation))


def loads(text: str) -> SimProfile:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SimProfileError("profile", f"not JSON: {exc}") from None
    return from_dict(doc)


def load(path: str | Path) -> SimProfile:
    """Reads and validates a profile file (a bare name is looked up among the shipped ones)."""
    p = Path(path)
    if not p.exists() and p.parent == Path("."):
        shipped = Path(__file__).parent / "profiles" / (p.name if p.suffix else f"{p.name}.json")
        if shipped.exists():
            p = shipped
    return loads(p.read_text())


def save(profile: SimProfile, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    from_dict(profile.as_dict())  # never write what would not load
    p.write_text(json.dumps(profile.as_dict(), indent=1) + "\n")
    return p
