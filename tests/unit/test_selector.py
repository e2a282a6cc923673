"""The live selector's closed loop (`services/scheduler/selector.py`), with no pipeline behind it:
which requests its slowdown hears from."""
from __future__ import annotations

import time

import pytest

from services.scheduler.core.selection_jobs import Slowdown
from services.scheduler.selector import Selector


def _selector(slowdown: Slowdown | None) -> Selector:
    return Selector(profile=None, pipeline=None, executor=None, slowdown=slowdown)


def test_requests_in_service_past_their_prediction_raise_the_slowdown_before_they_finish():
    sel = _selector(Slowdown(window=8, min_samples=2, high=4.0))
    now = time.time()
    sel._predicted = {"late": (now - 3.0, 1.0),  # 3 s in, predicted 1 s: at least 3x
                      "on-time": (now - 0.5, 1.0)}  # not past its prediction: says nothing yet
    assert sel._slowdown_now() == 1.0  # one sample: too few
    sel.slowdown.served(1.0, 1.5)
    assert sel._slowdown_now() == pytest.approx(2.25, abs=0.01)  # median of 1.5 and >= 3.0
    assert sel.stats.slowdown == pytest.approx(2.25, abs=0.01)  # what the status reports
    sel.completed("late")  # it finished: its full ratio replaces the lower bound
    assert sel.slowdown.samples == 2 and sel._predicted.keys() == {"on-time"}
    assert sel._slowdown_now() == pytest.approx(sel.slowdown.value)


def test_without_feedback_the_capacities_are_never_scaled():
    sel = _selector(None)
    sel._predicted = {"late": (time.time() - 3.0, 1.0)}
    assert sel._slowdown_now() == 1.0


def test_the_scheduler_config_builds_the_feedback_it_names(tiny_models, capsys):
    from prism.runtime.config import config_from_cli
    from services.scheduler.config import SchedulerConfig

    argv = ["--model-dir", str(tiny_models["llava"])]

    def config(*extra: str) -> SchedulerConfig:
        return config_from_cli(SchedulerConfig, env_prefix="PRISM_SCHEDULER", argv=[*argv, *extra], environ={})

    slow = config().selection_slowdown()
    assert (slow.quantile, slow._ratios.maxlen) == (0.9, 128)  # the defaults: a margin, a memory across bursts
    assert config("--selection-feedback-quantile", "0.5").selection_slowdown().quantile == 0.5
    assert config("--no-selection-feedback").selection_slowdown() is None
    with pytest.raises(SystemExit) as exc:
        config("--selection-feedback-quantile", "1.5")
    assert exc.value.code == 2 and "--selection-feedback-quantile (PRISM_SCHEDULER_SELECTION_FEEDBACK_QUANTILE): must be in [0, 1]" in capsys.readouterr().err
