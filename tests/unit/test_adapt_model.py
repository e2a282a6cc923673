"""Adaptation's data types: the latency model (points, interpolation, Sponge's fit), profiles from
``prism profile`` files, and the dynamic-SLO helpers."""
from __future__ import annotations

import json
import math

import pytest

from prism.profiling.schema import AccuracyEntry, ModelInfo, Profile, StageCost, save
from services.scheduler.core.adapt import (
    Bounds,
    LatencyModel,
    PipelineConfig,
    StageChoice,
    VariantProfile,
    Weights,
    batch_for_budget,
    batch_wait_ms,
    budget_order_key,
    from_prism_profile,
    load_profile,
    remaining_budget_ms,
    stage_latency_ms,
)


def test_measured_points_and_interpolation():
    m = LatencyModel({2: {1: 10.0, 4: 40.0, 8: 60.0}})
    assert m.latency_ms(1, 2) == 10.0 and m.latency_ms(8, 2) == 60.0
    assert m.latency_ms(2, 2) == pytest.approx(20.0)  # between 1 and 4
    assert m.latency_ms(6, 2) == pytest.approx(50.0)  # between 4 and 8


def test_sponge_fit_recovers_the_parameters():
    m = LatencyModel.parametric(3.0, 12.0, 2.0, cores=(1, 2, 4), batches=(1, 2, 8))
    assert (m.alpha, m.beta, m.gamma) == pytest.approx((3.0, 12.0, 2.0))
    assert m.latency_ms(5, 3) == pytest.approx((3 * 5 + 12) / 3 + 2)  # unmeasured cores: the model
    assert m.latency_ms(16, 4) == pytest.approx((3 * 16 + 12) / 4 + 2)  # beyond the measured batches


def test_one_core_count_takes_the_serial_fraction():
    m = LatencyModel({2: {1: 20.0, 4: 50.0}}, serial_fraction=0.25)  # gamma = 5 ms
    assert m.gamma == pytest.approx(5.0)
    assert (m.alpha, m.beta) == pytest.approx((20.0, 10.0))  # (alpha b + beta)/2 + 5 through both points
    assert m.latency_ms(1, 4) == pytest.approx(30 / 4 + 5)
    assert LatencyModel({1: {1: 8.0}}).latency_ms(1, 4) == pytest.approx(2.0)  # default: all work scales


@pytest.mark.parametrize("table, match", [({}, "no measured"), ({0: {1: 1.0}}, "cores"), ({1: {0: 1.0}}, "batch"),
                                          ({1: {1: -1.0}}, "finite"), ({1: {}}, "no batch")])
def test_bad_tables_name_the_fault(table, match):
    with pytest.raises(ValueError, match=match):
        LatencyModel(table)


def test_variant_validation():
    lat = LatencyModel({1: {1: 1.0}})
    with pytest.raises(ValueError, match="stage"):
        VariantProfile("a", "vision", 0.5, lat)
    with pytest.raises(ValueError, match="accuracy"):
        VariantProfile("a", "encode", 1.5, lat)
    v = VariantProfile("a", "encode", 0.5, lat)
    assert VariantProfile.from_dict(json.loads(json.dumps(v.as_dict()))) == v


def prism_profile() -> Profile:
    costs = {s: {b: StageCost(ms_per_token=ms / (b * 10), ms_per_call=ms, tokens_per_call=b * 10, samples=3)
                 for b, ms in ((1, base), (4, base * 2.5))} for s, base in (("encode", 200.0), ("prefill", 100.0),
                                                                             ("decode", 30.0))}
    return Profile(ModelInfo("tiny", "llava", "bfloat16", "cpu"), costs,
                   accuracy={"full": AccuracyEntry(0.8, 40), "drop_images:1": AccuracyEntry(0.6, 40)})


def test_from_prism_profile():
    v = from_prism_profile(prism_profile(), "decode", cores=2, calls_per_request=16)
    assert (v.name, v.stage, v.accuracy) == ("tiny/bfloat16", "decode", 0.8)
    assert v.latency_ms(1, 2) == pytest.approx(16 * 30.0) and v.latency_ms(4, 2) == pytest.approx(16 * 75.0)
    assert v.latency_ms(1, 4) == pytest.approx(16 * 30.0 / 2)  # linear speed-up from the measured 2 cores
    assert from_prism_profile(prism_profile(), "encode", reduction="drop_images:1").accuracy == 0.6
    assert from_prism_profile(prism_profile(), "encode", name="enc", accuracy=0.9).accuracy == 0.9
    with pytest.raises(ValueError, match="no accuracy"):
        from_prism_profile(prism_profile(), "encode", reduction="drop:audio")


def test_load_profile_files(tmp_path):
    path = save(prism_profile(), tmp_path / "profile.json")
    vs = load_profile(path, cores=2)
    assert [(v.stage, v.latency_ms(1, 2)) for v in vs] == [("encode", 200.0), ("prefill", 100.0), ("decode", 30.0)]
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"tiny/bfloat16": 0.75}))
    assert [v.accuracy for v in load_profile(path, stage="prefill", accuracy_path=acc)] == [0.75]
    own = tmp_path / "variants.json"
    own.write_text(json.dumps({"variants": [v.as_dict() for v in vs]}))
    assert load_profile(own) == vs


def test_configuration_types():
    c = PipelineConfig({"prefill": StageChoice("a", 4, 2, 3)}, 0.9, 6, 100.0,
                       mixes={"decode": [StageChoice("x", 1, 1, 1, 2.0), StageChoice("y", 1, 1, 1, 1.0)]})
    assert c.workers("prefill") == (StageChoice("a", 4, 2, 3),)
    assert [w.variant for w in c.workers("decode")] == ["x", "y"]
    assert StageChoice("a", 4, 2, 3).cost_cores == 6
    b = Bounds(max_replicas={"*": 2, "decode": 5}, batches={"prefill": (4, 1, 4)})
    assert (b.replicas_for("decode"), b.replicas_for("encode"), b.batches_for("prefill")) == (5, 2, (1, 4))
    with pytest.raises(ValueError, match="batches"):
        Bounds(batches={"*": (0,)})
    with pytest.raises(ValueError, match="min_accuracy"):
        Bounds(min_accuracy=2.0)
    with pytest.raises(ValueError, match="Weights"):
        Weights(accuracy=-1)


def test_stage_latency_includes_the_batch_forming_wait():
    assert batch_wait_ms(1, 0.0) == 0.0 and batch_wait_ms(4, 10.0) == pytest.approx(300.0)
    assert batch_wait_ms(2, 0.0) == 0.0  # a batch bound: at rate 0 nothing waits for it to fill
    m = LatencyModel({1: {4: 50.0}})
    assert stage_latency_ms(m, 4, 1, 20.0) == pytest.approx(50.0 + 150.0)


def test_remaining_budget_and_order():
    assert remaining_budget_ms(1_000.0, 500.0, 1_300.0) == 200.0  # 300 ms gone (network, queues)
    assert remaining_budget_ms(1_000.0, 500.0, 1_600.0) == -100.0
    assert remaining_budget_ms(None, 500.0, 1_600.0) == 500.0  # no send time: the whole budget
    assert remaining_budget_ms(1_000.0, None, 1_600.0) == math.inf
    queue = [("late", 0, 50.0, 1), ("urgent", 0, 10.0, 2), ("vip", 1, 900.0, 3), ("free", 0, math.inf, 0)]
    ordered = sorted(queue, key=lambda r: budget_order_key(r[2], r[1], r[3]))
    assert [r[0] for r in ordered] == ["vip", "urgent", "late", "free"]


def test_batch_for_budget():
    m = LatencyModel({1: {1: 10.0, 2: 15.0, 4: 25.0, 8: 45.0}})
    assert batch_for_budget(m, 1, [30.0, 100.0, 50.0, 70.0], [1, 2, 4, 8]) == 4  # 25 <= 30 < 45
    assert batch_for_budget(m, 1, [30.0] * 9, [1, 2, 4, 8]) == 4
    assert batch_for_budget(m, 1, [100.0, 100.0], [1, 2, 4, 8]) == 2  # only two queued
    assert batch_for_budget(m, 1, [100.0] * 9, [1, 2, 4, 8], queued=3) == 2
    assert batch_for_budget(m, 1, [12.0, 5.0, 100.0], [1, 2, 4]) == 1  # 5 ms unattainable: ignored
    assert batch_for_budget(m, 1, [5.0, 1.0, -3.0, 2.0], [1, 2, 4, 8]) == 4  # all late: clear the backlog
    with pytest.raises(ValueError):
        batch_for_budget(m, 1, [1.0], [])
