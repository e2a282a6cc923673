"""Model variants as processes (issue 7): `prism up --variant`-style Deployment with two tiny LLaVA
variants of different weights; each variant's workers run with --variant NAME and the scheduler
gets --variants. A request pinned to a variant is served by it with exactly its `model.generate`
tokens; one pinning none is served by one of them, with that one's tokens."""
from __future__ import annotations

import pytest

from prism.client import PrismClient
from prism.launch import Deployment, DeploymentOptions
from tests.oracle import Oracle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_pinned_requests_get_their_variants_exact_tokens(tiny_models, tmp_path):
    from prism.models.builder import make_model

    dirs = {"a": tiny_models["llava"], "b": make_model("llava", "tiny", tmp_path / "llava-b", seed=1)}
    oracles = {v: Oracle(d) for v, d in dirs.items()}
    options = DeploymentOptions(model_dir=dirs["a"], threads=1, slots=4, max_len=512, log_dir=tmp_path / "logs",
                                layout="colocated", variants=(f"a={dirs['a']}:0.6", f"b={dirs['b']}:0.8"))
    with Deployment(options) as d:
        assert sorted(d.started.values()) == [(("encode", "prefill", "decode"), "a"),
                                              (("encode", "prefill", "decode"), "b")]
        assert len(d.status().workers) == 2
        with PrismClient(d.address) as client:
            for k, variant in enumerate(("a", "b", "a", "b")):
                prompt = f"variant {k}"
                done = client.complete(prompt, max_new_tokens=6, variant=variant)
                assert done.variant == variant
                assert list(done.token_ids) == oracles[variant].generate(prompt, [], 6), (k, variant)
            done = client.complete("any variant", max_new_tokens=5)
            assert done.variant in ("a", "b")
            assert list(done.token_ids) == oracles[done.variant].generate("any variant", [], 5)
        assert d.scale_once() == {}  # no adaptation loop: the launcher leaves the variants' workers alone
