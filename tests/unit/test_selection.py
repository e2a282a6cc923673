"""Deadline-driven modality selection: reassign (vs exhaustive search), admission, strategy tables."""
from __future__ import annotations

import itertools
from dataclasses import replace
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.core import selection
from services.scheduler.core.selection import (
    EDF,
    FULL,
    GIVEN,
    Flow,
    Job,
    Miss,
    Strategy,
    admit_with_selection,
    diagnose,
    reassign,
    selection_time,
    stage_seconds,
    strategy_table,
)
from services.scheduler.core.selection_jobs import LoadPrice, Slowdown, arrival_price

CAP = {"encode": 1000.0, "prefill": 2000.0, "decode": 100.0}


def s(sid, acc, work, stage="prefill"):
    """A strategy of `work` seconds (at one stage)."""
    return Strategy(sid, acc, work_s={stage: work})


def tok(sid, acc, encode, prefill, decode):
    return Strategy(sid, acc, encode, prefill, decode)


@pytest.fixture
def no_solver(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the solver was called")

    monkeypatch.setattr(selection, "milp", boom)


# -- an independent model for the exhaustive search -------------------------------------------------


def serving_order(jobs, order):
    if order == EDF:
        def key(kj):
            k, j = kj
            return (-j.priority, math.inf if j.deadline is None else j.deadline, k)

        return [j for _, j in sorted(enumerate(jobs), key=key)]
    by_id = {j.request_id: j for j in jobs}
    return [by_id[r] for r in order]


def strat(job, sid):
    return next(x for x in job.strategies if x.id == sid)


def allowed(job):
    if not job.reassignable:
        return [strat(job, job.current)]
    return [x for x in job.strategies if x.accuracy >= job.floor or x.id == FULL]


def finishes(ordered, picks, now, capacity=None, flow=None):
    """Serial: one server, the running sum. `flow`: the stages overlap as a permutation flow
    shop (simulated stage by stage), no sooner than the running sum over the parallelism."""
    t, out = now, []
    free = {stage: now for stage in (flow.stages if flow else ())}
    ahead = {}  # (job index, stage): the work a stage does up to the job's (running jobs first)
    if flow is not None and not flow.strict:
        for stage in flow.stages:
            total = now
            for i in [i for i, j in enumerate(ordered) if stage in j.running] + \
                     [i for i, j in enumerate(ordered) if stage not in j.running]:
                total += picks[i].stage_seconds(capacity).get(stage, 0.0)
                ahead[(i, stage)] = total
    for i, x in enumerate(picks):
        t += x.seconds(capacity)
        if flow is None:
            out.append(t)
            continue
        work, at = x.stage_seconds(capacity), now
        for stage in flow.stages:
            if flow.strict:  # the job enters a stage when both it and the stage are free
                at = free[stage] = max(at, free[stage]) + work.get(stage, 0.0)
            elif work.get(stage, 0.0):  # busy with the work before it; the job needs its own on top
                at = max(at + work[stage], ahead[(i, stage)])
        out.append(max(at, now + (t - now) / flow.parallelism))
    return out


def meets(ordered, picks, now, capacity=None, flow=None):
    return all(j.deadline is None or f <= j.deadline + 1e-9
               for j, f in zip(ordered, finishes(ordered, picks, now, capacity, flow)))


def exhaustive(jobs, now, order=EDF, capacity=None, flow=None, price=0.0):
    """(best total accuracy less `price` x work, least total work at it) over every assignment, or None."""
    ordered = serving_order(jobs, order)
    best = None
    for picks in itertools.product(*(allowed(j) for j in ordered)):
        if meets(ordered, picks, now, capacity, flow):
            work = sum(x.seconds(capacity) for x in picks)
            key = (sum(x.accuracy for x in picks) - price * work, -work)
            if (best is None or key[0] > best[0] + 1e-9
                    or (abs(key[0] - best[0]) <= 1e-9 and key[1] > best[1])):
                best = key
    return None if best is None else (best[0], -best[1])


def check_assignment(jobs, result, now, order=EDF, capacity=None, flow=None):
    """The returned assignment is allowed, keeps the fixed jobs and meets every deadline."""
    ordered = serving_order(jobs, order)
    assert result.order == tuple(j.request_id for j in ordered)
    picks = [strat(j, result.choice[j.request_id]) for j in ordered]
    for j, x in zip(ordered, picks):
        if not j.reassignable:
            assert x.id == j.current
        else:
            assert x.accuracy >= j.floor or x.id == FULL  # never below its floor
    assert meets(ordered, picks, now, capacity, flow)
    assert result.objective == pytest.approx(sum(x.accuracy for x in picks), abs=1e-9)
    assert result.changed == tuple(j.request_id for j, x in zip(ordered, picks) if x.id != j.current)
    for j, f in zip(ordered, finishes(ordered, picks, now, capacity, flow)):
        assert result.finish[j.request_id] == pytest.approx(f, abs=1e-9)


@st.composite
def queues(draw, max_jobs=6, max_strategies=4):
    n = draw(st.integers(1, max_jobs))
    now = draw(st.integers(0, 3))
    acc = st.integers(0, 20).map(lambda k: k / 20)
    jobs = []
    for i in range(n):
        k = draw(st.integers(1, max_strategies))
        strategies = []
        for m in range(k):
            work = {"encode": draw(st.integers(0, 3)), "prefill": draw(st.integers(0, 3))}
            strategies.append(Strategy(FULL if m == 0 else f"s{m}", draw(acc), work_s=work))
        ids = [x.id for x in strategies]
        reassignable = draw(st.sampled_from([True, True, True, False]))
        jobs.append(Job(
            f"j{i}", tuple(strategies),
            deadline=draw(st.none() | st.integers(now, now + 4 * n)),
            floor=draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])),
            reassignable=reassignable,
            current=draw(st.sampled_from(ids)),
            priority=draw(st.sampled_from([0, 0, 1])),
            running=() if reassignable else draw(st.sampled_from([(), (), ("encode",), ("prefill",)]))))
    order = EDF
    if draw(st.booleans()):
        order = draw(st.permutations([j.request_id for j in jobs]))
    return jobs, now, order


# -- reassign -----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(queues())
def test_reassign_equals_exhaustive_search(case):
    jobs, now, order = case
    expected = exhaustive(jobs, now, order)
    result = reassign(jobs, now, order=order, keep_feasible=False)
    if expected is None:
        assert not result.feasible and result.objective is None and result.method == "infeasible"
        assert result.changed == () and all(result.choice[j.request_id] == j.current for j in jobs)
        # The diagnosis: exactly the jobs late with every job up to them on its cheapest allowed strategy.
        ordered = serving_order(jobs, order)
        cheapest = [min(allowed(j), key=lambda x: x.seconds()) for j in ordered]
        late = [(j.request_id, f) for j, f in zip(ordered, finishes(ordered, cheapest, now))
                if j.deadline is not None and f > j.deadline]
        assert late and [(m.request_id, m.earliest_finish) for m in result.misses] == late
        assert diagnose(jobs, now, order=order) == result.misses
        return
    assert result.feasible and not result.misses and result.method in ("best", "milp")
    check_assignment(jobs, result, now, order)
    assert result.objective == pytest.approx(expected[0], abs=1e-9)
    assert result.work_s == pytest.approx(expected[1], abs=1e-9)  # tie-break: least work
    assert diagnose(jobs, now, order=order) == ()


FLOWS = st.sampled_from([Flow(), Flow(parallelism=2.0), Flow(("encode", "prefill"), 1.5), Flow(strict=True),
                          Flow(("encode", "prefill"), 2.0, strict=True)])


@settings(max_examples=300, deadline=None)
@given(queues(), FLOWS)
def test_reassign_under_overlapping_stages_equals_exhaustive_search(case, flow):
    """The flow-shop program is exact even where a cheaper strategy is slower at some stage (the
    random strategies here are not ordered stage by stage)."""
    jobs, now, order = case
    expected = exhaustive(jobs, now, order, flow=flow)
    result = reassign(jobs, now, order=order, keep_feasible=False, flow=flow)
    if expected is None:
        assert not result.feasible and result.objective is None and result.method == "infeasible"
        assert result.changed == () and result.misses
        return
    assert result.feasible and result.method in ("best", "milp"), result.method
    check_assignment(jobs, result, now, order, flow=flow)
    assert result.objective == pytest.approx(expected[0], abs=1e-9)
    assert result.work_s == pytest.approx(expected[1], abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(queues(), st.sampled_from([None, Flow(), Flow(parallelism=2.0), Flow(strict=True)]),
       st.sampled_from([0.01, 0.05, 0.1, 0.3, 1.0]))
def test_a_priced_reassignment_equals_exhaustive_search(case, flow, price):
    """With a load price the program maximises accuracy less price x work, exactly, never below a
    floor and meeting every deadline; the reported objective stays the plain accuracy."""
    jobs, now, order = case
    expected = exhaustive(jobs, now, order, flow=flow, price=price)
    result = reassign(jobs, now, order=order, keep_feasible=False, flow=flow, price=price)
    if expected is None:
        assert not result.feasible and result.changed == ()
        return
    assert result.feasible
    check_assignment(jobs, result, now, order, flow=flow)
    ordered = serving_order(jobs, order)
    picks = [strat(j, result.choice[j.request_id]) for j in ordered]
    assert sum(x.accuracy for x in picks) - price * result.work_s == pytest.approx(expected[0], abs=1e-6)
    assert result.work_s == pytest.approx(expected[1], abs=1e-6)


def test_a_price_reduces_an_arrival_that_would_fit_whole():
    """Without a price an arrival that fits is served whole; with one it is served on the strategy
    whose accuracy less price x work is best, never below its floor, and a price too small to pay
    for the drop changes nothing."""
    whole, half, none = Strategy(FULL, 1.0, work_s={"encode": 4}), Strategy("half", 0.9, work_s={"encode": 2}), \
        Strategy("none", 0.6, work_s={"encode": 0})
    arrival = Job("a", (whole, half, none), deadline=100.0, floor=0.7)
    assert admit_with_selection([], arrival, 0.0).strategy == FULL
    assert admit_with_selection([], arrival, 0.0, price=0.01).strategy == FULL  # 0.1 for 2 s: worth it
    assert admit_with_selection([], arrival, 0.0, price=0.1).strategy == "half"  # "none" is below the floor
    assert admit_with_selection([], replace(arrival, floor=0.5), 0.0, price=0.1).strategy == "half"  # 0.7 > 0.6
    assert admit_with_selection([], replace(arrival, floor=0.5), 0.0, price=0.2).strategy == "none"  # 0.6 > 0.5
    pinned = Job("p", (whole,), deadline=100.0)
    assert admit_with_selection([], pinned, 0.0, price=5.0).strategy == FULL  # nothing to reduce
    with pytest.raises(ValueError, match="price"):
        reassign([arrival], 0.0, price=-1.0)


def test_the_load_price_follows_the_offered_load():
    lp = LoadPrice(scale=2.0, window_s=10.0)
    assert lp.price(0.0) == 0.0
    for t in range(10):  # 0.5 s of encode work a second: the stage keeps up
        lp.arrived(float(t), {"encode": 0.5, "prefill": 0.2})
    assert lp.load(9.0) == pytest.approx(0.5) and lp.price(9.0) == 0.0  # 9 arrivals' work since the first
    for t in range(10):  # then 3 s of prefill work a second
        lp.arrived(10.0 + t, {"encode": 0.1, "prefill": 3.0})
    assert lp.load(19.0) == pytest.approx(3.0)  # the busiest stage; the first window has passed
    assert lp.price(19.0) == pytest.approx(2.0 * (3.0 - 1.0))
    assert lp.load(24.0) == pytest.approx(4 * 3.0 / 9.0)  # t = 15..19 left: the four after the first over 9 s
    assert lp.price(40.0) == 0.0  # nothing arrived in the last window
    off = LoadPrice(scale=0.0)
    off.arrived(0.0, {"encode": 100.0})
    assert off.price(0.0) == 0.0
    with pytest.raises(ValueError):
        LoadPrice(scale=-1.0)
    job = Job("n", (Strategy(FULL, 1.0, encode_tokens=200, prefill_tokens=100),), deadline=5.0)
    lp2 = LoadPrice(scale=1.0, window_s=10.0)
    assert arrival_price(lp2, 0.0, job, {"encode": 100.0, "prefill": 100.0}) == 0.0  # one arrival: no rate yet
    # the second, 0.5 s later: its 2 s of encode over the min span of 1 s
    assert arrival_price(lp2, 0.5, job, {"encode": 100.0, "prefill": 100.0}) == pytest.approx(1.0)
    assert arrival_price(None, 0.0, job, {"encode": 100.0, "prefill": 100.0}) == 0.0


def test_a_burst_is_priced_from_its_second_arrival_not_averaged_over_the_window():
    """After a quiet minute, a request of 1.2 s of encode work arrives every 0.4 s (3x the
    encoder): priced from the second on, where a 10 s average would still read 0.36 (no price)
    after three."""
    lp = LoadPrice(scale=1.0, window_s=10.0)
    lp.arrived(0.0, {"encode": 0.2})
    assert lp.load(60.0) == 0.0  # the quiet minute has left the window
    for k in range(3):
        lp.arrived(60.0 + 0.4 * k, {"encode": 1.2})
    assert lp.load(60.8) == pytest.approx(2 * 1.2 / 1.0)  # two arrivals since the first, min span 1 s
    lp.arrived(61.2, {"encode": 1.2})
    assert lp.load(61.2) == pytest.approx(3 * 1.2 / 1.2) and lp.price(61.2) == pytest.approx(2.0)
    assert lp.load(65.0) == pytest.approx(3 * 1.2 / 5.0)  # no more arrivals: the rate decays
    assert LoadPrice(window_s=0.5).min_span_s == 0.5  # never beyond the window


def test_overlapping_stages_admit_what_one_server_cannot():
    """Two jobs, one encode-heavy and one prefill-heavy: in series the second misses, overlapped
    (one device per stage) both fit; on one shared core (parallelism 1) neither model helps."""
    a = Job("a", (Strategy(FULL, 1.0, work_s={"encode": 2.0, "prefill": 1.0}),), deadline=3.0)
    b = Job("b", (Strategy(FULL, 1.0, work_s={"encode": 1.0, "prefill": 1.0}),
                  Strategy("small", 0.5, work_s={"encode": 0.5, "prefill": 0.5})), deadline=4.0)
    serial = reassign([a, b], 0.0, keep_feasible=False)
    assert serial.choice == {"a": FULL, "b": "small"} and serial.finish["b"] == pytest.approx(4.0)
    flow = reassign([a, b], 0.0, keep_feasible=False, flow=Flow(("encode", "prefill")))
    assert flow.choice == {"a": FULL, "b": FULL} and flow.method == "best"
    assert flow.finish == {"a": pytest.approx(3.0), "b": pytest.approx(4.0)}  # b encodes while a prefills
    one_core = reassign([a, b], 0.0, keep_feasible=False, flow=Flow(("encode", "prefill"), 1.0))
    assert one_core.choice == serial.choice and one_core.finish == serial.finish
    with pytest.raises(ValueError, match="parallelism"):
        Flow(parallelism=0.5)
    with pytest.raises(ValueError, match="stages"):
        Flow(("encode", "encode"))


def test_a_text_only_job_passes_images_being_encoded_unless_strict():
    images = Job("img", (Strategy(FULL, 1.0, work_s={"encode": 3.0, "prefill": 1.0}),), deadline=10.0)
    text = Job("txt", (Strategy(FULL, 1.0, work_s={"prefill": 1.0}),), deadline=2.0)
    queues = reassign([images, text], 0.0, order=["img", "txt"], flow=Flow(("encode", "prefill")))
    assert queues.feasible and queues.finish == {"img": pytest.approx(4.0), "txt": pytest.approx(2.0)}
    strict = reassign([images, text], 0.0, order=["img", "txt"], flow=Flow(("encode", "prefill"), strict=True))
    assert not strict.feasible and [m.request_id for m in strict.misses] == ["txt"]
    assert strict.misses[0].earliest_finish == pytest.approx(5.0)


def test_a_stage_serves_what_it_is_running_first_then_by_deadline():
    """Under stage queues the serving order is the queues' (earliest deadline first), except that
    a task a worker is running finishes first: a text-only arrival with an early deadline passes a
    queued big prompt but not one being prefilled."""
    big = (Strategy(FULL, 1.0, work_s={"prefill": 3.0, "decode": 0.5}),)
    text = Job("txt", (Strategy(FULL, 1.0, work_s={"prefill": 0.5, "decode": 0.5}),), deadline=1.5)
    flow = Flow(("prefill", "decode"))
    queued = Job("big", big, deadline=10.0, reassignable=False)
    passes = reassign([queued, text], 0.0, order=["txt", "big"], flow=flow)
    assert passes.feasible and passes.finish["txt"] == pytest.approx(1.0)
    running = replace(queued, running={"prefill"})
    blocked = reassign([running, text], 0.0, order=["txt", "big"], flow=flow)
    assert not blocked.feasible and blocked.misses[0].earliest_finish == pytest.approx(4.0)


def test_admit_under_flow_fits_by_degrading_and_refuses_what_cannot_fit():
    heavy = (Strategy(FULL, 1.0, work_s={"encode": 2.0, "prefill": 1.0}),
             Strategy("text", 0.7, work_s={"prefill": 1.0}))
    flow = Flow(("encode", "prefill"))
    queued = [Job("q", heavy, deadline=3.0, floor=0.6)]
    fits = admit_with_selection(queued, Job("n", heavy, deadline=3.0, floor=0.8), 0.0, flow=flow)
    # n (floor 0.8) keeps its images: q goes text-only, its prefill done while n encodes.
    assert fits.ok and fits.strategy == FULL and fits.changed == ("q",)
    assert dict(fits.assignment.finish) == {"q": pytest.approx(1.0), "n": pytest.approx(3.0)}
    refused = admit_with_selection(queued, Job("n", heavy, deadline=2.5, floor=0.8), 0.0, flow=flow)
    assert not refused.ok and refused.code == "RESOURCE_EXHAUSTED" and "own work takes 3000 ms" in refused.message
    assert refused.retry_after_s is None


@settings(max_examples=100, deadline=None)
@given(queues())
def test_reassign_fast_path_keeps_a_feasible_current_assignment(case):
    jobs, now, order = case
    result = reassign(jobs, now, order=order)
    ordered = serving_order(jobs, order)
    current = [strat(j, j.current) for j in ordered]
    if all(x in allowed(j) for j, x in zip(ordered, current)) and meets(ordered, current, now):
        assert result.fast_path and result.method == "current" and result.changed == ()
        assert dict(result.choice) == {j.request_id: j.current for j in jobs}
    else:
        assert not result.fast_path
        expected = exhaustive(jobs, now, order)
        assert result.feasible == (expected is not None)
        if expected is not None:
            check_assignment(jobs, result, now, order)
            assert result.objective == pytest.approx(expected[0], abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(queues(max_jobs=5), st.integers(0, 50), st.integers(0, 20).map(lambda k: k / 20))
def test_a_job_without_deadline_never_constrains(case, work, acc):
    jobs, now, _ = case
    extra = Job("nodeadline", (s(FULL, 1.0, float(work)), s("cheap", acc, 0.0)), priority=-1)
    before = reassign(jobs, now, keep_feasible=False)
    after = reassign(jobs + [extra], now, keep_feasible=False)  # served last under EDF
    assert after.feasible == before.feasible
    if before.feasible:  # it takes its most accurate strategy (the cheaper one on a tie)
        assert after.choice["nodeadline"] == ("cheap" if acc == 1.0 and work > 0 else FULL)
        assert after.objective == pytest.approx(before.objective + 1.0, abs=1e-9)
        assert after.finish["nodeadline"] == pytest.approx(
            max(before.finish.values(), default=now) + (0.0 if acc == 1.0 else work))


def test_non_reassignable_jobs_keep_their_strategy_and_their_work_counts():
    fixed = Job("a", (s(FULL, 0.9, 4.0), s("drop", 0.8, 1.0)), deadline=10.0, reassignable=False)
    later = Job("b", (s(FULL, 0.9, 3.0), s("drop", 0.8, 1.0)), deadline=5.0 + 1e-12)
    # EDF puts b first; a is fixed on full (4 s): a finishes at b + 4 <= 10 whatever b does.
    result = reassign([fixed, later], 0.0, keep_feasible=False)
    assert dict(result.choice) == {"b": FULL, "a": FULL} and result.method == "best"
    # Served in the given order, b must drop (a's 4 s count), not the fixed a.
    result = reassign([fixed, later], 0.0, order=GIVEN, keep_feasible=False)
    assert dict(result.choice) == {"a": FULL, "b": "drop"} and result.changed == ("b",)
    assert dict(result.finish) == {"a": 4.0, "b": 5.0}
    # A fixed job on a cheap strategy stays there even when everything would fit on full.
    cheap = Job("a", fixed.strategies, deadline=10.0, reassignable=False, current="drop")
    assert reassign([cheap, later], 0.0, order=GIVEN, keep_feasible=False).choice["a"] == "drop"
    # When only moving the fixed job could help: infeasible, nothing changes.
    tight = Job("b", later.strategies, deadline=4.5)
    result = reassign([fixed, tight], 0.0, order=GIVEN)
    assert not result.feasible and result.misses == (Miss("b", 4.5, 5.0),)
    assert result.misses[0].overshoot_s == pytest.approx(0.5)
    assert dict(result.choice) == {"a": FULL, "b": FULL} and result.changed == ()


def test_floors_bound_the_choice_and_full_is_always_allowed():
    strategies = (s(FULL, 0.8, 4.0), s("half", 0.7, 2.0), s("quarter", 0.5, 1.0))
    assert [x.id for x in Job("x", strategies, floor=0.6).allowed] == [FULL, "half"]
    assert [x.id for x in Job("x", strategies, floor=0.95).allowed] == [FULL]  # above every profile
    assert [x.id for x in Job("x", strategies, reassignable=False, current="half").allowed] == ["half"]
    jobs = [Job("x", strategies, deadline=1.5, floor=0.6)]
    result = reassign(jobs, 0.0)
    assert not result.feasible and result.misses == (Miss("x", 1.5, 2.0),)  # quarter is below the floor
    result = reassign([Job("x", strategies, deadline=1.5, floor=0.5)], 0.0)
    assert result.feasible and result.choice["x"] == "quarter" and result.method == "milp"


def test_edf_order_within_priority_and_explicit_order():
    a = Job("a", (s(FULL, 0.9, 1.0),), deadline=9.0)
    b = Job("b", (s(FULL, 0.9, 1.0),), deadline=3.0)
    c = Job("c", (s(FULL, 0.9, 1.0),))
    d = Job("d", (s(FULL, 0.9, 1.0),), deadline=20.0, priority=1)
    e = Job("e", (s(FULL, 0.9, 1.0),), deadline=3.0)
    assert reassign([a, b, c, d, e], 0.0).order == ("d", "b", "e", "a", "c")
    assert reassign([a, b, c, d, e], 0.0, order=["c", "a", "b", "d", "e"]).order == ("c", "a", "b", "d", "e")
    assert reassign([a, b, c], 0.0, order=GIVEN).order == ("a", "b", "c")
    with pytest.raises(ValueError):
        reassign([a, b], 0.0, order=["a"])
    with pytest.raises(ValueError):
        reassign([a, a], 0.0)


def test_tokens_with_capacities_and_the_tie_break():
    # Both assignments reach 1.7; the second spends less work.
    x = Job("x", (tok(FULL, 0.9, 2000, 2000, 100), tok("small", 0.8, 500, 2000, 100)), deadline=4.0)
    y = Job("y", (tok(FULL, 0.9, 2000, 2000, 100), tok("small", 0.8, 0, 2000, 100)), deadline=6.5)
    result = reassign([x, y], 0.0, CAP)
    # Full costs 2 + 1 + 1 = 4 s; x small 2.5 s, y small 2 s: only one can stay full.
    assert result.feasible and result.objective == pytest.approx(1.7)
    assert dict(result.choice) == {"x": FULL, "y": "small"} and result.work_s == pytest.approx(6.0)
    assert result.finish["y"] == pytest.approx(6.0)
    with pytest.raises(ValueError):
        reassign([x], 0.0)  # tokens need capacities
    with pytest.raises(ValueError):
        reassign([x], 0.0, {"prefill": 1.0, "decode": 1.0})  # no encode capacity


def test_fast_path_and_best_path_never_call_the_solver(no_solver):
    strategies = (s(FULL, 0.9, 2.0), s("half", 0.8, 1.0))
    jobs = [Job("a", strategies, deadline=2.0, current="half"), Job("b", strategies, deadline=4.0)]
    result = reassign(jobs, 0.0)
    assert result.fast_path and result.variables == 0 and dict(result.choice) == {"a": "half", "b": FULL}
    # Seeking the best: everyone on full meets every deadline, still no solver.
    result = reassign(jobs, 0.0, keep_feasible=False)
    assert result.method == "best" and not result.fast_path and result.changed == ("a",)
    assert dict(result.choice) == {"a": FULL, "b": FULL}
    # The current assignment is not allowed any more (its floor was raised): not kept.
    raised = [Job("a", strategies, deadline=2.0, current="half", floor=0.85), jobs[1]]
    assert reassign(raised, 0.0).method == "best"


def test_solver_failure_falls_back_to_a_feasible_greedy_assignment(monkeypatch):
    class NoSolution:
        x, status = None, 1

    monkeypatch.setattr(selection, "milp", lambda *a, **k: NoSolution())
    strategies = (s(FULL, 0.9, 3.0), s("half", 0.8, 2.0), s("quarter", 0.6, 1.0))
    jobs = [Job(f"r{i}", strategies, deadline=2.0 * (i + 1)) for i in range(4)]
    result = reassign(jobs, 0.0)
    assert result.method == "greedy" and result.feasible
    check_assignment(jobs, result, 0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_time_limited_solves_stay_feasible(seed):
    jobs = selection._overloaded_queue(40, 6, seed)
    limited = reassign(jobs, 0.0, selection._BENCH_CAPACITY, time_limit_s=1e-4)
    exact = reassign(jobs, 0.0, selection._BENCH_CAPACITY)
    assert exact.method == "milp" and limited.method in ("milp", "limit", "greedy")
    for result in (limited, exact):
        check_assignment(jobs, result, 0.0, capacity=selection._BENCH_CAPACITY)
    assert limited.objective <= exact.objective + 1e-9


# -- admission -------------------------------------------------------------------------------------


def queue():
    # now = 0; capacities: encode 1000, prefill 2000, decode 100 tokens/s.
    q1 = Job("q1", (tok(FULL, 0.90, 2000, 2000, 100),         # 2 + 1 + 1 = 4 s
                    tok("pixels:0.5", 0.85, 1000, 2000, 100),  # 3 s
                    tok("drop_images:1", 0.80, 0, 2000, 100)),  # 2 s
             deadline=5.0, floor=0.8)
    q2 = Job("q2", (tok(FULL, 0.90, 1000, 2000, 100), tok("drop_images:1", 0.8, 0, 0, 100)),
             deadline=12.0, reassignable=False)  # 3 s, already encoding
    q3 = Job("q3", (tok(FULL, 0.90, 3000, 2000, 100), tok("pixels:0.5", 0.85, 0, 2000, 100)),
             deadline=30.0)  # 5 s, slack
    return [q1, q2, q3]


def new(deadline, priority=0):
    return Job("new", (tok(FULL, 0.95, 2500, 2000, 100), tok("drop_audio", 0.7, 0, 2000, 100)),
               deadline=deadline, floor=0.9, priority=priority)  # 4.5 s; drop_audio below its floor


def test_admit_fits_the_new_job_by_degrading_an_earlier_queued_job():
    # Order q1 (5), new (8), q2 (12), q3 (30). As is, new finishes at 4 + 4.5 = 8.5 > 8: it fits
    # only when q1 drops to pixels:0.5 (3 s, the most accurate that fits; drop_images:1 fits too).
    d = admit_with_selection(queue(), new(8.0), 0.0, CAP)
    assert d.ok and d.code == "OK" and d.strategy == FULL and d.retry_after_s is None
    assert d.changed == ("q1",) and d.assignment.changed == ("q1",)
    assert dict(d.assignment.choice) == {"q1": "pixels:0.5", "new": FULL, "q2": FULL, "q3": FULL}
    assert d.assignment.finish["new"] == pytest.approx(7.5)
    assert d.assignment.finish["q3"] == pytest.approx(15.5)
    assert d.assignment.method == "milp" and "q1 -> pixels:0.5" in d.message


def test_admit_refuses_when_nothing_fits_and_leaves_the_queue_unchanged():
    # new's deadline 6: even q1 on drop_images:1 (2 s) puts new at 6.5.
    d = admit_with_selection(queue(), new(6.0), 0.0, CAP)
    assert not d.ok and d.code == "RESOURCE_EXHAUSTED" and d.strategy is None and d.changed == ()
    assert dict(d.assignment.choice) == {"q1": FULL, "new": FULL, "q2": FULL, "q3": FULL}
    assert d.assignment.misses == (Miss("new", 6.0, 6.5),)
    assert d.retry_after_s == pytest.approx(0.5) and "new by 500 ms" in d.message


def test_admit_never_breaks_a_queued_deadline():
    # new (deadline 4.6) goes first and meets it (4.5 s), but q1 cannot then meet 5.0 even on
    # drop_images:1 (4.5 + 2 = 6.5): refused, naming q1.
    d = admit_with_selection(queue(), new(4.6), 0.0, CAP)
    assert not d.ok and d.assignment.misses == (Miss("q1", 5.0, 6.5),) and d.changed == ()
    assert "q1 by 1500 ms" in d.message and d.retry_after_s == pytest.approx(1.5)
    assert dict(d.assignment.choice) == {"new": FULL, "q1": FULL, "q2": FULL, "q3": FULL}


def test_admit_refusal_without_retry_and_past_deadline():
    d = admit_with_selection(queue(), new(4.0), 0.0, CAP)  # its own 4.5 s exceed 4 s
    assert not d.ok and d.retry_after_s is None and "own work takes 4500 ms" in d.message
    d = admit_with_selection(queue(), new(1.0), 2.0, CAP)
    assert not d.ok and d.code == "DEADLINE_EXCEEDED" and d.retry_after_s is None
    with pytest.raises(ValueError):
        admit_with_selection(queue(), queue()[0], 0.0, CAP)  # already queued


def test_admit_fast_path_and_already_late_jobs(no_solver):
    d = admit_with_selection(queue(), new(20.0), 0.0, CAP)  # fits behind q1 and q2 as is
    assert d.ok and d.assignment.fast_path and d.changed == () and d.strategy == FULL
    # q0 is late whatever is done; it does not make every new arrival refused.
    late = Job("q0", (s(FULL, 0.9, 0.5),), deadline=0.1)
    assert diagnose([late, *queue()], 0.0, CAP) == (Miss("q0", 0.1, 0.5),)
    d = admit_with_selection([late, *queue()], new(30.0), 0.0, CAP)
    assert d.ok and d.already_late == ("q0",) and d.changed == () and d.assignment.fast_path
    assert d.assignment.order == ("q0", "q1", "q2", "q3", "new")  # q3 (30) was queued first
    assert d.assignment.finish["new"] == pytest.approx(17.0)


# -- strategy tables -------------------------------------------------------------------------------


def table_by_hand(jobs_by_size, floors, capacity=None, tokens=False):
    out = {}
    for size, strategies in jobs_by_size.items():
        for floor in floors:
            ok = [(x.seconds(capacity) if not tokens else sum(x.tokens.values()), -x.accuracy, k, x)
                  for k, x in enumerate(strategies) if x.accuracy >= floor]
            out[(size, floor)] = min(ok, key=lambda t: t[:3])[3] if ok else None
    return out


def test_strategy_table_equals_exhaustive_choice():
    by_size = {
        1: [s(FULL, 0.90, 1.0), s("pixels:0.5", 0.86, 0.6), s("pixels:0.25", 0.80, 0.4)],
        2: [s(FULL, 0.88, 2.0), s("drop_images:1", 0.84, 1.0), s("pixels:0.5", 0.84, 1.2),
            s("pixels:0.25", 0.75, 0.8), s("same", 0.84, 1.0)],
        4: [s(FULL, 0.85, 4.0), s("drop_images:2", 0.83, 2.0), s("drop_images:3", 0.78, 1.0),
            s("pixels:0.5", 0.83, 2.4)],
    }
    floors = [0.0, 0.75, 0.8, 0.84, 0.85, 0.9, 0.95]
    table = strategy_table(by_size, floors)
    assert table == table_by_hand(by_size, floors)
    assert table[(2, 0.84)].id == "drop_images:1"  # ties: least work, then the first listed
    assert table[(4, 0.8)].id == "drop_images:2" and table[(1, 0.0)].id == "pixels:0.25"
    assert table[(1, 0.95)] is None and table[(2, 0.9)] is None  # floor above every strategy
    assert strategy_table({8: []}, [0.5]) == {(8, 0.5): None}


def test_strategy_table_work_in_seconds_or_tokens():
    a = tok(FULL, 0.9, 1000, 0, 0)  # 1000 tokens, 1 s
    b = tok("b", 0.9, 0, 0, 200)  # 200 tokens, 2 s
    assert strategy_table({1: [a, b]}, [0.5])[(1, 0.5)] is b
    assert strategy_table({1: [a, b]}, [0.5], CAP)[(1, 0.5)] is a
    with pytest.raises(ValueError):
        strategy_table({1: [a, s("c", 0.9, 1.0)]}, [0.5])  # seconds and tokens mixed


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), min_size=1, max_size=5),
       st.lists(st.integers(0, 20).map(lambda k: k / 20), min_size=1, max_size=4))
def test_strategy_table_random(rows, floors):
    strategies = [s(f"s{k}", acc / 20, float(work)) for k, (acc, work) in enumerate(rows)]
    assert strategy_table({3: strategies}, floors) == table_by_hand({3: strategies}, floors)


# -- model pieces and the benchmark hook -----------------------------------------------------------


def test_stage_seconds_and_validation():
    assert stage_seconds({"encode": 500, "prefill": 1000, "decode": 0}, CAP) == {
        "encode": 0.5, "prefill": 0.5, "decode": 0.0}
    assert stage_seconds({"encode": 500}, {"encode": math.inf}) == {"encode": 0.0}
    assert tok(FULL, 0.9, 500, 1000, 10).seconds(CAP) == pytest.approx(1.1)
    assert s(FULL, 0.9, 0.25, "decode").seconds() == 0.25  # work_s wins over capacities
    with pytest.raises(ValueError):
        stage_seconds({"encode": 1}, {"encode": 0.0})
    with pytest.raises(ValueError):
        stage_seconds({"vision": 1}, CAP)
    for bad in (lambda: Strategy("x", 1.5), lambda: Strategy("x", 0.5, -1), lambda: Strategy("", 0.5),
                lambda: Strategy("x", 0.5, work_s={"vision": 1.0}),
                lambda: Strategy("x", 0.5, work_s={"encode": -1.0}),
                lambda: Job("j", (s("half", 0.5, 1.0),)),  # no full
                lambda: Job("j", (s(FULL, 0.5, 1.0), s(FULL, 0.4, 1.0))),
                lambda: Job("j", (s(FULL, 0.5, 1.0),), current="half"),
                lambda: Job("j", (s(FULL, 0.5, 1.0),), floor=1.5)):
        with pytest.raises(ValueError):
            bad()


def test_selection_time_reports_a_solved_decision():
    out = selection_time(12, 4, 3, repeats=1)
    assert out["method"] == "milp" and out["variables"] > 0 and out["rows"] > 0
    assert out["limited_gap"] >= -1e-9 and out["limited_method"] in ("milp", "limit", "greedy")
    assert all(out[k] > 0 for k in ("exact_s", "limited_s", "fast_path_s"))
    jobs = selection._overloaded_queue(12, 4, 3)
    assert diagnose(jobs, 0.0, selection._BENCH_CAPACITY) == ()  # every deadline can be met...
    assert not reassign(jobs, 0.0, selection._BENCH_CAPACITY).fast_path  # ...but not as is


def test_slowdown_is_the_median_error_of_the_requests_served_within_its_bounds():
    slow = Slowdown(window=4, min_samples=3, low=1.0, high=3.0)
    slow.served(1.0, 2.0)
    slow.served(2.0, 3.0)
    assert slow.value == 1.0  # too few served yet
    slow.served(1.0, 5.0)
    assert slow.value == 2.0  # ratios 2, 1.5, 5
    slow.served(1.0, 0.5)  # faster than predicted: 2, 1.5, 5, 0.5
    assert slow.value == 1.75
    for _ in range(4):  # the window keeps the latest: the model is optimistic by 10x
        slow.served(1.0, 10.0)
    assert slow.value == 3.0  # at most `high`
    for _ in range(4):
        slow.served(2.0, 1.0)
    assert slow.value == 1.0  # never below `low`
    slow.served(0.0, 1.0)  # no prediction: ignored
    slow.served(1.0, math.inf)
    assert slow.value == 1.0
    with pytest.raises(ValueError):
        Slowdown(window=2, min_samples=3)
    with pytest.raises(ValueError):
        Slowdown(quantile=1.5)


def test_slowdown_counts_requests_in_service_past_their_prediction_and_takes_its_quantile():
    slow = Slowdown(window=8, min_samples=3, low=1.0, high=4.0)
    slow.served(1.0, 1.2)
    slow.served(1.0, 1.4)
    assert slow.value == 1.0  # two served: too few
    # a request in service for 3x its prediction is a third sample; one not past its own is none
    assert slow.value_with([3.0, 0.9]) == pytest.approx(1.4)  # median of 1.2, 1.4, 3.0
    assert slow.value_with([3.0, 3.5]) == pytest.approx(2.2)  # median of 1.2, 1.4, 3.0, 3.5
    assert slow.value_with([math.inf, math.nan]) == 1.0  # no sample
    slow.served(1.0, 2.0)
    slow.served(1.0, 3.0)
    assert slow.value == pytest.approx(1.7)  # median of 1.2, 1.4, 2, 3
    upper = Slowdown(window=8, min_samples=3, quantile=0.75)
    for actual in (1.2, 1.4, 2.0, 3.0):
        upper.served(1.0, actual)
    assert upper.value == pytest.approx(2.25)  # 1.2, 1.4, 2, 3: the 0.75 quantile, interpolated
    assert Slowdown(min_samples=1, quantile=1.0, high=10.0).value_with([5.0]) == 5.0
