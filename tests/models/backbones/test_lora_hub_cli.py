"""`spobench generate --lora` takes a hub id as the recipes' `lora = "hub:..."` does (the released SPO
LoRAs are hub repositories), resolved from the offline cache like the models."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from spobench.models.backbones import load_backbone
from spobench.models.backbones.testing import fake_hub_cache, make_lora_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clitools import run  # noqa: E402
from contract import assert_clean_failure  # noqa: E402

REPO = "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"


def _pixels(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("*.png"))])


def test_generate_lora_from_a_hub_id_equals_the_same_file(sd15_dir, tmp_path):
    lora = make_lora_file(tmp_path / "lora", load_backbone("sd15", str(sd15_dir)), style="diffusers").parent
    cache = tmp_path / "hf"
    fake_hub_cache(cache, REPO, lora)
    (tmp_path / "p.txt").write_text("a red cat\n")
    common = ["generate", "--backbone", "sd15", "--model", sd15_dir, "--prompts", tmp_path / "p.txt",
              "--steps", "2", "--resolution", "64"]
    env = {"HF_HUB_CACHE": str(cache)}
    by_id = run(*common, "--lora", REPO, "--out", tmp_path / "hub", env=env)
    assert by_id.returncode == 0, by_id.stderr
    by_file = run(*common, "--lora", lora, "--out", tmp_path / "file", env=env)
    plain = run(*common, "--out", tmp_path / "plain", env=env)
    assert by_file.returncode == 0 and plain.returncode == 0, by_file.stderr + plain.stderr
    assert np.array_equal(_pixels(tmp_path / "hub"), _pixels(tmp_path / "file"))
    assert not np.array_equal(_pixels(tmp_path / "hub"), _pixels(tmp_path / "plain"))  # the LoRA was applied

    missing = run(*common, "--lora", "SPO-Diffusion-Models/not-there", "--out", tmp_path / "none", env=env)
    assert_clean_failure(missing.returncode, missing.stderr, ["SPO-Diffusion-Models/not-there", "HF_HUB_OFFLINE"],
                         tmp_path / "none", None)
    gone = run(*common, "--lora", tmp_path / "no-such-folder", "--out", tmp_path / "none2", env=env)
    assert_clean_failure(gone.returncode, gone.stderr, ["no LoRA weights at"], tmp_path / "none2", None)


def test_generate_refuses_a_resolution_the_latent_cannot_hold(sd15_dir, tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n")
    bad = run("generate", "--backbone", "sd15", "--model", sd15_dir, "--prompts", tmp_path / "p.txt", "--steps", "1",
              "--resolution", "63", "--out", tmp_path / "o")
    assert_clean_failure(bad.returncode, bad.stderr, ["resolution 63", "multiple of"], tmp_path / "o", None)
