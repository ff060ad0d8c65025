"""A tiny CLIP for the tiny world and tests: a byte-level tokenizer with one token per tiny-world word, and
a randomly initialised CLIPModel folder laid out like PickScore's, which the SPM loads as its start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from spobench.models.spm_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from spobench.toyworld.words import WORDS


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip_tokenizer(words: Sequence[str] = ()):
    """A byte-level CLIPTokenizer whose vocabulary is the 256 byte symbols (with and without
    ``</w>``), one merged token per word in ``words`` (when the BPE merge order allows), and the
    two special tokens at the top ids (as in CLIP)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for w in words:
        w = w.lower()
        if len(w) < 2 or not w.isascii():
            continue
        left = w[0]
        for i, c in enumerate(w[1:], start=1):
            right = c + "</w>" if i == len(w) - 1 else c
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def make_tiny_clip_folder(folder: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                          hidden: int = 32, layers: int = 2, heads: int = 2, projection_dim: int = 16,
                          max_length: int = 77, words: Sequence[str] | None = None, tokenizer=None) -> Path:
    """Write a randomly initialised tiny CLIPModel folder (config, safetensors, tokenizer,
    preprocessor_config.json) that ``StepAwarePreferenceModel.from_clip`` loads like PickScore.
    ``tokenizer``: any CLIPTokenizer (e.g. the tiny backbone's); default a byte-level one with the
    tiny world's ``words`` merged."""
    from transformers import CLIPConfig, CLIPModel

    if words is None:
        words = WORDS
    folder = Path(folder)
    tok = tokenizer if tokenizer is not None else make_tiny_clip_tokenizer(words)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
    return folder
