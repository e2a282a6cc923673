"""One checkpoint loaded once and driven through Prism's own cores (encoder, prefill, decode),
never Hugging Face ``generate``: what the profiler times and what it scores."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from prism.engine.decode import DecodeEngine, DecodeSpec
from prism.engine.encoder import EncoderEngine
from prism.engine.kv import KEY, VALUE
from prism.engine.lm import LanguageModel
from prism.engine.prefill import KvSink, PrefillEngine, PromptPlan
from prism.engine.sampling import Sampling
from prism.models.base import PreparedPrompt
from prism.models.loading import ENCODER, LANGUAGE, LoadedModel, load_model

__all__ = ["Engines"]


class Engines:
    """The encoder, language model, prefill core and a processor for `model_dir` (one
    ``from_pretrained`` shared by the stages)."""

    def __init__(self, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 loaded: LoadedModel | None = None):
        self.model_dir = Path(model_dir)
        self.loaded = loaded or load_model(model_dir, dtype=dtype, device=device,
                                           parts=frozenset({ENCODER, LANGUAGE}))
        self.adapter = self.loaded.adapter
        self.processor = self.adapter.load_processor()
        self.encoder = EncoderEngine(self.loaded)
        self.lm = LanguageModel(self.loaded)
        self.prefill = PrefillEngine(self.lm)
        self.dtype = dtype
        self.device = str(self.loaded.device)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def media_embeddings(self, prompts: Sequence[PreparedPrompt]) -> list[dict[str, list[torch.Tensor]]]:
        """Each prompt's media embeddings by modality (one batched encoder pass)."""
        per_request = self.encoder.encode_batch([p.items for p in prompts])
        out = []
        for prompt, embs in zip(prompts, per_request):
            media: dict[str, list[torch.Tensor]] = {}
            for item, emb in zip(prompt.items, embs):
                media.setdefault(item.modality, []).append(emb)
            out.append(media)
        return out

    @staticmethod
    def slot_sink(engine: DecodeEngine, request_id: str) -> KvSink:
        def sink(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            engine.write_kv(request_id, layer, KEY, 0, k)
            engine.write_kv(request_id, layer, VALUE, 0, v)

        return sink

    def generate(self, prompt: PreparedPrompt, max_new_tokens: int, *, max_len: int | None = None) -> list[int]:
        """Greedy tokens for one prepared request: encode, prefill into a reserved decode slot,
        decode until a stop id or `max_new_tokens` (stop ids are not returned)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        media = self.media_embeddings([prompt])[0] if prompt.items else {}
        plan: PromptPlan = self.prefill.plan(prompt.input_ids, prompt.items)
        engine = DecodeEngine(self.lm, slots=1, max_len=max_len or plan.prompt_tokens + max_new_tokens + 1)
        engine.reserve("r", plan.prompt_tokens)
        first = self.prefill.run(plan, media, Sampling(), self.slot_sink(engine, "r"))
        stops = self.lm.eos_ids
        tokens = [first]
        engine.activate(DecodeSpec("r", first, plan.rope_delta, Sampling(), max_new_tokens, stops))
        while engine.num_active:
            tokens += [e.token for e in engine.step() if e.token is not None]
        return [t for t in tokens if t not in stops]

    def decode_text(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)
