"""`prism profile --sim-out`: a simulator profile measured on the tiny LLaVA loads, covers every
stage at the batch sizes and token counts asked for, and drives a simulation."""
from __future__ import annotations

import pytest

from prism.profiling.cost import CostSettings
from prism.profiling.engines import Engines
from prism.profiling.sim import measure_sim_profile
from prism.sim.profile import loads, save
from prism.sim.simulator import InstanceSpec, SimConfig, SimRequest, simulate


@pytest.fixture(scope="module")
def sim_profile(tiny_models):
    engines = Engines(tiny_models["llava"])
    return measure_sim_profile(engines, settings=CostSettings(repeats=1, warmup=0), prompt_lengths=(16, 48),
                               contexts=(32, 64), prefill_batches=(1, 2), decode_batches=(1, 2), image_counts=(1, 2),
                               shared_cores=2), engines


def test_sim_profile_covers_the_grid_and_round_trips(sim_profile, tmp_path):
    prof, engines = sim_profile
    tables = prof.stages
    assert sorted(tables["prefill"].curves) == [1, 2]
    assert [p[0] for p in tables["prefill"].curves[1]] == [16, 48]
    assert [p[0] for p in tables["decode"].curves[2]] == [32, 64]
    per = prof.tokens_per_image
    assert [p[0] for p in tables["encode"].curves[1]] == [per, 2 * per]
    assert prof.shared_cores == 2
    layout = engines.lm.layout
    kv = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * 4  # fp32
    assert prof.overheads_ms["kv_per_token"] == pytest.approx(kv / 1e9 * 1e3, rel=1e-4)
    again = loads(save(prof, tmp_path / "p.json").read_text())
    assert again.as_dict() == prof.as_dict()


def test_sim_profile_drives_a_simulation(sim_profile):
    prof, _ = sim_profile
    cfg = SimConfig((InstanceSpec(("encode",)), InstanceSpec(("prefill",)), InstanceSpec(("decode",))))
    res = simulate([SimRequest("a", 0.0, 20, 1, 4), SimRequest("b", 0.01, 30, 0, 4)], cfg, prof)
    assert [r.status for r in res.records] == ["OK", "OK"]
    assert all(r.tokens == 4 and r.ttft_ms > 0 for r in res.records)
