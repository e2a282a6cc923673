"""The scheduler's pure policy core: load accounting, routing, admission, placement, autoscaling.

No gRPC, Redis or torch here: plain dataclasses and functions with injectable clocks, so the
policies can be unit-tested, simulated and benchmarked in isolation. The service layer feeds
them worker registrations (`Instance`), keeps a `LoadBook` in step with the work it hands out
and acts on their answers. Modules:

* `load` -- `LoadBook` (pending tokens, decode slots), `RateTracker`, `SloTracker`;
* `routing` -- `Instance`, `route`, `split_images`, `NoInstance`;
* `cost` -- `RequestCost`, `Estimate`, `estimate_path` (the latency model);
* `placement` -- `Placement`, `PlacementChoice` (colocated vs split path);
* `admission` -- `Admission`, `Limits`, `Decision`, `commit`, `order_key`;
* `autoscale` -- `Autoscaler`, `ScalePolicy`, `capacity_from_profile`, `task_share_s`;
* `selection` -- deadline-driven modality selection (MOSEL): `reassign`, `admit_with_selection`,
  `strategy_table` as integer programs (scipy's HiGHS). Imported on its own
  (``from services.scheduler.core.selection import ...``) so that the rest of the core stays
  standard-library only.

A request's decision::

    decision = admission.admit(req, now, book, instances)   # places, estimates, may refuse
    if decision.ok:
        commit(book, req, decision, rates=rates, now=now)    # books its pending tokens
"""

from services.scheduler.core.admission import Admission, Decision, Limits, commit, order_key
from services.scheduler.core.autoscale import Autoscaler, ScalePolicy, capacity_from_profile, task_share_s
from services.scheduler.core.cost import Estimate, RequestCost, estimate_path
from services.scheduler.core.load import STAGES, LoadBook, RateTracker, SloOutcome, SloTracker
from services.scheduler.core.placement import MODES, Placement, PlacementChoice
from services.scheduler.core.routing import Instance, NoInstance, candidates, route, split_images

__all__ = [
    "MODES",
    "STAGES",
    "Admission",
    "Autoscaler",
    "Decision",
    "Estimate",
    "Instance",
    "Limits",
    "LoadBook",
    "NoInstance",
    "Placement",
    "PlacementChoice",
    "RateTracker",
    "RequestCost",
    "ScalePolicy",
    "SloOutcome",
    "SloTracker",
    "candidates",
    "capacity_from_profile",
    "commit",
    "estimate_path",
    "order_key",
    "route",
    "split_images",
    "task_share_s",
]
