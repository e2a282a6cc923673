"""The offline profiler of deadline-driven modality selection (prism/profiling) on the tiny
checkpoints: accuracies per reduction on an eval set whose answers are what Prism's engines
generate on the full inputs, stage costs per batch size, the profile file's validation and
round trip, the strategies it feeds the scheduler's selection, and ``prism profile``."""
from __future__ import annotations

import copy
import json
from fractions import Fraction

import pytest
from typer.testing import CliRunner

from prism.cli import app
from prism.models.base import IMAGE
from prism.models.reduce import FULL, Allowed, candidates, cost
from prism.profiling.accuracy import (
    EvalError, default_max_new_tokens, engine_output, evaluate, load_accuracy_file, load_eval, parse_allow,
)
from prism.profiling.cost import CostSettings, measure_costs
from prism.profiling.engines import Engines
from prism.profiling.profile import build_profile, summary_tables
from prism.profiling.schema import STAGES, AccuracyEntry, ModelInfo, Profile, ProfileError, StageCost, load, save
from tests.conftest import png_bytes, random_image

N_NEW = 6
FAST = CostSettings(batch_sizes=(1, 2, 3), image_side=32, prompt_tokens=12, decode_context=10, warmup=0, repeats=2)
ALL = parse_allow("all")

#: (prompt or question, image count, raw prompt?, match)
SPECS = [
    ("describe the picture", 2, False, "exact"),
    ("what is different between these", 2, False, "contains"),
    ("<image>what colour is it", 1, True, "contains"),
    ("compare them please", 2, True, "exact"),  # raw, no placeholders: put first, as the intake does
    ("count the things", 1, False, "contains"),
]


@pytest.fixture(scope="module")
def llava(tiny_models) -> Engines:
    return Engines(tiny_models["llava"])


def _line(spec, i: int, answer: str | None) -> dict:
    text, n_images, raw, match = spec
    images = [f"img{i}_{j}.png" for j in range(n_images)]
    if raw:
        d = {"prompt": text, "images": images}
    else:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        d = {"messages": [{"role": "user", "content": content}], "images": images}
    d["match"] = match
    if answer is not None:
        d["answer"] = answer
    return d


def _write_eval(tmp_path, specs, answers=None, name="eval.jsonl"):
    for i, (_, n_images, _, _) in enumerate(specs):
        for j in range(n_images):
            (tmp_path / f"img{i}_{j}.png").write_bytes(png_bytes(100 * i + j, 48 + 16 * j, 64))
    path = tmp_path / name
    rows = [_line(s, i, None if answers is None else answers[i]) for i, s in enumerate(specs)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def eval_set(llava, tmp_path_factory):
    """An eval set whose answers are Prism's own greedy outputs on the full inputs."""
    tmp = tmp_path_factory.mktemp("eval")
    bare = load_eval(_write_eval(tmp, SPECS, name="bare.jsonl"), llava.adapter, llava.processor,
                     require_answer=False)
    answers = [engine_output(llava, ex, N_NEW, FULL) for ex in bare]
    assert all(a.strip() for a in answers), answers
    return _write_eval(tmp, SPECS, answers), answers


def _norm(s: str) -> str:
    return s.strip().lower()


def test_eval_accuracy_is_exact_per_reduction(llava, eval_set):
    path, answers = eval_set
    examples = load_eval(path, llava.adapter, llava.processor)
    assert [len(e.media) for e in examples] == [s[1] for s in SPECS]
    result = evaluate(llava, examples, ALL, max_new_tokens=N_NEW)
    # independently: every candidate of every example, through the engines, scored by hand
    hits: dict[str, list[bool]] = {}
    for ex, answer, spec in zip(examples, answers, SPECS):
        for r in candidates(llava.adapter, llava.processor, ex.media, Allowed(
                drop_modalities=frozenset({IMAGE}), drop_images=True)):
            out = engine_output(llava, ex, N_NEW, r)
            ok = _norm(out) == _norm(answer) if spec[3] == "exact" else _norm(answer) in _norm(out)
            hits.setdefault(r.id, []).append(ok)
    want = {rid: Fraction(sum(v), len(v)) for rid, v in hits.items()}
    assert set(result.accuracy) == set(want) == {"full", "drop_images:1", "drop:image"}
    for rid, entry in result.accuracy.items():
        assert Fraction(entry.accuracy).limit_denominator(100) == want[rid]
        assert entry.accuracy == float(want[rid]) and entry.n == len(hits[rid])
    assert result.accuracy["full"] == AccuracyEntry(1.0, len(SPECS))
    assert result.accuracy["drop_images:1"].n == 3 and result.accuracy["drop:image"].n == len(SPECS)
    assert any(e.accuracy < 1.0 for rid, e in result.accuracy.items() if rid != "full")
    assert result.max_new_tokens == N_NEW and len(result.results) == sum(result.offered.values())
    # only what --allow permits is scored
    only_drop = evaluate(llava, examples[:2], parse_allow("drop_images"), max_new_tokens=N_NEW)
    assert set(only_drop.accuracy) == {"full", "drop_images:1"}


def test_default_max_new_tokens_is_longest_answer_plus_margin(llava, eval_set):
    path, answers = eval_set
    examples = load_eval(path, llava.adapter, llava.processor)
    longest = max(len(llava.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    assert default_max_new_tokens(llava, examples) == longest + 4
    assert default_max_new_tokens(llava, examples, margin=0) == longest


def test_costs_cover_every_batch_size(llava):
    costs = measure_costs(llava, FAST)
    assert set(costs) == set(STAGES)
    for stage in STAGES:
        assert sorted(costs[stage]) == [1, 2, 3]
        for b, c in costs[stage].items():
            assert c.ms_per_token > 0 and c.ms_per_call > 0 and c.samples == FAST.repeats
            assert c.ms_per_token == pytest.approx(c.ms_per_call / c.tokens_per_call)
    assert [costs["encode"][b].tokens_per_call for b in (1, 2, 3)] == [64, 128, 192]  # 64 tokens an image
    assert [costs["prefill"][b].tokens_per_call for b in (1, 2, 3)] == [12, 24, 36]
    assert [costs["decode"][b].tokens_per_call for b in (1, 2, 3)] == [1, 2, 3]  # a call is one step


@pytest.fixture(scope="module")
def profile(llava, eval_set, tiny_models):
    path, _ = eval_set
    return build_profile(tiny_models["llava"], eval_path=path, settings=FAST, max_new_tokens=N_NEW,
                         engines=llava)


def test_profile_round_trips(profile, tmp_path, eval_set):
    assert profile.model == ModelInfo("llava", "llava", "float32", "cpu")
    assert profile.accuracy["full"].accuracy == 1.0
    assert profile.source.kind == "eval" and profile.source.examples == len(SPECS)
    assert profile.source.max_new_tokens == N_NEW and profile.source.allow == "all"
    import hashlib
    assert profile.source.sha256 == hashlib.sha256(eval_set[0].read_bytes()).hexdigest()
    out = save(profile, tmp_path / "sub" / "p.json")
    back = load(out)
    assert back == profile and back.as_dict() == profile.as_dict()
    raw = json.loads(out.read_text())
    assert raw["version"] == 1 and set(raw["costs"]["decode"]) == {"1", "2", "3"}
    assert len(summary_tables(profile)) == 3  # costs, accuracy, strategy table


def _bad(d: dict, tmp_path, want_field: str):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError) as err:
        load(path)
    assert err.value.field == want_field, str(err.value)
    assert want_field in str(err.value)


def test_load_rejects_bad_profiles_naming_the_field(profile, tmp_path):
    good = profile.as_dict()

    def edit(fn):
        d = copy.deepcopy(good)
        fn(d)
        return d

    _bad(edit(lambda d: d.update(version=2)), tmp_path, "version")
    _bad(edit(lambda d: d.pop("version")), tmp_path, "version")
    _bad(edit(lambda d: d["model"].pop("family")), tmp_path, "model.family")
    _bad(edit(lambda d: d["model"].update(dtype="")), tmp_path, "model.dtype")
    _bad(edit(lambda d: d["costs"].pop("decode")), tmp_path, "costs.decode")
    _bad(edit(lambda d: d["costs"]["encode"]["2"].pop("ms_per_token")), tmp_path, "costs.encode.2.ms_per_token")
    _bad(edit(lambda d: d["costs"]["prefill"]["1"].update(ms_per_call=-1.0)), tmp_path, "costs.prefill.1.ms_per_call")
    _bad(edit(lambda d: d["costs"]["decode"].update({"x": d["costs"]["decode"]["1"]})), tmp_path, "costs.decode.x")
    _bad(edit(lambda d: d["costs"].update(vision={})), tmp_path, "costs.vision")
    _bad(edit(lambda d: d["accuracy"]["full"].update(accuracy=1.5)), tmp_path, "accuracy.full.accuracy")
    _bad(edit(lambda d: d["accuracy"]["drop:image"].pop("accuracy")), tmp_path, "accuracy.drop:image.accuracy")
    _bad(edit(lambda d: d["accuracy"].update({"pixels:0.5": {"accuracy": 0.5, "n": 1}})), tmp_path,
         "accuracy.pixels:0.5")
    _bad(edit(lambda d: d["accuracy"].pop("full")), tmp_path, "accuracy.full")
    _bad(edit(lambda d: d["source"].update(sha256="abc")), tmp_path, "source.sha256")
    _bad(edit(lambda d: d["source"].update(kind="guess")), tmp_path, "source.kind")
    _bad(edit(lambda d: d.pop("settings")), tmp_path, "settings")
    _bad(edit(lambda d: d.update(extra=1)), tmp_path, "extra")
    (tmp_path / "nojson.json").write_text("{")
    with pytest.raises(ProfileError):
        load(tmp_path / "nojson.json")
    with pytest.raises(ProfileError) as err:
        StageCost(0.0, 1.0, 1, 1)
    assert err.value.field == "ms_per_token"


def test_strategies_for_offers_only_reductions_with_accuracy(llava):
    stage = {b: StageCost(0.5, 0.5 * b, b, 1) for b in (1, 4)}
    prof = Profile(ModelInfo("m", "llava", "float32", "cpu"), {s: stage for s in STAGES},
                   {"full": AccuracyEntry(0.9, 10), "drop_images:1": AccuracyEntry(0.6, 10),
                    "drop_images:5": AccuracyEntry(0.1, 10)})
    media = [(IMAGE, random_image(i, 48 + 8 * i, 64)) for i in range(3)]
    msgs = [{"role": "user", "content": [{"type": IMAGE}] * 3 + [{"type": "text", "text": "what is this"}]}]
    cands = candidates(llava.adapter, llava.processor, media, ALL)
    assert [r.id for r in cands] == ["full", "drop_images:1", "drop_images:2", "drop:image"]
    costs = [cost(llava.adapter, llava.processor, msgs, media, r) for r in cands]
    got = prof.strategies_for(costs, decode_tokens=16)
    assert [s.id for s in got] == ["full", "drop_images:1"]
    assert [s.accuracy for s in got] == [0.9, 0.6]
    assert [s.encode_tokens for s in got] == [192, 128]
    assert [s.prefill_tokens for s in got] == [costs[0]["prompt_tokens"], costs[1]["prompt_tokens"]]
    assert costs[0]["prompt_tokens"] - costs[1]["prompt_tokens"] >= 64  # an image and its template text
    assert all(s.decode_tokens == 16 and s.work_s is None for s in got)
    timed = prof.strategies_for(costs, decode_tokens=16, batch=3)  # nearest measured batch: 4
    assert timed[0].work_s["encode"] == pytest.approx(192 * 0.5 / 1000)
    assert timed[0].work_s["decode"] == pytest.approx(16 * 0.5 / 1000)
    assert Profile(ModelInfo("m", "llava", "float32", "cpu"), {}).strategies_for(costs) == []
    from services.scheduler.core.selection import Strategy
    assert all(isinstance(s, Strategy) for s in got)


def test_accuracy_file(llava, tiny_models, tmp_path):
    good = tmp_path / "acc.json"
    good.write_text(json.dumps({"full": 0.8, "drop_images:1": {"accuracy": 0.7, "n": 50}, "drop:image": 0.3}))
    acc = load_accuracy_file(good)
    assert acc == {"full": AccuracyEntry(0.8), "drop_images:1": AccuracyEntry(0.7, 50), "drop:image": AccuracyEntry(0.3)}
    prof = build_profile(tiny_models["llava"], accuracy_file=good, settings=CostSettings(
        batch_sizes=(1,), image_side=32, prompt_tokens=8, decode_context=8, warmup=0, repeats=1), engines=llava)
    assert prof.source.kind == "file" and prof.source.examples is None and dict(prof.accuracy) == acc
    _check_tables(prof, llava)
    for bad, field in (({"drop:image": 0.3}, "acc.json.full"), ({"full": 1.2}, "acc.json.full.accuracy"),
                       ({"full": 0.5, "bogus": 0.1}, "acc.json.bogus"), ({"full": "high"}, "acc.json.full.accuracy")):
        good.write_text(json.dumps(bad))
        with pytest.raises(EvalError) as err:
            load_accuracy_file(good)
        assert err.value.field == field, str(err.value)


def test_eval_set_errors_name_the_line_and_field(llava, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    cases = [
        ({"prompt": "<image><image>hi", "images": ["a.png"], "answer": "x"}, "e.jsonl:1.prompt"),
        ({"prompt": "hi", "answer": "x", "match": "fuzzy"}, "e.jsonl:1.match"),
        ({"prompt": "hi"}, "e.jsonl:1.answer"),
        ({"prompt": "hi", "images": ["missing.png"], "answer": "x"}, "e.jsonl:1.images[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}], "answer": "x"}, "e.jsonl:1.messages[0].content[0]"),
        ({"prompt": "hi", "audios": ["a.png"], "answer": "x"}, "e.jsonl:1.audios"),  # llava takes no audio
        ({"prompt": "hi", "messages": [], "answer": "x"}, "e.jsonl:1"),
        ({"prompt": "hi", "answer": "x", "extra": 1}, "e.jsonl:1.extra"),
    ]
    for row, field in cases:
        (tmp_path / "e.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(EvalError) as err:
            load_eval(tmp_path / "e.jsonl", llava.adapter, llava.processor)
        assert err.value.field == field, str(err.value)
    with pytest.raises(ValueError):
        parse_allow("shrink_everything")
    assert parse_allow("none") == Allowed.none()
    assert parse_allow("drop:image,drop_images") == Allowed(drop_modalities=frozenset({IMAGE}), drop_images=True)


def test_cli_profile_end_to_end(tiny_models, eval_set, tmp_path):
    path, _ = eval_set
    out = tmp_path / "profile.json"
    runner = CliRunner()
    args = ["profile", "--model", str(tiny_models["llava"]), "--eval", str(path), "--batch-sizes", "1,2",
            "--out", str(out), "--max-new-tokens", str(N_NEW), "--image-side", "32", "--prompt-tokens", "8",
            "--decode-context", "8", "--repeats", "1", "--warmup", "0"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "stage costs" in res.output and "drop_images:1" in res.output and f"wrote {out}" in res.output
    prof = load(out)
    assert prof.accuracy["full"].accuracy == 1.0 and prof.batch_sizes("decode") == [1, 2]
    bad = runner.invoke(app, ["profile", "--model", str(tiny_models["llava"]), "--batch-sizes", "1,x"])
    assert bad.exit_code != 0 and "--batch-sizes" in bad.output
    both = runner.invoke(app, ["profile", "--model", str(tiny_models["llava"]), "--eval", str(path),
                               "--accuracy-file", str(path)])
    assert both.exit_code != 0


def test_qwen2_vl_downscale_accuracy(tiny_models, tmp_path):
    engines = Engines(tiny_models["qwen2-vl"])
    (tmp_path / "a.png").write_bytes(png_bytes(3, 96, 96))
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}],
           "images": ["a.png"]}
    (tmp_path / "bare.jsonl").write_text(json.dumps(row) + "\n")
    ex = load_eval(tmp_path / "bare.jsonl", engines.adapter, engines.processor, require_answer=False)[0]
    answer = engine_output(engines, ex, N_NEW)
    assert answer.strip()
    (tmp_path / "e.jsonl").write_text(json.dumps({**row, "answer": answer, "match": "exact"}) + "\n")
    examples = load_eval(tmp_path / "e.jsonl", engines.adapter, engines.processor)
    result = evaluate(engines, examples, parse_allow("downscale_images"), max_new_tokens=N_NEW)
    ids = [r.id for r in candidates(engines.adapter, engines.processor, ex.media, parse_allow("downscale_images"))]
    assert list(result.accuracy) == ids and ids[0] == "full" and ids[1].startswith("image_scale:")
    assert result.accuracy["full"] == AccuracyEntry(1.0, 1)
    for rid in ids[1:]:
        want = _norm(engine_output(engines, ex, N_NEW, next(
            r for r in candidates(engines.adapter, engines.processor, ex.media, ALL) if r.id == rid))) == _norm(answer)
        assert result.accuracy[rid] == AccuracyEntry(float(want), 1)


def _check_tables(prof, engines):
    """The offline table equals exhaustive search: for each size (images) and floor, the least
    work strategy (profiled ms per token at batch 1) among the candidates at or above the floor."""
    import dataclasses

    from prism.models.reduce import candidates, cost
    from prism.profiling.tables import _EVERYTHING, _media, build_tables

    t = prof.tables
    assert t["size"] == "images" and t["floors"] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert list(t["rows"]) == [str(k) for k in range(1, 9)]
    adapter, processor = engines.adapter, engines.processor
    for size in (1, 2, 3):
        media = _media(adapter, processor, size, prof.settings["image_side"], prof.settings["seed"])
        text = " ".join(adapter.media_placeholder(m) for m, _ in media) + " Describe it."
        strategies = prof.strategies_for([cost(adapter, processor, text, media, r)
                                          for r in candidates(adapter, processor, media, _EVERYTHING)],
                                         t["decode_tokens"], batch=1)
        for floor in t["floors"]:
            ok = [s for s in strategies if s.accuracy >= floor]
            best = min(ok, key=lambda s: (s.seconds(), -s.accuracy)).id if ok else None
            assert t["rows"][str(size)][f"{floor:g}"] == best, (size, floor)
    assert t["rows"]["1"]["1"] is None and t["rows"]["1"]["0.8"] == "full"  # full scores 0.8 here
    # drop_images:2 has no accuracy here: not offered
    assert [t["rows"]["3"][f] for f in ("0.5", "0.7", "0.8", "0.9")] == ["drop_images:1", "drop_images:1", "full", None]
    assert build_tables(dataclasses.replace(prof, accuracy={}), adapter, processor) == {}
