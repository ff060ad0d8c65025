"""`spobench generate` end to end on a tiny backbone folder, as a user runs it."""

import json

import numpy as np
import pytest
from PIL import Image

from spobench.models.backbones.testing import make_tiny_folder
from clitools import run, run_together


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red circle\ntwo blue squares\n")
    return p


def test_generate_writes_pngs_and_manifest(tiny_model, prompts, tmp_path):
    out = tmp_path / "out"
    r = run("generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out),
            "-n", "2", "--steps", "3", "--seed", "7")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r_["seed"] for r_ in rows] == [7, 8, 9, 10]
    assert [r_["prompt"] for r_ in rows] == ["a red circle"] * 2 + ["two blue squares"] * 2
    assert rows[0]["sampler"]["num_steps"] == 3 and rows[0]["backbone"]["backbone"] == "tiny"
    assert "torch" in rows[0]["versions"] and "git" in rows[0]
    for row in rows:
        assert Image.open(out / row["file"]).size == (32, 32)

    # an existing folder is refused before any work
    again = run("generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out))
    assert again.returncode == 2 and "--resume or --overwrite" in again.stderr

    # resume after a lost image regenerates exactly that image, bit for bit
    before = (out / "00002.png").read_bytes()
    (out / "00002.png").unlink()
    r = run("generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out),
            "-n", "2", "--steps", "3", "--seed", "7", "--resume")
    assert r.returncode == 0, r.stderr
    assert (out / "00002.png").read_bytes() == before


def test_same_seed_same_image_whatever_the_batch(tiny_model, prompts, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for r in run_together(*[("generate", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out),
                             "--steps", "2", "--batch-size", bs, "--eta", "1.0") for out, bs in ((a, "1"), (b, "4"))]):
        assert r.returncode == 0, r.stderr
    for name in ("00000.png", "00001.png"):
        x = np.asarray(Image.open(a / name), dtype=int)
        y = np.asarray(Image.open(b / name), dtype=int)
        # batched BLAS may differ in the last bit; pixels may move by at most one level
        assert np.abs(x - y).max() <= 1


def test_model_folder_missing_component(tiny_model, prompts, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    r = run("generate", "--model", str(broken), "--prompts", str(prompts), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unet" in r.stderr and "Traceback" not in r.stderr
