"""The pure pieces of adaptation's live mechanics: the variant mix (pins, floors, weighted round
robin), the variants' spec, compute shares and their application on the compute thread, the
budget-driven batch bound, and the dynamic-SLO deadline at intake."""
from __future__ import annotations

import os
import time

import pytest

from prism.runtime.compute import BatchBudget, ComputeShare, ShareError, resolve_share
from prism.runtime.stagework import ComputeThread
from prism.v1 import common_pb2, prism_pb2
from services.scheduler.core.variants import Variant, VariantError, VariantMix, parse_variants
from services.scheduler.intake import Limits, RequestError, ServedModel, admit


def mix(**acc: float) -> VariantMix:
    return VariantMix([Variant(n, a) for n, a in acc.items()])


def test_pinned_variant_wins_and_an_unknown_one_names_the_field():
    m = mix(small=0.6, large=0.8)
    assert m.resolve("small", floor=0.9) == "small"
    with pytest.raises(VariantError) as err:
        m.resolve("medium")
    assert err.value.field == "variant" and "'medium'" in str(err.value) and "['small', 'large']" in str(err.value)


def test_floor_excludes_less_accurate_variants_and_refuses_when_none_reaches_it():
    m = mix(small=0.6, large=0.8)
    assert [m.resolve("", floor=0.7) for _ in range(5)] == ["large"] * 5
    with pytest.raises(VariantError) as err:
        m.resolve("", floor=0.9)
    assert err.value.field == "selection.accuracy_floor"


def test_weighted_round_robin_gives_exact_shares():
    m = mix(small=0.6, large=0.8)
    m.set_weights({"small": 3, "large": 1})
    picks = [m.resolve("") for _ in range(8)]
    assert picks.count("small") == 6 and picks.count("large") == 2
    assert picks[:4].count("small") == 3  # smooth: within one of the share over any prefix
    m.set_weights({"large": 1})  # small not named: 0
    assert {m.resolve("") for _ in range(4)} == {"large"}
    with pytest.raises(ValueError):
        m.set_weights({"small": 0, "large": 0})
    with pytest.raises(ValueError):
        m.set_weights({"huge": 1})


def test_unpinned_requests_prefer_variants_with_live_workers():
    m = mix(small=0.6, large=0.8)
    assert {m.resolve("", available={"large"}) for _ in range(4)} == {"large"}
    assert m.resolve("", floor=0.7, available={"small"}) == "large"  # none live qualifies: the mix decides


def test_parse_variants():
    assert parse_variants("small=/m/a:0.71, large=/m/b") == (("small", "/m/a", 0.71), ("large", "/m/b", None))
    assert parse_variants("x=C:/dir") == (("x", "C:/dir", None),)
    for bad in ("small", "small=/a,small=/b", "s p=/a", "a=/m:1.5"):
        with pytest.raises(ValueError):
            parse_variants(bad)


def test_resolve_share_keeps_what_is_unset_and_names_bad_fields():
    cur = ComputeShare(threads=2, cpus=(0, 1), max_batch=0)
    assert resolve_share(cur, (0, 1), cpus=(1,)) == ComputeShare(1, (1,), 0)
    assert resolve_share(cur, (0, 1), threads=1) == ComputeShare(1, (0, 1), 0)
    assert resolve_share(cur, (0, 1), max_batch=3) == ComputeShare(2, (0, 1), 3)
    assert ComputeShare(4, (0, 1)).cores == 2
    with pytest.raises(ShareError) as err:
        resolve_share(cur, (0, 1), cpus=(0, 7))
    assert err.value.field == "share.cpus" and "[7]" in str(err.value)
    with pytest.raises(ShareError) as err:
        resolve_share(cur, (0, 1), threads=-1)
    assert err.value.field == "share.threads"


async def test_compute_thread_applies_a_share_on_its_own_thread():
    import torch

    compute = ComputeThread("t", torch_threads=2)
    allowed = compute.allowed_cpus
    try:
        assert await compute.run(torch.get_num_threads) == 2
        await compute.apply(ComputeShare(threads=1, cpus=allowed[:1], max_batch=3))
        assert await compute.run(torch.get_num_threads) == 1
        assert compute.max_batch == 3 and compute.generation == 1
        assert tuple(sorted(os.sched_getaffinity(0))) == allowed[:1]
    finally:
        await compute.apply(ComputeShare(threads=len(allowed), cpus=allowed))
        compute.shutdown()
    assert tuple(sorted(os.sched_getaffinity(0))) == allowed


async def test_compute_thread_times_a_call_in_wall_and_cpu_seconds():
    import time

    def spin(seconds: float) -> str:
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return "spun"

    compute = ComputeThread("t")
    try:
        out, wall, cpu = await compute.timed(spin, 0.2)
        assert out == "spun" and cpu >= 0.2 and wall >= 0.2  # busy: it burns what it takes
        out, wall, cpu = await compute.timed(time.sleep, 0.3)
        assert out is None and wall >= 0.3 and cpu < 0.15  # waiting costs no CPU
        await compute.run(spin, 0.2)  # work around the timed calls (serving outputs...) counts too
        out, wall, cpu = await compute.timed(time.sleep, 0.05)
        assert wall < 0.2 <= cpu
    finally:
        compute.shutdown()


def test_batch_budget_bounds_the_batch_by_the_tightest_budget():
    budget = BatchBudget()
    assert budget.limit(1, [50.0, 50.0], max_batch=0) == 0  # nothing measured: unbounded
    for b, ms in ((1, 10.0), (2, 20.0), (4, 40.0)):
        budget.record(1, b, ms)
    assert budget.limit(1, [25.0, 100.0, 100.0, 100.0], max_batch=0) == 2
    assert budget.limit(1, [100.0] * 4, max_batch=0) == 4
    assert budget.limit(1, [float("inf")] * 4, max_batch=3) == 3  # no deadlines: the share's bound
    assert budget.limit(1, [45.0] * 4, max_batch=3) == 3


@pytest.fixture(scope="module")
def served(tiny_models) -> ServedModel:
    return ServedModel.load("llava", tiny_models["llava"], 512)


def request(**kw) -> prism_pb2.GenerateRequest:
    return prism_pb2.GenerateRequest(prompt="hello", sampling=common_pb2.SamplingParams(max_new_tokens=4), **kw)


def test_deadline_counts_from_the_send_time(served):
    sent = int(time.time() * 1000) - 1500  # the network (or a queue) took 1.5 s
    adm = admit(request(sent_unix_ms=sent, slo=prism_pb2.Slo(deadline_ms=4000)), {"llava": served}, "llava", Limits())
    assert adm.deadline == pytest.approx((sent + 4000) / 1000)
    plain = admit(request(slo=prism_pb2.Slo(deadline_ms=4000)), {"llava": served}, "llava", Limits())
    assert plain.deadline == pytest.approx(plain.arrival + 4.0)


def test_send_time_far_in_the_future_is_refused_naming_the_field(served):
    future = int((time.time() + 3600) * 1000)
    with pytest.raises(RequestError) as err:
        admit(request(sent_unix_ms=future), {"llava": served}, "llava", Limits())
    assert err.value.code == "INVALID_ARGUMENT" and err.value.field == "sent_unix_ms"


def test_sdk_sets_the_send_time_and_the_variant():
    from prism.client.request import build_request

    before = int(time.time() * 1000)
    req = build_request("hi", variant="small")
    assert req.variant == "small" and before <= req.sent_unix_ms <= int(time.time() * 1000)
