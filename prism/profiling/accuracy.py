"""Accuracy per reduction id, measured on an eval set through Prism's own cores (or read from a
user-supplied accuracy file).

An eval set is JSONL, one example a line::

    {"prompt": "<image>What colour is the car?", "images": ["car.png"], "answer": "red"}
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which animal?"}]}],
     "images": ["cat.png"], "answer": "cat", "match": "exact"}

* ``prompt`` is a raw prompt, taken as the intake takes one: one
  ``adapter.media_placeholder(modality)`` per media item, or none (the placeholders are then
  put first, images before audio); ``messages`` is a chat whose media parts
  (``{"type": "image" | "audio"}``) take the example's ``images`` / ``audios`` in order and are
  rendered with the processor's chat template;
* ``images`` / ``audios`` are paths relative to the JSONL file (images in any format Prism
  decodes, audio as WAV, resampled to the processor's rate);
* ``answer`` is what a correct output holds; ``match`` is ``"contains"`` (default) or
  ``"exact"``, both case-insensitive on stripped text.

For every example, every reduction the family offers for its media within ``allowed``
(``reduce.candidates``, "full" first) is served greedily (encode, prefill into a decode slot,
decode; one request at a time, so an output does not depend on what else is in the eval set)
and scored. A reduction id's accuracy is over the examples it was offered for (ids are concrete:
``drop_images:2`` exists only for examples of three or more images).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from prism.models.base import AUDIO, IMAGE, InputError
from prism.models.reduce import FULL, Allowed, Reduction, candidates, prepare_reduced
from prism.profiling.engines import Engines
from prism.profiling.schema import AccuracyEntry, ProfileError, check_reduction_id

__all__ = [
    "MATCHES", "EvalError", "Example", "ExampleResult", "EvalResult", "parse_allow", "load_eval",
    "matches", "default_max_new_tokens", "engine_output", "evaluate", "load_accuracy_file", "file_sha256",
]

MATCHES = ("contains", "exact")
DEFAULT_MARGIN = 4
_ALLOW_WORDS = ("drop_images", "downscale_images", "trim_audio", "drop:image", "drop:audio", "drop_modality")


class EvalError(ValueError):
    """An eval set or accuracy file is unusable; `field` names the place (``file:line.field``)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def parse_allow(spec: str) -> Allowed:
    """`--allow`: ``all``, ``none``, or a comma list of drop_images, downscale_images, trim_audio,
    drop:image, drop:audio, drop_modality (= both drop:)."""
    words = [w.strip() for w in spec.split(",") if w.strip()]
    if words == ["none"]:
        return Allowed.none()
    if words == ["all"]:
        words = list(_ALLOW_WORDS)
    bad = [w for w in words if w not in _ALLOW_WORDS]
    if bad or not words:
        raise ValueError(f"--allow {spec!r}: use all, none or a comma list of {', '.join(_ALLOW_WORDS)}")
    drop = {m for m in (IMAGE, AUDIO) if f"drop:{m}" in words or "drop_modality" in words}
    return Allowed(drop_modalities=frozenset(drop), drop_images="drop_images" in words,
                   downscale_images="downscale_images" in words, trim_audio="trim_audio" in words)


@dataclass(frozen=True)
class Example:
    """One eval example: `text` a raw prompt (placeholders in) or chat messages, `media` its
    decoded media in request order, as ``reduce`` takes them."""

    line: int
    text: str | tuple[Mapping[str, Any], ...]
    media: tuple[tuple[str, Any], ...]
    answer: str | None = None
    match: str = "contains"

    @property
    def modalities(self) -> list[str]:
        return [m for m, _ in self.media]


def _load_media(paths: Any, modality: str, base: Path, engines_like: Any, where: str) -> list[Any]:
    from prism.media import MediaLimits, decode_image, decode_wav

    key = "images" if modality == IMAGE else "audios"
    if paths is None:
        return []
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise EvalError(f"{where}.{key}", "must be a list of file paths")
    out = []
    for i, rel in enumerate(paths):
        name = f"{where}.{key}[{i}]"
        path = base / rel
        if not path.is_file():
            raise EvalError(name, f"{path} is not a file")
        data = path.read_bytes()
        try:
            if modality == IMAGE:
                out.append(decode_image(data, name, MediaLimits()))
            else:
                adapter, processor = engines_like
                out.append(decode_wav(data, name, adapter.audio_sampling_rate(processor), MediaLimits()))
        except InputError as exc:
            raise EvalError(name, exc.reason) from None
    return out


def _raw_order(adapter: Any, prompt: str, images: list, audios: list, where: str) -> tuple[str, list]:
    marks = {m: adapter.media_placeholder(m) for m, vals in ((IMAGE, images), (AUDIO, audios)) if vals}
    counts = {m: prompt.count(mark) for m, mark in marks.items()}
    if all(n == 0 for n in counts.values()):
        media = [(IMAGE, v) for v in images] + [(AUDIO, v) for v in audios]
        return "".join(marks[m] for m, _ in media) + prompt, media
    want = {IMAGE: len(images), AUDIO: len(audios)}
    for m, n in counts.items():
        if n != want[m]:
            raise EvalError(f"{where}.prompt", f"has {n} {m} placeholders ({marks[m]!r}) for {want[m]} {m} files")
    starts = []
    for m, mark in marks.items():
        at = prompt.find(mark)
        while at >= 0:
            starts.append((at, m))
            at = prompt.find(mark, at + len(mark))
    values = {IMAGE: iter(images), AUDIO: iter(audios)}
    return prompt, [(m, next(values[m])) for _, m in sorted(starts)]


def _chat(messages: Any, images: list, audios: list, where: str) -> tuple[tuple[dict, ...], list]:
    if not isinstance(messages, list) or not messages:
        raise EvalError(f"{where}.messages", "must be a non-empty list of chat messages")
    values = {IMAGE: list(images), AUDIO: list(audios)}
    used = {IMAGE: 0, AUDIO: 0}
    out, media = [], []
    for m, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise EvalError(f"{where}.messages[{m}]", "must be an object with a role")
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for c, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in (IMAGE, AUDIO):
                    if used[kind] >= len(values[kind]):
                        raise EvalError(f"{where}.messages[{m}].content[{c}]",
                                        f"more {kind} parts than {'images' if kind == IMAGE else 'audios'} files")
                    media.append((kind, values[kind][used[kind]]))
                    used[kind] += 1
                    parts.append({"type": kind})
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise EvalError(f"{where}.messages[{m}].content[{c}]", "must be a text, image or audio part")
            out.append({**msg, "content": parts})
        elif isinstance(content, str):
            out.append(dict(msg))
        else:
            raise EvalError(f"{where}.messages[{m}].content", "must be a string or a list of parts")
    for kind, vals in values.items():
        if used[kind] != len(vals):
            raise EvalError(f"{where}.{'images' if kind == IMAGE else 'audios'}",
                            f"{len(vals)} files for {used[kind]} {kind} parts in the messages")
    return tuple(out), media


def load_eval(path: str | Path, adapter: Any, processor: Any, *, require_answer: bool = True) -> list[Example]:
    """The examples of a JSONL eval set, media decoded (see the module docstring)."""
    path = Path(path)
    base = path.parent
    examples = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise EvalError(where, f"not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise EvalError(where, "must be a JSON object")
        extra = sorted(set(d) - {"prompt", "messages", "images", "audios", "answer", "match"})
        if extra:
            raise EvalError(f"{where}.{extra[0]}", "unknown field")
        if ("prompt" in d) == ("messages" in d):
            raise EvalError(where, "needs exactly one of prompt or messages")
        for modality, key in ((IMAGE, "images"), (AUDIO, "audios")):
            if d.get(key) and modality not in adapter.modalities:
                raise EvalError(f"{where}.{key}", f"{adapter.family} takes no {modality}")
        images = _load_media(d.get("images"), IMAGE, base, (adapter, processor), where)
        audios = _load_media(d.get("audios"), AUDIO, base, (adapter, processor), where)
        if "prompt" in d:
            if not isinstance(d["prompt"], str):
                raise EvalError(f"{where}.prompt", "must be a string")
            text, media = _raw_order(adapter, d["prompt"], images, audios, where)
        else:
            text, media = _chat(d["messages"], images, audios, where)
        answer = d.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise EvalError(f"{where}.answer", "must be a string")
        if require_answer and not (answer or "").strip():
            raise EvalError(f"{where}.answer", "missing or empty: an example needs the answer to score")
        match = d.get("match", "contains")
        if match not in MATCHES:
            raise EvalError(f"{where}.match", f"{match!r} is not one of {list(MATCHES)}")
        examples.append(Example(n, text, tuple(media), answer, match))
    if not examples:
        raise EvalError(path.name, "no examples")
    return examples


def matches(output: str, answer: str, match: str = "contains") -> bool:
    """Whether `output` answers `answer`: case-insensitive, on stripped text."""
    out, want = output.strip().lower(), answer.strip().lower()
    if match == "exact":
        return out == want
    if match == "contains":
        return want in out
    raise ValueError(f"match {match!r} is not one of {list(MATCHES)}")


def default_max_new_tokens(engines: Engines, examples: Sequence[Example], margin: int = DEFAULT_MARGIN) -> int:
    """Tokens of the longest answer plus `margin`."""
    tok = engines.tokenizer
    longest = max((len(tok(e.answer or "", add_special_tokens=False)["input_ids"]) for e in examples), default=0)
    return max(1, longest + margin)


def engine_output(engines: Engines, example: Example, max_new_tokens: int, reduction: Reduction = FULL) -> str:
    """The text Prism's cores generate greedily for `example` under `reduction`."""
    req = prepare_reduced(engines.adapter, engines.processor,
                          example.text if isinstance(example.text, str) else list(example.text),
                          example.media, reduction)
    return engines.decode_text(engines.generate(req.prompt, max_new_tokens))


@dataclass(frozen=True)
class ExampleResult:
    line: int
    reduction: str
    output: str
    correct: bool


@dataclass(frozen=True)
class EvalResult:
    accuracy: dict[str, AccuracyEntry]
    results: tuple[ExampleResult, ...]
    max_new_tokens: int
    examples: int = 0
    #: reduction id -> examples it was offered for, in eval order
    offered: dict[str, int] = field(default_factory=dict)


def evaluate(engines: Engines, examples: Sequence[Example], allowed: Allowed, *,
             max_new_tokens: int | None = None, margin: int = DEFAULT_MARGIN) -> EvalResult:
    """Score every candidate reduction of every example (see the module docstring)."""
    if any(e.answer is None for e in examples):
        raise ValueError("every example needs an answer to be scored")
    n_new = max_new_tokens or default_max_new_tokens(engines, examples, margin)
    results = []
    hits: dict[str, list[bool]] = {}
    for ex in examples:
        for reduction in candidates(engines.adapter, engines.processor, ex.media, allowed):
            output = engine_output(engines, ex, n_new, reduction)
            ok = matches(output, ex.answer or "", ex.match)
            results.append(ExampleResult(ex.line, reduction.id, output, ok))
            hits.setdefault(reduction.id, []).append(ok)
    accuracy = {rid: AccuracyEntry(sum(v) / len(v), len(v)) for rid, v in hits.items()}
    return EvalResult(accuracy, tuple(results), n_new, len(examples), {rid: len(v) for rid, v in hits.items()})


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_accuracy_file(path: str | Path) -> dict[str, AccuracyEntry]:
    """A user-supplied accuracy file: JSON ``{reduction_id: accuracy}`` (or ``{reduction_id:
    {"accuracy": a, "n": k}}``), e.g. published per-modality results. It must hold "full"."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EvalError(path.name, f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise EvalError(path.name, "must be a non-empty JSON object {reduction_id: accuracy}")
    out = {}
    for rid, value in data.items():
        try:
            check_reduction_id(rid, rid)
            if isinstance(value, dict):
                out[rid] = AccuracyEntry.from_dict(value, rid)
            else:
                out[rid] = AccuracyEntry.from_dict({"accuracy": value}, rid)
        except ProfileError as exc:
            raise EvalError(f"{path.name}.{exc.field}", exc.reason) from None
    if "full" not in out:
        raise EvalError(f"{path.name}.full", "missing: the accuracy of the full input is required")
    return out
