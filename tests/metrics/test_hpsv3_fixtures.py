"""A tiny HPSv3 in the OFFICIAL file layout, and checks that the layout is the published one.

What a user downloads (see spobench/metrics/hpsv3.py):

* ``HPSv3.safetensors`` (hub ``MizzenAI/HPSv3``): the whole ``Qwen2VLRewardModelBT`` state dict as
  transformers 4.45 names it (hpsv3 1.0.0 pins transformers==4.45.2): ``visual.*``, ``model.*``
  (the text decoder), ``lm_head.weight`` and the ``rm_head`` MLP (``rm_head.0/3/5``, its "ranknet"
  head without ``rm_head_kwargs``), with the embedding resized to the tokenizer plus ``<|Reward|>``
  (151658 rows for the real model, MizzenAI/HPSv3 issue #15);
* ``Qwen2-VL-7B-Instruct/`` (hub ``Qwen/Qwen2-VL-7B-Instruct``): config.json, preprocessor_config.json,
  chat_template.json and the Qwen2 byte-level BPE tokenizer files; its weight shards are not read.

Here both come in miniature (a 2-layer ViT of width 32 and a 2-layer decoder of width 64), with a
byte-level BPE of 256 symbols + a few merges and Qwen2-VL's 14 special tokens after them, as Qwen2's
tokenizer has them. ``base_weights=True`` also writes random Qwen2-VL weights into the Qwen folder
(the official package's ``from_pretrained`` needs some before HPSv3.safetensors replaces them all).

Import with ``sys.path.insert(0, <tests/metrics>); import test_hpsv3_fixtures as hf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

QWEN_DIR = "Qwen2-VL-7B-Instruct"
CHECKPOINT = "HPSv3.safetensors"
# Qwen2-VL's special tokens, in the order (and so the relative ids) of Qwen/Qwen2-VL-7B-Instruct's tokenizer.json
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer split (Qwen/Qwen2-VL-7B-Instruct tokenizer.json, pre_tokenizer.pretokenizers[0])
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen/Qwen2-VL-7B-Instruct chat_template.json (the processor's template, which apply_chat_template renders)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in "
    "messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] "
    "== 'image' or 'image' in content or 'image_url' in content %}{% set image_count.value = image_count.value "
    "+ 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = "
    "video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|>"
    "<|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MERGE_WORDS = ["Ġthe", "Ġimage", "Ġa", "ing", "Ġof", "Ġcat", "Ġred", "**", "Ġshould", "Ġand"]
VISION = dict(depth=2, embed_dim=32, mlp_ratio=4, num_heads=2, in_chans=3, hidden_size=64, patch_size=14,
              spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=400, max_position_embeddings=8192, rms_norm_eps=1e-6,
            rope_theta=1000000.0)
MROPE = [2, 3, 3]  # sums to head_dim / 2 = 8, as [16, 24, 24] does for the 7B's 128


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tokenizer_parts() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges): the 256 byte symbols, then whole words built left to right by merges."""
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    merges = []
    for word in MERGE_WORDS:
        cur = word[0]
        for ch in word[1:]:
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    return vocab, list(dict.fromkeys(merges))


def write_qwen_folder(folder: Path, seed: int = 0, base_weights: bool = False) -> dict:
    """The processor + config half of the layout; returns the config dict."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_parts()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    ids = {t: len(vocab) + i for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "padding_side": "left",
        "additional_special_tokens": SPECIALS[1:],
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=1))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"}, indent=1))
    config = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
              "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
              "video_token_id": ids["<|video_pad|>"], "hidden_act": "silu", "initializer_range": 0.02,
              "max_window_layers": 2, "sliding_window": 8192, "tie_word_embeddings": False,
              "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
              "transformers_version": "4.41.2", **TEXT, "vision_config": dict(VISION),
              "rope_scaling": {"type": "mrope", "mrope_section": MROPE}}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": config["bos_token_id"],
                                                               "eos_token_id": [config["eos_token_id"]]}))
    if base_weights:
        base = official_state_dict(config, len(vocab) + len(SPECIALS), seed=seed + 100, head=False)
        base["model.embed_tokens.weight"] = torch.randn(TEXT["vocab_size"], TEXT["hidden_size"]) * 0.02
        base["lm_head.weight"] = torch.randn(TEXT["vocab_size"], TEXT["hidden_size"]) * 0.02
        save_file(base, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config


def official_state_dict(config: dict, n_tokens: int, seed: int = 1, head: bool = True) -> dict[str, torch.Tensor]:
    """A random ``Qwen2VLRewardModelBT`` state dict in transformers 4.45's names; ``n_tokens`` rows of
    embedding (the tokenizer's length, <|Reward|> included, as resize_token_embeddings leaves it)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).float()

    v, t = config["vision_config"], config
    e, hid, pt = v["embed_dim"], t["hidden_size"], v["patch_size"]
    sd = {"visual.patch_embed.proj.weight": r(e, 3, v["temporal_patch_size"], pt, pt, scale=0.05)}
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(e, scale=0.1), p + "norm1.bias": r(e, scale=0.1),
                   p + "norm2.weight": 1 + r(e, scale=0.1), p + "norm2.bias": r(e, scale=0.1),
                   p + "attn.qkv.weight": r(3 * e, e), p + "attn.qkv.bias": r(3 * e, scale=0.1),
                   p + "attn.proj.weight": r(e, e), p + "attn.proj.bias": r(e, scale=0.1),
                   p + "mlp.fc1.weight": r(4 * e, e), p + "mlp.fc1.bias": r(4 * e, scale=0.1),
                   p + "mlp.fc2.weight": r(e, 4 * e), p + "mlp.fc2.bias": r(e, scale=0.1)})
    m = 4 * e
    sd.update({"visual.merger.ln_q.weight": 1 + r(e, scale=0.1), "visual.merger.ln_q.bias": r(e, scale=0.1),
               "visual.merger.mlp.0.weight": r(m, m, scale=0.1), "visual.merger.mlp.0.bias": r(m, scale=0.1),
               "visual.merger.mlp.2.weight": r(hid, m, scale=0.1), "visual.merger.mlp.2.bias": r(hid, scale=0.1)})
    heads, kv, inter = t["num_attention_heads"], t["num_key_value_heads"], t["intermediate_size"]
    hd = hid // heads
    sd["model.embed_tokens.weight"] = r(n_tokens, hid, scale=0.5)
    for i in range(t["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": r(hid, hid), p + "self_attn.q_proj.bias": r(hid, scale=0.1),
                   p + "self_attn.k_proj.weight": r(kv * hd, hid), p + "self_attn.k_proj.bias": r(kv * hd, scale=0.1),
                   p + "self_attn.v_proj.weight": r(kv * hd, hid), p + "self_attn.v_proj.bias": r(kv * hd, scale=0.1),
                   p + "self_attn.o_proj.weight": r(hid, hid),
                   p + "mlp.gate_proj.weight": r(inter, hid), p + "mlp.up_proj.weight": r(inter, hid),
                   p + "mlp.down_proj.weight": r(hid, inter),
                   p + "input_layernorm.weight": 1 + r(hid, scale=0.1),
                   p + "post_attention_layernorm.weight": 1 + r(hid, scale=0.1)})
    sd["model.norm.weight"] = 1 + r(hid, scale=0.1)
    sd["lm_head.weight"] = r(n_tokens, hid, scale=0.05)
    if head:  # hpsv3's "ranknet" head without rm_head_kwargs: Linear(H, 1024), ReLU, Dropout, Linear(1024, 16), ReLU, Linear(16, 2)
        sd.update({"rm_head.0.weight": r(1024, hid, scale=0.1), "rm_head.0.bias": r(1024, scale=0.1),
                   "rm_head.3.weight": r(16, 1024, scale=0.1), "rm_head.3.bias": r(16, scale=0.1),
                   "rm_head.5.weight": r(2, 16, scale=0.3), "rm_head.5.bias": r(2, scale=0.1)})
    return sd


def build_hpsv3(root: Path, seed: int = 1, base_weights: bool = False) -> Path:
    """``root/HPSv3.safetensors`` + ``root/Qwen2-VL-7B-Instruct/``; returns ``root``."""
    root = Path(root)
    config = write_qwen_folder(root / QWEN_DIR, seed=seed, base_weights=base_weights)
    n_tokens = len(tokenizer_parts()[0]) + len(SPECIALS) + 1  # + <|Reward|>
    save_file(official_state_dict(config, n_tokens, seed=seed), str(root / CHECKPOINT), metadata={"format": "pt"})
    return root


def images(n: int = 3, seed: int = 0) -> list:
    """Sizes that exercise the 200704-pixel resize from above, from below and off-square."""
    sizes = [(64, 48), (500, 380), (30, 90), (448, 448), (1000, 200), (77, 77)]
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(n))]


# -- the layout itself ---------------------------------------------------------------------------

def test_tokenizer_layout(tmp_path):
    """Qwen2's tokenizer in miniature: byte-level BPE, the special tokens right after the vocabulary,
    <|endoftext|> as pad, and <|Reward|> appended by hpsv3 landing on the last embedding row."""
    from transformers import AutoTokenizer

    build_hpsv3(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / QWEN_DIR))
    n = len(tokenizer_parts()[0])
    assert tok.convert_tokens_to_ids("<|endoftext|>") == n and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|image_pad|>") == n + SPECIALS.index("<|image_pad|>")
    ids = tok("the image of a red cat").input_ids
    assert tok.decode(ids) == "the image of a red cat" and len(ids) < 12  # merges apply
    assert tok("<|im_start|>user").input_ids[0] == n + 1  # specials are not split
