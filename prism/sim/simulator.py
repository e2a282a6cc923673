"""The discrete-event simulation of a Prism deployment, driven by the scheduler's own core.

The scheduler side here makes every decision with the live scheduler's code
(`services.scheduler.core`): `Admission.admit` (limits, back-pressure, SLO refusals),
`Placement.decide` (colocated or split path, `route`, `split_images`), the `LoadBook` kept in
step with the tasks exactly as `services/scheduler/pipeline.py` keeps it (task ids, costs, when
each is added and finished), online capacity profiling as `services/scheduler/cluster.py` does
(median of the last 32 (tokens, seconds) per instance and stage, `capacity_from_profile`,
refreshed every `refresh_s`), and, with autoscaling, `RateTracker`, `SloTracker` and `Autoscaler`
fed as `services/scheduler/admin.py` feeds them, acted on like the local supervisor
(`prism.launch`: single-stage workers started and drained within the bounds).

What is simulated: the clock (`prism.sim.events.Clock`), the workers' latencies
(`prism.sim.profile`, through `prism.sim.workers`) and the hops between processes (the
profile's overheads). With a selection profile (`SimConfig.selection`), modality selection
decides arrivals and reassigns queued requests as the live selector does (`prism.sim.selection`).
Not simulated: failures and retries, KV memory limits beyond decode slots, stop strings (every
request generates its `max_new_tokens`, as the benchmarks force with ignore_eos).

Given the same requests, configuration and profile, a run is deterministic: no wall clock and
no randomness.
"""
from __future__ import annotations

import collections
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from prism.bench.stats import RequestRecord
from prism.engine.batching import MAX_PADDING
from prism.sim.events import Clock
from prism.sim.profile import SimProfile
from prism.sim.selection import FULL, Choice, Inputs, Refused, SelectionConfig, SimReduce, SimSelector
from prism.sim.workers import DecodeWorker, Device, EncodeWorker, Host, PrefillWorker, StageQueue, Task
from services.scheduler.core import (STAGES, Admission, Autoscaler, Instance, Limits, LoadBook, NoInstance,
                                     Placement, RateTracker, RequestCost, ScalePolicy, SloTracker)
from services.scheduler.core.autoscale import capacity_from_profile

__all__ = ["DEFAULT_CAPACITY", "AutoscaleConfig", "InstanceSpec", "SimConfig", "SimRequest", "SimResult",
           "Simulator", "simulate"]

#: What `services.scheduler.cluster.DEFAULT_CAPACITY` assumes of a worker not profiled yet
#: (tokens/s; equal by a unit test: that module imports the queue backends).
DEFAULT_CAPACITY = MappingProxyType({"encode": 2000.0, "prefill": 2000.0, "decode": 200.0})


@dataclass(frozen=True)
class SimRequest:
    """One request to simulate."""

    request_id: str
    arrival_s: float
    text_tokens: int
    num_images: int = 0
    max_new_tokens: int = 16
    priority: int = 0
    ttft_target_s: float | None = None
    """Sent as ``slo.ttft_ms`` (admission may refuse on it); None: no target."""
    tpot_target_s: float | None = None
    deadline_s: float | None = None
    """Sent as ``slo.deadline_ms``: a budget from arrival; None: no deadline."""
    accuracy_floor: float = 0.0
    """``selection.accuracy_floor``: the least expected accuracy the caller accepts."""
    reduce: SimReduce | None = None
    """What may be reduced (``selection``); None: nothing."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.accuracy_floor <= 1.0:
            raise ValueError(f"request {self.request_id}: accuracy_floor must be in [0, 1]")
        if self.arrival_s < 0 or self.text_tokens < 0 or self.num_images < 0 or self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id}: arrival_s, text_tokens, num_images must be >= 0 "
                             "and max_new_tokens >= 1")
        if self.text_tokens + self.num_images == 0:
            raise ValueError(f"request {self.request_id}: empty prompt")


@dataclass(frozen=True)
class InstanceSpec:
    """`count` identical worker instances."""

    stages: tuple[str, ...]
    """Stages hosted (several: a colocated worker, one device for all of them)."""
    count: int = 1
    tp: int = 1
    """Devices per instance (tensor parallel degree: the profile's tp_speedup applies)."""
    slots: int = 16
    """Decode slots."""
    encode_batch_tokens: int = 4096
    prefill_batch_tokens: int = 2048
    prefill_max_padding: float = MAX_PADDING
    """Padding a prefill batch may carry, a fraction of its real tokens (`take_batch`)."""
    capacity: Mapping[str, float] = field(default_factory=dict)
    """Advertised tokens/s per stage (``--capacity``); missing stages are profiled online."""

    def __post_init__(self) -> None:
        stages = tuple(s for s in STAGES if s in self.stages)
        if not stages or set(self.stages) - set(STAGES):
            raise ValueError(f"stages: {self.stages!r} must be a non-empty subset of {STAGES}")
        object.__setattr__(self, "stages", stages)
        if self.count < 0 or self.tp < 1 or self.slots < 1:
            raise ValueError("count must be >= 0, tp and slots >= 1")
        if self.encode_batch_tokens < 1 or self.prefill_batch_tokens < 1 or not self.prefill_max_padding >= 0:
            raise ValueError("batch token budgets must be >= 1 and prefill_max_padding >= 0")
        object.__setattr__(self, "capacity", MappingProxyType(dict(self.capacity)))


@dataclass(frozen=True)
class AutoscaleConfig:
    """The scheduler's autoscaling policy (`services.scheduler.config.Policy`) and the supervisor."""

    templates: Mapping[str, InstanceSpec]
    """The single-stage instance started for each stage scaled."""
    min_replicas: int = 1
    max_replicas: int = 4
    max_by_stage: Mapping[str, int] = field(default_factory=dict)
    """Per-stage bound overriding `max_replicas` (e.g. each pool's static size)."""
    target_utilisation: float = 0.8
    scale_out_cooldown_s: float = 10.0
    scale_in_cooldown_s: float = 60.0
    window_s: float = 10.0
    every_s: float = 1.0
    start_s: float = 30.0
    """From the decision to start a worker until it registers (loading weights)."""

    def __post_init__(self) -> None:
        for stage, spec in self.templates.items():
            if spec.stages != (stage,):
                raise ValueError(f"templates[{stage!r}] must host only {stage!r}")
        if self.every_s <= 0 or self.start_s < 0 or self.window_s <= 0:
            raise ValueError("every_s and window_s must be > 0, start_s >= 0")


@dataclass(frozen=True)
class SimConfig:
    """The deployment simulated and its scheduler policy (`services.scheduler.config.Policy`)."""

    instances: tuple[InstanceSpec, ...]
    placement: str = "adaptive"
    colocate_below: float = 0.5
    colocate_stall_ms: float = 100.0
    queue_tokens: Mapping[str, int] = field(default_factory=dict)
    max_inflight: int = 0
    refresh_s: float = 0.25
    profile_window: int = 32
    autoscale: AutoscaleConfig | None = None
    shared_queues: bool = False
    """One queue per stage read by all its workers (``--shared-queues``, the Kubernetes
    deployment): a task goes to whichever worker takes it first, and the scheduler moves its
    booked load there when the task's first event names that worker."""
    selection: SelectionConfig | None = None
    """Modality selection (``--selection-profile``); None: requests are served as sent."""

    def __post_init__(self) -> None:
        if not self.instances and self.autoscale is None:
            raise ValueError("instances: at least one instance spec (or autoscaling)")
        if self.refresh_s <= 0 or self.profile_window < 1:
            raise ValueError("refresh_s must be > 0 and profile_window >= 1")

    @property
    def gpus(self) -> int:
        return sum(s.count * s.tp for s in self.instances)


@dataclass
class SimResult:
    records: list[RequestRecord]
    decisions: list[tuple]
    """(request_id, time, code, path, {stage: instance names}) per admission, in order."""
    placements: dict[str, int]
    gpu_seconds: float
    end_s: float
    events: int
    replicas: list[tuple[float, dict[str, int]]]
    """(time, {stage: instances up}) whenever it changed (autoscaling)."""
    batch_sizes: dict[str, float]
    """Mean batch size per stage (decode: active requests per step)."""
    outcomes: list[tuple] = field(default_factory=list)
    """(request id, status, strategy, expected accuracy, floor, deadline budget s, e2e s) per request."""
    selection: dict | None = None
    """What the selector did (decisions, fitted, refused, reassigned, lost races); None: no selection."""


class _Inst:
    """A simulated worker instance: its device, its stage workers and its registration."""

    def __init__(self, name: str, spec: InstanceSpec, sim: "Simulator", born: float):
        self.name, self.spec, self.born = name, spec, born
        self.registered = False
        self.draining = False
        self.removed_at: float | None = None
        self.device = Device(sim.host)
        p, clock = sim.profile, sim.clock
        self.workers: dict[str, object] = {}
        for stage in spec.stages:
            if stage == "encode":
                self.workers[stage] = EncodeWorker(name, clock, self.device, p, sim, spec.tp,
                                                   max_batch_tokens=spec.encode_batch_tokens)
            elif stage == "prefill":
                self.workers[stage] = PrefillWorker(name, clock, self.device, p, sim, spec.tp,
                                                    max_batch_tokens=spec.prefill_batch_tokens,
                                                    max_padding=spec.prefill_max_padding)
            else:
                self.workers[stage] = DecodeWorker(name, clock, self.device, p, sim, spec.tp, slots=spec.slots)
            if sim.config.shared_queues:
                w = self.workers[stage]
                w.queue = sim.shared[stage]
                w.peers = sim.peers[stage]
                w.peers.append(w)

    def idle(self) -> bool:
        for w in self.workers.values():
            if w.busy or len(w.queue) or getattr(w, "_held", 0):
                return False
        return not self.device.busy


@dataclass(eq=False)
class _Req:
    req: SimRequest
    cost: RequestCost
    arrival: float  # at the scheduler
    encode_left: int = 0
    prefill: str = ""
    decode: str = ""
    encoders: tuple[str, ...] = ()
    first_s: float | None = None
    prefill_done: float | None = None
    decode_task: Task | None = None
    decode_worker: str = ""
    inputs: Inputs | None = None  # the images served now
    strategy: str = FULL
    accuracy: float | None = None
    options: dict | None = None  # strategy id -> (Strategy, Inputs), when its inputs may be reduced
    attempt: int = 1
    encode_tasks: list = field(default_factory=list)  # this attempt's
    encode_started: bool = False  # the scheduler saw a worker take one of its encode tasks
    prefill_started: bool = False  # the scheduler saw a worker take its prefill task
    encode_done: bool = False
    reassigned: str | None = None  # a reassignment being carried out
    reassignments: int = 0


class Simulator:
    """One simulated deployment (module docstring). `run` once per instance."""

    def __init__(self, config: SimConfig, profile: SimProfile):
        self.config, self.profile = config, profile
        self.clock = Clock()
        self.host = Host(self.clock, profile.shared_cores)
        self.book = LoadBook()
        self.placement = Placement(config.placement, colocate_below=config.colocate_below,
                                   stall_budget_s=config.colocate_stall_ms / 1000)
        self.admission = Admission(Limits(queue_tokens=dict(config.queue_tokens), max_inflight=config.max_inflight),
                                   self.placement)
        a = config.autoscale
        window = a.window_s if a is not None else 10.0
        self.rates = RateTracker(window_s=window, clock=lambda: self.clock.now)
        self.slo = SloTracker(window_s=window, clock=lambda: self.clock.now)
        self.autoscaler: Autoscaler | None = None
        self.insts: dict[str, _Inst] = {}
        self.routable: list[Instance] = []
        self._samples: dict[tuple[str, str], collections.deque] = {}
        self._names: dict[str, int] = collections.Counter()
        self._reqs: dict[str, _Req] = {}
        self._tasks: dict[str, tuple[str, str, str]] = {}  # task id -> (request id, stage, booked instance)
        self.records: list[RequestRecord] = []
        self.decisions: list[tuple] = []
        self.placements = {"split": 0, "colocated": 0}
        self.replicas: list[tuple[float, dict[str, int]]] = []
        self.shared = {s: StageQueue() for s in STAGES}
        self.peers: dict[str, list] = {s: [] for s in STAGES}
        self._expected = 0
        self.outcomes: list[tuple] = []
        self.selector = SimSelector(config.selection, self) if config.selection is not None else None
        for spec in config.instances:
            for _ in range(spec.count):
                self._add(spec, registered=True)
        self._refresh()

    # ---- cluster -------------------------------------------------------------------------
    def _add(self, spec: InstanceSpec, *, registered: bool) -> _Inst:
        kind = "worker" if len(spec.stages) > 1 else spec.stages[0]
        name = f"{kind}-{self._names[kind]}"
        self._names[kind] += 1
        inst = _Inst(name, spec, self, self.clock.now)
        inst.registered = registered
        for w in inst.workers.values():
            w.stopped = not registered
        self.insts[name] = inst
        return inst

    def _capacity(self, inst: _Inst, stage: str) -> float:
        return (inst.spec.capacity.get(stage) or self._profiled(inst.name, stage) or self._stage_profile(stage)
                or DEFAULT_CAPACITY[stage])

    def _profiled(self, name: str, stage: str) -> float:
        s = self._samples.get((name, stage))
        return capacity_from_profile(list(s)) if s else 0.0

    def _stage_profile(self, stage: str) -> float:
        xs = [x for (_, st), d in self._samples.items() if st == stage for x in d]
        return capacity_from_profile(xs) if xs else 0.0

    def _refresh(self) -> None:
        """The registry view, as `Cluster.refresh` builds it."""
        self.routable = [
            Instance(name=i.name, address=i.name, stages=frozenset(i.spec.stages),
                     capacity={s: self._capacity(i, s) for s in i.spec.stages},
                     decode_slots=i.spec.slots if "decode" in i.spec.stages else 0, draining=i.draining)
            for i in self.insts.values() if i.registered and i.removed_at is None]

    def _record(self, name: str, stage: str, tokens: int, seconds: float) -> None:
        if tokens > 0 and seconds > 0:
            self._samples.setdefault((name, stage), collections.deque(maxlen=self.config.profile_window)).append(
                (tokens, seconds))

    def _periodic(self) -> None:
        if self._done_all():
            return
        self._refresh()
        self.clock.after(self.config.refresh_s, self._periodic)

    def _done_all(self) -> bool:
        return len(self.records) >= self._expected

    def _worker(self, name: str, stage: str):
        return self.insts[name].workers[stage]

    # ---- autoscaling ------------------------------------------------------------------------
    def _count(self) -> dict[str, int]:
        return {s: sum(1 for i in self.insts.values() if i.removed_at is None and not i.draining and s in i.spec.stages)
                for s in STAGES}

    def _note_replicas(self) -> None:
        up = {s: sum(1 for i in self.insts.values() if i.registered and i.removed_at is None and not i.draining
                     and s in i.spec.stages) for s in STAGES}
        if not self.replicas or self.replicas[-1][1] != up:
            self.replicas.append((round(self.clock.now, 3), up))

    def _scale(self) -> None:
        """`Scaling.step` (services/scheduler/admin.py) and the supervisor's answer to it."""
        if self._done_all():
            return
        a = self.config.autoscale
        now = self.clock.now
        live = [i for i in self.routable if not i.draining]
        actual = {s: sum(1 for i in live if s in i.stages) for s in STAGES}
        caps = {}
        for s in STAGES:
            c = [i.cap(s) for i in live if s in i.stages]
            caps[s] = sum(c) / len(c) if c else DEFAULT_CAPACITY[s]
        policies = {s: ScalePolicy(capacity=max(caps[s], 1e-6), min_replicas=a.min_replicas,
                                   max_replicas=a.max_by_stage.get(s, a.max_replicas), target_utilisation=a.target_utilisation,
                                   scale_in_cooldown_s=a.scale_in_cooldown_s,
                                   scale_out_cooldown_s=a.scale_out_cooldown_s) for s in STAGES}
        if self.autoscaler is None:
            self.autoscaler = Autoscaler(policies)
        else:
            self.autoscaler.policies.update(policies)
        load = {s: self.rates.arrival_rate(s, now) for s in STAGES}
        desired = self.autoscaler.desired(now, load, self.slo.stage_attainment(now), actual)
        have = self._count()
        for stage, want in desired.items():
            if stage not in a.templates:
                continue
            want = max(a.min_replicas, min(a.max_by_stage.get(stage, a.max_replicas), want))
            while have[stage] < want:
                inst = self._add(a.templates[stage], registered=False)
                self.clock.after(a.start_s, lambda inst=inst: self._register(inst))
                have[stage] += 1
            if have[stage] > want:
                mine = [i for i in self.insts.values() if i.spec.stages == (stage,) and i.removed_at is None
                        and not i.draining]
                if mine:
                    victim = mine[-1]
                    victim.draining = True
                    if self.config.shared_queues:  # it stops reading the shared queue, finishes what it took
                        for w in victim.workers.values():
                            w.stopped = True
                    self._refresh()
                    self._reap(victim)
                    have[stage] -= 1
        self._note_replicas()
        self.clock.after(a.every_s, self._scale)

    def _register(self, inst: _Inst) -> None:
        inst.registered = True
        for w in inst.workers.values():
            w.stopped = False
            w.kick()
        self._refresh()
        self._note_replicas()

    def _reap(self, inst: _Inst) -> None:
        if inst.idle() and not self.book.requests_on(inst.name):
            inst.removed_at = self.clock.now
            self._refresh()
            self._note_replicas()
        else:
            self.clock.after(1.0, lambda: self._reap(inst))

    # ---- requests -----------------------------------------------------------------------
    def run(self, requests: Sequence[SimRequest]) -> SimResult:
        if self._expected:
            raise RuntimeError("a Simulator runs once")
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique")
        self._expected = len(requests)
        half = self.profile.overhead_s("client") / 2
        intake = self.profile.overhead_s("intake_per_image")
        for r in requests:
            self.clock.at(r.arrival_s + half + intake * r.num_images, lambda r=r: self._arrive(r))
        self.clock.after(self.config.refresh_s, self._periodic)
        if self.selector is not None and self.selector.enabled:
            self.clock.after(self.config.selection.every_s, self._select)
        if self.config.autoscale is not None:
            self._note_replicas()
            self.clock.after(self.config.autoscale.every_s, self._scale)
        end = self.clock.run()
        for i in self.insts.values():
            if i.removed_at is None:
                i.removed_at = end
        gpu_s = sum(i.spec.tp * (i.removed_at - i.born) for i in self.insts.values())
        sizes: dict[str, list[int]] = {s: [] for s in STAGES}
        for i in self.insts.values():
            for s, w in i.workers.items():
                sizes[s].extend(w.batch_sizes)
        self.records.sort(key=lambda rec: (rec.arrival_s, rec.sent_s))
        sel = None
        if self.selector is not None:
            st = self.selector.stats
            sel = {"decisions": st.decisions, "fitted": st.fitted, "refused": st.refused,
                   "reassigned": st.reassigned, "lost_races": st.lost_races}
        return SimResult(self.records, self.decisions, dict(self.placements), gpu_s, end, self.clock.events_run,
                         self.replicas, {s: round(statistics.fmean(v), 3) for s, v in sizes.items() if v},
                         self.outcomes, sel)

    def _select(self) -> None:
        if self._done_all():
            return
        self.selector.tick()
        self.clock.after(self.config.selection.every_s, self._select)

    def deadline_of(self, r: SimRequest) -> float | None:
        return None if r.deadline_s is None else r.arrival_s + r.deadline_s

    def cost_of(self, r: SimRequest, inputs: Inputs | None = None, *, deadline: bool = True) -> RequestCost:
        """The request's cost with `inputs` (None: as sent); `deadline=False`: without its deadline
        (the selection's program checked it)."""
        p = self.profile
        k, t, pp = (r.num_images, p.tokens_per_image, p.prompt_tokens_per_image) if inputs is None else \
            (inputs.images, inputs.tokens_per_image, inputs.prompt_tokens_per_image)
        return RequestCost(
            request_id=r.request_id, priority=r.priority, deadline=self.deadline_of(r) if deadline else None,
            ttft_target_s=r.ttft_target_s, image_tokens=k * t, prompt_tokens=r.text_tokens + k * pp,
            max_new_tokens=r.max_new_tokens, media=(t,) * k if t else ())

    def _fail(self, r: SimRequest, code: str, message: str) -> None:
        done = self.clock.now + self.profile.overhead_s("client") / 2
        self.records.append(RequestRecord(r.arrival_s, r.arrival_s, None, done, 0, code,
                                          expected_tokens=r.max_new_tokens, num_images=r.num_images,
                                          message=message))
        self.outcomes.append((r.request_id, code, "", None, r.accuracy_floor, r.deadline_s, None))

    def _arrive(self, r: SimRequest) -> None:
        now = self.clock.now
        if self.selector is not None and self.selector.enabled:
            try:
                choice = self.selector.admit(r, now)
            except Refused as exc:
                self.decisions.append((r.request_id, now, exc.code, None, {}))
                self._fail(r, exc.code, exc.message)
                return
        else:
            decision = self.admission.admit(self.cost_of(r), now, self.book, self.routable)
            if not decision.ok:
                self.decisions.append((r.request_id, now, decision.code, None, {}))
                self._fail(r, decision.code, decision.message)
                return
            full = self.config.selection.full_accuracy() if self.config.selection is not None else None
            choice = Choice(Inputs(FULL, r.num_images, self.profile.tokens_per_image,
                                   self.profile.prompt_tokens_per_image), FULL, full, None)
        cost = self.cost_of(r, choice.inputs)
        for stage in cost.stages:  # on_admit (services/scheduler/app.py)
            self.rates.arrived(stage, cost.cost(stage), now)
        st = _Req(r, cost, now, inputs=choice.inputs, strategy=choice.strategy, accuracy=choice.accuracy,
                  options=choice.options)
        if self._place(st) and self.selector is not None:
            self.selector.accepted(st)

    def _place(self, st: _Req) -> bool:
        """An attempt: its placement (`Pipeline._choose`) and its first tasks."""
        r, cost, now = st.req, st.cost, self.clock.now
        try:
            choice = self.placement.decide(cost, self.routable, self.book)
        except NoInstance as exc:
            self.decisions.append((r.request_id, now, "UNAVAILABLE", None, {}))
            self._fail(r, "UNAVAILABLE", f"no live worker for the {exc.stage} stage")
            if self.selector is not None:
                self.selector.finished(r.request_id)
            self._reqs.pop(r.request_id, None)
            return False
        self.decisions.append((r.request_id, now, "OK", choice.path, choice.names()))
        self.placements[choice.path] += 1
        st.prefill, st.decode = choice.prefill.name, choice.decode.name
        st.encoders = tuple(i.name for i in choice.encode)
        self._reqs[r.request_id] = st
        base = f"{r.request_id}/a{st.attempt}"
        # The prefill and decode chosen now carry the load from now (live `Pipeline._attempt`).
        self.book.add(f"{base}/prefill", "prefill", st.prefill, cost.prompt_tokens)
        if r.max_new_tokens > 1:
            self.book.add(f"{base}/decode", "decode", st.decode, r.max_new_tokens - 1)
        st.encode_tasks = []
        if choice.encode:
            groups: dict[str, int] = {}
            for inst, tokens in zip(choice.encode, cost.media_costs):
                groups[inst.name] = groups.get(inst.name, 0) + tokens
            st.encode_left = len(groups)
            for k, (name, tokens) in enumerate(groups.items()):
                task = Task(f"{base}/encode{k}", r.request_id, tokens, r.priority, cost.deadline, media_tokens=tokens)
                st.encode_tasks.append(task)
                self._put("encode", name, task)
        else:
            self._queue_prefill(st)
        return True

    # ---- selection's hooks -------------------------------------------------------------
    def later(self, fn) -> None:
        self._later(fn)

    def take_back(self, task: Task) -> bool:
        """Cancels a queued task atomically unless a worker took it (``cancel(if_queued=True)``)."""
        return task.take_back()

    def generated(self, st: _Req) -> int:
        """Tokens the scheduler has of `st` (the first from prefill, then decode's)."""
        if st.first_s is None:
            return 0
        seq = None
        if st.decode_task is not None and st.decode_task.task_id and st.decode_worker:
            seq = self._worker(st.decode_worker, "decode").sequence(st.decode_task.task_id)
        return seq.generated if seq is not None else 1

    def reattempt(self, st: _Req) -> None:
        """The cancellation reached the scheduler: the attempt ends (its tasks taken back or
        orphaned), the next serves the reassigned inputs."""
        for task in st.encode_tasks:
            if task.task_id in self._tasks:
                self.book.finish(task.task_id, "encode")
                del self._tasks[task.task_id]
        base = f"{st.req.request_id}/a{st.attempt}"  # the load booked for its prefill and decode
        self.book.finish(f"{base}/prefill", "prefill")
        self.book.finish(f"{base}/decode", "decode")
        sid, st.reassigned = st.reassigned, None
        st.reassignments += 1
        st.attempt += 1
        st.encode_started = st.prefill_started = False
        strategy, inputs = st.options[sid]
        st.strategy, st.accuracy, st.inputs = sid, strategy.accuracy, inputs
        st.cost = self.cost_of(st.req, inputs)
        if not self._place(st) and self.selector is not None:
            self.selector.finished(st.req.request_id)

    def _put(self, stage: str, name: str, task: Task) -> None:
        self._tasks[task.task_id] = (task.request_id, stage, name)
        self.book.add(task.task_id, stage, name, task.cost)
        self._worker(name, stage).put(task)

    def _queue_prefill(self, st: _Req) -> None:
        r, c = st.req, st.cost
        src = next((e for e in st.encoders if e != st.prefill), st.encoders[0] if st.encoders else "")
        self._put("prefill", st.prefill, Task(f"{r.request_id}/a{st.attempt}/prefill", r.request_id, c.prompt_tokens, r.priority,
                                              c.deadline, media_tokens=c.image_tokens, prompt_tokens=c.prompt_tokens,
                                              new_tokens=r.max_new_tokens, source=src))

    # ---- worker events (Listener), seen by the scheduler after the event hop ---------------
    def _later(self, fn) -> None:
        self.clock.after(self.profile.overhead_s("event"), fn)

    def running(self, task: Task, worker: str) -> None:
        if task.task_id not in self._tasks:  # an attempt ended by a reassignment
            return
        rid, stage, booked = self._tasks[task.task_id]
        st = self._reqs[rid]
        if stage == "encode":
            def started() -> None:  # the RUNNING event reaches the scheduler
                if any(t is task for t in st.encode_tasks):  # this attempt's
                    st.encode_started = True
            self._later(started)
        if worker != booked:  # taken from a shared queue: the pipeline moves its load on this event
            self._tasks[task.task_id] = (rid, stage, worker)
            self._later(lambda: self.book.move(task.task_id, stage, worker, from_instance=booked))
        if stage == "decode":
            st.decode_worker = worker
        if stage != "prefill":
            return

        def prefill_started() -> None:  # the RUNNING event reaches the scheduler
            if self._tasks.get(task.task_id, ("",))[0] == rid:
                st.prefill_started = True
        self._later(prefill_started)
        if st.req.max_new_tokens > 1 and st.decode_task is None:
            def queue_decode() -> None:
                r, c = st.req, st.cost
                st.decode_task = Task(f"{r.request_id}/a{st.attempt}/decode", r.request_id, r.max_new_tokens - 1, r.priority,
                                      c.deadline, prompt_tokens=c.prompt_tokens, new_tokens=r.max_new_tokens,
                                      source=worker)
                self._put("decode", st.decode, st.decode_task)
            st.decode_task = Task("", "", 0)  # placeholder: queued once the event arrives
            self._later(queue_decode)

    def input_ready_at(self, task: Task) -> float | None:
        return self._reqs[task.request_id].prefill_done

    def ready(self, task: Task, worker: str, compute_s: float) -> None:
        if task.task_id not in self._tasks:  # an attempt ended by a reassignment: nobody waits for it
            return
        rid, stage, _ = self._tasks[task.task_id]
        st = self._reqs[rid]
        if stage == "prefill":  # the KV is complete on the prefill worker now
            st.prefill_done = self.clock.now
            dec = st.decode_task
            if dec is not None and dec.task_id and st.decode_worker:
                self._worker(st.decode_worker, "decode").input_ready(dec.task_id)

        def seen() -> None:
            if task.task_id not in self._tasks:
                return
            self.book.finish(task.task_id, stage)
            if stage == "encode":
                self._record(worker, "encode", task.media_tokens, compute_s)
                st.encode_left -= 1
                if st.encode_left == 0:
                    st.encode_done = True
                    self._queue_prefill(st)
            else:
                self._record(worker, "prefill", task.prompt_tokens, compute_s)
                st.first_s = self.clock.now + self.profile.overhead_s("client") / 2
                if st.req.max_new_tokens <= 1:
                    self._finish(st, st.first_s, 1)
        self._later(seen)

    def done(self, task: Task, worker: str, tokens: int, share_s: float) -> None:
        rid, stage, _ = self._tasks[task.task_id]
        st = self._reqs[rid]

        def seen() -> None:
            self.book.finish(task.task_id, stage)
            if share_s > 0:
                self._record(worker, "decode", tokens, share_s)
            self._finish(st, self.clock.now + self.profile.overhead_s("client") / 2, tokens + 1)
        self._later(seen)

    def _finish(self, st: _Req, done_s: float, tokens: int) -> None:
        r = st.req
        first = st.first_s if st.first_s is not None else done_s
        self.records.append(RequestRecord(r.arrival_s, r.arrival_s, first, done_s, tokens, "OK",
                                          expected_tokens=r.max_new_tokens, num_images=r.num_images,
                                          strategy=st.strategy, expected_accuracy=st.accuracy))
        self.outcomes.append((r.request_id, "OK", st.strategy, st.accuracy, r.accuracy_floor, r.deadline_s,
                              done_s - r.arrival_s))
        if self.selector is not None:
            self.selector.finished(r.request_id)
        tpot = (done_s - first) / (tokens - 1) if tokens > 1 else None
        self.slo.record(first - r.arrival_s, tpot, r.ttft_target_s, r.tpot_target_s, now=self.clock.now)
        del self._reqs[r.request_id]


def simulate(requests: Sequence[SimRequest], config: SimConfig, profile: SimProfile) -> SimResult:
    """Runs `requests` through a fresh simulated deployment."""
    return Simulator(config, profile).run(requests)
