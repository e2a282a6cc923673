"""Fitting a simulator profile to isolated live requests (`prism.sim.calibrate`): the encode,
prefill and decode scales and the fixed path are recovered from requests simulated on a known
"true" profile, and the isolated requests cover every image count."""
from __future__ import annotations

import pytest

from prism.sim.calibrate import fit_profile, pick_isolated, scaled
from prism.sim.profile import from_dict
from prism.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate

BASE = from_dict({
    "version": 1, "kind": "prism-sim-profile", "model": {"name": "toy"},
    "media": {"tokens_per_image": 100, "prompt_tokens_per_image": 100},
    "stages": {"encode": {"curves": {"1": [[100, 80.0], [400, 300.0]]}},
               "prefill": {"curves": {"1": [[50, 40.0], [600, 700.0]]}},
               "decode": {"curves": {"1": [[1, 20.0], [800, 30.0]]}}},
    "overheads_ms": {"client": 5.0},
    "sources": [{"id": "hand", "title": "by hand", "used_for": "tests"}]})
SPLIT = SimConfig((InstanceSpec(("encode",)), InstanceSpec(("prefill",)), InstanceSpec(("decode",))),
                  placement="split")
SHAPES = [(30, 0, 4), (400, 0, 6), (120, 1, 5), (250, 2, 3), (60, 3, 8), (200, 0, 2)]  # text, images, new


def run(profile) -> tuple[list, list]:
    reqs = [SimRequest(f"i{k}", 10.0 * k, text, images, new) for k, (text, images, new) in enumerate(SHAPES)]
    recs = {r.arrival_s: r for r in simulate(reqs, SPLIT, profile).records}
    return [recs[r.arrival_s].ttft_ms for r in reqs], [recs[r.arrival_s].tpot_ms for r in reqs]


def test_the_stages_scales_and_the_fixed_path_are_recovered():
    truth = scaled(BASE, encode=0.7, prefill=1.3, decode=0.9)
    truth = type(truth)(**{**truth.__dict__, "overheads_ms": {"client": 35.0}})
    live_ttft, live_tpot = run(truth)
    fit = fit_profile(BASE, live_ttft, live_tpot, run)
    assert fit is not None and fit.requests == len(SHAPES)
    assert fit.encode_scale == pytest.approx(0.7, rel=1e-6)
    assert fit.prefill_scale == pytest.approx(1.3, rel=1e-6)
    assert fit.decode_scale == pytest.approx(0.9, rel=1e-6)
    assert fit.client_added_ms == pytest.approx(30.0, abs=1e-6)
    again, _ = run(fit.profile)
    assert again == pytest.approx(live_ttft, abs=1e-6)


def test_one_scale_for_both_when_no_request_has_media():
    global SHAPES
    saved, SHAPES = SHAPES, [(30, 0, 4), (400, 0, 6), (200, 0, 2)]
    try:
        live_ttft, live_tpot = run(scaled(BASE, prefill=1.5))
        fit = fit_profile(BASE, live_ttft, live_tpot, run)
    finally:
        SHAPES = saved
    assert fit.prefill_scale == pytest.approx(1.5, rel=1e-6)
    assert fit.encode_scale == fit.prefill_scale  # nothing measured the encoder: it follows prefill


def test_too_few_completed_requests_fit_nothing():
    live_ttft, live_tpot = run(BASE)
    assert fit_profile(BASE, [live_ttft[0]] + [None] * (len(SHAPES) - 1), live_tpot, run) is None


def test_isolated_requests_cover_every_image_count_and_spread_the_prompts():
    images = [0, 0, 1, 0, 0, 3, 0, 1, 0, 0, 2, 0]
    prompts = [40, 500, 230, 60, 300, 620, 90, 240, 510, 30, 420, 150]
    picked = pick_isolated(images, prompts, 6)
    assert picked == sorted(picked) and len(picked) == 6
    assert {images[k] for k in picked} == {0, 1, 2, 3}
    assert 7 in picked  # the longest-prompt one-image request
    text = sorted(prompts[k] for k in picked if images[k] == 0)
    assert text == [30, 500, 510]  # the longest of the group, then the shortest and longest of the rest
    assert pick_isolated(images, prompts, 2) == [5, 10]  # the most images first when slots are short
    assert pick_isolated(images, prompts, 50) == list(range(len(images)))
    assert pick_isolated([], [], 3) == []
