"""Deadline-driven modality selection (after MOSEL, arXiv 2310.18481): what to serve under overload.

A multimodal request may be served with some inputs dropped or shrunk -- a *strategy* such as
``"drop_images:1"`` or ``"pixels:0.5"`` -- as long as its expected accuracy (offline profile)
stays at or above the floor its caller allowed. The full-input strategy (`FULL`) is always a
candidate and always allowed: serving a request as submitted never goes below what its caller
allowed (a floor above its accuracy only means "do not degrade").

The model. One server (the bottleneck) serves the queued jobs in a known order (`EDF`: priority,
then earliest deadline, none last, then arrival; or an explicit order): job i finishes at ``now +
the work of every job up to and including i``. A job's work is the sum over stages of tokens over
stage capacity (tokens/s, `stage_seconds`; ``math.inf`` for a stage that is no bottleneck), or
per-stage seconds given directly. For stages pipelined in one order this bounds the real finish
from above (a flow shop never finishes a job later than the serial sum). Jobs not *reassignable*
(encoding started) keep their strategy; their work still counts (strategies describe remaining
work). `reassign` picks one allowed strategy per job so that every job with a deadline meets it,
maximising the total expected accuracy, then minimising the total work: an integer program for
`scipy.optimize.milp` (HiGHS), binaries x[i, s] one-hot per job, a prefix-sum row per deadline.

`Flow` is the tighter model for stages that overlap (one worker per stage; decode's work is its
share of the batch's throughput). Each stage's queue hands its worker the first *ready* task in
the serving order, so job i leaves stage s at ``C[i,s] = max(C[i,s-1] + work[i,s], now + the work
at s of the jobs up to i)`` for a job with work at s (a text-only request skips the encoder and
passes images still being encoded; `Flow.strict`:
a permutation flow shop, ``max(C[i-1,s], C[i,s-1]) + work[i,s]``), and, when the stages share
`Flow.parallelism` cores or devices, no sooner than ``now + (every job's work up to i) /
parallelism``. The program then has a continuous ``C[i,s]`` per job and stage with two lower-bound
rows each, linear in the binaries, so it stays exact.

Finish times only grow with work, so some assignment meets every deadline exactly when every job
on its cheapest allowed strategy does; `diagnose` checks that without the solver and names the
jobs that miss even then (`Miss`). Before solving, strategies dominated by one as accurate and no
more work are dropped; deadlines met with every job on its most accurate strategy, or implied by
a later one, are no rows; jobs after the last row take their most accurate strategy.
`admit_with_selection` fits a new arrival by reassigning queued jobs or refuses it before any
work is spent; `strategy_table` precomputes the cheapest strategy per (job size, floor);
`selection_time` times decisions for a benchmark.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from types import MappingProxyType
from typing import TypeVar

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from services.scheduler.core.load import STAGES

__all__ = [
    "EDF", "FULL", "GIVEN", "Admit", "Assignment", "Flow", "Job", "Miss", "Strategy", "admit_with_selection",
    "diagnose", "reassign", "selection_time", "stage_seconds", "strategy_table",
]

FULL = "full"  # id of the full-input strategy (every input as submitted); every `Job` has one
EDF = "edf"  # serving order: priority, then earliest deadline (none last), then `Job.seq` / input
GIVEN = "given"  # serving order: as given
TIME_TOL = 1e-9  # seconds a finish may exceed its deadline by (float rounding)
_ACC_SCALE = 1e3  # HiGHS stops at an absolute gap of 1e-6: 1e-9 of accuracy after scaling
# HiGHS's feasibility-jump heuristic costs ~6 ms per solve even on tiny programs (HiGHS 1.12).
_HIGHS_EXTRA = {"mip_heuristic_run_feasibility_jump": False}

Capacity = Mapping[str, float]
K = TypeVar("K", bound=Hashable)


def stage_seconds(tokens: Mapping[str, float], capacity: Capacity) -> dict[str, float]:
    """Seconds of work per stage: tokens / capacity (tokens/s); a stage without tokens costs 0."""
    out = {}
    for stage, n in tokens.items():
        cap = capacity.get(stage)
        if stage not in STAGES or n and (cap is None or not cap > 0):
            raise ValueError(f"{n} {stage!r} tokens: not a stage, or no positive capacity for it")
        out[stage] = n / cap if n else 0.0
    return out


@dataclass(frozen=True)
class Strategy:
    """One way to serve a request: its expected accuracy and its work, in tokens per stage (seconds
    by the capacities given to `reassign`) or in seconds per stage, `work_s` (which then wins)."""

    id: str
    accuracy: float  # expected accuracy in [0, 1] (offline profile)
    encode_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    work_s: Mapping[str, float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not self.id or not 0.0 <= self.accuracy <= 1.0 or min(self.tokens.values()) < 0:
            raise ValueError(f"Strategy {self.id!r}: needs an id, accuracy in [0, 1] and tokens >= 0")
        if self.work_s is not None:
            work = {str(k): float(v) for k, v in self.work_s.items()}
            if set(work).difference(STAGES) or not all(0.0 <= v < math.inf for v in work.values()):
                raise ValueError(f"Strategy {self.id}: work_s must map stages to finite seconds >= 0")
            object.__setattr__(self, "work_s", MappingProxyType(work))

    @property
    def tokens(self) -> dict[str, int]:
        """Tokens of work per stage."""
        return {"encode": self.encode_tokens, "prefill": self.prefill_tokens, "decode": self.decode_tokens}

    def stage_seconds(self, capacity: Capacity | None = None) -> dict[str, float]:
        """Seconds of work per stage: `work_s`, or the tokens over `capacity`."""
        if self.work_s is not None:
            return dict(self.work_s)
        if capacity is None:
            raise ValueError(f"Strategy {self.id} is given in tokens: pass the stage capacities")
        return stage_seconds(self.tokens, capacity)

    def seconds(self, capacity: Capacity | None = None) -> float:
        """Its work on the single-server model: the sum of `stage_seconds`."""
        return math.fsum(self.stage_seconds(capacity).values())


@dataclass(frozen=True)
class Job:
    """A queued request and its strategies. `deadline` is absolute (the clock of `now`; None: none);
    `current` is its strategy now, kept whatever happens when not `reassignable`; `seq` orders
    equal priority and deadline under `EDF` (default: the input order)."""

    request_id: str
    strategies: tuple[Strategy, ...]
    deadline: float | None = None
    floor: float = 0.0  # the lowest expected accuracy the caller allows (`FULL` always allowed)
    reassignable: bool = True
    current: str = FULL
    priority: int = 0
    seq: int | None = None
    running: frozenset[str] = frozenset()
    """Stages a worker is on for it now: there it is served first (`Flow`; stages do not preempt)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "strategies", tuple(self.strategies))
        object.__setattr__(self, "running", frozenset(self.running))
        ids = [s.id for s in self.strategies]
        if len(set(ids)) != len(ids) or FULL not in ids or self.current not in ids:
            raise ValueError(f"Job {self.request_id}: strategy ids {ids} must be distinct and include "
                             f"{FULL!r} and the current {self.current!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"Job {self.request_id}: floor must be in [0, 1], got {self.floor}")

    @property
    def allowed(self) -> tuple[Strategy, ...]:
        """What `reassign` may choose: `current` when not reassignable, else `FULL` and every
        strategy at or above the floor."""
        return tuple(s for s in self.strategies if (s.id == self.current if not self.reassignable
                                                    else s.accuracy >= self.floor or s.id == FULL))


@dataclass(frozen=True)
class Flow:
    """The stages overlap: jobs go through `stages` in order, each stage serving one job at a time
    by the serving order, and the stages share `parallelism` cores or devices (``math.inf``: each
    stage its own; 2 for three single-threaded stage processes on two cores).

    `strict`: a stage takes the jobs strictly in the serving order, idling until the next one is
    ready (a permutation flow shop). Otherwise (the stage queues: a worker takes the first task
    that is *ready*) a job leaves stage s no sooner than its previous stage plus its own work, nor
    than ``now`` plus all the work at s of the jobs up to it in the order, where the jobs a stage
    is running (`Job.running`) come first; a text-only request then passes the encoding of the
    images queued before it."""

    stages: tuple[str, ...] = STAGES
    parallelism: float = math.inf
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages or set(self.stages).difference(STAGES) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"Flow: stages must be distinct stages of {STAGES}, got {self.stages}")
        if not self.parallelism >= 1:
            raise ValueError(f"Flow: parallelism must be >= 1, got {self.parallelism}")


@dataclass(frozen=True)
class Miss:
    """A job missing its deadline even with every job up to it on its cheapest allowed strategy."""

    request_id: str
    deadline: float
    earliest_finish: float  # absolute

    @property
    def overshoot_s(self) -> float:  # by how much it misses
        return self.earliest_finish - self.deadline


@dataclass(frozen=True)
class Assignment:
    """The outcome of `reassign`.

    `method`: ``"current"`` (the fast path: the current assignment meets every deadline and is
    kept without solving), ``"best"`` (every job on its most accurate strategy meets every
    deadline; optimal without solving), ``"milp"`` (solved, optimal), ``"limit"`` (the solver's
    time ran out: the best assignment it found, feasible), ``"greedy"`` (the solver found none:
    a feasible greedy one) or ``"infeasible"`` (`misses` says why; `choice` is unchanged).
    """

    feasible: bool
    choice: Mapping[str, str]  # {request id: strategy id}, in serving order
    objective: float | None  # total expected accuracy of `choice` (None when infeasible)
    work_s: float  # total seconds of work of `choice`
    changed: tuple[str, ...]  # jobs whose strategy is not their current one, in serving order
    order: tuple[str, ...]
    finish: Mapping[str, float]  # estimated finish (absolute) of each job under `choice`
    method: str
    misses: tuple[Miss, ...] = ()
    variables: int = 0  # binaries of the integer program (0: not solved)
    rows: int = 0  # deadline rows of the integer program

    @property
    def fast_path(self) -> bool:
        """The current assignment was kept without calling the solver."""
        return self.method == "current"


@dataclass(frozen=True)
class Admit:
    """The outcome of `admit_with_selection`; `code` and `retry_after_s` as admission's `Decision`."""

    ok: bool
    code: str
    message: str
    retry_after_s: float | None  # refusals: when retrying may succeed (None: waiting cannot help)
    strategy: str | None  # the new job's strategy (None when refused)
    assignment: Assignment  # what to apply (ok), or the unchanged current one and its misses
    changed: tuple[str, ...] = ()  # queued jobs whose strategy changes (ok only)
    already_late: tuple[str, ...] = ()  # queued jobs late whatever is done: not constraints


# -- the model ------------------------------------------------------------------------------


class _Plan:
    """One job in serving order: its strategies' work and its Pareto frontier of allowed ones
    (work and value both strictly increasing; on exact ties the current, then the first). A
    strategy's value is its accuracy less `price` per second of its work (`reassign`)."""

    __slots__ = ("job", "stage", "work", "acc", "value", "allowed", "frontier", "cheapest", "best", "by_accuracy")

    def __init__(self, job: Job, capacity: Capacity | None, flow: Flow | None = None, price: float = 0.0) -> None:
        self.job = job
        self.stage = {s.id: s.stage_seconds(capacity) for s in job.strategies}  # {id: {stage: seconds}}
        self.work = {sid: math.fsum(w.values()) for sid, w in self.stage.items()}
        self.acc = {s.id: s.accuracy for s in job.strategies}
        # rounded: equal values tie exactly (then the least work wins), whatever the float error
        self.value = {sid: round(a - price * self.work[sid], 12) for sid, a in self.acc.items()} if price else self.acc
        self.allowed = frozenset(s.id for s in job.allowed)
        self.frontier: list[str] = []  # by work; under `flow` the strategies no other one dominates
        for *_, sid in sorted((self.work[s.id], -s.accuracy, s.id != job.current, k, s.id)
                              for k, s in enumerate(job.allowed)):
            if flow is None:
                if not self.frontier or self.value[sid] > self.value[self.frontier[-1]]:
                    self.frontier.append(sid)
            elif not any(self.value[o] >= self.value[sid] and all(
                    self.stage[o].get(st, 0.0) <= self.stage[sid].get(st, 0.0) for st in flow.stages)
                    for o in self.frontier):
                self.frontier.append(sid)
        self.by_accuracy = sorted(self.frontier, key=lambda sid: (-self.value[sid], self.work[sid]))
        self.cheapest, self.best = self.frontier[0], self.by_accuracy[0]


def _plans(jobs: Iterable[Job], order: str | Sequence[str], capacity: Capacity | None,
           flow: Flow | None = None, price: float = 0.0) -> list[_Plan]:
    jobs = tuple(jobs)
    by_id = {j.request_id: j for j in jobs}
    if len(by_id) != len(jobs):
        raise ValueError("duplicate request ids")
    if order == EDF:
        ranked = [j for _, j in sorted(enumerate(jobs), key=lambda kj: (
            -kj[1].priority, math.inf if kj[1].deadline is None else kj[1].deadline,
            kj[0] if kj[1].seq is None else kj[1].seq, kj[0]))]
    elif order == GIVEN:
        ranked = list(jobs)
    elif not isinstance(order, str) and sorted(order) == sorted(by_id):
        ranked = [by_id[r] for r in order]
    else:
        raise ValueError("order must be EDF, GIVEN or a permutation of the jobs' request ids")
    return [_Plan(j, capacity, flow, price) for j in ranked]


def _finishes(plans: Sequence[_Plan], choice: Sequence[str], now: float, flow: Flow | None = None) -> list[float]:
    serial = list(accumulate((p.work[s] for p, s in zip(plans, choice)), initial=now))[1:]
    if flow is None:
        return serial
    ahead = {} if flow.strict else {stage: _work_ahead(plans, choice, stage) for stage in flow.stages}
    out, done = [], dict.fromkeys(flow.stages, now)  # strict: when each stage is free
    for i, (p, s, total) in enumerate(zip(plans, choice, serial)):
        ready = now
        for stage in flow.stages:
            work = p.stage[s].get(stage, 0.0)
            if flow.strict:
                ready = done[stage] = max(done[stage], ready) + work
            elif work:  # a job with no work at a stage (no media to encode) skips it
                ready = max(ready + work, now + ahead[stage][i])
        out.append(max(ready, now + (total - now) / flow.parallelism))
    return out


def _stage_order(plans: Sequence[_Plan], stage: str) -> list[int]:
    """The order a stage serves the jobs in: those it is running first, then the rest, each in
    the serving order."""
    return sorted(range(len(plans)), key=lambda i: stage not in plans[i].job.running)


def _work_ahead(plans: Sequence[_Plan], choice: Sequence[str], stage: str) -> list[float]:
    """Per job: the work at `stage` of the jobs it serves up to and including it."""
    out, total = [0.0] * len(plans), 0.0
    for i in _stage_order(plans, stage):
        total += plans[i].stage[choice[i]].get(stage, 0.0)
        out[i] = total
    return out


def _late(plans: Sequence[_Plan], choice: Sequence[str], now: float, flow: Flow | None = None) -> list[Miss]:
    return [Miss(p.job.request_id, p.job.deadline, f) for p, f in zip(plans, _finishes(plans, choice, now, flow))
            if p.job.deadline is not None and f > p.job.deadline + TIME_TOL]


def diagnose(jobs: Iterable[Job], now: float, capacity: Capacity | None = None, *,
             order: str | Sequence[str] = EDF, flow: Flow | None = None) -> tuple[Miss, ...]:
    """The jobs missing their deadline even with every job on its cheapest allowed strategy: none
    exactly when some assignment meets every deadline (later misses may be due to earlier jobs).
    Under `flow` "cheapest" is the least total work, exact when it is also the least in every
    stage (as for dropped or shrunk inputs; `reassign` solves the program before it says
    infeasible under `flow`, so it is exact either way)."""
    plans = _plans(jobs, order, capacity, flow)
    return tuple(_late(plans, [p.cheapest for p in plans], now, flow))


def _result(plans, choice, now, method, misses=(), variables=0, rows=0, flow=None) -> Assignment:
    ids, feasible = [p.job.request_id for p in plans], method != "infeasible"
    return Assignment(
        feasible, MappingProxyType(dict(zip(ids, choice))),
        math.fsum(p.acc[s] for p, s in zip(plans, choice)) if feasible else None,
        math.fsum(p.work[s] for p, s in zip(plans, choice)),
        tuple(p.job.request_id for p, s in zip(plans, choice) if s != p.job.current), tuple(ids),
        MappingProxyType(dict(zip(ids, _finishes(plans, choice, now, flow)))), method, tuple(misses),
        variables, rows)


def reassign(jobs: Iterable[Job], now: float, capacity: Capacity | None = None, *,
             order: str | Sequence[str] = EDF, keep_feasible: bool = True,
             time_limit_s: float | None = None, flow: Flow | None = None, price: float = 0.0) -> Assignment:
    """One allowed strategy per job, every deadline met, most accurate, then least work.

    With `keep_feasible` (the fast path) a current assignment on allowed strategies meeting every
    deadline is kept without solving, even where a more accurate one exists. `time_limit_s`
    bounds the solver (both passes); when it runs out the best assignment found is returned.
    `flow`: the overlapping-stages model (module docstring); None: one server, the serial sum.
    `price` (accuracy per second of work, >= 0; `LoadPrice`): the program maximises the total
    accuracy less `price` times the total work, so under overload a strategy is worth its work
    only when it buys at least `price` accuracy per second (floors still hold); 0: accuracy only."""
    if not price >= 0:
        raise ValueError(f"price must be >= 0, got {price}")
    plans = _plans(jobs, order, capacity, flow, price)
    current = [p.job.current for p in plans]
    if keep_feasible and all(c in p.allowed for p, c in zip(plans, current)) \
            and not _late(plans, current, now, flow):
        return _result(plans, current, now, "current", flow=flow)
    misses = _late(plans, [p.cheapest for p in plans], now, flow)
    best = [p.best for p in plans]
    if flow is not None:
        top = _finishes(plans, best, now, flow)
        if not misses and all(p.job.deadline is None or f <= p.job.deadline + TIME_TOL for p, f in zip(plans, top)):
            return _result(plans, best, now, "best", flow=flow)
        # Every deadline is a row (a less accurate strategy may take longer at some stage); a job a
        # stage is running comes first there, wherever it is in the order.
        last = max(k for k, p in enumerate(plans) if p.job.deadline is not None or p.job.running)
        choice, method, n_vars, n_rows = _solve_flow(plans, best, last, now, flow, time_limit_s)
        if choice is None and not misses:
            choice, method = _greedy(plans, now, flow), "greedy"
        if choice is None:
            return _result(plans, current, now, "infeasible", misses, flow=flow)
        return _result(plans, choice, now, method, variables=n_vars, rows=n_rows, flow=flow)
    if misses:
        return _result(plans, current, now, "infeasible", misses, flow=flow)
    top = _finishes(plans, best, now, flow)
    binding = [k for k, p in enumerate(plans)
               if p.job.deadline is not None and top[k] > p.job.deadline + TIME_TOL]
    if not binding:
        return _result(plans, best, now, "best", flow=flow)

    # Variables: the frontiers of the jobs up to the last binding deadline that have a choice;
    # the others stay on `best`, which is their only strategy unless they come after it.
    binaries = _Binaries(plans, binding[-1] + 1)
    free, var_sid, groups, pos = binaries.free, binaries.sid, binaries.groups, binaries.pos
    is_free = set(free)
    work = np.array([plans[i].work[s] for i, s in zip(pos, var_sid)])
    value = np.array([plans[i].value[s] for i, s in zip(pos, var_sid)])
    fixed = np.cumsum([0.0 if i in is_free else p.work[best[i]] for i, p in enumerate(plans)])
    budget = np.array([plans[k].job.deadline - now - fixed[k] + TIME_TOL for k in binding])
    # A row is implied by a later one whose budget, less the least work between them, is tighter.
    least = np.cumsum([min(plans[i].work[s] for s in plans[i].frontier) if i in is_free else 0.0
                       for i in range(len(plans))])[binding]
    keep, tightest = [], math.inf
    for r in reversed(range(len(binding))):
        if tightest + least[r] > budget[r]:
            keep.append(r)
        tightest = min(tightest, budget[r] - least[r])
    rows = np.array(binding)[keep[::-1]]
    a_ub = (np.array(pos)[None, :] <= rows[:, None]) * work[None, :]

    picked, method = _lex_milp(-_ACC_SCALE * value, work, groups, a_ub, budget[keep[::-1]], time_limit_s)
    choice = binaries.choice(best, picked or ())
    if picked is None or _late(plans, choice, now):  # no solution in time (or numerical slack)
        choice, method = _greedy(plans, now), "greedy"
    return _result(plans, choice, now, method, variables=len(var_sid), rows=len(rows))


class _Binaries:
    """The program's binaries x[i, s]: one per frontier strategy of each of the first `n_jobs`
    jobs that has a choice (`free`), one-hot within each job's `groups`; `sid` and `pos` give
    each binary's strategy and job."""

    def __init__(self, plans: Sequence[_Plan], n_jobs: int) -> None:
        self.free = [i for i in range(n_jobs) if len(plans[i].frontier) > 1]
        self.sid: list[str] = []
        self.groups: list[list[int]] = []
        self.pos: list[int] = []
        for i in self.free:
            self.groups.append(list(range(len(self.sid), len(self.sid) + len(plans[i].frontier))))
            self.sid += plans[i].frontier
            self.pos += [i] * len(plans[i].frontier)

    def choice(self, best: Sequence[str], picked: Sequence[int]) -> list[str]:
        """`best` with each free job on the strategy picked in its group."""
        out = list(best)
        for g, k in enumerate(picked):
            out[self.free[g]] = self.sid[self.groups[g][k]]
        return out


def _greedy(plans: Sequence[_Plan], now: float, flow: Flow | None = None) -> list[str]:
    """A feasible assignment: all cheapest, then each job (last first) as accurate as still fits."""
    choice = [p.cheapest for p in plans]
    for i in reversed(range(len(plans))):
        choice[i] = next(s for s in plans[i].by_accuracy
                         if s == choice[i] or not _late(plans, choice[:i] + [s] + choice[i + 1:], now, flow))
    return choice


def _solve_flow(plans: Sequence[_Plan], best: Sequence[str], last: int, now: float, flow: Flow,
                time_limit_s: float | None) -> tuple[list[str] | None, str, int, int]:
    """`reassign`'s program under `flow`: binaries x[i, s] (one-hot over the frontier of each job
    up to `last`, the last with a deadline, that has a choice), continuous C[i, k] >= 0 (job i
    leaves stage k, seconds after `now`); rows ``C[i,k] - C[i,k-1] - work >= 0`` and, `strict`,
    ``C[i,k] - C[i-1,k] - work >= 0``, else ``C[i,k] - (work at k of jobs up to i) >= 0`` (relaxed by a
    big M where job i's strategy has no work at k); for each deadline ``C[i, last stage] <= deadline - now`` and
    ``(work up to i) / parallelism <= deadline - now``. Jobs after `last` keep `best`. The choice
    is None when the solver found none (infeasible, or out of time)."""
    n_jobs, stages = last + 1, flow.stages
    binaries = _Binaries(plans, n_jobs)
    free, var_sid, groups, pos = binaries.free, binaries.sid, binaries.groups, binaries.pos
    n_bin, n_st = len(var_sid), len(stages)
    n = n_bin + n_jobs * n_st
    col = {(i, k): n_bin + i * n_st + k for i in range(n_jobs) for k in range(n_st)}
    stage_work = np.array([[plans[i].stage[s].get(st, 0.0) for st in stages] for i, s in zip(pos, var_sid)])
    stage_work = stage_work.reshape(n_bin, n_st)
    is_free = set(free)
    fixed = {i: [plans[i].stage[best[i]].get(st, 0.0) for st in stages] for i in range(n_jobs) if i not in is_free}
    rows, lower, upper = [], [], []

    def row(coeffs: dict[int, float], lo: float, hi: float) -> None:
        r = np.zeros(n)
        for c, v in coeffs.items():
            r[c] += v
        rows.append(r)
        lower.append(lo)
        upper.append(hi)

    rank = {k: {i: r for r, i in enumerate(j for j in _stage_order(plans, st) if j < n_jobs)}
            for k, st in enumerate(stages)}
    for i in range(n_jobs):
        own = [j for j, p in enumerate(pos) if p == i]
        for k in range(n_st):
            prefix = [j for j, p in enumerate(pos) if rank[k][p] <= rank[k][i]]
            work = {j: -stage_work[j, k] for j in own}
            const = fixed[i][k] if i in fixed else 0.0
            before = [(i, k - 1)] if k else []  # the job's previous stage
            if flow.strict:
                before += [(i - 1, k)] if i else []  # the previous job at this stage
            for prev in before:
                row({col[(i, k)]: 1.0, col[prev]: -1.0, **work}, const, np.inf)
            if not before:
                row({col[(i, k)]: 1.0, **work}, const, np.inf)
            if not flow.strict and rank[k][i] and (i not in fixed or fixed[i][k] > 0):
                # All the work at this stage up to the job, unless its strategy skips the stage
                # (big-M on the strategies without work here).
                ahead = math.fsum(fixed[h][k] for h in fixed if rank[k][h] <= rank[k][i])
                coeffs = {col[(i, k)]: 1.0, **{j: -stage_work[j, k] for j in prefix}}
                skips = [j for j in own if stage_work[j, k] == 0.0]
                if skips:
                    big = ahead + sum(max((stage_work[j, k] for j in prefix if pos[j] == h), default=0.0)
                                      for h in {pos[j] for j in prefix})
                    coeffs.update({j: coeffs[j] + big for j in skips})
                row(coeffs, ahead, np.inf)
        deadline = plans[i].job.deadline
        if deadline is not None:
            row({col[(i, n_st - 1)]: 1.0}, -np.inf, deadline - now + TIME_TOL)
            if flow.parallelism < math.inf:
                prefix = [j for j, p in enumerate(pos) if p <= i]
                const = math.fsum(sum(fixed[h]) for h in fixed if h <= i)
                row({j: stage_work[j].sum() / flow.parallelism for j in prefix}, -np.inf,
                    deadline - now - const / flow.parallelism + TIME_TOL)
    value = np.array([plans[i].value[s] for i, s in zip(pos, var_sid)])
    work_total = np.array([plans[i].work[s] for i, s in zip(pos, var_sid)])
    primary = np.concatenate([-_ACC_SCALE * value, np.zeros(n - n_bin)])
    secondary = np.concatenate([work_total, np.zeros(n - n_bin)])
    picked, method = _lex_milp(primary, secondary, groups, np.array(rows), np.array(upper), time_limit_s,
                               n_binary=n_bin, b_lb=np.array(lower))
    if picked is None:
        return None, method, n_bin, len(rows)
    choice = binaries.choice(best, picked)
    if _late(plans, choice, now, flow):  # numerical slack: the greedy one is feasible (checked by it)
        return None, "greedy", n_bin, len(rows)
    return choice, method, n_bin, len(rows)


def _lex_milp(primary, secondary, groups, a_ub=None, b_ub=None, time_limit_s=None, upper=None, *,
              n_binary=None, b_lb=None):
    """Minimises `primary`, then `secondary`, over binaries one-hot within each of `groups`
    (contiguous, the first `n_binary` variables; any after them are continuous, >= 0), subject to
    ``b_lb <= a_ub @ x <= b_ub``: (index picked per group, "milp" or "limit"), or (None,
    "infeasible"/"limit")."""
    primary, n = np.asarray(primary, dtype=float), len(primary)
    n_binary = n if n_binary is None else n_binary
    gid = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    one_hot = np.zeros((len(groups), n))
    one_hot[:, :n_binary] = np.equal.outer(np.arange(len(groups)), gid)
    constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
    if a_ub is not None and len(a_ub):
        constraints.append(LinearConstraint(a_ub, -np.inf if b_lb is None else b_lb, b_ub))
    top = np.ones(n) if upper is None else np.asarray(upper, dtype=float)
    if n > n_binary:
        top = np.concatenate([top[:n_binary], np.full(n - n_binary, np.inf)])
    bounds = Bounds(0.0, top)
    integrality = np.concatenate([np.ones(n_binary), np.zeros(n - n_binary)])
    end = None if time_limit_s is None else time.perf_counter() + time_limit_s

    def solve(c):
        options = {"mip_rel_gap": 0.0, **_HIGHS_EXTRA}
        if end is not None:
            options["time_limit"] = max(end - time.perf_counter(), 1e-4)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)  # "passed verbatim"
            try:
                return milp(c, integrality=integrality, bounds=bounds, constraints=constraints,
                            options=options)
            except AttributeError:  # a HiGHS without these options
                _HIGHS_EXTRA.clear()
                return solve(c)

    def pick(x):
        return [int(np.argmax(x[idx])) for idx in groups]

    res = solve(primary)
    if res.x is None:
        return None, "infeasible" if res.status == 2 else "limit"
    x, method = res.x, "milp" if res.status == 0 else "limit"
    if method == "milp" and np.ptp(secondary) > 0:  # second pass: the optimum stays, then least
        opt = sum(primary[idx[k]] for idx, k in zip(groups, pick(x)))
        constraints.append(LinearConstraint(primary[None, :], -np.inf, opt + 1e-9 * max(1.0, abs(opt))))
        res = solve(secondary) if end is None or time.perf_counter() < end else None
        if res is None or res.status != 0:
            method = "limit"
        if res is not None and res.x is not None:
            x = res.x
    return pick(x), method


# -- admission ----------------------------------------------------------------------------------


def admit_with_selection(queued_jobs: Iterable[Job], new_job: Job, now: float,
                         capacity: Capacity | None = None, *, order: str | Sequence[str] = EDF,
                         time_limit_s: float | None = None, flow: Flow | None = None,
                         price: float = 0.0) -> Admit:
    """Fits `new_job` by reassigning the reassignable queued jobs, or refuses it.

    Never moves a job below its floor, never makes a queued job miss a deadline it could still
    meet (one late even without the new job, `Admit.already_late`, does not constrain), and
    changes nothing when the new job fits on its current strategy (fast path). Refusals are
    ``RESOURCE_EXHAUSTED`` naming the jobs that would miss (``DEADLINE_EXCEEDED``: deadline past)
    with a retry hint, the worst overshoot (queued work drains a second per second), or None
    when the new job's own cheapest work exceeds its time left. With a `price` (`reassign`) the
    new job starts from its best-valued strategy, so under overload it arrives reduced."""
    queued, rid = tuple(queued_jobs), new_job.request_id
    plans = _plans(queued + (new_job,), order, capacity, flow, price)
    ids = [p.job.request_id for p in plans]
    if price and new_job.reassignable:
        new_job = replace(new_job, current=plans[ids.index(rid)].best)
    if new_job.deadline is not None and new_job.deadline <= now:
        return Admit(False, "DEADLINE_EXCEEDED",
                     f"selection: {rid}: deadline passed {(now - new_job.deadline) * 1e3:.0f} ms ago", None,
                     None, _result(plans, [p.job.current for p in plans], now, "infeasible", flow=flow))
    late = {m.request_id for m in diagnose(queued, now, capacity, order=[i for i in ids if i != rid], flow=flow)}
    relaxed = [replace(j, deadline=None) if j.request_id in late else j for j in queued]
    result = reassign(relaxed + [new_job], now, capacity, order=ids, time_limit_s=time_limit_s, flow=flow,
                      price=price)
    already_late = tuple(i for i in ids if i in late)
    if result.feasible:
        changed = tuple(r for r in result.changed if r != rid)
        moves = "".join(f"; {r} -> {result.choice[r]}" for r in changed)
        return Admit(True, "OK", f"selection: {rid} as {result.choice[rid]} ({result.method}){moves}",
                     None, result.choice[rid], result, changed, already_late)

    misses = ", ".join(f"{m.request_id} by {m.overshoot_s * 1e3:.0f} ms" for m in result.misses)
    msg = (f"selection: with {rid} admitted, deadlines are missed ({misses}) even with every job on its "
           f"cheapest allowed strategy")
    plan = plans[ids.index(rid)]
    own_s, retry = plan.work[plan.cheapest], None
    if new_job.deadline is not None and own_s > new_job.deadline - now + TIME_TOL:
        msg += f"; {rid}'s own work takes {own_s * 1e3:.0f} ms at least"
    else:
        retry = max(m.overshoot_s for m in result.misses)
        msg += f"; retry in {retry * 1e3:.0f} ms"
    return Admit(False, "RESOURCE_EXHAUSTED", msg, retry, None, result, (), already_late)


# -- offline tables -------------------------------------------------------------------------------


def strategy_table(jobs_by_size: Mapping[K, Sequence[Strategy]], floors: Sequence[float],
                   capacity: Capacity | None = None) -> dict[tuple[K, float], Strategy | None]:
    """{(size, floor): the least-work strategy of that size with accuracy >= floor, or None}.

    Work is seconds (`Strategy.seconds`) with `capacity` or when every strategy of the size has
    `work_s`, else total tokens. Ties: the more accurate, then the first listed. Each entry is a
    one-hot integer program solved by `milp`, as in `reassign`.
    """
    table: dict[tuple[K, float], Strategy | None] = {}
    for size, strategies in jobs_by_size.items():
        strategies = tuple(strategies)
        given = [s.work_s is not None for s in strategies]
        if capacity is None and any(given) and not all(given):
            raise ValueError(f"size {size!r}: strategies mix seconds and tokens; pass the capacities")
        work = np.array([s.seconds(capacity) if capacity is not None or s.work_s is not None
                         else float(sum(s.tokens.values())) for s in strategies])
        acc = np.array([s.accuracy for s in strategies])
        first = np.array([not any(work[j] == work[k] and acc[j] == acc[k] for j in range(k))
                          for k in range(len(strategies))], dtype=bool)
        for floor in floors:
            picked = None
            if strategies:
                picked, _ = _lex_milp(work, -_ACC_SCALE * acc, [list(range(len(strategies)))],
                                      upper=((acc >= floor) & first).astype(float))
            table[(size, floor)] = strategies[picked[0]] if picked is not None else None
    return table


# -- benchmark hook --------------------------------------------------------------------------------
_BENCH_CAPACITY = MappingProxyType({"encode": 20_000.0, "prefill": 40_000.0, "decode": 4_000.0})


def _overloaded_queue(n_jobs: int, n_strategies: int, seed: int) -> list[Job]:
    """Jobs of 1-8 images with a shared accuracy profile per size; every deadline can be met,
    but not with every job on `FULL`; the first tenth are no longer reassignable."""
    rng, profile, jobs = random.Random(seed), {}, []
    for images in (1, 2, 4, 8):
        full, xs = round(rng.uniform(0.75, 0.9), 3), [rng.uniform(0.1, 0.9) for _ in range(1, n_strategies)]
        profile[images] = [(FULL, 1.0, full)] + [(f"pixels:{x:.2f}/{k}", x, round(
            full - rng.uniform(0.05, 0.3) * (1 - x), 3)) for k, x in enumerate(xs, 1)]
    for i in range(n_jobs):
        images, text, new = rng.choice((1, 2, 4, 8)), rng.randint(16, 512), rng.randint(16, 256)
        strategies = [Strategy(sid, acc, int(576 * images * x), text + int(576 * images * x), new)
                      for sid, x, acc in profile[images]]
        jobs.append(Job(f"r{i}", tuple(strategies), floor=strategies[0].accuracy - rng.choice((0, 0.05, 0.1)),
                        reassignable=i >= n_jobs // 10, seq=i))
    plans = _plans(jobs, GIVEN, _BENCH_CAPACITY)
    cheap, full = (_finishes(plans, c, 0.0) for c in ([p.frontier[0] for p in plans], [FULL] * n_jobs))
    deadlines = accumulate((c + rng.uniform(0.2, 0.6) * (f - c) for c, f in zip(cheap, full)), max)
    return [replace(j, deadline=d) for j, d in zip(jobs, deadlines)]


def selection_time(n_jobs: int, n_strategies: int, seed: int, *, repeats: int = 3,
                   time_limit_s: float = 0.01) -> dict:
    """Seconds per `reassign` (median of `repeats`) on a random overloaded queue: ``exact_s``
    (to optimality), ``limited_s`` with `time_limit_s` (``limited_gap``: accuracy given up),
    ``fast_path_s`` (the same queue, no deadlines); with the methods, program size and arguments."""
    jobs = _overloaded_queue(n_jobs, n_strategies, seed)
    loose = [replace(j, deadline=None) for j in jobs]

    def timed(queue, **kw):  # (median seconds, last result)
        runs = [(time.perf_counter(), reassign(queue, 0.0, _BENCH_CAPACITY, **kw), time.perf_counter())
                for _ in range(max(1, repeats))]
        return statistics.median(t1 - t0 for t0, _, t1 in runs), runs[-1][1]

    reassign(jobs, 0.0, _BENCH_CAPACITY)  # warm-up
    exact_s, exact = timed(jobs)
    limited_s, limited = timed(jobs, time_limit_s=time_limit_s)
    fast_s, _ = timed(loose)
    return {"n_jobs": n_jobs, "n_strategies": n_strategies, "seed": seed, "exact_s": exact_s,
            "limited_s": limited_s, "time_limit_s": time_limit_s,
            "limited_gap": exact.objective - limited.objective, "fast_path_s": fast_s,
            "method": exact.method, "limited_method": limited.method, "variables": exact.variables,
            "rows": exact.rows, "changed": len(exact.changed)}
