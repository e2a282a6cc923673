"""The tiny/small model builder: checkpoints load like real ones and generate usefully.

Each tiny family is built once per module; generation runs through ``model.generate`` (greedy)
with inputs made by the saved processor, as a client of a real checkpoint would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForMultimodalLM, AutoTokenizer  # noqa: E402

from prism.models.builder import FAMILIES, RECIPES, SIZES, make_model  # noqa: E402
from prism.models.processors import PRISM_PROCESSORS, load_processor, processor_class_name  # noqa: E402

NEW_TOKENS = 12


# ---- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=FAMILIES)
def built(request, tmp_path_factory):
    """(family, model dir, model, processor) for each tiny family, built once per module."""
    family = request.param
    model_dir = make_model(family, "tiny", tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir).eval()
    return family, model_dir, model, load_processor(model_dir)


def image(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def audio(freq: float, seconds: float = 1.5, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(int(freq)).standard_normal(t.shape)
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * noise).astype(np.float32)


def media(family: str, i: int):
    """The i-th test media item of the family's modality (distinct items for distinct i)."""
    return audio(220.0 * (i + 1)) if RECIPES[family].modality == "audio" else image(i)


def inputs(family: str, processor, text: str, items=()) -> dict:
    """Chat-templated prompt with ``items`` before the text, run through the processor."""
    modality = RECIPES[family].modality
    content = [{"type": modality} for _ in items] + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}],
                                           add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if items and modality == "audio":
        kwargs = {"audio": list(items), "sampling_rate": processor.feature_extractor.sampling_rate}
    elif items:
        kwargs = {"images": list(items)}
    return processor(text=prompt, return_tensors="pt", **kwargs)


def generate(model, batch) -> tuple[list[int], float]:
    """Greedy continuation (exactly NEW_TOKENS tokens) and the smallest top-1/top-2 logit gap."""
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    gaps = []
    for scores in out.scores:
        row = scores[0][torch.isfinite(scores[0])]
        top = torch.topk(row, 2).values
        gaps.append(float(top[0] - top[1]))
    return out.sequences[0, batch["input_ids"].shape[1]:].tolist(), min(gaps)


def placeholder_id(family: str, config) -> int:
    return config.audio_token_id if RECIPES[family].modality == "audio" else config.image_token_id


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


# ---- checkpoint files and loading ---------------------------------------------------------------


def test_families_sizes_and_cli_agree():
    from prism import cli

    assert FAMILIES == ("llava", "qwen2-vl", "qwen2.5-vl", "qwen2-audio")
    assert SIZES == ("tiny", "small")
    assert cli._FAMILIES == FAMILIES and cli._SIZES == SIZES


def test_cli_models_make(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["models", "make", "--family", "qwen2-audio", "--out", str(tmp_path / "m"),
                                 "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen2_audio"
    bad = runner.invoke(app, ["models", "make", "--family", "gpt-2", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and not (tmp_path / "x").exists()


def test_unknown_family_or_size(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_model("gpt-2", "tiny", tmp_path)
    with pytest.raises(ValueError, match="unknown size"):
        make_model("llava", "huge", tmp_path)


def test_loads_like_a_real_checkpoint(built):
    family, model_dir, model, processor = built
    recipe = RECIPES[family]
    files = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "processor_config.json", "chat_template.jinja"} <= files
    assert type(model).__name__ == recipe.model_class
    _, info = getattr(transformers, recipe.model_class).from_pretrained(model_dir, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 5_000_000
    config = AutoConfig.from_pretrained(model_dir)
    assert config.get_text_config().max_position_embeddings >= 4096
    assert type(processor).__name__ == processor_class_name(model_dir)


def test_tokenizer_and_special_tokens(built):
    family, model_dir, _, processor = built
    recipe = RECIPES[family]
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert 900 <= len(tok) <= 1000
    for t in recipe.special_tokens:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = "The quick brown fox visited the old harbor in 1987!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) < len(text)
    assert tok.encode("hello", add_special_tokens=True) == tok.encode("hello", add_special_tokens=False)
    assert processor.tokenizer.chat_template == processor.chat_template


def test_generation_config(built):
    family, model_dir, _, processor = built
    recipe = RECIPES[family]
    gen = json.loads((model_dir / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(eos) == {processor.tokenizer.convert_tokens_to_ids(t) for t in recipe.end_tokens}
    assert gen["pad_token_id"] == processor.tokenizer.pad_token_id is not None
    assert gen["do_sample"] is False


def test_chat_template_string_and_list_content(built):
    family, _, _, processor = built
    modality = RECIPES[family].modality
    conversation = [
        {"role": "user", "content": [{"type": modality}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "And now?"},
    ]
    closed = processor.apply_chat_template(conversation, tokenize=False)
    opened = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert opened.startswith(closed) and len(opened) > len(closed)
    for piece in ("What is it?", "A dog.", "And now?"):
        assert piece in closed
    placeholder = processor.audio_token if modality == "audio" else processor.image_token
    assert closed.count(placeholder) == 1


def test_processor_saves_and_reloads(built, tmp_path):
    _, model_dir, _, processor = built
    processor.save_pretrained(tmp_path)
    again = load_processor(tmp_path)
    assert type(again) is type(processor)
    assert again.chat_template == processor.chat_template
    assert again.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_load_processor_prefers_prism_classes(tmp_path):
    assert set(PRISM_PROCESSORS) == {"PrismQwen2VLProcessor", "PrismQwen2_5_VLProcessor"}
    with pytest.raises(FileNotFoundError):
        load_processor(tmp_path / "missing")
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "NoSuchProcessor"}))
    with pytest.raises(ValueError, match="NoSuchProcessor"):
        load_processor(tmp_path)


def test_same_seed_same_weights_other_seed_differs(built, tmp_path):
    family, model_dir, _, _ = built
    first = tensors(model_dir)
    again = tensors(make_model(family, "tiny", tmp_path / "same", seed=0))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = tensors(make_model(family, "tiny", tmp_path / "other", seed=1))
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert (tmp_path / "same" / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()


def test_llava_checkpoint_uses_hub_key_layout(tmp_path):
    model_dir = make_model("llava", "tiny", tmp_path)
    keys = set(tensors(model_dir))
    tower = {k for k in keys if k.startswith("vision_tower.")}
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    assert "language_model.lm_head.weight" in keys
    assert any(k.startswith("language_model.model.layers.0.") for k in keys)
    assert any(k.startswith("multi_modal_projector.linear_1.") for k in keys)
    assert all(k.split(".")[0] in {"vision_tower", "language_model", "multi_modal_projector"} for k in keys)


# ---- token counts -------------------------------------------------------------------------------


def test_media_token_counts(built):
    family, model_dir, _, processor = built
    config = AutoConfig.from_pretrained(model_dir)
    token = placeholder_id(family, config)

    def count(item) -> int:
        return int((inputs(family, processor, "x", [item])["input_ids"] == token).sum())

    if RECIPES[family].modality == "audio":
        assert count(audio(440.0, seconds=1.0)) == 25
        assert count(audio(440.0, seconds=2.0)) == 50
    elif family == "llava":
        assert count(image(0, (64, 64))) == count(image(0, (200, 120))) == 64
    else:
        assert count(image(0, (64, 64))) == 16
        assert count(image(0, (96, 80))) == 30
        assert count(image(0, (128, 128))) == 64
        assert count(image(0, (512, 512))) == 64  # capped by max_pixels


# ---- generation -----------------------------------------------------------------------------------


def test_generate_text_only_varies_with_the_prompt(built):
    family, _, model, processor = built
    a, gap_a = generate(model, inputs(family, processor, "Describe the weather in the village today."))
    b, gap_b = generate(model, inputs(family, processor, "Why did the old horse walk to the river?"))
    assert a != b
    for out in (a, b):
        assert len(out) == NEW_TOKENS and len(set(out)) > 2, out
    assert min(gap_a, gap_b) > 1e-5  # no near-ties


def test_generate_with_one_media_item_depends_on_it(built):
    family, _, model, processor = built
    outs = []
    for i in range(3):
        out, gap = generate(model, inputs(family, processor, "What is this?", [media(family, i)]))
        assert len(set(out)) > 2, out
        assert gap > 1e-5
        outs.append(tuple(out))
    assert len(set(outs)) == 3, outs  # three different items, three different continuations


def test_generate_with_two_media_items(built):
    family, _, model, processor = built
    first, second = media(family, 0), media(family, 1)
    one, _ = generate(model, inputs(family, processor, "Compare them.", [first, second]))
    swapped, _ = generate(model, inputs(family, processor, "Compare them.", [second, first]))
    assert len(set(one)) > 2 and one != swapped


def test_generate_is_deterministic_after_reload(built):
    family, model_dir, model, processor = built
    batch = inputs(family, processor, "What is this?", [media(family, 5)])
    again = AutoModelForMultimodalLM.from_pretrained(model_dir).eval()
    assert generate(model, batch)[0] == generate(again, batch)[0]


# ---- small -------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_small_builds_and_loads(family, tmp_path):
    model_dir = make_model(family, "small", tmp_path / family)
    model = AutoModelForMultimodalLM.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100e6 <= n_params <= 250e6, n_params
    text = model.config.get_text_config()
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (12, 768, 12)
    assert text.max_position_embeddings >= 4096
    processor = load_processor(model_dir)
    assert 7000 <= len(processor.tokenizer) <= 8000
