"""Seeded random checkpoints that load like real ones: ``prism models make``.

:func:`make_model` writes a model directory for one family (LLaVA, Qwen2-VL, Qwen2.5-VL,
Qwen2-Audio) at one size (``tiny`` for tests, ``small`` for benchmarks) holding

* ``config.json`` + ``model.safetensors`` (fp32, seeded random weights) + ``generation_config.json``
  (greedy; eos = end-of-turn and end-of-text ids),
* a byte-level BPE tokenizer trained offline on a built-in English corpus, with the family's
  special tokens and a Jinja chat template, and
* the family's processor (image processor or Whisper feature extractor), saved so that
  :func:`prism.models.processors.load_processor` reloads it.

Everything family-specific lives in the :data:`RECIPES` table below; nothing else in Prism
branches on model names. Weights are drawn with a variance-preserving init (see
:func:`_reinit_weights`) so that greedy continuations of the tiny models depend on the prompt
and on the media, rather than collapsing to one repeated token.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["FAMILIES", "SIZES", "RECIPES", "Dims", "Recipe", "make_model", "english_corpus"]

SIZES: tuple[str, ...] = ("tiny", "small")


# ---------------------------------------------------------------------------------------------
# Sizes: dimensions shared by every family at one size.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Dimensions of one size; each family's recipe maps them onto its own config classes."""

    vocab_size: int  # BPE target; the trained vocabulary may come out a little smaller
    corpus_sentences: int
    max_positions: int
    # language model (Llama / Qwen2 style)
    hidden: int
    layers: int
    heads: int
    gqa_kv_heads: int  # KV heads for the Qwen families (LLaVA's Llama keeps full multi-head)
    ffn: int
    # towers: CLIP ViT, Qwen-VL ViT and Whisper-style audio encoder share width and depth
    tower_hidden: int
    tower_layers: int
    tower_heads: int
    tower_ffn: int
    clip_image_size: int
    clip_patch: int
    qwen_patch: int
    qwen_min_pixels: int
    qwen_max_pixels: int
    qwen_window: int  # Qwen2.5-VL window attention size, in pixels
    # init: std of each matrix = gain / sqrt(fan_in); embeddings get std `embed_std`
    init_gain: float
    embed_std: float


DIMS: dict[str, Dims] = {
    "tiny": Dims(
        vocab_size=1000, corpus_sentences=600, max_positions=4096,
        hidden=64, layers=2, heads=4, gqa_kv_heads=2, ffn=128,
        tower_hidden=64, tower_layers=2, tower_heads=4, tower_ffn=128,
        clip_image_size=64, clip_patch=8,
        qwen_patch=8, qwen_min_pixels=32 * 32, qwen_max_pixels=128 * 128, qwen_window=64,
        init_gain=2.0, embed_std=1.0,
    ),
    "small": Dims(
        vocab_size=8000, corpus_sentences=20000, max_positions=4096,
        hidden=768, layers=12, heads=12, gqa_kv_heads=2, ffn=2048,
        tower_hidden=768, tower_layers=12, tower_heads=12, tower_ffn=3072,
        clip_image_size=224, clip_patch=16,
        qwen_patch=14, qwen_min_pixels=56 * 56, qwen_max_pixels=448 * 448, qwen_window=112,
        init_gain=2.0, embed_std=1.0,
    ),
}


# ---------------------------------------------------------------------------------------------
# Built-in English corpus (deterministic).
# ---------------------------------------------------------------------------------------------

_NOUNS = """time year people way day man woman child world life hand part place week case point
government company number group problem fact house water room mother father area money story
month lot right study book eye job word business issue side kind head service friend power hour
game line end member law car city community name president team minute idea kid body information
back parent face others level office door health person art war history party result change
morning reason research girl guy moment air teacher force education river mountain garden window
table chair kitchen street village forest ocean island bridge train station market school library
letter song picture camera bottle flower tree bird horse dog cat fish apple bread cheese coffee
tea rain snow wind storm cloud star moon sun planet engine machine computer phone screen signal
model network server request answer question language image sound voice color shape corner edge
field farm harbor ship boat road map key box bag coat shoe hat ring stone wall roof floor lamp""".split()
_VERBS = """see find take give tell ask call try leave feel become show hear play run move live
believe hold bring write sit stand lose pay meet include continue set learn change lead understand
watch follow stop create speak read allow add spend grow open walk win offer remember love consider
appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell
require report decide pull carry paint draw sing cook clean fix measure count paint explain describe
""".split()
_PAST = """saw found took gave told asked called tried left felt became showed heard played ran moved
lived believed held brought wrote sat stood lost paid met included continued learned changed led
watched followed stopped created spoke read allowed added spent grew opened walked won offered
remembered loved considered appeared bought waited served sent expected built stayed fell cut reached
remained suggested raised passed sold required reported decided pulled carried painted drew sang
cooked cleaned fixed measured counted explained described""".split()
_ADJECTIVES = """good new first last long great little own other old right big high different small
large next early young important few public bad same able red blue green yellow white black bright
dark quiet loud warm cold soft hard quick slow happy sad strange simple clear heavy light empty full
rich poor wide narrow deep shallow sharp gentle brave calm careful clever curious eager famous fresh
gold silver wooden tiny huge ancient modern rough smooth sweet bitter wild""".split()
_ADVERBS = """quickly slowly carefully quietly loudly happily sadly suddenly finally rarely often
always never sometimes usually almost really nearly gently easily barely""".split()
_PLACES = """the park|the city|the station|the market|the river|the old harbor|the library|the
village|the forest|the mountain|the kitchen|the garden|the island|the school|the bridge|the farm|the
museum|the valley|the beach|the office""".split("|")
_CONNECTORS = ["because", "although", "while", "after", "before", "when", "since", "unless", "so", "but"]
_SYLLABLES = """ka lo mi ra ten vor sa li den mar co bel tri an ul pe nor zi ha el fin go ru ve qua
dor im sel tha ber cal pri fos wen dri lum ost""".split()
_TEMPLATES = (
    "{Name} {past} the {adj} {noun} near {place}.",
    "The {noun} {past} {adv} {conn} the {noun2} was {adj}.",
    "Why did the {adj} {noun} {verb} the {noun2}?",
    "{Name} and {Name2} {past} {num} {noun}s in {place} last {period}.",
    "In {year}, {Name} wrote a {adj} book about the {noun}.",
    "Please {verb} the {noun} and {verb2} the {adj} {noun2}.",
    "A {adj} {noun} can {verb} {adv}, {conn} a {noun2} cannot.",
    "\"{Sentence}\" said {Name}.",
    "There were {num} {adj} {noun}s, {num2} {noun2}s and one {noun3}.",
    "Is the {noun} {adj} or {adj2}? It is {adj}.",
    "{Name} {adv} {past} to {place} on day {num}.",
    "Every {period}, the {noun} {past} {adv} over {place}.",
    "Question: what does a {noun} {verb}? Answer: it can {verb2} a {noun2}.",
    "The price of the {noun} was {num}.{num2} dollars in {year}.",
)


def _pseudo_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def english_corpus(n_sentences: int, seed: int = 1234) -> list[str]:
    """``n_sentences`` varied English-like sentences built from word lists (deterministic)."""
    rng = random.Random(seed)
    names = sorted({_pseudo_name(rng) for _ in range(max(40, n_sentences // 3))})
    periods = ["week", "month", "year", "summer", "winter", "morning", "evening"]

    def fields() -> dict[str, str]:
        return {
            "Name": rng.choice(names), "Name2": rng.choice(names),
            "noun": rng.choice(_NOUNS), "noun2": rng.choice(_NOUNS), "noun3": rng.choice(_NOUNS),
            "verb": rng.choice(_VERBS), "verb2": rng.choice(_VERBS), "past": rng.choice(_PAST),
            "adj": rng.choice(_ADJECTIVES), "adj2": rng.choice(_ADJECTIVES), "adv": rng.choice(_ADVERBS),
            "place": rng.choice(_PLACES), "conn": rng.choice(_CONNECTORS), "period": rng.choice(periods),
            "num": str(rng.choice([rng.randint(2, 12), rng.randint(13, 999)])),
            "num2": str(rng.randint(0, 99)), "year": str(rng.randint(1800, 2030)),
        }

    out: list[str] = []
    for _ in range(n_sentences):
        template = rng.choice(_TEMPLATES)
        f = fields()
        f["Sentence"] = rng.choice(_TEMPLATES[:7]).format(**fields()).rstrip(".?")
        sentence = template.format(**f)
        out.append(sentence[0].upper() + sentence[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------


def _train_tokenizer(recipe: Recipe, dims: Dims) -> Any:
    """Byte-level BPE trained on the built-in corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=dims.vocab_size,
        special_tokens=list(recipe.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(english_corpus(dims.corpus_sentences), trainer)
    roles = {k: v for k, v in recipe.role_tokens.items() if v is not None}
    extra = [t for t in recipe.special_tokens if t not in roles.values()]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=extra,
        model_max_length=dims.max_positions,
        **roles,
    )
    fast.chat_template = recipe.chat_template
    return fast


# ---------------------------------------------------------------------------------------------
# Chat templates (Jinja, in the style of each family's own).
# ---------------------------------------------------------------------------------------------

LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set prefix = '' %}"
    "{% else %}"
    "{% set prefix = message['role'].upper() + ': ' %}"
    "{% endif %}"
    "{{ prefix }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _chatml_template(media: dict[str, tuple[str, str]]) -> str:
    """Qwen's ChatML template.

    ``media`` maps a content type to (Jinja expression for the text before the n-th item, text
    that stands for the item); ``counts.n`` numbers the media items of the conversation.
    """
    media_branches = "".join(
        "{% elif content['type'] == '" + kind + "' %}"
        "{% set counts.n = counts.n + 1 %}"
        "{{ " + prefix + " }}{{ '" + text + "' }}"
        for kind, (prefix, text) in media.items()
    )
    return (
        "{% set counts = namespace(n=0) %}"
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}"
        "{{ message['content'] }}"
        "{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'text' %}{{ content['text'] }}"
        + media_branches
        + "{% endif %}"
        "{% endfor %}"
        "{% endif %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


# Like Qwen2-VL's: "Picture n: " only when the caller passes add_vision_id=True.
QWEN_VL_TEMPLATE = _chatml_template({
    "image": ("'Picture ' ~ counts.n ~ ': ' if add_vision_id else ''",
              "<|vision_start|><|image_pad|><|vision_end|>"),
})
# Like Qwen2-Audio-Instruct's: every clip is introduced as "Audio n: ".
QWEN_AUDIO_TEMPLATE = _chatml_template({
    "audio": ("'Audio ' ~ counts.n ~ ': '", "<|audio_bos|><|AUDIO|><|audio_eos|>\\n"),
})


# ---------------------------------------------------------------------------------------------
# Family recipes.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between families.

    ``special_tokens`` are added to the BPE vocabulary first (lowest ids); ``role_tokens`` name
    the tokenizer's bos/eos/unk/pad among them; ``end_tokens`` end generation (end of turn, end
    of text). ``make_config(dims, ids, vocab_size)`` builds the transformers config from the
    special-token ids; ``make_processor(dims, tokenizer)`` the processor; ``fix_checkpoint(dir)``
    rewrites the saved files where the family's published layout differs from what
    ``save_pretrained`` writes.
    """

    special_tokens: tuple[str, ...]
    role_tokens: dict[str, str | None]
    end_tokens: tuple[str, ...]
    chat_template: str
    modality: str  # the media the family takes: "image" or "audio"
    model_class: str  # transformers class that loads and generates (AutoModelForMultimodalLM resolves it too)
    make_config: Callable[[Dims, dict[str, int], int], Any]
    make_processor: Callable[[Dims, Any], Any]
    fix_checkpoint: Callable[[Path], None] | None = None


def _llama_text(dims: Dims, ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dims.hidden, intermediate_size=dims.ffn,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.heads,
        max_position_embeddings=dims.max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
    )


def _llava_config(dims: Dims, ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=dims.tower_hidden, intermediate_size=dims.tower_ffn, num_hidden_layers=dims.tower_layers,
        num_attention_heads=dims.tower_heads, image_size=dims.clip_image_size, patch_size=dims.clip_patch,
        projection_dim=dims.tower_hidden, hidden_act="quick_gelu",
    )
    tokens = (dims.clip_image_size // dims.clip_patch) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=_llama_text(dims, ids, vocab_size),
        image_token_index=ids["<image>"], image_seq_length=tokens,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )


def _llava_processor(dims: Dims, tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = dims.clip_image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_center_crop=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor, tokenizer, patch_size=dims.clip_patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )


def _llava_hub_layout(model_dir: Path) -> None:
    """Rename ``vision_tower.*`` to the hub's ``vision_tower.vision_model.*`` (what vLLM loads;
    transformers 5 loads both)."""
    _rename_safetensors_keys(
        model_dir, lambda k: "vision_tower.vision_model." + k[len("vision_tower."):]
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k
    )


def _qwen2_text(dims: Dims, ids: dict[str, int], vocab_size: int, model_type: str) -> dict[str, Any]:
    head_dim = dims.hidden // dims.heads
    half = head_dim // 2
    t = half // 4  # mrope_section (temporal, height, width) in Qwen's 1:1.5:1.5 proportions
    return {
        "model_type": model_type, "vocab_size": vocab_size, "hidden_size": dims.hidden,
        "intermediate_size": dims.ffn, "num_hidden_layers": dims.layers, "num_attention_heads": dims.heads,
        "num_key_value_heads": dims.gqa_kv_heads, "max_position_embeddings": dims.max_positions,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "use_sliding_window": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                            "mrope_section": [t, (half - t) // 2, half - t - (half - t) // 2]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False,
    }


def _qwen_vl_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen2_vl_config(dims: Dims, ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import Qwen2VLConfig

    vision = {
        "depth": dims.tower_layers, "embed_dim": dims.tower_hidden, "hidden_size": dims.hidden,
        "mlp_ratio": dims.tower_ffn // dims.tower_hidden, "num_heads": dims.tower_heads,
        "patch_size": dims.qwen_patch, "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    text = _qwen2_text(dims, ids, vocab_size, "qwen2_vl_text")
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         **_qwen_vl_ids(ids))


def _qwen2_5_vl_config(dims: Dims, ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import Qwen2_5_VLConfig

    every = max(2, dims.tower_layers // 4)  # full attention in every few blocks, windows elsewhere
    vision = {
        "depth": dims.tower_layers, "hidden_size": dims.tower_hidden, "out_hidden_size": dims.hidden,
        "intermediate_size": -(-dims.tower_ffn * 2 // 3 // 16) * 16,  # gated MLP: 2/3 of the width
        "num_heads": dims.tower_heads, "patch_size": dims.qwen_patch, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "window_size": dims.qwen_window, "hidden_act": "silu",
        "fullatt_block_indexes": list(range(every - 1, dims.tower_layers, every)),
    }
    text = _qwen2_text(dims, ids, vocab_size, "qwen2_5_vl_text")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            **_qwen_vl_ids(ids))


def _qwen_vl_processor(cls_name: str) -> Callable[[Dims, Any], Any]:
    def make(dims: Dims, tokenizer: Any) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from prism.models import processors

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=dims.qwen_min_pixels, max_pixels=dims.qwen_max_pixels,
            patch_size=dims.qwen_patch, merge_size=2, temporal_patch_size=2,
        )
        return getattr(processors, cls_name)(image_processor, tokenizer, chat_template=QWEN_VL_TEMPLATE)

    return make


def _qwen2_audio_config(dims: Dims, ids: dict[str, int], vocab_size: int) -> Any:
    from transformers import Qwen2AudioConfig

    audio = {
        "model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": dims.tower_layers,
        "encoder_attention_heads": dims.tower_heads, "encoder_ffn_dim": dims.tower_ffn,
        "d_model": dims.tower_hidden, "max_source_positions": 1500, "activation_function": "gelu",
    }
    text = _qwen2_text(dims, ids, vocab_size, "qwen2")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    return Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=ids["<|AUDIO|>"])


def _qwen2_audio_processor(dims: Dims, tokenizer: Any) -> Any:
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=128)  # 16 kHz, 30 s windows, like Qwen2-Audio's
    return Qwen2AudioProcessor(features, tokenizer, chat_template=QWEN_AUDIO_TEMPLATE)


_QWEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None}
_QWEN_VL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>")

#: Family name -> recipe. The only table in Prism keyed by model family names.
RECIPES: dict[str, Recipe] = {
    "llava": Recipe(
        special_tokens=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        role_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        end_tokens=("</s>",),
        chat_template=LLAVA_TEMPLATE,
        modality="image",
        model_class="LlavaForConditionalGeneration",
        make_config=_llava_config,
        make_processor=_llava_processor,
        fix_checkpoint=_llava_hub_layout,
    ),
    "qwen2-vl": Recipe(
        special_tokens=_QWEN_VL_TOKENS, role_tokens=_QWEN_ROLES, end_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=QWEN_VL_TEMPLATE, modality="image", model_class="Qwen2VLForConditionalGeneration",
        make_config=_qwen2_vl_config, make_processor=_qwen_vl_processor("PrismQwen2VLProcessor"),
    ),
    "qwen2.5-vl": Recipe(
        special_tokens=_QWEN_VL_TOKENS, role_tokens=_QWEN_ROLES, end_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=QWEN_VL_TEMPLATE, modality="image", model_class="Qwen2_5_VLForConditionalGeneration",
        make_config=_qwen2_5_vl_config, make_processor=_qwen_vl_processor("PrismQwen2_5_VLProcessor"),
    ),
    "qwen2-audio": Recipe(
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                        "<|audio_bos|>", "<|audio_eos|>", "<|AUDIO|>"),
        role_tokens=_QWEN_ROLES, end_tokens=("<|im_end|>", "<|endoftext|>"),
        chat_template=QWEN_AUDIO_TEMPLATE, modality="audio", model_class="Qwen2AudioForConditionalGeneration",
        make_config=_qwen2_audio_config, make_processor=_qwen2_audio_processor,
    ),
}

FAMILIES: tuple[str, ...] = tuple(RECIPES)


# ---------------------------------------------------------------------------------------------
# Weights and checkpoint files.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _reinit_weights(model: nn.Module, dims: Dims) -> None:
    """Variance-preserving random init, the same rule for every family.

    transformers' default (normal, std 0.02) leaves tiny random models with near-uniform
    attention and logits within ~0.1 of each other, so greedy decoding ignores the prompt and
    the media and repeats one token. Here every weight matrix (linear, conv, projector, LM head)
    gets std ``init_gain / sqrt(fan_in)``, embeddings std ``embed_std``, norms weight 1 and bias
    0, other biases 0: activations keep unit scale through towers and layers, and logits spread
    by a few units.
    """
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.Embedding):
                param.normal_(0.0, dims.embed_std)
            elif param.dim() >= 2:
                param.normal_(0.0, dims.init_gain / math.sqrt(math.prod(param.shape[1:])))
            elif name == "bias":
                param.zero_()
            elif is_norm:
                param.fill_(1.0)
            else:  # other learned vectors, e.g. CLIP's class embedding
                param.normal_(0.0, dims.embed_std)


def _rename_safetensors_keys(model_dir: Path, rename: Callable[[str], str]) -> None:
    """Rename tensor keys in every ``*.safetensors`` file of ``model_dir`` (and its index)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(path), metadata=metadata)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' chatter (progress bars, the PIL image-processor fallback warning)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def make_model(family: str, size: str, out: str | Path, seed: int = 0) -> Path:
    """Build a seeded random ``family`` checkpoint of ``size`` into ``out``; returns the directory.

    The directory loads like a downloaded one: ``AutoConfig`` / the family's model class via
    ``from_pretrained``, and the processor via :func:`prism.models.processors.load_processor`.
    The same ``(family, size, seed)`` always gives the same files.
    """
    import transformers
    from transformers import GenerationConfig

    if family not in RECIPES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if size not in DIMS:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    recipe, dims = RECIPES[family], DIMS[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    with _quiet():
        tokenizer = _train_tokenizer(recipe, dims)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in recipe.special_tokens}
        config = recipe.make_config(dims, ids, len(tokenizer))
        config.dtype = torch.float32
        processor = recipe.make_processor(dims, tokenizer)

        with torch.random.fork_rng(devices=[]):  # seeded, and the caller's RNG state is left alone
            torch.manual_seed(seed)
            model = getattr(transformers, recipe.model_class)(config).to(torch.float32).eval()
            _reinit_weights(model, dims)

        end_ids = list(dict.fromkeys(ids[t] for t in recipe.end_tokens))
        pad_id = tokenizer.pad_token_id
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids if len(end_ids) > 1 else end_ids[0],
            pad_token_id=pad_id, do_sample=False, num_beams=1,
        )
        model.save_pretrained(out, max_shard_size="100GB")
        processor.save_pretrained(out)
    if recipe.fix_checkpoint is not None:
        recipe.fix_checkpoint(out)
    logging.getLogger(__name__).info("built %s/%s seed %d into %s", family, size, seed, out)
    return out
