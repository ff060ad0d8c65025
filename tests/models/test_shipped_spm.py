"""The shipped tiny-world SPM (spobench/assets/tiny-spm): it loads, it learned image quality from generic
pairs, it is SPO's default scorer on the tiny backbone, and recipes reach it through ``{assets}``."""

import json

import numpy as np
import torch

from spobench.models.spm import StepAwarePreferenceModel
from spobench.models.spm_files import TINY_SPM
from spobench.toyworld import grammar as g
from spobench.toyworld.render import Knobs, render

PROMPTS = ["a red circle", "two green triangles", "a yellow square and a blue circle",
           "a large blue square on the left", "a red circle above a green triangle", "a large circle",
           "three purple squares", "a small orange triangle", "a cyan circle on the right", "a white square"]
SPOILED = Knobs(grain=0.8, blur=0.8, washout=0.8, color_shift=0.8, blobs=0.8, jagged=0.8, bg_tint=0.8)


def _batch(knobs=Knobs()):
    arr = np.stack([render(g.parse(p), knobs, 100 + i) for i, p in enumerate(PROMPTS)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def test_shipped_spm_loads_and_records_how_it_was_made():
    spm = StepAwarePreferenceModel.load(TINY_SPM)
    assert spm.time_conditioned
    info = json.loads((TINY_SPM / "train.json").read_text())
    acc = info["held_out_accuracy"]["spm"]
    assert set(acc) == {"0", "250", "500", "750", "950"} and min(acc.values()) > 0.6
    assert any("train-spm" in c for c in info["commands"])


@torch.no_grad()
def test_shipped_spm_prefers_clean_renders_at_every_timestep():
    spm = StepAwarePreferenceModel.load(TINY_SPM).eval()
    clean, spoiled = _batch(), _batch(SPOILED)
    for t in (0, 500, 950):
        a, b = spm(clean, t, PROMPTS), spm(spoiled, t, PROMPTS)
        assert torch.isfinite(a).all() and (a > b).float().mean() >= 0.8, t


def test_tiny_spo_defaults_to_the_shipped_spm():
    from spobench.models.backbones.tiny import TinyBackbone
    from spobench.trainers.spo import SPOTrainer

    cfg = SPOTrainer.prepare_config(SPOTrainer.Config.load(None, ["prompts=unused"]), "tiny", TinyBackbone.defaults)
    assert cfg.scorer == str(TINY_SPM) and cfg.threshold == TinyBackbone.defaults.spo_threshold


def test_recipes_reach_shipped_models_through_assets(tmp_path):
    from spobench.reproduce.paths import resolve_path

    assert resolve_path("{assets}/tiny-spm", tmp_path) == TINY_SPM


def test_tiny_spm_training_starts_from_the_shipped_toy_pickscore(monkeypatch, tmp_path):
    from spobench.trainers.spm import default_init

    monkeypatch.setenv("SPOBENCH_WEIGHTS", str(tmp_path))
    assert default_init("tiny") == TINY_SPM.parent / "toy-pickscore"
    (tmp_path / "toy_pickscore").mkdir()
    assert default_init("tiny") == tmp_path / "toy_pickscore"
