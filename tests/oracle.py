"""The correctness oracle: the monolithic Hugging Face model's greedy `generate` on the same
inputs a request carries."""
from __future__ import annotations

from pathlib import Path

import torch

from prism.models.base import IMAGE
from prism.models.registry import adapter_for


#: Prompts of different lengths for the oracle comparisons.
TEXTS = ["hello there", "the quick brown fox jumps over the lazy dog", "a b c", "tell me about the weather today please",
         "zebra", "one more thing to say", "why", "count to ten slowly and then stop please"]


class Oracle:
    def __init__(self, model_dir: Path):
        self.adapter = adapter_for(model_dir)
        self.processor = self.adapter.load_processor()
        self.model = self.adapter.model_class.from_pretrained(str(model_dir)).eval()
        self.modality = next(iter(self.adapter.modalities))

    def chat_text(self, text: str, n_media: int) -> str:
        messages = [{"role": "user", "content": [{"type": self.modality}] * n_media + [{"type": "text", "text": text}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, prompt: str, media: list, max_new_tokens: int) -> list[int]:
        """Greedy tokens for a formatted prompt and decoded media (PIL images, or float32 16 kHz
        audio)."""
        kwargs = {}
        if media:
            kwargs = {"images": media} if self.modality == IMAGE else {"audio": media, "sampling_rate": 16000}
        inputs = self.processor(text=[prompt], return_tensors="pt", **kwargs)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    def chat(self, text: str, media: list, max_new_tokens: int) -> list[int]:
        return self.generate(self.chat_text(text, len(media)), media, max_new_tokens)
