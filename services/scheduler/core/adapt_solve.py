"""Adaptation's integer programs (scipy.optimize.milp, HiGHS), all on the latency model of
`adapt_model`: a batch of ``b`` on ``c`` cores takes ``l(b, c)`` ms; a request's latency at a stage
is ``l(b, c) + (b - 1) / rate`` (service plus batch-forming wait); a worker's capacity is
``1000 * b / l(b, c)`` requests/s; capacity must exceed the rate by ``Bounds.headroom``. Cost is
cores (workers times cores each). Options that break a bound on their own (latency over the
SLO, a batch or core count not allowed, more replicas than allowed) are never variables.

`solve_pipeline` -- IPA (Inference Pipeline Adaptation, Ghafouri et al., 2023). Variables, per
stage s and option o = (variant, batch, cores) of s: a binary x[o] (o chosen), an integer n[o] in
[0, max_replicas(s)] (its replicas); per combination k of one variant per stage, a binary z[k].
Constraints: one option per stage (sum_o x[o] = 1); replicas only on the chosen option and enough
of them, ``n_min[o] x[o] <= n[o] <= R x[o]`` with ``n_min[o] = max(min_replicas, ceil(rate (1 +
headroom) l / (1000 b)))`` (the capacity row ``n[o] * 1000 b / l >= rate (1 + headroom)`` solved
for the integer n); end-to-end latency ``sum_o latency[o] x[o] <= slo``; ``sum_o cores[o] n[o] <=
total_cores``; the variant chosen at each stage is the one of the combination chosen
(``sum_{o of s with variant v} x[o] = sum_{k with k[s] = v} z[k]``), where k ranges over the
combinations allowed to run together (all, or those the operator lists). Pipeline accuracy is the
product of the stage accuracies; it is made linear by ENUMERATING the combinations (z, exact for
any number of stages, as long as the product of the variant counts stays small -- tens), not by
logs, so the objective is exactly ``min cost * sum cores n - accuracy * sum_k acc[k] z[k]``
(`Weights`) and the floor ``sum_k acc[k] z[k] >= min_accuracy`` is exact. Ties: the least latency.

`solve_variants` -- InfAdapter (Salmani et al., arXiv 2304.10892): one stage (or the whole
pipeline as one stage) served by a SET of variants sharing its traffic. Per option o = (variant,
batch, cores): a binary x[o], an integer n[o] (replicas) and a continuous share s[o] (requests/s).
At most one option per variant; ``sum s = rate``; ``s[o] <= rate x[o]``; capacity ``(1 + headroom)
s[o] <= n[o] 1000 b / l``; ``min_replicas x[o] <= n[o]`` and ``sum n <= max_replicas`` (the stage's
workers); the batch must form within the SLO at the option's own share, ``(b - 1) / s[o] <= slo -
l`` i.e. ``s[o] >= 1000 (b - 1) / (slo - l) x[o]`` (linear); cores within budget; requests pinning a
variant get at least their rate (``pinned_rps``); the traffic-weighted accuracy ``sum acc s / rate
>= min_accuracy``. Objective: ``min cost * sum cores n - accuracy * sum acc[o] s[o] / rate``.

`solve_vertical` -- Sponge (Razavi et al., arXiv 2404.00704): a single worker's in-place scaling.
Binaries x[c, b] over core counts and batch sizes, one chosen; only pairs meeting the remaining
budget ``l(b, c) + (b - 1) / rate <= budget`` and the rate ``1000 b / l(b, c) >= rate (1 +
headroom)`` are variables. Objective: the fewest cores, then the least latency (most slack).

Each raises `Infeasible` with the reason (the bound that cannot be met, and by how much) when no
configuration satisfies every constraint.
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds as VarBounds
from scipy.optimize import LinearConstraint, milp

from services.scheduler.core.adapt_model import (
    Bounds,
    Infeasible,
    Latency,
    PipelineConfig,
    StageChoice,
    VariantProfile,
    Weights,
    batch_wait_ms,
)

__all__ = ["Option", "pipeline_options", "required_replicas", "solve_pipeline", "solve_variants", "solve_vertical"]

_EPS = 1e-9
_TIME_LIMIT_S = 5.0  # default solver limit per solve; small programs finish in milliseconds
_HIGHS = {"mip_rel_gap": 0.0, "mip_heuristic_run_feasibility_jump": False}


def required_replicas(rate_rps: float, headroom: float, service_ms: float, batch: int) -> int:
    """The fewest workers carrying ``rate * (1 + headroom)`` at ``1000 * batch / service_ms`` each."""
    need = rate_rps * (1.0 + headroom) * service_ms / (1000.0 * batch)
    return max(0, math.ceil(need - 1e-9))


@dataclass(frozen=True)
class Option:
    """One (variant, batch, cores) of a stage and what it implies at a rate: per-batch service
    time, a request's latency (service plus batch-forming wait) and the replicas it needs."""

    stage: str
    variant: VariantProfile
    batch: int
    cores: int
    service_ms: float
    latency_ms: float
    replicas: int  # the fewest replicas carrying the rate (at least Bounds.min_replicas)


def pipeline_options(stage: str, variants: Sequence[VariantProfile], rate_rps: float, slo_ms: float,
                     bounds: Bounds) -> list[Option]:
    """Every option of `stage` that meets every bound on its own (latency within the SLO, replicas
    within the stage's maximum, cores within the total)."""
    out = []
    for v in variants:
        for b in bounds.batches_for(stage):
            for c in bounds.cores_for(stage):
                service = v.latency_ms(b, c)
                lat = service + batch_wait_ms(b, rate_rps)
                n = max(bounds.min_replicas, required_replicas(rate_rps, bounds.headroom, service, b))
                if lat <= slo_ms + _EPS and n <= bounds.replicas_for(stage) and n * c <= bounds.total_cores:
                    out.append(Option(stage, v, b, c, service, lat, n))
    return out


def _solve(c, integrality, lb, ub, rows, time_limit_s, tie=None):
    """`milp` with `rows` [(coefficients, lo, hi)]; a second pass minimises `tie` with the first
    objective held at its optimum. Returns x, or None when infeasible."""
    a = np.array([r[0] for r in rows], dtype=float)
    constraints = [LinearConstraint(a, [r[1] for r in rows], [r[2] for r in rows])] if rows else []
    end = time.perf_counter() + (time_limit_s or _TIME_LIMIT_S)

    def run(obj, cons):
        opts = {**_HIGHS, "time_limit": max(end - time.perf_counter(), 1e-3)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
            return milp(obj, integrality=integrality, bounds=VarBounds(lb, ub), constraints=cons, options=opts)

    res = run(np.asarray(c, dtype=float), constraints)
    if res.x is None:
        if res.status == 2:
            return None
        raise TimeoutError(f"adaptation program: no solution within {time_limit_s or _TIME_LIMIT_S} s ({res.message})")
    x = res.x
    if tie is not None and np.ptp(tie) > 0:
        opt = float(np.dot(c, x))
        held = constraints + [LinearConstraint(np.asarray(c, dtype=float)[None, :], -np.inf,
                                               opt + 1e-7 * max(1.0, abs(opt)))]
        res2 = run(np.asarray(tie, dtype=float), held)
        if res2.x is not None:
            x = res2.x
    return x


# -- IPA -------------------------------------------------------------------------------------------


def solve_pipeline(variants_by_stage: Mapping[str, Sequence[VariantProfile]], rate_rps: float, slo_ms: float,
                   bounds: Bounds = Bounds(), weights: Weights = Weights(), *,
                   combinations: Iterable[Mapping[str, str]] | None = None,
                   time_limit_s: float | None = None) -> PipelineConfig:
    """Per stage one (variant, batch, cores) and its replicas, end-to-end latency within `slo_ms`
    at `rate_rps`, cores within budget, least ``cost - weighted accuracy`` (module docstring).

    `combinations` ({stage: variant name} each) lists the variant combinations that may run
    together (a prefill and a decode must share one language model: its KV means nothing to
    another's layers); None: any."""
    stages = list(variants_by_stage)
    if not stages:
        raise ValueError("solve_pipeline: no stages")
    for s in stages:
        vs = list(variants_by_stage[s])
        if not vs or any(v.stage != s for v in vs) or len({v.name for v in vs}) != len(vs):
            raise ValueError(f"solve_pipeline: stage {s!r} needs variants of that stage with distinct names")
    opts = {s: pipeline_options(s, variants_by_stage[s], rate_rps, slo_ms, bounds) for s in stages}
    for s, o in opts.items():
        if not o:
            raise Infeasible(_why_no_option(s, variants_by_stage[s], rate_rps, slo_ms, bounds))
    combos = [k for k in itertools.product(*[[v.name for v in variants_by_stage[s]] for s in stages])]
    if combinations is not None:
        allowed = {tuple(c.get(s) for s in stages) for c in combinations}
        combos = [k for k in combos if k in allowed]
        if not combos:
            raise ValueError("solve_pipeline: no combination names one known variant for every stage")
    acc_of = {s: {v.name: v.accuracy for v in variants_by_stage[s]} for s in stages}
    combo_acc = [math.prod(acc_of[s][name] for s, name in zip(stages, k)) for k in combos]
    keep = [i for i, a in enumerate(combo_acc) if a >= bounds.min_accuracy - _EPS]
    if not keep:
        raise Infeasible(f"accuracy: the most accurate pipeline reaches {max(combo_acc):.4f} "
                         f"< min_accuracy {bounds.min_accuracy}")
    combos, combo_acc = [combos[i] for i in keep], [combo_acc[i] for i in keep]
    slack = slo_ms - sum(min(o.latency_ms for o in opts[s]) for s in stages)
    if slack < -_EPS:
        raise Infeasible(f"SLO: the fastest option of each stage sums to {slo_ms - slack:.1f} ms > slo {slo_ms:.1f} ms "
                         f"at {rate_rps:.2f} req/s")

    flat = [o for s in stages for o in opts[s]]
    nx, nk = len(flat), len(combos)
    nv = 2 * nx + nk  # x[0:nx], n[nx:2nx], z[2nx:]
    rows = []
    for s in stages:  # one option per stage
        rows.append(([1.0 if o.stage == s else 0.0 for o in flat] + [0.0] * (nx + nk), 1.0, 1.0))
    for j, s in enumerate(stages):  # the chosen variant is the combination's
        for v in variants_by_stage[s]:
            row = [1.0 if o.stage == s and o.variant.name == v.name else 0.0 for o in flat] + [0.0] * nx
            row += [-1.0 if k[j] == v.name else 0.0 for k in combos]
            rows.append((row, 0.0, 0.0))
    for i, o in enumerate(flat):  # n_min x <= n <= R x
        lo = [0.0] * nv
        lo[i], lo[nx + i] = -float(o.replicas), 1.0
        rows.append((lo, 0.0, np.inf))
        hi = [0.0] * nv
        hi[i], hi[nx + i] = -float(bounds.replicas_for(o.stage)), 1.0
        rows.append((hi, -np.inf, 0.0))
    rows.append(([o.latency_ms for o in flat] + [0.0] * (nx + nk), -np.inf, slo_ms + _EPS))
    rows.append(([0.0] * nx + [float(o.cores) for o in flat] + [0.0] * nk, -np.inf, float(bounds.total_cores)))
    cost = np.array([0.0] * nx + [weights.cost * o.cores for o in flat] + [-weights.accuracy * a for a in combo_acc])
    tie = np.array([o.latency_ms for o in flat] + [0.0] * (nx + nk))
    integrality = np.ones(nv)
    ub = np.array([1.0] * nx + [float(bounds.replicas_for(o.stage)) for o in flat] + [1.0] * nk)
    x = _solve(cost, integrality, np.zeros(nv), ub, rows, time_limit_s, tie)
    if x is None:
        least = sum(min(o.cores * o.replicas for o in opts[s]) for s in stages)
        if least > bounds.total_cores:
            raise Infeasible(f"cores: the cheapest option of each stage needs {least} cores "
                             f"> total_cores {bounds.total_cores} at {rate_rps:.2f} req/s")
        raise Infeasible(f"no configuration meets the SLO ({slo_ms:.1f} ms), the cores budget "
                         f"({bounds.total_cores}) and min_accuracy ({bounds.min_accuracy}) together at "
                         f"{rate_rps:.2f} req/s")
    chosen = {o.stage: (o, int(round(x[nx + i]))) for i, o in enumerate(flat) if x[i] > 0.5}
    choices = {s: StageChoice(o.variant.name, o.batch, n, o.cores) for s, (o, n) in chosen.items()}
    acc = math.prod(o.variant.accuracy for o, _ in chosen.values())
    cores = sum(c.cost_cores for c in choices.values())
    return PipelineConfig({s: choices[s] for s in stages}, acc, cores,
                          sum(o.latency_ms for o, _ in chosen.values()), rate_rps=rate_rps,
                          objective=weights.cost * cores - weights.accuracy * acc)


def _why_no_option(stage: str, variants: Sequence[VariantProfile], rate: float, slo: float, bounds: Bounds) -> str:
    best = min(v.latency_ms(b, c) + batch_wait_ms(b, rate) for v in variants
               for b in bounds.batches_for(stage) for c in bounds.cores_for(stage))
    if best > slo + _EPS:
        return f"SLO: stage {stage!r} takes at least {best:.1f} ms > slo {slo:.1f} ms at {rate:.2f} req/s"
    return (f"capacity: no option of stage {stage!r} carries {rate:.2f} req/s (+{bounds.headroom:.0%}) within "
            f"the SLO with at most {bounds.replicas_for(stage)} replicas and {bounds.total_cores} cores")


# -- InfAdapter ------------------------------------------------------------------------------------


def solve_variants(variants: Sequence[VariantProfile], rate_rps: float, slo_ms: float,
                   bounds: Bounds = Bounds(), weights: Weights = Weights(), *, stage: str | None = None,
                   pinned_rps: Mapping[str, float] | None = None,
                   time_limit_s: float | None = None) -> PipelineConfig:
    """A set of variants for one stage, the cores and replicas of each and the traffic each takes
    (module docstring). The result's `mixes[stage]` lists every variant chosen with its
    ``share_rps``; `stages[stage]` is the one with the largest share."""
    variants = list(variants)
    if not variants or len({v.name for v in variants}) != len(variants):
        raise ValueError("solve_variants: needs variants with distinct names")
    stage = stage or variants[0].stage
    pinned = dict(pinned_rps or {})
    unknown = set(pinned) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"solve_variants: pinned_rps names unknown variants {sorted(unknown)}")
    if sum(pinned.values()) > rate_rps + _EPS:
        raise ValueError("solve_variants: pinned_rps sums to more than rate_rps")
    rate = max(rate_rps, 1e-6)  # no traffic: still one worker, batches of one
    opts: list[tuple[VariantProfile, int, int, float, float]] = []  # variant, batch, cores, service, min share
    for v in variants:
        for b in bounds.batches_for(stage):
            for c in bounds.cores_for(stage):
                service = v.latency_ms(b, c)
                if service > slo_ms + _EPS or c * bounds.min_replicas > bounds.total_cores:
                    continue
                lo = 0.0 if b == 1 else (math.inf if slo_ms - service <= 0 else 1000.0 * (b - 1) / (slo_ms - service))
                if lo <= rate + _EPS:
                    opts.append((v, b, c, service, lo))
    if not opts:
        raise Infeasible(_why_no_option(stage, variants, rate, slo_ms, bounds))
    n_o, R, h = len(opts), bounds.replicas_for(stage), bounds.headroom
    nv = 3 * n_o  # x, n, s
    X, N, S = 0, n_o, 2 * n_o
    rows = []

    def row(coefs: dict[int, float], lo: float, hi: float) -> None:
        r = [0.0] * nv
        for k, val in coefs.items():
            r[k] = val
        rows.append((r, lo, hi))

    for v in variants:  # at most one option per variant
        row({X + i: 1.0 for i, o in enumerate(opts) if o[0].name == v.name}, -np.inf, 1.0)
        if pinned.get(v.name, 0.0) > 0:
            row({S + i: 1.0 for i, o in enumerate(opts) if o[0].name == v.name}, pinned[v.name] - _EPS, np.inf)
    row({X + i: 1.0 for i in range(n_o)}, 1.0, np.inf)  # some worker
    row({S + i: 1.0 for i in range(n_o)}, rate, rate)
    for i, (v, b, c, service, lo) in enumerate(opts):
        row({S + i: 1.0, X + i: -rate}, -np.inf, 0.0)
        row({S + i: 1.0, X + i: -lo}, -_EPS, np.inf)
        row({S + i: 1.0 + h, N + i: -1000.0 * b / service}, -np.inf, 0.0)
        row({N + i: 1.0, X + i: -float(bounds.min_replicas)}, 0.0, np.inf)
        row({N + i: 1.0, X + i: -float(R)}, -np.inf, 0.0)
    row({N + i: 1.0 for i in range(n_o)}, -np.inf, float(R))
    row({N + i: float(o[2]) for i, o in enumerate(opts)}, -np.inf, float(bounds.total_cores))
    if bounds.min_accuracy > 0:
        row({S + i: o[0].accuracy for i, o in enumerate(opts)}, bounds.min_accuracy * rate - 1e-7, np.inf)
    cost = np.zeros(nv)
    for i, (v, b, c, service, lo) in enumerate(opts):
        cost[N + i] = weights.cost * c
        cost[S + i] = -weights.accuracy * v.accuracy / rate
    tie = np.zeros(nv)
    tie[X:X + n_o] = [o[3] for o in opts]
    integrality = np.array([1.0] * (2 * n_o) + [0.0] * n_o)
    ub = np.array([1.0] * n_o + [float(R)] * n_o + [rate] * n_o)
    x = _solve(cost, integrality, np.zeros(nv), ub, rows, time_limit_s, tie)
    if x is None:
        raise Infeasible(f"no set of variants of stage {stage!r} carries {rate_rps:.2f} req/s (+{h:.0%}) within "
                         f"slo {slo_ms:.1f} ms, {R} replicas, {bounds.total_cores} cores, min_accuracy "
                         f"{bounds.min_accuracy}" + (f" and pins {pinned}" if pinned else ""))
    picked = [i for i in range(n_o) if x[X + i] > 0.5]
    replicas = {i: int(round(x[N + i])) for i in picked}
    shares = _fill_shares([(opts[i][0], opts[i][4], min(rate, replicas[i] * 1000.0 * opts[i][1] / opts[i][3] / (1 + h)),
                            pinned.get(opts[i][0].name, 0.0)) for i in picked], rate)
    exact = dict(zip(picked, shares)) if shares is not None else {i: float(max(x[S + i], 0.0)) for i in picked}
    mix = []
    latency, acc_sum = 0.0, 0.0
    for i, (v, b, c, service, lo) in enumerate(opts):
        if i in exact:
            share, n = exact[i], replicas[i]
            mix.append(StageChoice(v.name, b, n, c, share_rps=share if rate_rps > 0 else 0.0))
            latency = max(latency, service + batch_wait_ms(b, share) if share > 1e-9 else service)
            acc_sum += v.accuracy * share
    mix.sort(key=lambda m: (-(m.share_rps or 0.0), m.variant))
    acc = acc_sum / rate if rate_rps > 0 else max(next(v for v in variants if v.name == m.variant).accuracy
                                                   for m in mix)
    cores = sum(m.cost_cores for m in mix)
    return PipelineConfig({stage: mix[0]}, acc, cores, latency, mixes={stage: tuple(mix)}, rate_rps=rate_rps,
                          objective=weights.cost * cores - weights.accuracy * (acc_sum / rate))


def _fill_shares(parts: list[tuple[VariantProfile, float, float, float]], rate: float) -> list[float] | None:
    """The traffic split of chosen options, exactly: with the options and replicas fixed, the
    program's remaining part is a fractional knapsack (each share between its least, the larger of
    its batch-forming minimum and its pin, and its capacity; shares summing to `rate`; most
    accuracy), solved greedily by accuracy. None where the bounds do not fit (numerical edge)."""
    lo = [max(p[1], p[3]) for p in parts]
    hi = [p[2] for p in parts]
    if any(a > b + 1e-7 for a, b in zip(lo, hi)) or sum(lo) > rate + 1e-7 or sum(hi) < rate - 1e-7:
        return None
    shares, left = [min(a, b) for a, b in zip(lo, hi)], rate - sum(min(a, b) for a, b in zip(lo, hi))
    for k in sorted(range(len(parts)), key=lambda k: -parts[k][0].accuracy):
        add = max(0.0, min(left, hi[k] - shares[k]))
        shares[k] += add
        left -= add
    return shares


# -- Sponge ------------------------------------------------------------------------------------------


def solve_vertical(model: Latency, rate_rps: float, budget_ms: float, max_cores: int | Iterable[int],
                   batches: Iterable[int], *, headroom: float = 0.0,
                   time_limit_s: float | None = None) -> tuple[int, int]:
    """(cores, batch) for one worker: the fewest cores (1..`max_cores`, or those listed) and then
    the least latency among `batches` meeting `budget_ms` at `rate_rps` (module docstring)."""
    cores = list(range(1, max_cores + 1)) if isinstance(max_cores, int) else sorted(set(max_cores))
    sizes = sorted(set(batches))
    if not cores or not sizes or min(cores) < 1 or min(sizes) < 1:
        raise ValueError("solve_vertical: cores and batches must be integers >= 1")
    pairs = []
    for c in cores:
        for b in sizes:
            service = model.latency_ms(b, c)
            lat = service + batch_wait_ms(b, rate_rps)
            if lat <= budget_ms + _EPS and 1000.0 * b / service >= rate_rps * (1 + headroom) - _EPS:
                pairs.append((c, b, lat))
    if not pairs:
        fastest = min(model.latency_ms(b, c) + batch_wait_ms(b, rate_rps) for c in cores for b in sizes)
        most = max(1000.0 * b / model.latency_ms(b, c) for c in cores for b in sizes)
        raise Infeasible(f"vertical: no (cores <= {max(cores)}, batch in {sizes}) meets {budget_ms:.1f} ms at "
                         f"{rate_rps:.2f} req/s (fastest {fastest:.1f} ms, most {most:.2f} req/s)")
    n = len(pairs)
    x = _solve(np.array([float(c) for c, _, _ in pairs]), np.ones(n), np.zeros(n), np.ones(n),
               [([1.0] * n, 1.0, 1.0)], time_limit_s, np.array([lat for _, _, lat in pairs]))
    c, b, _ = pairs[int(np.argmax(x))]
    return c, b
