"""The CUDA path (flash-attn 2 where installed, SDPA otherwise): the split engines still equal
the monolith's greedy tokens on the GPU, in fp32 and bf16."""
from __future__ import annotations

import pytest
import torch

from prism.engine.decode import DecodeEngine, DecodeSpec
from prism.engine.kv import KEY, VALUE
from prism.engine.lm import LanguageModel
from prism.engine.prefill import PrefillEngine
from prism.engine.sampling import Sampling
from prism.models.loading import LANGUAGE, attention_implementation, load_model
from prism.models.registry import adapter_for

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text_decode_on_cuda_matches_generate(tiny_models, dtype):
    model_dir = tiny_models["qwen2-vl"]
    adapter = adapter_for(model_dir)
    processor = adapter.load_processor()
    loaded = load_model(model_dir, dtype=dtype, device="cuda", parts=frozenset({LANGUAGE}), attn="sdpa")
    assert attention_implementation(torch.device("cuda")) in ("flash_attention_2", "sdpa")
    full = adapter.model_class.from_pretrained(str(model_dir), dtype=loaded.dtype,
                                               attn_implementation=attention_implementation(torch.device("cuda"))).cuda().eval()
    lm = LanguageModel(loaded)
    prefill, engine = PrefillEngine(lm), DecodeEngine(lm, slots=2, max_len=256)
    prompt = "the quick brown fox"
    ids = processor(text=[prompt], return_tensors="pt")["input_ids"]
    want = full.generate(input_ids=ids.cuda(), attention_mask=torch.ones_like(ids).cuda(), max_new_tokens=8,
                         do_sample=False)[0, ids.shape[1]:].tolist()
    plan = prefill.plan(ids[0].tolist(), [])
    engine.reserve("r", plan.prompt_tokens)

    def sink(layer, k, v):
        engine.write_kv("r", layer, KEY, 0, k)
        engine.write_kv("r", layer, VALUE, 0, v)

    got = [prefill.run(plan, {}, Sampling(), sink)]
    engine.activate(DecodeSpec("r", got[0], plan.rope_delta, Sampling(), 8, lm.eos_ids))
    while engine.num_active:
        got += [e.token for e in engine.step()]
    assert got == want[: len(got)] and len(got) == len(want)
