"""The simulator: clock order, profile interpolation and validation, exact latencies on a tiny
cluster, determinism, and decisions equal to the scheduler core's."""
from __future__ import annotations

import json
import random

import pytest

from prism.sim.events import Clock
from prism.sim.profile import SimProfileError, StageTable, from_dict, load, loads
from prism.sim.run import parse_cluster
from prism.sim.simulator import DEFAULT_CAPACITY, InstanceSpec, SimConfig, SimRequest, simulate
from services.scheduler.core import Instance, LoadBook, Placement, RequestCost


def doc(**over) -> dict:
    d = {"version": 1, "kind": "prism-sim-profile", "model": {"name": "toy"},
         "media": {"tokens_per_image": 100, "prompt_tokens_per_image": 100},
         "stages": {"encode": {"curves": {"1": [[100, 50.0]]}},
                    "prefill": {"curves": {"1": [[100, 100.0]]}},
                    "decode": {"curves": {"1": [[1, 10.0]]}}},
         "sources": [{"id": "hand", "title": "by hand", "used_for": "tests"}]}
    d.update(over)
    return d


FIXED = from_dict(doc())
ALL = ("encode", "prefill", "decode")


# ---- clock ---------------------------------------------------------------------------------

def test_clock_runs_in_time_order_and_ties_in_scheduling_order():
    clock, seen = Clock(), []
    clock.at(2.0, lambda: seen.append(("b", clock.now)))
    clock.at(1.0, lambda: seen.append(("a", clock.now)))
    clock.at(2.0, lambda: seen.append(("c", clock.now)))
    h = clock.at(1.5, lambda: seen.append(("never", clock.now)))
    h.cancel()
    clock.at(1.0, lambda: clock.after(0.25, lambda: seen.append(("d", clock.now))))
    assert clock.run() == 2.0
    assert seen == [("a", 1.0), ("d", 1.25), ("b", 2.0), ("c", 2.0)]


def test_clock_run_until_stops_before_later_events():
    clock, seen = Clock(), []
    clock.at(1.0, lambda: seen.append(1))
    clock.at(3.0, lambda: seen.append(3))
    clock.run(until=2.0)
    assert seen == [1] and clock.now == 1.0
    clock.run()
    assert seen == [1, 3]


# ---- profile -------------------------------------------------------------------------------

def test_interpolation_along_tokens_and_batches():
    t = StageTable({1: ((100, 10.0), (300, 30.0)), 4: ((100, 20.0), (300, 60.0))}, {1: 1.0, 4: 2.0})
    assert t.ms(1, 200) == pytest.approx(20.0)
    assert t.ms(1, 50) == pytest.approx(10.0)  # below the first point: its value
    assert t.ms(1, 500) == pytest.approx(50.0)  # above: the last slope
    assert t.ms(2, 200) == pytest.approx(20.0 + (40.0 - 20.0) / 3)  # between batches 1 and 4
    assert t.ms(8, 100) == pytest.approx(20.0 + (20.0 - 10.0) / 3 * 4)  # extrapolated past batch 4
    assert t.ms(4, 300, tp=4) == pytest.approx(30.0)
    with pytest.raises(ValueError, match="tp=2"):
        t.ms(1, 100, tp=2)


def test_single_point_curve_is_flat():
    assert FIXED.latency_s("prefill", 1, 7) == pytest.approx(0.1)
    assert FIXED.latency_s("prefill", 1, 7000) == pytest.approx(0.1)


@pytest.mark.parametrize("change,field", [
    ({"version": 2}, "version"),
    ({"kind": "other"}, "kind"),
    ({"sources": []}, "sources"),
    ({"media": {"tokens_per_image": -1, "prompt_tokens_per_image": 0}}, "media.tokens_per_image"),
    ({"stages": {"encode": {"curves": {"1": [[100, 50.0]]}}, "prefill": {"curves": {"1": [[100, 1.0]]}}}},
     "stages.decode"),
    ({"stages": {"encode": {"curves": {"0": [[1, 1.0]]}}, "prefill": {"curves": {"1": [[1, 1.0]]}},
                 "decode": {"curves": {"1": [[1, 1.0]]}}}}, "stages.encode.curves.0"),
    ({"stages": {"encode": {"curves": {"1": [[5, 1.0], [5, 2.0]]}}, "prefill": {"curves": {"1": [[1, 1.0]]}},
                 "decode": {"curves": {"1": [[1, 1.0]]}}}}, "stages.encode.curves.1[1][0]"),
    ({"stages": {"encode": {"curves": {"1": [[1, 0.0]]}}, "prefill": {"curves": {"1": [[1, 1.0]]}},
                 "decode": {"curves": {"1": [[1, 1.0]]}}}}, "stages.encode.curves.1[0][1]"),
    ({"stages": {"encode": {"curves": {"1": [[1, 1.0]]}, "tp_speedup": {"4": 3.0}},
                 "prefill": {"curves": {"1": [[1, 1.0]]}}, "decode": {"curves": {"1": [[1, 1.0]]}}}},
     "stages.encode.tp_speedup.1"),
    ({"overheads_ms": {"nope": 1.0}}, "overheads_ms.nope"),
    ({"extra": 1}, "extra"),
])
def test_schema_names_the_bad_field(change, field):
    with pytest.raises(SimProfileError) as info:
        from_dict(doc(**change))
    assert info.value.field == field


def test_profile_round_trips_and_shipped_profiles_cite_sources():
    again = loads(json.dumps(FIXED.as_dict()))
    assert again.as_dict() == FIXED.as_dict()
    for name in ("modserve-a100-llama32-11b-vision", "modserve-a100-internvl-26b"):
        p = load(name)
        ids = {s["id"] for s in p.sources}
        assert {"modserve", "a100"} <= ids
        assert any("DERIVED" in line for line in p.derivation)
        assert p.stages["decode"].tp_speedup[4] > 1


# ---- tiny clusters with exact latencies -------------------------------------------------------

def test_one_colocated_worker_fixed_latencies_exact_ttft():
    # encode 50 ms + prefill 100 ms; decode 10 ms a step; no overheads; requests never overlap
    reqs = [SimRequest(f"r{i}", float(i), 100, 1, 5) for i in range(3)]
    res = simulate(reqs, SimConfig((InstanceSpec(ALL),), placement="colocated"), FIXED)
    assert [r.status for r in res.records] == ["OK"] * 3
    for r in res.records:
        assert r.ttft_ms == pytest.approx(150.0)
        assert r.tpot_ms == pytest.approx(10.0)
        assert r.e2e_ms == pytest.approx(190.0)
        assert r.tokens == 5
    assert res.placements == {"split": 0, "colocated": 3}


def test_queueing_on_one_worker_is_exact():
    # two text requests at once on one split pipeline: the second prefill waits for the first
    # (the queue serves the smaller cost first: r1 has the shorter prompt)
    reqs = [SimRequest("r0", 0.0, 200, 0, 1), SimRequest("r1", 0.0, 100, 0, 1)]
    specs = (InstanceSpec(("prefill",), prefill_batch_tokens=1), InstanceSpec(("decode",)))
    res = simulate(reqs, SimConfig(specs, placement="split"), FIXED)
    ttft = {r.expected_tokens: r.ttft_ms for r in res.records}
    assert sorted(r.ttft_ms for r in res.records) == pytest.approx([100.0, 200.0])
    assert all(r.tokens == 1 for r in res.records) and len(ttft) == 1


def test_shared_processor_slows_concurrent_calls():
    # two single-stage prefill workers on ONE shared core: two prompts at once take twice as long
    d = doc(hardware={"shared_cores": 1})
    p = from_dict(d)
    reqs = [SimRequest("r0", 0.0, 100, 0, 1), SimRequest("r1", 0.0, 100, 0, 1)]
    specs = (InstanceSpec(("prefill",), count=2), InstanceSpec(("decode",)))
    res = simulate(reqs, SimConfig(specs, placement="split"), p)
    assert sorted(r.ttft_ms for r in res.records) == pytest.approx([200.0, 200.0])


# ---- determinism --------------------------------------------------------------------------

def random_requests(seed: int, n: int = 120) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for k in range(n):
        t += rng.expovariate(8.0)
        out.append(SimRequest(f"q{k}", t, rng.randint(10, 400), rng.choice((0, 0, 1, 2, 5)), rng.randint(1, 40)))
    return out


def test_same_seed_gives_identical_records_and_decisions():
    prof = load("modserve-a100-llama32-11b-vision")
    cfg = SimConfig(parse_cluster("encode@tp1x3,prefill@tp4x2,decode@tp4x2,all@tp4x1", slots=8))
    a = simulate(random_requests(7), cfg, prof)
    b = simulate(random_requests(7), cfg, prof)
    assert a.records == b.records
    assert a.decisions == b.decisions
    assert a.events == b.events
    c = simulate(random_requests(8), cfg, prof)
    assert c.records != a.records


# ---- decisions are the core's ---------------------------------------------------------------

def test_decisions_equal_the_placement_core_on_the_same_inputs():
    # Three text requests arriving together on two prefill and two decode workers, with
    # advertised capacities: the simulator must choose exactly what Placement.decide chooses on
    # the load book the live pipeline would hold (each arrival's prefill and decode are not
    # booked until its tasks are queued, so at the same instant the book is empty for all).
    caps = {"prefill": 1000.0, "decode": 100.0}
    specs = (InstanceSpec(("prefill",), count=2, capacity=caps), InstanceSpec(("decode",), count=2, capacity=caps,
                                                                           slots=4))
    reqs = [SimRequest("a", 0.0, 300, 0, 3), SimRequest("b", 0.5, 100, 0, 3), SimRequest("c", 0.5005, 50, 0, 3)]
    res = simulate(reqs, SimConfig(specs, placement="split", refresh_s=10.0), FIXED)

    insts = [Instance(f"prefill-{k}", f"prefill-{k}", frozenset({"prefill"}), {"prefill": 1000.0}) for k in range(2)]
    insts += [Instance(f"decode-{k}", f"decode-{k}", frozenset({"decode"}), {"decode": 100.0}, decode_slots=4)
              for k in range(2)]
    place, book = Placement("split"), LoadBook()
    want = []
    for rid, prompt in (("a", 300), ("b", 100), ("c", 50)):
        choice = place.decide(RequestCost(rid, prompt_tokens=prompt, max_new_tokens=3), insts, book)
        want.append((rid, choice.path, choice.names()))
        if rid == "b":
            book.add("b/a1/prefill", "prefill", choice.prefill.name, prompt)
            book.add("b/a1/decode", "decode", choice.decode.name, 2)
    got = [(d[0], d[3], d[4]) for d in res.decisions]
    assert got == want
    assert got[2][2] == {"prefill": ("prefill-1",), "decode": ("decode-1",)}  # c avoids b's workers


def test_admission_refusal_is_the_core_s():
    # a TTFT target no path can meet: refused by Admission with its own code and message
    reqs = [SimRequest("r0", 0.0, 100, 0, 2, ttft_target_s=0.001)]
    specs = (InstanceSpec(ALL, capacity={"encode": 1000.0, "prefill": 1000.0, "decode": 100.0}),)
    res = simulate(reqs, SimConfig(specs), FIXED)
    rec = res.records[0]
    assert rec.status == "RESOURCE_EXHAUSTED"
    assert rec.message.startswith("slo.ttft_ms: TTFT target in 1 ms cannot be met: estimated 100 ms")
    assert res.decisions[0][2] == "RESOURCE_EXHAUSTED"


def test_default_capacity_matches_the_cluster():
    from services.scheduler.cluster import DEFAULT_CAPACITY as live

    assert dict(DEFAULT_CAPACITY) == live


def test_cluster_shapes():
    specs = parse_cluster("all@tp4x32", slots=64)
    assert specs[0].stages == ALL and specs[0].count == 32 and specs[0].tp == 4 and specs[0].slots == 64
    assert SimConfig(parse_cluster("e@tp1x32,p@tp4x12,d@tp4x12")).gpus == 128
    with pytest.raises(ValueError, match="'encode@x'"):
        parse_cluster("encode@x")
    with pytest.raises(ValueError, match="unknown stage"):
        parse_cluster("vision@tp1x2")


def test_prism_simulate_prints_bench_statistics(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app

    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens,NumImages"]
    rows += [f"{k * 0.5},{100 + 10 * k},{4 + k % 3},{k % 3}" for k in range(12)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "s.json"
    args = ["simulate", "--profile", "modserve-a100-internvl-26b", "--trace", str(trace), "--cluster",
            "all@tp4x2", "--placement", "colocated", "--duration", "10", "--out", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads(out.read_text())
    assert report["requests"] == 12 and report["counts"] == {"OK": 12}
    assert report["config"]["gpus"] == 8
    assert report["sim"]["placements"] == {"split": 0, "colocated": 12}
    assert {"ttft_ms", "tpot_ms", "goodput_rps", "slo_attainment"} <= set(report)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and json.loads(out.read_text()) == report  # deterministic
    bad = CliRunner().invoke(app, [*args[:6], "vision@tp1x2"])
    assert bad.exit_code != 0 and "unknown stage" in bad.output
