"""Modality selection in the simulator: the live selector's program on simulated requests."""
from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest

import prism.sim.selection as simsel
from prism.sim.profile import load
from prism.sim.run import parse_cluster, summarize_result
from prism.sim.selection import (
    SelectionConfig,
    SimReduce,
    SimSelector,
    load_selection_profile,
    profile_from_accuracy,
    reductions,
)
from prism.sim.simulator import SimConfig, SimRequest, Simulator, simulate
from services.scheduler.core.selection import FULL, admit_with_selection

ACC = {"full": 0.8, "drop_images:1": 0.74, "drop_images:2": 0.7, "drop_images:3": 0.67, "drop:image": 0.55}
ALLOW = SimReduce(drop_images=True, drop_all_images=True)


@pytest.fixture(scope="module")
def profile():
    return load("modserve-a100-llama32-11b-vision")


def _requests(n=120, seed=3, allow=ALLOW, rate=30.0):
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        images = rng.choice((0, 1, 2, 3, 4))
        out.append(SimRequest(f"r{i}", round(t, 6), rng.randint(50, 400), images, rng.randint(16, 64),
                              deadline_s=rng.choice((1.5, 3.0)), accuracy_floor=rng.choice((0.5, 0.65, 0.75)),
                              reduce=allow))
    return out


def _config(accuracy=ACC, **kw):
    return SimConfig(instances=parse_cluster("encode@tp1x2,prefill@tp4x1,decode@tp4x1", slots=64), placement="split",
                     shared_queues=True, selection=SelectionConfig(profile_from_accuracy(accuracy), **kw))


def test_reductions_are_the_image_reductions_of_prism_models_reduce():
    reduce = pytest.importorskip("prism.models.reduce")

    class Family:
        def reduction_kinds(self):
            return frozenset({reduce.DROP_IMAGES, reduce.DROP_MODALITY, reduce.DOWNSCALE_IMAGES})

    for allowed, mine in (
        (reduce.Allowed(drop_images=True, drop_modalities=frozenset({"image"})), ALLOW),
        (reduce.Allowed(drop_images=True, min_images=2, downscale_images=True, min_scale=0.5),
         SimReduce(drop_images=True, min_images=2, downscale_images=True, min_scale=0.5)),
    ):
        theirs = {r.id for r in reduce._options(Family(), None, [("image", None)] * 4, allowed)} | {"full"}
        ours = reductions(Family().reduction_kinds(), 4, mine, 576, 576)
        assert {o.reduction for o in ours} == theirs
        assert [o.media_tokens for o in ours] == sorted({o.media_tokens for o in ours}, reverse=True)
    assert (simsel.DROP_IMAGES, simsel.DROP_MODALITY, simsel.DOWNSCALE_IMAGES) == (
        reduce.DROP_IMAGES, reduce.DROP_MODALITY, reduce.DOWNSCALE_IMAGES)
    assert [(o.reduction, o.images) for o in reductions(frozenset({"drop_images"}), 3, ALLOW, 10, 1)] == [
        ("full", 3), ("drop_images:1", 2), ("drop_images:2", 1)]
    assert [o.reduction for o in reductions(frozenset({"drop_images"}), 3, None, 10, 1)] == ["full"]


def test_selection_run_is_deterministic_and_reports(profile):
    reqs = _requests()
    a, b = simulate(reqs, _config(price=0.0), profile), simulate(reqs, _config(price=0.0), profile)
    assert a.records == b.records
    assert a.outcomes == b.outcomes and a.decisions == b.decisions and a.selection == b.selection
    assert a.selection["reassigned"] > 0 and a.selection["fitted"] > 0
    used = {o[2] for o in a.outcomes if o[1] == "OK"}
    assert FULL in used and used - {FULL}
    for rec in a.records:
        if rec.ok:
            assert rec.strategy and rec.expected_accuracy == ACC[rec.strategy]
    stats = summarize_result(a, ttft_slo_ms=1e6, tpot_slo_ms=1e6, duration_s=10.0)["selection"]
    assert stats["strategies"] == {k: sum(1 for o in a.outcomes if o[1] == "OK" and o[2] == k) for k in used}
    good = [o for o in a.outcomes if o[1] == "OK" and o[6] <= o[5] and (o[2] == FULL or o[3] >= o[4])]
    assert stats["good_deadline_floor"] == len(good)


def test_under_overload_the_load_price_serves_more_requests_in_time(profile):
    """The same overloaded arrivals, selection priced (the default) and not: priced, arrivals come
    reduced before deadlines force it, so more finish in time at or above their floors."""
    reqs = _requests()
    good = {}
    for price in (0.0, 1.0):
        res = simulate(reqs, _config(price=price), profile)
        stats = summarize_result(res, ttft_slo_ms=1e6, tpot_slo_ms=1e6, duration_s=10.0)["selection"]
        good[price] = stats["good_deadline_floor"]
        for o in res.outcomes:
            if o[1] == "OK" and o[2] != FULL:
                assert o[3] >= o[4]  # never below the floor
    assert good[1.0] > good[0.0]
    with pytest.raises(ValueError, match="price"):
        SelectionConfig(profile_from_accuracy(ACC), price=-1.0)


def test_decisions_equal_the_core_program_on_the_same_queue(profile, monkeypatch):
    calls = []
    real = simsel.admit_with_selection

    def spy(jobs, new, now, capacity, **kw):
        args = (copy.deepcopy(list(jobs)), copy.deepcopy(new), now, dict(capacity), copy.deepcopy(kw))
        out = real(jobs, new, now, capacity, **kw)
        calls.append((args, out))
        return out

    monkeypatch.setattr(simsel, "admit_with_selection", spy)
    sim = Simulator(_config(), profile)
    seen = {}
    accepted = SimSelector.accepted

    def note(self, st):
        seen[st.req.request_id] = st.strategy  # the inputs it is accepted with
        accepted(self, st)

    monkeypatch.setattr(SimSelector, "accepted", note)
    res = sim.run(_requests())
    assert len(calls) == len(sim.selector.stats.log) and calls
    for (jobs, new, now, capacity, kw), got in calls:
        direct = admit_with_selection(jobs, new, now, capacity, **kw)
        assert (direct.ok, direct.code, direct.strategy, direct.changed) == (got.ok, got.code, got.strategy,
                                                                            got.changed)
        assert dict(direct.assignment.choice) == dict(got.assignment.choice)
        rid = new.request_id
        if got.ok:
            assert seen[rid] == got.strategy
        else:
            assert rid not in seen
            assert next(o for o in res.outcomes if o[0] == rid)[1] == got.code


def test_request_allowing_nothing_is_never_changed(profile):
    reqs = _requests(allow=None)
    res = simulate(reqs, _config(), profile)
    assert {o[2] for o in res.outcomes if o[1] == "OK"} == {FULL}
    assert res.selection["reassigned"] == 0
    # mixed: those allowing nothing stay full while others are reduced
    mixed = [r if k % 2 else replace(r, reduce=None) for k, r in enumerate(_requests())]
    res = simulate(mixed, _config(), profile)
    fixed = {r.request_id for r in mixed if r.reduce is None}
    assert all(o[2] == FULL for o in res.outcomes if o[0] in fixed and o[1] == "OK")
    assert any(o[2] != FULL for o in res.outcomes if o[0] not in fixed and o[1] == "OK")


def test_reassignment_touches_only_requests_not_yet_encoded(profile, monkeypatch):
    sim = Simulator(_config(price=0.0), profile)  # unpriced: arrivals come whole, ticks reassign them
    taken_back, reattempts = [], []
    real_take, real_re = sim.take_back, sim.reattempt

    def take_back(task):
        was_taken = task.taken
        ok = real_take(task)
        taken_back.append((task.task_id, was_taken, ok))
        return ok

    def reattempt(st):
        assert not st.encode_done and st.first_s is None and st.reassigned is not None
        assert all(t.cancelled or t.taken for t in st.encode_tasks)
        reattempts.append(st.req.request_id)
        real_re(st)

    sim.take_back, sim.reattempt = take_back, reattempt
    res = sim.run(_requests())
    assert reattempts and res.selection["reassigned"] >= len(reattempts)
    assert all(ok == (not was_taken) for _, was_taken, ok in taken_back)
    # a reassigned request was served by a later attempt: only its later attempt's tasks reached prefill
    for rid in set(reattempts):
        prefills = [t for t in sim._tasks if t.startswith(f"{rid}/") and t.endswith("/prefill")]
        assert prefills and all("/a1/" not in t for t in prefills)


def test_refused_arrival_spends_no_simulated_work(profile):
    r = SimRequest("late", 0.0, 4000, 4, 64, deadline_s=0.01, accuracy_floor=0.5, reduce=ALLOW)
    sim = Simulator(_config(), profile)
    res = sim.run([r])
    assert [o[1] for o in res.outcomes] == ["RESOURCE_EXHAUSTED"]
    assert res.records[0].first_token_s is None and not sim._tasks
    assert all(i.device.busy_s == 0.0 for i in sim.insts.values())
    assert sim.book.inflight == 0
    # under overload: a refused request never had a task
    sim = Simulator(_config(), profile)
    res = sim.run(_requests(rate=80.0))
    refused = {o[0] for o in res.outcomes if o[1] != "OK"}
    assert refused
    assert not [t for t in sim._tasks if t.split("/")[0] in refused]


def test_selection_profile_files(tmp_path):
    p = tmp_path / "acc.json"
    p.write_text('{"_source": "assumed", "full": 0.8, "drop:image": {"accuracy": 0.5}}')
    prof = load_selection_profile(p)
    assert {k: v.accuracy for k, v in prof.accuracy.items()} == {"full": 0.8, "drop:image": 0.5}
    p.write_text('{"drop:image": 0.5}')
    with pytest.raises(ValueError, match="accuracy.full"):
        load_selection_profile(p)
    p.write_text('{"full": 0.8, "pixels:0.5": 0.5}')
    with pytest.raises(ValueError, match="pixels:0.5"):
        load_selection_profile(p)
