"""Simulated stage workers: each batches its queue as the live worker does and spends the
profile's latency on a simulated device.

* `Host` -- the compute the devices run on. With ``cores=None`` every device is its own (a GPU);
  with a number, the devices are worker processes on one machine of that many cores and the
  calls running at once share them (processor sharing: each runs at min(1, cores / running)).
* `Device` -- one instance's compute: one call at a time, first come first served (the live
  worker's `ComputeThread`; co-hosted stages share it).
* `StageQueue` -- a stage queue served in `services.scheduler.core.order_key` order (priority,
  earliest deadline, smaller cost, arrival), as `prism.queue.memory` serves it.
* `EncodeWorker`, `PrefillWorker` -- take the first queued task, then whatever else is queued
  while `prism.engine.batching.take_batch` keeps it in the token budget (media concatenated;
  prompts padded to the longest), and run the batch as one call.
* `DecodeWorker` -- takes tasks while a slot is free, activates each once its KV is in (prefill
  done, transfer over), and steps the continuous batch: one token for every active request per
  step; requests join and leave between steps.

Workers report to a `Listener` (the simulated scheduler) with the same events the live ones
put on their tasks: running, ready (with the call's compute time), done (with the request's
share of its decode steps).
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prism.engine.batching import MAX_PADDING, take_batch
from prism.sim.events import Clock
from prism.sim.profile import SimProfile
from services.scheduler.core.admission import order_key

__all__ = ["Device", "DecodeWorker", "EncodeWorker", "Host", "Listener", "PrefillWorker", "StageQueue", "Task"]


class Host:
    """The compute devices run on (module docstring)."""

    def __init__(self, clock: Clock, cores: int | None = None) -> None:
        if cores is not None and cores < 1:
            raise ValueError("cores must be >= 1 or None")
        self.clock, self.cores = clock, cores
        self._running: dict[int, list] = {}  # job id -> [remaining_s, on_done, handle]
        self._last = 0.0
        self._ids = 0

    def _rate(self) -> float:
        n = len(self._running)
        return 1.0 if self.cores is None or n <= self.cores else self.cores / n

    def _advance(self) -> None:
        now = self.clock.now
        rate = self._rate()
        for job in self._running.values():
            job[0] = max(0.0, job[0] - (now - self._last) * rate)
        self._last = now

    def _reschedule(self) -> None:
        rate = self._rate()
        for jid, job in self._running.items():
            if job[2] is not None:
                job[2].cancel()
            job[2] = self.clock.after(job[0] / rate, lambda jid=jid: self._finish(jid))

    def run(self, work_s: float, on_done: Callable[[], None]) -> None:
        """Runs `work_s` seconds of full-speed work, then `on_done()`."""
        if self.cores is None:
            self.clock.after(work_s, on_done)
            return
        self._advance()
        self._ids += 1
        self._running[self._ids] = [work_s, on_done, None]
        self._reschedule()

    def _finish(self, jid: int) -> None:
        self._advance()
        job = self._running.pop(jid)
        self._reschedule()
        job[1]()


class Device:
    """One instance's compute: one call at a time, in the order submitted."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._waiting: list[tuple[float, Callable[[float], None]]] = []
        self.busy = False
        self.busy_s = 0.0

    def submit(self, work_s: float, on_done: Callable[[float], None]) -> None:
        """Queues a call of `work_s`; `on_done(work_s)` when it ends."""
        self._waiting.append((work_s, on_done))
        if not self.busy:
            self._next()

    def _next(self) -> None:
        if not self._waiting:
            self.busy = False
            return
        self.busy = True
        work_s, on_done = self._waiting.pop(0)
        self.busy_s += work_s

        def done() -> None:
            on_done(work_s)
            self._next()

        self.host.run(work_s, done)


@dataclass(eq=False)
class Task:
    """One stage task as a worker sees it."""

    task_id: str
    request_id: str
    cost: int
    """The task's tokens as the scheduler booked them (the queue's cost)."""
    priority: int = 0
    deadline: float | None = None
    media_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    """Decode: tokens to generate in all, the first (prefill's) included."""
    source: str = ""
    """The instance holding this task's input (encoder for prefill, prefill for decode)."""
    seq: int = 0
    taken: bool = False
    """A worker took it from its queue."""
    cancelled: bool = False
    queue: "StageQueue | None" = None

    def take_back(self) -> bool:
        """Cancels it unless a worker took it (on its way to the queue, or queued): True if so."""
        if self.taken:
            return False
        if not self.cancelled:
            self.cancelled = True
            if self.queue is not None:
                self.queue.dropped()
        return True


class Listener(Protocol):
    def running(self, task: Task, worker: str) -> None: ...
    def ready(self, task: Task, worker: str, compute_s: float) -> None: ...
    def done(self, task: Task, worker: str, tokens: int, share_s: float) -> None: ...
    def input_ready_at(self, task: Task) -> float | None: ...


class StageQueue:
    """Tasks served in `order_key` order (cancelled ones skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Task]] = []
        self._seq = 0
        self._live = 0

    def put(self, task: Task) -> None:
        if task.cancelled:  # taken back on its way to the queue
            return
        self._seq += 1
        task.seq = self._seq
        task.queue = self
        self._live += 1
        heapq.heappush(self._heap, (order_key(task.priority, task.deadline, task.cost, self._seq), task))

    def dropped(self) -> None:
        self._live -= 1

    def _purge(self) -> None:
        while self._heap and self._heap[0][1].cancelled:
            heapq.heappop(self._heap)

    def peek(self) -> Task | None:
        self._purge()
        return self._heap[0][1] if self._heap else None

    def pop(self) -> Task:
        self._purge()
        task = heapq.heappop(self._heap)[1]
        task.taken, task.queue = True, None
        self._live -= 1
        return task

    def __len__(self) -> int:
        return self._live


@dataclass(eq=False)
class _Base:
    name: str
    clock: Clock
    device: Device
    profile: SimProfile
    listener: Listener
    tp: int = 1
    queue: StageQueue = field(default_factory=StageQueue)
    busy: bool = False
    batch_sizes: list[int] = field(default_factory=list)
    peers: list | None = None
    """With a shared stage queue: every worker reading it (this one included), in start order."""
    stopped: bool = False
    """Takes nothing from its queue (not registered yet, or draining from a shared queue)."""

    def put(self, task: Task) -> None:
        """The task reaches this worker's queue (after the queue hop)."""
        self.clock.after(self.profile.overhead_s("queue"), lambda: self._arrive(task))

    def _arrive(self, task: Task) -> None:
        self.queue.put(task)
        for w in self.peers or (self,):
            w.kick()

    def kick(self) -> None:
        raise NotImplementedError

    def _take(self, budget: int, padded: bool, tokens: Callable[[Task], int],
              max_padding: float | None = None) -> list[Task]:
        """The first queued task, then queued ones while the batch stays in `budget` (and, padded,
        its padding within `max_padding`: `take_batch`)."""
        batch = [self.queue.pop()]
        while len(self.queue):
            nxt = self.queue.peek()
            pending = [(k, tokens(t)) for k, t in enumerate([*batch, nxt])]
            if len(take_batch(pending, budget, len(pending), padded=padded,
                              max_padding=max_padding)) < len(pending):
                break
            batch.append(self.queue.pop())
        self.batch_sizes.append(len(batch))
        return batch

    def _call(self, stage: str, batch: list[Task], tokens: int) -> None:
        """The batch is RUNNING; one `stage` call over it on the device, then READY and the next."""
        for t in batch:
            self.listener.running(t, self.name)
        self.device.submit(self.profile.latency_s(stage, len(batch), tokens, self.tp),
                           lambda s: self._done(batch, s))

    def _done(self, batch: list[Task], compute_s: float) -> None:
        for t in batch:
            self.listener.ready(t, self.name, compute_s)
        self.busy = False
        self.kick()


@dataclass(eq=False)
class EncodeWorker(_Base):
    max_batch_tokens: int = 4096

    def kick(self) -> None:
        if self.busy or self.stopped or not len(self.queue):
            return
        self.busy = True
        batch = self._take(self.max_batch_tokens, False, lambda t: t.media_tokens)
        self._call("encode", batch, sum(t.media_tokens for t in batch))


@dataclass(eq=False)
class PrefillWorker(_Base):
    max_batch_tokens: int = 2048
    max_padding: float | None = MAX_PADDING

    def kick(self) -> None:
        if self.busy or self.stopped or not len(self.queue):
            return
        self.busy = True
        batch = self._take(self.max_batch_tokens, True, lambda t: t.prompt_tokens, self.max_padding)
        # pull each request's embeddings (in parallel) from an encoder elsewhere, then RUNNING
        per = self.profile.overhead_s("embed_per_token")
        fetch = max((t.media_tokens * per for t in batch if t.source and t.source != self.name), default=0.0)
        self.clock.after(fetch, lambda: self._call("prefill", batch, max(t.prompt_tokens for t in batch)))


@dataclass(eq=False)
class _Seq:
    task: Task
    context: int
    generated: int = 1  # the first token came from prefill
    share_s: float = 0.0


@dataclass(eq=False)
class DecodeWorker(_Base):
    slots: int = 16
    _held: int = 0  # slots reserved or active
    _active: dict[str, _Seq] = field(default_factory=dict)
    _stepping: bool = False
    _waits: dict[str, list[Callable[[], None]]] = field(default_factory=dict)
    steps: int = 0

    @property
    def active(self) -> int:
        return len(self._active)

    def sequence(self, task_id: str) -> _Seq | None:
        """The active request of `task_id` (its tokens so far), or None."""
        return self._active.get(task_id)

    def kick(self) -> None:
        while self._held < self.slots and len(self.queue) and not self.stopped:
            task = self.queue.pop()
            self._held += 1
            self.listener.running(task, self.name)
            remote = task.source and task.source != self.name
            transfer = task.prompt_tokens * self.profile.overhead_s("kv_per_token") if remote else 0.0
            taken = self.clock.now
            self._when_input(task, lambda task=task, taken=taken, transfer=transfer:
                             self.clock.at(max(self.clock.now, taken + transfer), lambda: self._activate(task)))

    def _when_input(self, task: Task, then: Callable[[], None]) -> None:
        at = self.listener.input_ready_at(task)
        if at is None:  # prefill not done yet: look again when it is (the scheduler calls `input_ready`)
            self._waits.setdefault(task.task_id, []).append(then)
        else:
            self.clock.at(at, then)

    def input_ready(self, task_id: str) -> None:
        """The scheduler: the KV this task waits for is complete."""
        for then in self._waits.pop(task_id, ()):
            then()

    def _activate(self, task: Task) -> None:
        if task.new_tokens <= 1:
            self._held -= 1
            self.listener.done(task, self.name, 1, 0.0)
            self.kick()
            return
        self._active[task.task_id] = _Seq(task, task.prompt_tokens)
        if not self._stepping:
            self._step()

    def _step(self) -> None:
        if not self._active:
            self._stepping = False
            return
        self._stepping = True
        seqs = list(self._active.values())
        context = sum(s.context + s.generated for s in seqs) / len(seqs)
        work = self.profile.latency_s("decode", len(seqs), context, self.tp)
        self.batch_sizes.append(len(seqs))
        self.device.submit(work, lambda s: self._stepped(seqs, s))

    def _stepped(self, seqs: list[_Seq], step_s: float) -> None:
        self.steps += 1
        share = step_s / len(seqs)
        for seq in seqs:
            seq.generated += 1
            seq.share_s += share
            if seq.generated >= seq.task.new_tokens:
                del self._active[seq.task.task_id]
                self._held -= 1
                self.listener.done(seq.task, self.name, seq.generated - 1, seq.share_s)
        self.kick()
        self._step()

