"""Tiny weights folders in each metric's OFFICIAL layout, and the ways to spoil them (issue 14).

Used by tests/metrics/test_strict_weights.py (the metric API) and tests/robustness/test_bad_weights.py
(the same spoilings through ``spobench eval``). Import with::

    sys.path.insert(0, str(<tests/metrics>)); import official_weights as ow
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import clip_fixtures as cf  # noqa: E402
import test_geneval as tge  # noqa: E402  (its tiny Mask2Former + CLIP folder)
import test_imagereward as tir  # noqa: E402  (its official-layout state dict)
from spobench.metrics import aesthetic, geneval, hpsv2, imagereward, pickscore, toy_pickscore  # noqa: E402

EXTRA = "spare.weight"


def build_pickscore(folder):
    cf.write_clip_model(folder / pickscore.MODEL_DIR, seed=3)
    cf.write_processor_folder(folder / pickscore.PROCESSOR_DIR, size=32)


def build_aesthetic(folder):
    cf.write_clip_model(folder / aesthetic.CLIP_DIR, seed=5, hidden_act="quick_gelu")
    torch.save(cf.aesthetic_head_state_dict(cf.EMBED, seed=6), folder / aesthetic.HEAD_FILE)


def build_hpsv2(folder):
    torch.save({"state_dict": cf.open_clip_state_dict(seed=1)}, folder / hpsv2.CHECKPOINTS["v2.1"])
    cf.write_tokenizer(folder / hpsv2.TOKENIZER_DIR)


def build_imagereward(folder):
    torch.save(tir.official_state_dict(), folder / imagereward.CHECKPOINT)
    (folder / imagereward.MED_CONFIG).write_text(json.dumps(tir.MED))
    (folder / imagereward.TOKENIZER_DIR).mkdir()
    (folder / imagereward.TOKENIZER_DIR / "vocab.txt").write_text("\n".join(tir.WORDS) + "\n")


def build_toy(folder):
    shutil.copytree(toy_pickscore.SHIPPED, folder, dirs_exist_ok=True)


def image(w=48, h=40):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


SCORE: dict[str, Callable[[Path], np.ndarray]] = {
    "pickscore": lambda f: pickscore.PickScore(weights=f).score([image()], ["a red cat"]).scores,
    "aesthetic": lambda f: aesthetic.Aesthetic(weights=f).score([image()]).scores,
    "hpsv2": lambda f: hpsv2.HPSv2(weights=f).score([image()], ["a red cat"]).scores,
    "imagereward": lambda f: imagereward.ImageReward(weights=f).score([image()], ["a photo of a red cat"]).scores,
    "geneval": lambda f: geneval.GenEval(weights=f).score([image(64, 48)], ["a photo of a bench"]).scores,
    "toy_pickscore": lambda f: toy_pickscore.ToyPickScore(weights=f).score([image(32, 32)], ["a red circle"]).scores,
}
BUILD = {"pickscore": build_pickscore, "aesthetic": build_aesthetic, "hpsv2": build_hpsv2,
         "imagereward": build_imagereward, "geneval": tge._tiny_weights, "toy_pickscore": build_toy}


@dataclass(frozen=True)
class Target:
    """One weights file of a metric: ``key`` is removed / poisoned, ``shape_key`` gets a wrong shape
    (both spelled as the file spells them)."""

    metric: str
    file: str
    key: str
    shape_key: str
    nested: str | None = None  # the pickle wraps its state dict under this key

    @property
    def pickle(self) -> bool:
        return not self.file.endswith(".safetensors")


TARGETS = [
    Target("pickscore", f"{pickscore.MODEL_DIR}/model.safetensors", "text_projection.weight",
           "visual_projection.weight"),
    Target("aesthetic", aesthetic.HEAD_FILE, "layers.2.weight", "layers.4.weight"),
    Target("aesthetic", f"{aesthetic.CLIP_DIR}/model.safetensors", "logit_scale", "visual_projection.weight"),
    Target("hpsv2", hpsv2.CHECKPOINTS["v2.1"], "transformer.resblocks.1.ln_2.bias",
           "transformer.resblocks.1.mlp.c_fc.weight", nested="state_dict"),
    Target("imagereward", imagereward.CHECKPOINT, "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
           "mlp.layers.2.weight"),
    Target("geneval", f"{geneval.DETECTOR_DIR}/model.safetensors", "class_predictor.weight", "class_predictor.bias"),
    Target("geneval", f"{geneval.CLIP_DIR}/model.safetensors", "text_projection.weight", "visual_projection.weight"),
    Target("toy_pickscore", "model.safetensors", "text_projection.weight", "visual_projection.weight"),
]
TARGET_IDS = [f"{t.metric}:{t.file.split('/')[0]}" for t in TARGETS]


def edit(path: Path, target: Target, fn) -> None:
    """Apply ``fn`` to the state dict in ``path`` and write it back in the same format."""
    if target.pickle:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        fn(obj[target.nested] if target.nested else obj)
        torch.save(obj, path)
    else:
        state = load_file(str(path))
        fn(state)
        save_file(state, str(path), metadata={"format": "pt"})


def wrong_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)


def poison(state, key) -> None:
    bad = state[key].clone()
    bad.view(-1)[0] = float("nan")
    state[key] = bad


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
