"""Bad models and released checkpoints through the installed CLI (issue 13 part 2, issue 14 "Weights that
are NaN"): every backbone component and LoRA load goes through spobench.core.weights, so NaN/inf weights, missing
or unexpected keys, wrong shapes, foreign layouts and missing hub snapshots each end in ONE error line that
names the file or recipe field, exit 2, and nothing written. (Before, NaN UNet weights gave black images and
exit 0.) The contract is tests/contract.py's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import released_world as world
from clitools import run
from contract import assert_clean_failure, snapshot

GEN = ["--steps", "2", "--limit", "1"]


def _edit(file: Path, fn) -> str:
    """Rewrite a safetensors file with ``fn(state)`` applied; returns the key it touched."""
    sd = load_file(str(file))
    key = fn(sd)
    save_file(sd, str(file), metadata={"format": "pt"})
    return key


def _nan(pattern: str):
    def fn(sd):
        k = next(k for k in sorted(sd) if pattern in k)
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = float("nan")
        return k
    return fn


def _drop(pattern: str):
    def fn(sd):
        k = next(k for k in sorted(sd) if pattern in k)
        del sd[k]
        return k
    return fn


def _reshape(pattern: str):
    def fn(sd):
        k = next(k for k in sorted(sd) if pattern in k)
        sd[k] = torch.zeros(*sd[k].shape[:-1], sd[k].shape[-1] + 1)
        return k
    return fn


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An SD-1.5-shaped folder, broken copies of it, and LoRA files for it (and one for SDXL)."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_lora_file, make_sd15_folder, make_sdxl_folder, make_unet_folder

    root = tmp_path_factory.mktemp("bad-models")
    good = make_sd15_folder(root / "sd15")
    keys = {}
    for name, comp, fn in (("nan-unet", "unet", _nan("conv_in.weight")), ("inf-vae", "vae", _nan("decoder.conv_out")),
                           ("missing-key-unet", "unet", _drop("up_blocks.0")),
                           ("wrong-shape-unet", "unet", _reshape("time_embedding.linear_1.weight")),
                           ("nan-text-encoder", "text_encoder", _nan("token_embedding"))):
        shutil.copytree(good, root / name)
        stem = "model" if comp == "text_encoder" else "diffusion_pytorch_model"
        keys[name] = _edit(root / name / comp / f"{stem}.safetensors", fn)
    shutil.copytree(good, root / "truncated-unet")
    f = root / "truncated-unet" / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    bb = load_backbone("sd15", str(good))
    make_lora_file(root / "lora-kohya", bb, style="kohya")
    make_lora_file(root / "lora-nan", bb)
    keys["lora-nan"] = _edit(root / "lora-nan" / "pytorch_lora_weights.safetensors", _nan("lora.up"))
    make_lora_file(root / "lora-missing", bb, metadata=True)
    _edit(root / "lora-missing" / "pytorch_lora_weights.safetensors", _drop("lora.down"))
    make_lora_file(root / "lora-sdxl", load_backbone("sdxl", str(make_sdxl_folder(root / "sdxl"))))
    shutil.copytree(root / "lora-kohya", root / "lora-te")
    te = root / "lora-te" / "pytorch_lora_weights.safetensors"
    _edit(te, lambda sd: sd.update({"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                                    torch.zeros(4, 32)}))
    (root / "lora-pickle").mkdir()
    torch.save({}, root / "lora-pickle" / "pytorch_lora_weights.bin")
    make_unet_folder(root / "unet-nan", good, layout="unet")
    keys["unet-nan"] = _edit(root / "unet-nan" / "unet" / "diffusion_pytorch_model.safetensors", _nan("conv_out"))
    make_unet_folder(root / "unet-top", good, layout="top")
    (root / "p.txt").write_text("a red cat\n")
    return root, keys


def _generate(root: Path, tmp: Path, model="sd15", lora=None):
    argv = ["generate", "--backbone", "sd15", "--model", root / model, "--prompts", root / "p.txt", *GEN,
            "--out", tmp / "o"]
    return argv + (["--lora", root / lora] if lora else [])


CASES = {
    # id: (generate(model, lora), names in the error line)
    "nan-unet": (("nan-unet", None), ["nan-unet/unet/diffusion_pytorch_model.safetensors", "NaN", "conv_in.weight"]),
    "inf-vae": (("inf-vae", None), ["inf-vae/vae/diffusion_pytorch_model.safetensors", "NaN or inf"]),
    "nan-text-encoder": (("nan-text-encoder", None), ["nan-text-encoder/text_encoder/model.safetensors", "NaN"]),
    "missing-key-unet": (("missing-key-unet", None), ["missing-key-unet/unet/diffusion_pytorch_model.safetensors"]),
    "wrong-shape-unet": (("wrong-shape-unet", None), ["wrong-shape-unet/unet/diffusion_pytorch_model.safetensors",
                                                      "shape"]),
    "truncated-unet": (("truncated-unet", None), ["truncated-unet/unet/diffusion_pytorch_model.safetensors"]),
    "nan-lora": (("sd15", "lora-nan"), ["lora-nan/pytorch_lora_weights.safetensors", "NaN"]),
    "lora-missing-key": (("sd15", "lora-missing"), ["lora-missing/pytorch_lora_weights.safetensors", "missing 1 key"]),
    "lora-other-backbone": (("sd15", "lora-sdxl"), ["lora-sdxl/pytorch_lora_weights.safetensors", "sd15"]),
    "lora-text-encoder-keys": (("sd15", "lora-te"), ["lora-te/pytorch_lora_weights.safetensors", "text-encoder"]),
    "lora-pickle-only": (("sd15", "lora-pickle"), ["lora-pickle", "safetensors only"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_model_or_lora_in_generate(case, models, tmp_path):
    root, keys = models
    (model, lora), names = CASES[case]
    r = run(*_generate(root, tmp_path, model, lora))
    line = assert_clean_failure(r.returncode, r.stderr, names, tmp_path / "o", None)
    assert r.returncode == 2
    if case in keys and case not in ("missing-key-unet", "wrong-shape-unet"):
        assert keys[case] in line


@pytest.mark.parametrize("flag,target,names", [
    ("--unet", "unet-nan", ["unet-nan/unet/diffusion_pytorch_model.safetensors", "NaN"]),
    ("--vae", "unet-top", ["vae override", "UNet2DConditionModel, not a AutoencoderKL"]),
    ("--unet", "mhdang/dpo-sd1.5-text2image-v1", ["mhdang/dpo-sd1.5-text2image-v1", "HF_HUB_OFFLINE"]),
])
def test_bad_released_component_in_generate(flag, target, names, models, tmp_path):
    root, keys = models
    value = root / target if (root / target).exists() else target
    r = run(*_generate(root, tmp_path), flag, value, env={"HF_HUB_CACHE": str(tmp_path / "hf")})
    line = assert_clean_failure(r.returncode, r.stderr, names, tmp_path / "o", None)
    if target in keys:
        assert keys[target] in line


# -- `reproduce --released`: what is missing is named before anything is written ---------------------
@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    root = tmp_path_factory.mktemp("released-machine")
    world.build(root, ("sd15",))
    return root


def _variant(machine: Path, tmp: Path, drop=(), edit=None) -> dict:
    """The machine with hub repos removed (``drop``) or a file edited, in a copy of its cache."""
    cache = tmp / "hf"
    shutil.copytree(machine / "hf", cache)
    for repo in drop:
        shutil.rmtree(cache / ("models--" + repo.replace("/", "--")))
    if edit:
        edit(cache)
    return world.env(machine) | {"HF_HUB_CACHE": str(cache)}


def _snap(cache: Path, repo: str) -> Path:
    return next((cache / ("models--" + repo.replace("/", "--")) / "snapshots").iterdir())


SPO_LORA = "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"
DPO_UNET = "mhdang/dpo-sd1.5-text2image-v1"
BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"

RELEASED = {
    "base-not-cached": (lambda m, t: _variant(m, t, drop=[BASE]), [BASE, "HF_HUB_OFFLINE"]),
    "lora-not-cached": (lambda m, t: _variant(m, t, drop=[SPO_LORA]), ["cells.spo.lora", SPO_LORA, "HF_HUB_OFFLINE"]),
    "unet-not-cached": (lambda m, t: _variant(m, t, drop=[DPO_UNET]), ["cells.dpo.unet", DPO_UNET]),
    "lora-nan": (lambda m, t: _variant(m, t, edit=lambda c: _edit(_snap(c, SPO_LORA) / "pytorch_lora_weights.safetensors",
                                                                 _nan("lora.up"))), ["cells.spo.lora", "NaN"]),
    "unet-layout": (lambda m, t: _variant(m, t, edit=lambda c: shutil.rmtree(_snap(c, DPO_UNET) / "unet")),
                    ["cells.dpo.unet", "holds no config.json"]),
    "no-prompts": (lambda m, t: world.env(m) | {"SPOBENCH_DATA": str(t / "empty")},
                   ["generate.prompt_set", "validation_unique"]),
    "no-metric-weights": (lambda m, t: world.env(m) | {"SPOBENCH_WEIGHTS": str(t / "empty")},
                          ["evaluate.metrics", "pickscore"]),
}


@pytest.mark.parametrize("case", sorted(RELEASED))
def test_released_run_names_what_is_missing(case, machine, tmp_path):
    make_env, names = RELEASED[case]
    env = make_env(machine, tmp_path)
    out = tmp_path / "run"
    r = run("reproduce", "table2", "--released", "--limit", "1", "--out", out, env=env)
    assert_clean_failure(r.returncode, r.stderr, names, out, None)


def _released_recipe(tmp: Path, cell: str) -> Path:
    text = (Path(__file__).resolve().parents[2] / "spobench" / "recipes" / "table2.toml").read_text()
    old = 'lora = "hub:SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"'
    assert old in text
    (tmp / "table2.toml").write_text(text.replace(old, cell))
    return tmp / "table2.toml"


@pytest.mark.parametrize("cell,names", [
    ('lora = "hub:/etc/models"', ["[released]: cells.spo.lora", "hub id"]),
    ('unet = "hub:../../x"', ["[released]: cells.spo.unet", "hub id"]),
    ('lora = "../outside"', ["[released]: cells.spo.lora", "escape"]),
    ('vae = "/abs/vae"', ["[released]: cells.spo.vae", "absolute"]),
    ('model = "random:0"', ["[released]: cells.spo.model", "released model"]),
])
def test_released_cell_paths_stay_in_the_recipe_roots(cell, names, tmp_path):
    r = run("reproduce", _released_recipe(tmp_path, cell), "--released", "--out", tmp_path / "o")
    assert_clean_failure(r.returncode, r.stderr, ["table2.toml", *names], tmp_path / "o", None)


@pytest.mark.parametrize("argv,names", [
    (["table4", "--released"], ["table4", "no [released]"]),
    (["table2", "--released", "--backbone", "tiny"], ["released.backbone", "sd15", "'tiny'"]),
    (["table1", "--released", "--backbone", "sd15"], ["released.backbone", "sdxl", "'sd15'"]),
    (["table2", "--released", "--limit", "0"], ["--limit", ">= 1"]),
])
def test_released_flags(argv, names, tmp_path):
    r = run("reproduce", *argv, "--out", tmp_path / "o", env={"HF_HUB_CACHE": str(tmp_path / "hf")})
    assert_clean_failure(r.returncode, r.stderr, names, tmp_path / "o", None)


def test_existing_out_is_left_unchanged(machine, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    r = run("reproduce", "table2", "--released", "--out", out, env=world.env(machine))
    assert_clean_failure(r.returncode, r.stderr, [str(out), "not empty"], out, before)
