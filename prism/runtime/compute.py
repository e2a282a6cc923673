"""In-place vertical scaling of a worker: its compute share (torch threads, CPU cores, batch
bound) changed while it runs, between batches, with no restart and no request lost.

A worker's model work runs on one compute thread (`ComputeThread`), one batch or decode step
at a time. A change is submitted to that same thread, so it runs after the batch in progress
and before the next: torch's intra-op thread count is a property of the calling thread (OpenMP
keeps it per thread, and torch initialises each thread once), so it must be set there; the
core affinity is set on every thread of the process (`/proc/self/task`), the OpenMP pool's
included. `max_batch` is read by the stage workers when they form their next batch.

On CUDA the GPU's share is fixed when the process starts (the MPS active thread percentage,
a MIG slice), so a running worker changes only its host-side threads and cores and its batch
bound (which bounds the GPU work per step).

Pure Python (no gRPC): `WorkerAdminServicer` in `prism.runtime.workeradmin` is the RPC.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

__all__ = ["ComputeShare", "ShareError", "allowed_cpus", "apply_here", "resolve_share"]


class ShareError(ValueError):
    """A requested share is invalid; `field` names the request field at fault."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class ComputeShare:
    """A worker's compute share in effect."""

    threads: int
    """torch intra-op threads of the compute thread (>= 1)."""
    cpus: tuple[int, ...]
    """CPU ids the process may run on (sorted, non-empty)."""
    max_batch: int = 0
    """Most tasks (encode, prefill) or sequences (decode) per batch; 0: the worker's own limit."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ShareError("share.threads", f"must be >= 1, got {self.threads}")
        if not self.cpus:
            raise ShareError("share.cpus", "must name at least one CPU")
        if self.max_batch < 0:
            raise ShareError("share.max_batch", f"must be >= 0, got {self.max_batch}")
        object.__setattr__(self, "cpus", tuple(sorted(set(self.cpus))))

    @property
    def cores(self) -> int:
        """Cores this share occupies (what it costs): the threads, at most one per CPU named."""
        return min(self.threads, len(self.cpus))


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on now."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return tuple(range(os.cpu_count() or 1))


def resolve_share(current: ComputeShare, allowed: tuple[int, ...], threads: int = 0,
                  cpus: tuple[int, ...] = (), max_batch: int = -1) -> ComputeShare:
    """The share a request asks for: `threads` 0 keeps the threads (or takes the number of
    `cpus` when those change), `cpus` empty keeps the cores, `max_batch` < 0 keeps the bound.

    Raises:
        ShareError: threads below 0, a CPU outside `allowed`, a negative bound.
    """
    if threads < 0:
        raise ShareError("share.threads", f"must be >= 0, got {threads}")
    bad = sorted(set(cpus) - set(allowed))
    if bad:
        raise ShareError("share.cpus", f"CPUs {bad} are not among this worker's CPUs {list(allowed)}")
    new_cpus = tuple(cpus) or current.cpus
    new_threads = threads or (len(set(cpus)) if cpus else current.threads)
    return ComputeShare(threads=new_threads, cpus=new_cpus,
                        max_batch=current.max_batch if max_batch < 0 else max_batch)


def apply_here(share: ComputeShare) -> None:
    """Apply `share` from the compute thread: its torch threads, every thread's affinity."""
    import torch

    torch.set_num_threads(share.threads)
    if not hasattr(os, "sched_setaffinity"):
        return
    cpus = set(share.cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except (ProcessLookupError, PermissionError) as exc:  # a thread that just ended
            log.debug("affinity of thread %d not set: %s", tid, exc)


class BatchBudget:
    """How many queued tasks a stage worker takes into its next batch when budgets are tight
    (Sponge's dynamic batching): the largest batch whose service time, learnt from this worker's
    own recent batches at its current core count, fits the tightest remaining budget
    (`services.scheduler.core.adapt_model.batch_for_budget`). Before any batch was measured, or
    when no task carries a deadline, only the share's `max_batch` bounds the batch."""

    def __init__(self, window: int = 64):
        import collections

        self._times: dict[int, dict[int, collections.deque]] = {}
        self._window = window

    def record(self, cores: int, batch: int, ms: float) -> None:
        import collections

        if batch >= 1 and ms > 0:
            self._times.setdefault(cores, {}).setdefault(batch, collections.deque(maxlen=self._window)).append(ms)

    def limit(self, cores: int, remaining_ms: list[float], max_batch: int) -> int:
        """The most tasks the next batch may take (0: unbounded) given the remaining budgets of
        the tasks it would take, most urgent first."""
        import math

        from services.scheduler.core.adapt_model import LatencyModel, batch_for_budget

        finite = [r for r in remaining_ms if math.isfinite(r)]
        measured = self._times.get(cores)
        if not finite or not measured:
            return max_batch
        model = LatencyModel({cores: {b: sum(v) / len(v) for b, v in sorted(measured.items())}})
        top = max_batch or max(len(remaining_ms), 1)
        return batch_for_budget(model, cores, finite, range(1, top + 1), queued=len(remaining_ms))
