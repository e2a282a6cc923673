"""Adaptation's integer programs against exhaustive search on small random cases: IPA's pipeline
program, InfAdapter's variant mix, Sponge's vertical scaling; bounds and infeasibility."""
from __future__ import annotations

import itertools
import math
import random

import pytest

from services.scheduler.core.adapt import (
    Bounds,
    Infeasible,
    LatencyModel,
    VariantProfile,
    Weights,
    solve_pipeline,
    solve_variants,
    solve_vertical,
)

TOL = 1e-6


def random_model(rng: random.Random) -> LatencyModel:
    """Measured points that need not follow any formula (cores 1, 2, 4; batches 1, 2, 4, 8)."""
    base, per = rng.uniform(5, 80), rng.uniform(2, 40)
    return LatencyModel({c: {b: (base + per * b) / (c ** rng.uniform(0.4, 1.0)) * rng.uniform(0.9, 1.1)
                             for b in (1, 2, 4, 8)} for c in (1, 2, 4)})


def random_bounds(rng: random.Random, stages) -> Bounds:
    return Bounds(max_replicas={s: rng.randint(1, 3) for s in stages},
                  batches={"*": tuple(rng.sample((1, 2, 3, 4, 8), rng.randint(1, 3)))},  # 3: interpolated
                  cores={"*": tuple(rng.sample((1, 2, 3, 4), rng.randint(1, 2)))},  # 3: the fitted model
                  total_cores=rng.randint(2, 16), headroom=rng.choice((0.0, 0.1, 0.25)),
                  min_accuracy=rng.choice((0.0, 0.0, 0.5, 0.7)))


def latency(v, b, c, rate):
    return v.latency_ms(b, c) + (0.0 if b == 1 or rate <= 0 else 1000.0 * (b - 1) / rate)  # at rate 0 nothing waits


# -- IPA ------------------------------------------------------------------------------------------


def pipeline_case(seed: int):
    rng = random.Random(seed)
    stages = ["encode", "prefill", "decode"][: rng.randint(1, 3)]
    variants = {s: [VariantProfile(f"{s}{k}", s, round(rng.uniform(0.6, 1.0), 3), random_model(rng))
                    for k in range(rng.randint(1, 2 if len(stages) == 3 else 3))] for s in stages}
    combos = None
    if rng.random() < 0.3:  # only some combinations may run together
        every = list(itertools.product(*[[(s, v.name) for v in vs] for s, vs in variants.items()]))
        combos = [dict(k) for k in rng.sample(every, rng.randint(1, len(every)))]
    return variants, rng.choice((0.0, rng.uniform(1, 40))), rng.uniform(50, 600), random_bounds(rng, stages), \
        Weights(accuracy=rng.choice((0.0, 5.0, 40.0)), cost=rng.choice((1.0, 0.5))), combos


def stage_candidates(stage, vs, rate, bounds):
    """Every (variant, batch, cores, replicas) of a stage meeting the stage's own bounds."""
    out = []
    for v, b, c in itertools.product(vs, bounds.batches_for(stage), bounds.cores_for(stage)):
        for n in range(0, bounds.replicas_for(stage) + 1):
            if n >= bounds.min_replicas and n * 1000.0 * b / v.latency_ms(b, c) >= rate * (1 + bounds.headroom) - 1e-9:
                out.append((v, b, c, n))
    return out


def brute_pipeline(variants, rate, slo, bounds, weights, combos=None):
    best = None
    per_stage = [stage_candidates(s, vs, rate, bounds) for s, vs in variants.items()]
    for combo in itertools.product(*per_stage):
        if combos is not None and {s: v.name for s, (v, *_) in zip(variants, combo)} not in combos:
            continue
        lat = sum(latency(v, b, c, rate) for v, b, c, n in combo)
        cores = sum(c * n for v, b, c, n in combo)
        acc = math.prod(v.accuracy for v, *_ in combo)
        if lat <= slo + 1e-9 and cores <= bounds.total_cores and acc >= bounds.min_accuracy - 1e-9:
            obj = weights.cost * cores - weights.accuracy * acc
            best = obj if best is None else min(best, obj)
    return best


def check_pipeline(config, variants, rate, slo, bounds, weights):
    """Every bound holds and the reported figures are the configuration's."""
    by = {s: {v.name: v for v in vs} for s, vs in variants.items()}
    assert set(config.stages) == set(variants)
    lat = cores = 0.0
    acc = 1.0
    for s, ch in config.stages.items():
        v = by[s][ch.variant]
        assert ch.batch in bounds.batches_for(s) and ch.cores in bounds.cores_for(s)
        assert bounds.min_replicas <= ch.replicas <= bounds.replicas_for(s)
        assert ch.replicas * 1000.0 * ch.batch / v.latency_ms(ch.batch, ch.cores) >= rate * (1 + bounds.headroom) - 1e-9
        lat += latency(v, ch.batch, ch.cores, rate)
        cores += ch.cores * ch.replicas
        acc *= v.accuracy
    assert lat <= slo + 1e-9 and cores <= bounds.total_cores and acc >= bounds.min_accuracy - 1e-9
    assert config.cost_cores == cores and config.latency_ms == pytest.approx(lat)
    assert config.expected_accuracy == pytest.approx(acc)
    return weights.cost * cores - weights.accuracy * acc


@pytest.mark.parametrize("seed", range(120))
def test_pipeline_equals_exhaustive_search(seed):
    variants, rate, slo, bounds, weights, combos = pipeline_case(seed)
    best = brute_pipeline(variants, rate, slo, bounds, weights, combos)
    if best is None:
        with pytest.raises(Infeasible):
            solve_pipeline(variants, rate, slo, bounds, weights, combinations=combos)
        return
    config = solve_pipeline(variants, rate, slo, bounds, weights, combinations=combos)
    if combos is not None:
        assert {s: c.variant for s, c in config.stages.items()} in combos
    assert check_pipeline(config, variants, rate, slo, bounds, weights) == pytest.approx(best, abs=TOL)
    assert config.objective == pytest.approx(best, abs=TOL)


def test_pipeline_cases_are_not_trivial():
    """The random cases exercise both outcomes and several choices (guards the generator)."""
    outcomes = [brute_pipeline(*pipeline_case(seed)) for seed in range(120)]
    assert sum(pipeline_case(seed)[-1] is not None for seed in range(120)) > 20
    assert 20 < sum(o is None for o in outcomes) < 100


def two_variants():
    small = VariantProfile("small", "prefill", 0.7, LatencyModel.parametric(10, 40))
    large = VariantProfile("large", "prefill", 0.9, LatencyModel.parametric(40, 160))
    return small, large


def test_pipeline_keeps_variants_that_must_run_together():
    small, large = two_variants()
    dec = [VariantProfile("small", "decode", 1.0, LatencyModel.parametric(5, 20)),
           VariantProfile("large", "decode", 1.0, LatencyModel.parametric(40, 160))]  # 200 ms: 2 workers
    bounds = Bounds(max_replicas={"*": 8}, batches={"*": (1,)}, cores={"*": (1,)}, total_cores=32, headroom=0.0)
    free = solve_pipeline({"prefill": [small, large], "decode": dec}, 10, 1000, bounds, Weights(accuracy=6.0))
    assert [c.variant for c in free.stages.values()] == ["large", "small"]  # a mismatch, when allowed
    tied = solve_pipeline({"prefill": [small, large], "decode": dec}, 10, 1000, bounds, Weights(accuracy=6.0),
                          combinations=[{"prefill": n, "decode": n} for n in ("small", "large")])
    assert [c.variant for c in tied.stages.values()] == ["small", "small"]  # 2 - 4.2 beats large: 4 - 5.4
    with pytest.raises(ValueError, match="combination"):
        solve_pipeline({"prefill": [small]}, 1, 1000, combinations=[{"prefill": "huge"}])


def test_pipeline_trades_accuracy_for_cost_by_the_weights():
    small, large = two_variants()
    bounds = Bounds(max_replicas={"*": 8}, batches={"*": (1,)}, cores={"*": (1,)}, total_cores=32, headroom=0.0)
    # 10 req/s: small (50 ms) needs 1 worker, large (200 ms) needs 2.
    cheap = solve_pipeline({"prefill": [small, large]}, 10, 1000, bounds, Weights(accuracy=4.0))
    assert (cheap.stages["prefill"].variant, cheap.stages["prefill"].replicas) == ("small", 1)
    rich = solve_pipeline({"prefill": [small, large]}, 10, 1000, bounds, Weights(accuracy=6.0))
    assert (rich.stages["prefill"].variant, rich.stages["prefill"].replicas) == ("large", 2)
    floor = solve_pipeline({"prefill": [small, large]}, 10, 1000, Bounds(**{**bounds.__dict__, "min_accuracy": 0.8}),
                           Weights(accuracy=0.0))
    assert floor.stages["prefill"].variant == "large"


def test_pipeline_infeasible_names_the_bound():
    small, large = two_variants()
    with pytest.raises(Infeasible, match="SLO"):
        solve_pipeline({"prefill": [small, large]}, 1, 10, Bounds())
    with pytest.raises(Infeasible, match="accuracy"):
        solve_pipeline({"prefill": [small, large]}, 1, 1000, Bounds(min_accuracy=0.95))
    with pytest.raises(Infeasible, match="capacity"):  # 1000 req/s is beyond 4 replicas
        solve_pipeline({"prefill": [small, large]}, 1000, 1000, Bounds())
    enc = VariantProfile("enc", "encode", 1.0, LatencyModel.parametric(10, 40))
    with pytest.raises(Infeasible, match="cores"):  # each stage alone fits 3 cores, not both
        solve_pipeline({"encode": [enc], "prefill": [small]}, 30, 1000,
                       Bounds(cores={"*": (1,)}, batches={"*": (1,)}, total_cores=3, headroom=0.0))
    with pytest.raises(ValueError, match="stage 'decode'"):
        solve_pipeline({"decode": [small]}, 1, 1000)


# -- InfAdapter -------------------------------------------------------------------------------------


def variants_case(seed: int):
    rng = random.Random(1000 + seed)
    vs = [VariantProfile(f"v{k}", "pipeline", round(rng.uniform(0.5, 1.0), 3), random_model(rng))
          for k in range(rng.randint(1, 3))]
    bounds = Bounds(max_replicas={"*": rng.randint(1, 3)}, batches={"*": tuple(rng.sample((1, 2, 4), rng.randint(1, 2)))},
                    cores={"*": tuple(rng.sample((1, 2, 4), rng.randint(1, 2)))}, total_cores=rng.randint(1, 10),
                    headroom=rng.choice((0.0, 0.1)), min_accuracy=rng.choice((0.0, 0.0, 0.7)))
    pinned = {}
    rate = rng.uniform(1, 40)
    if rng.random() < 0.3:
        pinned = {vs[-1].name: round(rate * rng.uniform(0.1, 0.5), 3)}
    return vs, rate, rng.uniform(50, 500), bounds, Weights(accuracy=rng.choice((0.0, 5.0, 40.0))), pinned


def best_shares(parts, rate, floor, pinned):
    """Fractional knapsack: shares in [lo, hi] summing to `rate`, most accuracy (None: none fit)."""
    lo = [max(p["lo"], pinned.get(p["v"].name, 0.0)) for p in parts]
    hi = [p["hi"] for p in parts]
    if any(a > b + 1e-9 for a, b in zip(lo, hi)) or sum(lo) > rate + 1e-9 or sum(hi) < rate - 1e-9:
        return None
    shares, left = list(lo), rate - sum(lo)
    for k in sorted(range(len(parts)), key=lambda k: -parts[k]["v"].accuracy):
        add = min(left, hi[k] - shares[k])
        shares[k] += add
        left -= add
    acc = sum(p["v"].accuracy * s for p, s in zip(parts, shares)) / rate
    return acc if acc >= floor - 1e-7 else None


def brute_variants(vs, rate, slo, bounds, weights, pinned):
    stage, best = "pipeline", None
    per_variant = []
    for v in vs:
        opts = [None]
        for b, c in itertools.product(bounds.batches_for(stage), bounds.cores_for(stage)):
            service = v.latency_ms(b, c)
            if service > slo:
                continue
            lo = 0.0 if b == 1 else (math.inf if slo <= service else 1000.0 * (b - 1) / (slo - service))
            for n in range(bounds.min_replicas, bounds.replicas_for(stage) + 1):
                hi = min(rate, n * 1000.0 * b / service / (1 + bounds.headroom))
                opts.append({"v": v, "b": b, "c": c, "n": n, "lo": lo, "hi": hi})
        per_variant.append(opts)
    for combo in itertools.product(*per_variant):
        parts = [p for p in combo if p is not None]
        if not parts or sum(p["n"] for p in parts) > bounds.replicas_for(stage):
            continue
        cores = sum(p["c"] * p["n"] for p in parts)
        if cores > bounds.total_cores or any(pinned.get(v.name, 0) > 0 and v.name not in {p["v"].name for p in parts}
                                             for v in vs):
            continue
        acc = best_shares(parts, rate, bounds.min_accuracy, pinned)
        if acc is not None:
            obj = weights.cost * cores - weights.accuracy * acc
            best = obj if best is None else min(best, obj)
    return best


@pytest.mark.parametrize("seed", range(100))
def test_variants_equal_exhaustive_search(seed):
    vs, rate, slo, bounds, weights, pinned = variants_case(seed)
    best = brute_variants(vs, rate, slo, bounds, weights, pinned)
    if best is None:
        with pytest.raises(Infeasible):
            solve_variants(vs, rate, slo, bounds, weights, pinned_rps=pinned)
        return
    config = solve_variants(vs, rate, slo, bounds, weights, pinned_rps=pinned)
    by = {v.name: v for v in vs}
    mix = config.workers("pipeline")
    assert sum(m.share_rps for m in mix) == pytest.approx(rate)
    assert sum(m.replicas for m in mix) <= bounds.replicas_for("pipeline")
    assert config.cost_cores == sum(m.cores * m.replicas for m in mix) <= bounds.total_cores
    assert len({m.variant for m in mix}) == len(mix)
    for m in mix:
        service = by[m.variant].latency_ms(m.batch, m.cores)
        assert m.batch in bounds.batches_for("pipeline") and m.cores in bounds.cores_for("pipeline")
        assert m.replicas >= bounds.min_replicas
        assert m.replicas * 1000.0 * m.batch / service >= m.share_rps * (1 + bounds.headroom) - 1e-6
        if m.share_rps > 1e-6:
            assert latency(by[m.variant], m.batch, m.cores, m.share_rps) <= slo + 1e-4
        assert m.share_rps >= pinned.get(m.variant, 0.0) - 1e-6
    assert set(pinned) <= {m.variant for m in mix}
    assert config.expected_accuracy >= bounds.min_accuracy - 1e-6
    assert config.objective == pytest.approx(best, abs=1e-5)
    assert weights.cost * config.cost_cores - weights.accuracy * config.expected_accuracy == pytest.approx(best, abs=1e-5)


def test_variants_mix_when_the_accurate_one_cannot_carry_it_all():
    small, large = two_variants()  # small: 50 ms (20 req/s per worker); large: 200 ms (5 req/s)
    bounds = Bounds(max_replicas={"*": 2}, batches={"*": (1,)}, cores={"*": (1,)}, total_cores=2, headroom=0.0)
    config = solve_variants([small, large], 15, 1000, bounds, Weights(accuracy=30.0), stage="prefill")
    mix = {m.variant: m for m in config.workers("prefill")}
    assert set(mix) == {"small", "large"}
    assert mix["large"].share_rps == pytest.approx(5.0) and mix["small"].share_rps == pytest.approx(10.0)
    assert config.stages["prefill"].variant == "small"  # the largest share
    assert config.expected_accuracy == pytest.approx((5 * 0.9 + 10 * 0.7) / 15)


# -- Sponge -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(60))
def test_vertical_equals_exhaustive_search(seed):
    rng = random.Random(5000 + seed)
    model, rate, budget = random_model(rng), rng.uniform(0, 60), rng.uniform(20, 400)
    max_cores, batches = rng.randint(1, 6), rng.sample((1, 2, 3, 4, 8), rng.randint(1, 4))
    fits = [(c, model.latency_ms(b, c) + (0 if b == 1 else math.inf if rate <= 0 else 1000 * (b - 1) / rate), b)
            for c in range(1, max_cores + 1) for b in batches
            if 1000.0 * b / model.latency_ms(b, c) >= rate - 1e-9]
    fits = [f for f in fits if f[1] <= budget + 1e-9]
    if not fits:
        with pytest.raises(Infeasible):
            solve_vertical(model, rate, budget, max_cores, batches)
        return
    c, b = solve_vertical(model, rate, budget, max_cores, batches)
    best = min(fits)
    assert c == best[0]
    assert latency(VariantProfile("m", "decode", 1.0, model), b, c, rate) == pytest.approx(best[1])


def test_vertical_takes_more_cores_for_a_tighter_budget():
    model = LatencyModel.parametric(20, 80, 0, cores=(1, 2, 4, 8))  # batch 1: 100 ms / cores
    assert solve_vertical(model, 1, 120, 8, [1]) == (1, 1)
    assert solve_vertical(model, 1, 60, 8, [1]) == (2, 1)
    assert solve_vertical(model, 1, 30, 8, [1]) == (4, 1)
    with pytest.raises(Infeasible, match="vertical"):
        solve_vertical(model, 1, 5, 8, [1])
