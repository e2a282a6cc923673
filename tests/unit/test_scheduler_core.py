"""The scheduler's pure policy core: load book, routing, admission, placement, autoscaling."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.scheduler.core import (
    Admission,
    Autoscaler,
    Instance,
    Limits,
    LoadBook,
    NoInstance,
    Placement,
    RateTracker,
    RequestCost,
    ScalePolicy,
    SloTracker,
    capacity_from_profile,
    task_share_s,
    commit,
    estimate_path,
    order_key,
    route,
    split_images,
)

ALL = frozenset({"encode", "prefill", "decode"})


def enc(name, cap=1000.0, draining=False):
    return Instance(name, f"{name}:1", frozenset({"encode"}), {"encode": cap}, draining=draining)


def pre(name, cap=2000.0, draining=False):
    return Instance(name, f"{name}:1", frozenset({"prefill"}), {"prefill": cap}, draining=draining)


def dec(name, cap=100.0, slots=4, draining=False):
    return Instance(name, f"{name}:1", frozenset({"decode"}), {"decode": cap}, decode_slots=slots,
                    draining=draining)


def col(name, caps=(1000.0, 2000.0, 100.0), slots=4):
    caps = dict(zip(("encode", "prefill", "decode"), caps))
    return Instance(name, f"{name}:1", ALL, caps, decode_slots=slots)


# -- LoadBook ---------------------------------------------------------------------------------


def test_loadbook_add_finish_idempotent_and_totals():
    book = LoadBook()
    book.add("r1", "prefill", "p0", 100)
    book.add("r2", "prefill", "p0", 50)
    book.add("r2", "prefill", "p0", 70)  # re-add replaces (redelivery)
    book.add("r3", "prefill", "p1", 30)
    book.add("r1", "decode", "d0", 16)
    assert book.pending("prefill", "p0") == 170
    assert book.stage_pending("prefill") == 200
    assert book.pending("decode", "d0") == 16 and book.slots_used("d0") == 1
    assert book.inflight == 3 and len(book) == 4
    assert book.requests_on("p0") == [("r1", "prefill"), ("r2", "prefill")]

    assert book.finish("r1", "prefill") == 100
    assert book.finish("r1", "prefill") == 0  # idempotent
    assert book.finish("nope", "encode") == 0
    assert book.pending("prefill", "p0") == 70 and book.stage_pending("prefill") == 100
    assert book.requests_on("p0") == [("r2", "prefill")]
    assert book.inflight == 3  # r1 still decoding
    assert book.finish("r1", "decode") == 16 and book.finish("r1", "decode") == 0
    assert book.slots_used("d0") == 0 and book.inflight == 2
    assert book.free_slots("d0", 4) == 4


def test_loadbook_move_parts_and_progress():
    book = LoadBook()
    book.add("r", "encode", "e0", 300)
    book.add("r", "encode", "e1", 200)  # split encode: a second part
    assert book.parts("r", "encode") == {"e0": 300, "e1": 200}
    assert book.stage_pending("encode") == 500 and book.inflight == 1
    assert book.move("r", "encode", "e2", from_instance="e1")  # e1 died
    assert book.parts("r", "encode") == {"e0": 300, "e2": 200}
    assert book.requests_on("e1") == [] and book.requests_on("e2") == [("r", "encode")]
    assert book.move("r", "encode", "e0")  # merge everything onto e0
    assert book.parts("r", "encode") == {"e0": 500} and book.pending("encode", "e2") == 0
    assert not book.move("r", "encode", "e0") and not book.move("x", "encode", "e0")
    assert book.finish("r", "encode", "e0") == 500 and book.inflight == 0

    book.add("q", "decode", "d0", 100)
    book.set_remaining("q", "decode", 40)
    assert book.pending("decode", "d0") == 40 and book.stage_pending("decode") == 40
    assert book.move("q", "decode", "d1")
    assert book.slots_used("d0") == 0 and book.slots_used("d1") == 1 and book.pending("decode", "d1") == 40
    assert book.finish_request("q") == 40 and len(book) == 0 and book.stage_pending("decode") == 0
    with pytest.raises(ValueError):
        book.add("z", "prefill", "p", -1)


def test_rate_tracker_sliding_window_with_injected_clock():
    t = [0.0]
    rates = RateTracker(window_s=10.0, clock=lambda: t[0])
    for k in range(10):
        t[0] = float(k)
        rates.arrived("prefill", 1000)
    rates.completed("prefill", 500)
    assert rates.arrival_rate("prefill") == pytest.approx(1000.0)  # 10,000 tokens / 10 s
    assert rates.completion_rate("prefill") == pytest.approx(50.0)
    t[0] = 14.5  # samples at 0..4 fell out
    assert rates.arrival_rate("prefill") == pytest.approx(500.0)
    assert rates.arrival_rates(now=100.0) == {"prefill": 0.0}
    assert rates.arrival_rate("decode") == 0.0


def test_slo_tracker_attainment_over_window():
    slo = SloTracker(window_s=60.0, clock=lambda: 0.0)
    assert slo.attainment() == 1.0  # nothing finished, nothing missed
    slo.record(0.5, 0.02, ttft_target_s=1.0, tpot_target_s=0.05, now=0.0)
    out = slo.record(2.0, 0.02, ttft_target_s=1.0, tpot_target_s=0.05, now=10.0)
    assert not out.ok and not out.ttft_ok and out.tpot_ok
    slo.record(0.5, 0.09, ttft_target_s=1.0, tpot_target_s=0.05, now=20.0)
    slo.record(9.0, 9.0, now=30.0)  # no targets: met
    assert slo.attainment(now=30.0) == pytest.approx(0.5)
    assert slo.ttft_attainment(now=30.0) == pytest.approx(0.75)
    assert slo.stage_attainment(now=30.0) == {"encode": 0.75, "prefill": 0.75, "decode": 0.75}
    assert slo.attainment(now=65.0) == pytest.approx(1 / 3)  # the t=0 success left the window
    assert slo.count(now=200.0) == 0 and slo.attainment(now=200.0) == 1.0


# -- routing ------------------------------------------------------------------------------------


def test_instance_validation():
    with pytest.raises(ValueError):
        Instance("a", "a:1", frozenset({"encode"}), {"prefill": 1.0})  # no capacity for its stage
    with pytest.raises(ValueError):
        Instance("a", "a:1", frozenset({"decode"}), {"decode": 1.0})  # decode without slots
    with pytest.raises(ValueError):
        Instance("a", "a:1", frozenset({"vision"}), {"vision": 1.0})
    i = col("c")
    assert hash(i) == hash(col("c")) and i == col("c")
    assert i.per_token_s() == pytest.approx(0.04)


def test_route_least_pending_then_capacity_then_name():
    book = LoadBook()
    ps = [pre("p-b", 2000), pre("p-a", 2000), pre("p-c", 3000), pre("p-d", 9000, draining=True)]
    assert route("prefill", ps, book).name == "p-c"  # all idle: most capacity (p-d drains)
    book.add("r1", "prefill", "p-c", 10)
    assert route("prefill", ps, book).name == "p-a"  # idle, equal capacity: smallest name
    book.add("r2", "prefill", "p-a", 5)
    book.add("r3", "prefill", "p-b", 5)
    assert route("prefill", ps, book).name == "p-a"  # 5 vs 5 vs 10: name
    assert route("prefill", ps, book, exclude={"p-a"}).name == "p-b"
    assert route("prefill", ps + [col("c0")], book).name == "c0"  # colocated hosts prefill too


def test_route_decode_prefers_free_slot_then_least_pending():
    book = LoadBook()
    ds = [dec("d0", slots=2), dec("d1", slots=2)]
    for k in range(2):
        book.add(f"a{k}", "decode", "d0", 1)  # d0 full but almost done
    book.add("b0", "decode", "d1", 500)
    assert route("decode", ds, book).name == "d1"  # free slot beats fewer pending tokens
    book.add("b1", "decode", "d1", 500)
    assert route("decode", ds, book).name == "d0"  # nobody free: least pending


def test_route_raises_no_instance():
    book = LoadBook()
    with pytest.raises(NoInstance) as err:
        route("encode", [pre("p0"), enc("e0", draining=True)], book)
    assert err.value.stage == "encode" and "encode" in str(err.value)
    with pytest.raises(NoInstance):
        route("prefill", [pre("p0")], book, exclude={"p0"})


def test_split_images_spreads_one_request_over_encoders():
    book = LoadBook()
    es = [enc("e0"), enc("e1")]
    assert [i.name for i in split_images([576, 576], es, book)] == ["e0", "e1"]
    # LPT: 500 -> e0, 300 -> e1, 300 -> e1 (300 < 500), 100 -> e0 (500 < 600); original order kept.
    assert [i.name for i in split_images([100, 300, 500, 300], es, book)] == ["e0", "e1", "e0", "e1"]
    book.add("old", "encode", "e0", 1000)
    assert [i.name for i in split_images([400, 400], es, book)] == ["e1", "e1"]
    # Capacity counts: e2 is 3x faster, finishing 1000 tokens in 1/3 of the time of e1.
    fast = [enc("e1"), enc("e2", cap=3000.0)]
    assert [i.name for i in split_images([500, 500], fast, LoadBook())] == ["e2", "e2"]
    assert split_images([], es, book) == []
    assert [i.name for i in split_images([1, 2], [enc("x", draining=True), enc("y")], book)] == ["y", "y"]
    with pytest.raises(NoInstance) as err:
        split_images([576], [pre("p0"), enc("e9", draining=True)], book)
    assert err.value.stage == "encode"


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.sets(st.sampled_from(["encode", "prefill", "decode"]), min_size=1), st.booleans(),
                  st.integers(0, 5000), st.integers(0, 6)),
        min_size=1, max_size=8),
    stage=st.sampled_from(["encode", "prefill", "decode"]),
)
def test_property_route_never_picks_draining_or_non_hosting(specs, stage):
    book = LoadBook()
    insts = []
    for k, (stages, draining, pending, busy) in enumerate(specs):
        name = f"i{k}"
        insts.append(Instance(name, f"{name}:1", frozenset(stages), {s: 100.0 + k for s in stages},
                              decode_slots=3 if "decode" in stages else 0, draining=draining))
        for s in stages:
            book.add(f"q{k}", s, name, pending)
        for b in range(busy if "decode" in stages else 0):
            book.add(f"busy{k}-{b}", "decode", name, 1)
    ok = [i for i in insts if stage in i.stages and not i.draining]
    if not ok:
        with pytest.raises(NoInstance):
            route(stage, insts, book)
        return
    got = route(stage, insts, book)
    assert got in ok
    if stage == "decode" and any(book.slots_used(i.name) < i.decode_slots for i in ok):
        ok = [i for i in ok if book.slots_used(i.name) < i.decode_slots]
    assert book.pending(stage, got.name) == min(book.pending(stage, i.name) for i in ok)


# -- admission ----------------------------------------------------------------------------------

E, P, D = enc("e0"), pre("p0"), dec("d0")  # 1000 / 2000 / 100 tok/s, 4 slots: 0.01 s a token alone,
# 0.04 s in a full batch of 4 (the batch shares the throughput)


def req(rid="r", **kw):
    base = dict(image_tokens=500, prompt_tokens=1000, max_new_tokens=50)
    base.update(kw)
    return RequestCost(rid, **base)


def test_admit_ok_carries_instances_and_exact_estimate():
    adm = Admission(placement=Placement("split"))
    d = adm.admit(req(ttft_target_s=1.0, deadline=13.0), 10.0, LoadBook(), [E, P, D, enc("e1")])
    assert d.ok and d.code == "OK" and d.retry_after_s is None
    assert d.choice.names() == {"encode": ("e0",), "prefill": ("p0",), "decode": ("d0",)}
    est = d.estimate
    assert (est.encode_s, est.prefill_s, est.ttft_s) == pytest.approx((0.5, 0.5, 1.0))
    assert (est.slot_wait_s, est.decode_s, est.finish_s) == pytest.approx((0.0, 0.5, 1.5))


def test_admit_refuses_unmeetable_ttft_with_retry_hint_in_bounds():
    book = LoadBook()
    book.add("old", "prefill", "p0", 3000)  # 1.5 s of queued prefill
    adm = Admission(placement=Placement("split"))
    d = adm.admit(req(ttft_target_s=1.5), 0.0, book, [E, P, D])
    assert not d.ok and d.code == "RESOURCE_EXHAUSTED"
    assert d.message.startswith("slo.ttft_ms: ") and "cannot be met: estimated 2500 ms" in d.message
    # Estimated 2.5 s vs 1.5 s: 1 s more than allowed; at most the 1.5 s of queued work.
    assert d.retry_after_s == pytest.approx(1.0)
    assert 0 < d.retry_after_s <= 1.5
    book.finish("old", "prefill")
    assert adm.admit(req(ttft_target_s=1.5), 0.0, book, [E, P, D]).ok  # drained: accepted


def test_admit_refuses_deadline_with_and_without_hope():
    adm = Admission(placement=Placement("split"))
    book = LoadBook()
    # Own service time is 1.5 s: a 1 s deadline can never be met, retrying does not help.
    d = adm.admit(req(deadline=101.0), 100.0, book, [E, P, D])
    assert (d.ok, d.code, d.retry_after_s) == (False, "RESOURCE_EXHAUSTED", None)
    assert d.message.startswith("slo.deadline_ms: deadline in 1000 ms cannot be met: estimated 1500 ms")
    assert "even with no queued work" in d.message
    # 4 queued decode requests hold the 4 slots: 400 pending tokens -> a slot in 100/100 = 1.0 s,
    # then 50 tokens in a batch of 4 at 100 tok/s: 2.0 s.
    for k in range(4):
        book.add(f"d{k}", "decode", "d0", 100)
    d = adm.admit(req(deadline=103.5), 100.0, book, [E, P, D])
    assert d.estimate.slot_wait_s == pytest.approx(1.0) and d.estimate.finish_s == pytest.approx(3.0)
    assert d.ok  # the slot frees during encode+prefill
    book.add("old", "encode", "e0", 1500)  # +1.5 s of encode: finish 4.5 s vs 3.5 s budget
    d = adm.admit(req(deadline=103.5), 100.0, book, [E, P, D])
    assert not d.ok and d.code == "RESOURCE_EXHAUSTED" and d.retry_after_s == pytest.approx(1.0)
    assert "estimated 4500 ms" in d.message and "retry in 1000 ms" in d.message
    d = adm.admit(req(deadline=99.0), 100.0, book, [E, P, D])
    assert (d.ok, d.code) == (False, "DEADLINE_EXCEEDED")


def test_admit_back_pressure_on_stage_queue_bound():
    book = LoadBook()
    book.add("old", "prefill", "p0", 4500)
    adm = Admission(Limits(queue_tokens={"prefill": 5000}), Placement("split"))
    d = adm.admit(req(), 0.0, book, [E, P, D, pre("p1", draining=True)])
    assert (d.ok, d.code) == (False, "RESOURCE_EXHAUSTED")
    assert d.message.startswith("limits.queue_tokens[prefill]: 4500 pending prefill tokens + 1000")
    assert d.retry_after_s == pytest.approx(500 / 2000)  # the excess over live prefill capacity
    assert d.choice is None
    # An oversize request on an empty stage is still admitted (else it could never run).
    assert adm.admit(req(prompt_tokens=9000), 0.0, LoadBook(), [E, P, D]).ok


def test_admit_max_inflight_and_unavailable():
    book = LoadBook()
    book.add("a", "prefill", "p0", 2000)  # 1 s to drain
    book.add("b", "decode", "d0", 10)
    adm = Admission(Limits(max_inflight=2, min_retry_s=0.0))
    d = adm.admit(req(), 0.0, book, [E, P, D])
    assert (d.ok, d.code) == (False, "RESOURCE_EXHAUSTED") and d.message.startswith("limits.max_inflight")
    assert d.retry_after_s == pytest.approx(1 * 1.0 / 2)  # one of two must finish; all drain in 1 s
    d = Admission().admit(req(), 0.0, LoadBook(), [P, D])  # has an image, no encoder
    assert (d.ok, d.code, d.retry_after_s) == (False, "UNAVAILABLE", 1.0) and "'encode'" in d.message
    assert Admission().admit(req(image_tokens=0), 0.0, LoadBook(), [P, D]).ok  # text only


def test_commit_books_every_stage_and_image_parts():
    book = LoadBook()
    insts = [enc("e0"), enc("e1"), P, D]
    r = RequestCost("r", media=(576, 576, 100), prompt_tokens=800, max_new_tokens=64)
    d = Admission(placement=Placement("split")).admit(r, 0.0, book, insts)
    assert d.ok and d.choice.names()["encode"] == ("e0", "e1", "e0")  # 100: tie -> e0
    rates = RateTracker(window_s=1.0, clock=lambda: 0.0)
    commit(book, r, d, rates=rates, now=0.0)
    assert book.parts("r", "encode") == {"e0": 676, "e1": 576}
    assert book.pending("prefill", "p0") == 800 and book.slots_used("d0") == 1
    assert rates.arrival_rate("encode", now=0.0) == pytest.approx(1252.0)
    with pytest.raises(ValueError):
        commit(book, r, Admission().admit(r, 0.0, book, [P, D]))


def test_order_key_priority_then_deadline_then_cost_then_seq():
    items = [
        ("low-soon", order_key(0, 5.0, 10, 0)),
        ("high-none", order_key(1, None, 999, 1)),
        ("low-none", order_key(0, None, 1, 2)),
        ("low-later-short", order_key(0, 9.0, 1, 3)),
        ("low-later-long", order_key(0, 9.0, 50, 4)),
        ("low-later-long-2", order_key(0, 9.0, 50, 5)),
        ("high-soon", order_key(1, 1.0, 999, 6)),
    ]
    assert [n for n, _ in sorted(items, key=lambda x: x[1])] == [
        "high-soon", "high-none", "low-soon", "low-later-short", "low-later-long", "low-later-long-2",
        "low-none"]


# -- placement ----------------------------------------------------------------------------------

COL = col("x0")  # same speeds as the dedicated ones; sorts after them on ties
DEDICATED = [enc("e0"), enc("e1"), pre("p0"), pre("p1"), dec("d0"), dec("d1")]


def test_adaptive_colocates_under_low_load_and_splits_under_high_load():
    place = Placement("adaptive", colocate_below=0.5, stall_budget_s=None)  # the utilisation rule alone
    book = LoadBook()
    r = req(image_tokens=200, prompt_tokens=400, max_new_tokens=8)
    c = place.decide(r, DEDICATED + [COL], book)
    assert c.path == "colocated" and c.names() == {"encode": ("x0",), "prefill": ("x0",), "decode": ("x0",)}
    assert "utilisation 0.00 < 0.5" in c.reason
    # A burst: keep admitting. x0 takes work while under half a second of it (0.48 s per
    # request) and its TTFT is no worse; then the burst spreads over the dedicated instances.
    seen = []
    for k in range(12):
        util = place.utilisation(COL, book)
        c = place.decide(r, DEDICATED + [COL], book)
        commit(book, RequestCost(f"b{k}", image_tokens=200, prompt_tokens=400, max_new_tokens=8), c)
        seen.append((util, c))
    assert [c.path for _, c in seen[:5]] == ["colocated", "split", "split", "colocated", "split"]
    assert seen[1][1].reason.startswith("split TTFT 400.0 ms < colocated 800.0 ms on x0")
    assert seen[1][1].names() == {"encode": ("e0",), "prefill": ("p0",), "decode": ("d0",)}
    assert seen[2][1].names() == {"encode": ("e1",), "prefill": ("p1",), "decode": ("d1",)}
    assert seen[4][1].reason == "x0 utilisation 0.96 >= 0.5"
    for util, c in seen:
        if util >= 0.5:  # busy: colocated only where split routing put every stage on x0 anyway
            assert c.path == "split" or c.reason == "split routing chose x0 for every stage"
    assert sum(c.path == "split" for _, c in seen) >= 8
    assert sum(book.pending("prefill", n) for n in ("p0", "p1")) > book.pending("prefill", "x0")


def test_adaptive_splits_rather_than_stall_the_colocated_workers_decodes():
    r = req(image_tokens=200, prompt_tokens=400, max_new_tokens=8)
    place = Placement("adaptive", colocate_below=0.9, stall_budget_s=0.1)
    book = LoadBook()
    first = place.decide(r, DEDICATED + [COL], book)
    assert first.path == "colocated"  # x0 idle: nothing to stall
    commit(book, RequestCost("b0", image_tokens=200, prompt_tokens=400, max_new_tokens=8), first)
    book.finish("b0", "encode")
    book.finish("b0", "prefill")  # b0 is decoding on x0 now
    stall = place.stall_s(r, COL)
    assert stall > 0.1
    second = place.decide(r, DEDICATED + [COL], book)
    assert second.path == "split"
    assert second.reason == f"x0 decodes 1 requests; this prompt pass would stall them {stall * 1e3:.0f} ms > 100 ms"
    # A short text-only prompt stalls little: colocated again.
    tiny = req(image_tokens=0, prompt_tokens=10, max_new_tokens=8)
    assert place.stall_s(tiny, COL) <= 0.1
    assert place.decide(tiny, DEDICATED + [COL], book).path == "colocated"


def test_adaptive_splits_when_split_ttft_is_better():
    # Two images encode in parallel on the split path (0.5 s) vs 1.0 s on the colocated one.
    r = RequestCost("r", media=(500, 500), prompt_tokens=400, max_new_tokens=8)
    c = Placement("adaptive").decide(r, DEDICATED + [COL], LoadBook())
    assert c.path == "split" and c.names()["encode"] == ("e0", "e1")
    assert c.reason.startswith("split TTFT 700.0 ms < colocated 1200.0 ms")
    # Adaptive with no colocated instance: split, saying why.
    c = Placement("adaptive").decide(r, DEDICATED, LoadBook())
    assert c.path == "split" and "no instance hosts all" in c.reason


def test_fixed_modes_force_or_fall_back_with_reason():
    r = req(image_tokens=200, prompt_tokens=400, max_new_tokens=8)
    c = Placement("split").decide(r, DEDICATED + [COL], LoadBook())
    assert c.path == "split" and c.reason == "mode=split"
    assert c.names() == {"encode": ("e0",), "prefill": ("p0",), "decode": ("d0",)}
    # Only a colocated instance: split is impossible, it runs colocated and says so.
    c = Placement("split").decide(r, [COL], LoadBook())
    assert c.path == "colocated" and "mode=split but only x0" in c.reason
    # Split with c0 and one dedicated prefill: prefill moves off c0.
    c = Placement("split").decide(r, [COL, pre("p9", cap=100.0)], LoadBook())
    assert c.path == "split" and c.names()["prefill"] == ("p9",)
    book = LoadBook()
    book.add("x", "prefill", "x0", 10**6)  # x0 is swamped: mode=colocated still colocates
    c = Placement("colocated").decide(r, DEDICATED + [COL], book)
    assert c.path == "colocated" and c.reason == "mode=colocated"
    c = Placement("colocated").decide(r, DEDICATED, book)
    assert c.path == "split" and "mode=colocated but no instance hosts all" in c.reason
    with pytest.raises(ValueError):
        Placement("sometimes")


def test_estimate_path_idle_ignores_queue():
    book = LoadBook()
    book.add("x", "prefill", "p0", 2000)
    r = req()
    busy = estimate_path(r, [E], P, D, book)
    idle = estimate_path(r, [E], P, D, book, idle=True)
    assert busy.ttft_s - idle.ttft_s == pytest.approx(1.0)


# -- autoscaling --------------------------------------------------------------------------------


def policy(**kw):
    base = dict(capacity=1000.0, min_replicas=1, max_replicas=6, target_utilisation=0.8,
                scale_in_cooldown_s=60.0, scale_out_cooldown_s=10.0)
    base.update(kw)
    return ScalePolicy(**base)


def test_scale_policy_base_replicas():
    p = policy()
    assert [p.base(x) for x in (0, 800, 801, 2000, 1e9)] == [1, 1, 2, 3, 6]


def test_autoscaler_burst_scales_out_then_back_in_within_bounds():
    scaler = Autoscaler({"prefill": policy()})
    actual = 1
    history = []  # (t, replicas)
    # 0-60 s idle-ish, 60-180 s burst ramping to 4,000 tok/s, then back to 200 tok/s.
    for t in range(0, 600, 5):
        load = 200.0 if t < 60 else min(4000.0, 200.0 + (t - 60) * 100.0) if t < 180 else 200.0
        want = scaler.desired(float(t), {"prefill": load}, 1.0, {"prefill": actual})["prefill"]
        assert 1 <= want <= 6
        if want != actual:
            history.append((t, actual, want))
            actual = want  # the platform obeys at once
    outs = [(t, a, w) for t, a, w in history if w > a]
    ins = [(t, a, w) for t, a, w in history if w < a]
    assert outs and max(w for _, _, w in outs) == 5  # ceil(4000 / 800)
    assert all(b[0] - a[0] >= 10 for a, b in zip(outs, outs[1:]))  # scale-out cooldown
    assert ins and all(a - w == 1 for _, a, w in ins)  # one step at a time
    assert ins[0][0] >= 180 + 60  # load stayed low for the scale-in cooldown first
    assert all(b[0] - a[0] >= 60 for a, b in zip(ins, ins[1:]))  # one step per cooldown
    assert actual == 1 and history[-1][2] == 1  # back to the floor


def test_autoscaler_slo_trigger_adds_one_replica_to_the_bottleneck_only():
    scaler = Autoscaler({"prefill": policy(), "decode": policy(capacity=100.0)})
    loads = {"prefill": 1500.0, "decode": 100.0}  # base 2 each
    actual = {"prefill": 2, "decode": 2}  # utilisation 0.75 vs 0.5: prefill is the bottleneck
    assert scaler.desired(0.0, loads, 1.0, actual) == {"prefill": 2, "decode": 2}
    got = scaler.desired(1.0, loads, {"prefill": 0.95, "decode": 0.5}, actual)
    assert got == {"prefill": 3, "decode": 2}  # decode misses too but is not the bottleneck
    assert "SLO 0.950 < 0.99" in scaler.reasons["prefill"]
    # Already at 3 and still missing: holds 3 (no scale-in while the SLO is missed), no runaway.
    assert scaler.desired(50.0, loads, 0.9, {"prefill": 3, "decode": 2})["prefill"] == 3
    # Bounded by max.
    s = Autoscaler({"prefill": policy(max_replicas=2)})
    assert s.desired(0.0, {"prefill": 1500.0}, 0.0, {"prefill": 2}) == {"prefill": 2}


def test_autoscaler_cooldowns_and_bounds():
    scaler = Autoscaler({"encode": policy(min_replicas=2, max_replicas=4)})
    assert scaler.desired(0.0, {}, 1.0, {"encode": 0}) == {"encode": 2}  # below min: at once
    assert scaler.desired(1.0, {"encode": 1e9}, 1.0, {"encode": 9}) == {"encode": 4}  # above max
    s = Autoscaler({"encode": policy()})
    assert s.desired(0.0, {"encode": 1600.0}, 1.0, {"encode": 1}) == {"encode": 2}
    assert s.desired(5.0, {"encode": 3200.0}, 1.0, {"encode": 2}) == {"encode": 2}  # cooling down
    assert s.desired(10.0, {"encode": 3200.0}, 1.0, {"encode": 2}) == {"encode": 4}
    # Load falls: held for 60 s of low load and 60 s since the last change, then one step.
    assert s.desired(20.0, {"encode": 0.0}, 1.0, {"encode": 4}) == {"encode": 4}
    assert s.desired(50.0, {"encode": 0.0}, 1.0, {"encode": 4}) == {"encode": 4}
    assert s.desired(55.0, {"encode": 3200.0}, 1.0, {"encode": 4}) == {"encode": 4}  # spike resets
    assert s.desired(60.0, {"encode": 0.0}, 1.0, {"encode": 4}) == {"encode": 4}
    assert s.desired(119.0, {"encode": 0.0}, 1.0, {"encode": 4}) == {"encode": 4}
    assert s.desired(120.0, {"encode": 0.0}, 1.0, {"encode": 4}) == {"encode": 3}
    assert s.desired(150.0, {"encode": 0.0}, 1.0, {"encode": 3}) == {"encode": 3}
    assert s.desired(180.0, {"encode": 0.0}, 1.0, {"encode": 3}) == {"encode": 2}


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1), st.integers(0, 20), st.floats(0, 100)),
                   min_size=1, max_size=30),
    lo=st.integers(0, 3),
    span=st.integers(0, 5),
)
def test_property_autoscaler_always_within_bounds(steps, lo, span):
    pol = policy(min_replicas=lo, max_replicas=lo + span)
    scaler = Autoscaler({"prefill": pol, "decode": policy(capacity=50.0)})
    now = 0.0
    for load, att, actual, dt in steps:
        now += dt
        out = scaler.desired(now, {"prefill": load, "decode": load / 10}, att,
                             {"prefill": actual, "decode": actual})
        assert lo <= out["prefill"] <= lo + span
        assert 1 <= out["decode"] <= 8


def test_capacity_from_profile_is_robust():
    samples = [(1000, 1.0), (1000, 0.98), (1000, 1.02), (1000, 10.0), (1000, 0.0), (500, 0.5)]
    assert capacity_from_profile(samples) == pytest.approx(1000.0)
    with pytest.raises(ValueError):
        capacity_from_profile([(10, 0.0)])
    assert math.isclose(capacity_from_profile([(300, 2.0)]), 150.0)


def test_a_tasks_share_of_its_batch_measures_the_batchs_throughput():
    # a batch of 600 + 200 tokens in 2 s: each task's (tokens, share) is 400 tokens/s, the batch's
    shares = [task_share_s(n, 2.0, 800) for n in (600, 200)]
    assert shares == [1.5, 0.5]
    assert capacity_from_profile([(600, shares[0]), (200, shares[1])]) == 400.0
    assert task_share_s(300, 2.0) == 2.0  # the batch's tokens unknown: all of it
    assert task_share_s(300, 2.0, 100) == 2.0  # inconsistent counts: all of it
