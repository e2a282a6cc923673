"""Accuracy, latency and cost adaptation (issue 7): the pure decision core.

What the runtime calls to decide how each stage is served -- which model variant(s), what
batch size, how many replicas, how many cores each -- from profiled latencies, accuracies, the
forecast load and the SLO; and the dynamic-SLO helpers that order stage queues by what is left
of each request's budget. No gRPC, Redis or torch: numpy and scipy (HiGHS through
``scipy.optimize.milp``). Split in three modules, re-exported here:

* `adapt_model` -- `VariantProfile` and its `LatencyModel` (measured points, interpolation,
  Sponge's ``(alpha*b + beta)/c + gamma`` fitted by non-negative least squares), `load_profile` /
  `from_prism_profile` (what ``prism profile`` writes), `StageChoice`, `PipelineConfig`, `Bounds`,
  `Weights`, `Infeasible`; `remaining_budget_ms`, `budget_order_key`, `batch_for_budget`;
* `adapt_solve` -- the integer programs: `solve_pipeline` (IPA: per stage variant, batch,
  cores and replicas, end-to-end SLO, least cost minus weighted accuracy), `solve_variants`
  (InfAdapter: a set of variants sharing a stage's traffic), `solve_vertical` (Sponge: the fewest
  cores and a batch size meeting a remaining budget);
* `adapt_control` -- `RateForecaster` (linear fit over recent windows, max with the last, plus a
  margin), `Adapter` (re-solve on a schedule, hysteresis), `diff` (the `Action` list, safe order),
  `carries` and `shortfall` (does a configuration carry a rate; if not, why).

Use::

    adapter = Adapter({"encode": [...], "prefill": [...], "decode": [...]},
                      AdapterSettings(slo_ms=2000), Bounds(total_cores=16), Weights(accuracy=20))
    adapter.observe(n_arrivals)                 # as requests arrive
    new = adapter.step()                        # every tick; None: keep what runs
    if new is not None:
        for action in diff(old, new): apply(action)

Papers: InfAdapter (arXiv 2304.10892), IPA (Ghafouri et al., "IPA: Inference Pipeline
Adaptation", 2023), Sponge (arXiv 2404.00704).
"""
from services.scheduler.core.adapt_control import (
    Action,
    Adapter,
    AdapterSettings,
    RateForecaster,
    carries,
    diff,
    shortfall,
)
from services.scheduler.core.adapt_model import (
    ADAPT_STAGES,
    Bounds,
    Infeasible,
    Latency,
    LatencyModel,
    PipelineConfig,
    StageChoice,
    VariantProfile,
    Weights,
    batch_for_budget,
    batch_wait_ms,
    budget_order_key,
    from_prism_profile,
    load_profile,
    remaining_budget_ms,
    stage_latency_ms,
)
from services.scheduler.core.adapt_solve import (
    Option,
    pipeline_options,
    required_replicas,
    solve_pipeline,
    solve_variants,
    solve_vertical,
)

__all__ = [
    "ADAPT_STAGES", "Action", "Adapter", "AdapterSettings", "Bounds", "Infeasible", "Latency", "LatencyModel",
    "Option", "PipelineConfig", "RateForecaster", "StageChoice", "VariantProfile", "Weights",
    "batch_for_budget", "batch_wait_ms", "budget_order_key", "carries", "diff", "from_prism_profile",
    "load_profile", "pipeline_options", "remaining_budget_ms", "required_replicas", "shortfall", "solve_pipeline",
    "solve_variants", "solve_vertical", "stage_latency_ms",
]
