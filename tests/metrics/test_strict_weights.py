"""Every metric refuses weights that do not fit, with one line naming the file and the key (issue 14).

For each metric, a tiny model in the official layout (the fixtures of each metric's test module) is
spoiled one way at a time: a key removed, an extra key, a wrong shape, a truncated file, a pickle
holding a non-tensor, a NaN weight. Each must be a ``ModelLoadError`` (never a score from a model that
transformers re-initialised at random, which is what a removed key used to give).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
import clip_fixtures as cf  # noqa: E402
import test_geneval as tge  # noqa: E402  (its tiny Mask2Former + CLIP folder)
import test_imagereward as tir  # noqa: E402  (its official-layout state dict)
from spobench.errors import ModelLoadError  # noqa: E402
from spobench.metrics import aesthetic, geneval, hpsv2, imagereward, pickscore, toy_pickscore  # noqa: E402

EXTRA = "spare.weight"


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No metric may fall back on a real Hugging Face cache here."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


# -- the metrics, each with its official layout ------------------------------------------------------

def _pickscore(folder):
    cf.write_clip_model(folder / pickscore.MODEL_DIR, seed=3)
    cf.write_processor_folder(folder / pickscore.PROCESSOR_DIR, size=32)


def _aesthetic(folder):
    cf.write_clip_model(folder / aesthetic.CLIP_DIR, seed=5, hidden_act="quick_gelu")
    torch.save(cf.aesthetic_head_state_dict(cf.EMBED, seed=6), folder / aesthetic.HEAD_FILE)


def _hpsv2(folder):
    torch.save({"state_dict": cf.open_clip_state_dict(seed=1)}, folder / hpsv2.CHECKPOINTS["v2.1"])
    cf.write_tokenizer(folder / hpsv2.TOKENIZER_DIR)


def _imagereward(folder):
    torch.save(tir.official_state_dict(), folder / imagereward.CHECKPOINT)
    (folder / imagereward.MED_CONFIG).write_text(json.dumps(tir.MED))
    (folder / imagereward.TOKENIZER_DIR).mkdir()
    (folder / imagereward.TOKENIZER_DIR / "vocab.txt").write_text("\n".join(tir.WORDS) + "\n")


def _toy(folder):
    shutil.copytree(toy_pickscore.SHIPPED, folder, dirs_exist_ok=True)


def _image(w=48, h=40):
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


SCORE: dict[str, Callable[[Path], np.ndarray]] = {
    "pickscore": lambda f: pickscore.PickScore(weights=f).score([_image()], ["a red cat"]).scores,
    "aesthetic": lambda f: aesthetic.Aesthetic(weights=f).score([_image()]).scores,
    "hpsv2": lambda f: hpsv2.HPSv2(weights=f).score([_image()], ["a red cat"]).scores,
    "imagereward": lambda f: imagereward.ImageReward(weights=f).score([_image()], ["a photo of a red cat"]).scores,
    "geneval": lambda f: geneval.GenEval(weights=f).score([_image(64, 48)], ["a photo of a bench"]).scores,
    "toy_pickscore": lambda f: toy_pickscore.ToyPickScore(weights=f).score([_image(32, 32)], ["a red circle"]).scores,
}
BUILD = {"pickscore": _pickscore, "aesthetic": _aesthetic, "hpsv2": _hpsv2, "imagereward": _imagereward,
         "geneval": tge._tiny_weights, "toy_pickscore": _toy}


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
    Target("pickscore", f"{pickscore.MODEL_DIR}/model.safetensors", "text_projection.weight", "visual_projection.weight"),
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


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """metric -> an intact weights folder (built once per module)."""
    built: dict[str, Path] = {}

    def get(metric: str) -> Path:
        if metric not in built:
            folder = tmp_path_factory.mktemp(metric)
            BUILD[metric](folder)
            built[metric] = folder
        return built[metric]

    return get


def _copy(pristine, metric, tmp_path) -> Path:
    folder = tmp_path / metric
    shutil.copytree(pristine(metric), folder)
    return folder


def _edit(path: Path, target: Target, fn) -> None:
    """Apply ``fn`` to the state dict in ``path`` and write it back in the same format."""
    if target.pickle:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        fn(obj[target.nested] if target.nested else obj)
        torch.save(obj, path)
    else:
        state = load_file(str(path))
        fn(state)
        save_file(state, str(path), metadata={"format": "pt"})


def _wrong_shape(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype)


def _poison(state, key):
    bad = state[key].clone()
    bad.view(-1)[0] = float("nan")
    state[key] = bad


def _refused(metric: str, folder: Path) -> str:
    with pytest.raises(ModelLoadError) as err:
        SCORE[metric](folder)
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- intact weights score (so the failures below are the spoiling's doing) ---------------------------

@pytest.mark.parametrize("metric", sorted(BUILD))
def test_intact_official_layout_scores(metric, pristine, tmp_path):
    scores = SCORE[metric](_copy(pristine, metric, tmp_path))
    assert scores.shape == (1,) and np.isfinite(scores).all()


# -- one spoiling at a time --------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_removed_key(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    _edit(folder / target.file, target, lambda sd: sd.pop(target.key))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.key in msg and "missing" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_extra_key(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    _edit(folder / target.file, target, lambda sd: sd.__setitem__(EXTRA, torch.zeros(3)))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and EXTRA in msg and "unexpected" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_wrong_shape(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    _edit(folder / target.file, target, lambda sd: sd.__setitem__(target.shape_key, _wrong_shape(sd[target.shape_key])))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.shape_key in msg and "wrong shape" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_truncated_file(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = _refused(target.metric, folder)
    assert str(path) in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_non_tensor_pickle(target, pristine, tmp_path):
    """A pickle that ``weights_only`` accepts may still hold an int where a tensor belongs. Where the
    official format is safetensors, a pickle in its place is refused whatever it holds."""
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    if target.pickle:
        _edit(path, target, lambda sd: sd.__setitem__(target.key, 3))
        msg = _refused(target.metric, folder)
        assert str(path) in msg and target.key in msg and "not a tensor" in msg, msg
    else:
        path.unlink()
        torch.save({target.key: 3}, path.parent / "pytorch_model.bin")
        msg = _refused(target.metric, folder)
        assert str(path.parent / "pytorch_model.bin") in msg and "model.safetensors" in msg, msg


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_nan_weight(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    _edit(folder / target.file, target, lambda sd: _poison(sd, target.key))
    msg = _refused(target.metric, folder)
    assert str(folder / target.file) in msg and target.key in msg and "NaN" in msg, msg


@pytest.mark.parametrize("target", [t for t in TARGETS if t.pickle], ids=[i for t, i in zip(TARGETS, TARGET_IDS)
                                                                          if t.pickle])
def test_pickle_of_something_else(target, pristine, tmp_path):
    folder = _copy(pristine, target.metric, tmp_path)
    path = folder / target.file
    torch.save([1, 2, 3], path)
    msg = _refused(target.metric, folder)
    assert str(path) in msg and "list" in msg, msg


# -- the original bug --------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [t for t in TARGETS if not t.pickle], ids=[i for t, i in zip(TARGETS, TARGET_IDS)
                                                                              if not t.pickle])
def test_removed_key_is_not_reinitialised_and_scored(target, pristine, tmp_path):
    """transformers loads a folder missing a key by initialising that key at random (and warning on a
    logger the CLI hides); the metric used to score with it (PickScore moved from -11.5 to 14.5)."""
    from transformers import CLIPModel

    folder = _copy(pristine, target.metric, tmp_path)
    _edit(folder / target.file, target, lambda sd: sd.pop(target.key))
    if target.file.split("/")[0] in (geneval.DETECTOR_DIR,):
        klass = geneval._instance_model_class()
    else:
        klass = CLIPModel
    _, info = klass.from_pretrained(str((folder / target.file).parent), output_loading_info=True)
    assert target.key in info["missing_keys"]  # plain from_pretrained accepts the folder: the bug's premise
    msg = _refused(target.metric, folder)
    assert target.key in msg
