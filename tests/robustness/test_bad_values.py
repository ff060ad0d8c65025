"""Bad values through the installed CLI (issue 14): numbers that are NaN, infinite or out of range in
options, trainer settings, config files and recipes; devices the machine does not have; config and
prompt files that are not text; names that are close to a real one; recipe sources that would read
outside the recipe's roots. Every case asserts tests/contract.py's contract: exit code 2, one
``error:`` line naming the flag, setting, file or field, no traceback, and no --out left behind.

All cases fail while the command line or the inputs are read, before any model work. The unit-level
forms: spobench.core.checks (tests/trainers/test_spo.py::test_bad_settings_name_the_field,
tests/reproduce/test_recipes.py, tests/data/test_prompts.py, tests/trainers/test_spm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clitools import run
from contract import assert_clean_failure, snapshot
from recipe_fixtures import write_recipe


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-values")
    (root / "nan.toml").write_text("k = 2\nbeta = nan\n")
    (root / "utf16.toml").write_bytes("k = 2\n".encode("utf-16"))
    (root / "late-nul.txt").write_bytes(b"a red circle\n" * 1000 + b"a blue\x00square\n")
    (root / "zero-width.txt").write_text("a red circle\n\u200b\u200d\u2060\n", encoding="utf-8")
    (root / "images").mkdir()
    (root / "clip").mkdir()
    (root / "pairs.parquet").write_bytes(b"never read")
    return root


def _recipe(root: Path, name: str, old: str, new: str) -> Path:
    return write_recipe(root, name, old, new, title="bad values")


# (id, argv given the files folder and an --out path, what the error line must name: text, or text
# given the files folder)
GEN = ["generate", "--prompt-set", "tiny-val"]
CASES = [
    # -- numeric options: finite, and in range ------------------------------------------------------
    ("generate-cfg-nan", lambda f, o: [*GEN, "--cfg", "nan", "--out", o], ["--cfg", "finite", "nan"]),
    ("generate-cfg-inf", lambda f, o: [*GEN, "--cfg", "inf", "--out", o], ["--cfg", "finite", "inf"]),
    ("generate-cfg-negative", lambda f, o: [*GEN, "--cfg", "-1", "--out", o], ["--cfg", ">= 0"]),
    ("generate-eta-nan", lambda f, o: [*GEN, "--eta", "nan", "--out", o], ["--eta", "finite"]),
    ("generate-eta-2", lambda f, o: [*GEN, "--eta", "2", "--out", o], ["--eta", "<= 1"]),
    ("generate-steps-0", lambda f, o: [*GEN, "--steps", "0", "--out", o], ["--steps", ">= 1"]),
    ("generate-seed-negative", lambda f, o: [*GEN, "--seed", "-1", "--out", o], ["--seed", ">= 0"]),
    ("generate-seed-huge", lambda f, o: [*GEN, "--seed", str(2**64), "--out", o], ["--seed", "<="]),
    ("generate-n-0", lambda f, o: [*GEN, "-n", "0", "--out", o], ["--images-per-prompt", ">= 1"]),
    ("generate-batch-0", lambda f, o: [*GEN, "--batch-size", "0", "--out", o], ["--batch-size", ">= 1"]),
    ("generate-limit-0", lambda f, o: [*GEN, "--limit", "0", "--out", o], ["--limit", ">= 1"]),
    ("train-spm-lr-negative", lambda f, o: ["train-spm", "--pairs", f / "pairs.parquet", "--lr", "-1", "--out", o],
     ["--lr", "> 0", "-1.0"]),  # gradient ascent
    ("train-spm-lr-nan", lambda f, o: ["train-spm", "--pairs", f / "pairs.parquet", "--lr", "nan", "--out", o],
     ["--lr", "finite"]),
    ("train-spm-time-lr-mult-inf", lambda f, o: ["train-spm", "--pairs", f / "pairs.parquet", "--time-lr-mult",
                                                 "inf", "--out", o], ["--time-lr-mult", "finite"]),
    ("train-spm-steps-negative", lambda f, o: ["train-spm", "--pairs", f / "pairs.parquet", "--steps", "-1",
                                               "--out", o], ["--steps", ">= 0"]),
    ("eval-spm-max-0", lambda f, o: ["eval-spm", f / "clip", "--pairs", f / "pairs.parquet", "--max", "0"],
     ["--max", ">= 1"]),
    ("eval-spm-timesteps-negative", lambda f, o: ["eval-spm", f / "clip", "--pairs", f / "pairs.parquet",
                                                  "--timesteps", "0,-250"], ["--timesteps", ">= 0"]),
    ("toy-clip-patch-64", lambda f, o: ["toy", "clip", "--patch", "64", "--out", o],
     ["--patch", "divide the image size 32", "64"]),
    ("toy-clip-patch-5", lambda f, o: ["toy", "clip", "--patch", "5", "--out", o], ["--patch", "divide"]),
    ("toy-clip-hidden-10", lambda f, o: ["toy", "clip", "--hidden", "10", "--out", o], ["--hidden", "multiple of the 4"]),
    ("toy-pretrain-lr-0", lambda f, o: ["toy", "pretrain", "--lr", "0", "--out", o], ["--lr", "> 0"]),
    ("toy-pretrain-lr-nan", lambda f, o: ["toy", "pretrain", "--lr", "nan", "--out", o], ["--lr", "finite"]),
    ("toy-data-base-samples-nan", lambda f, o: ["toy", "data", "--base-samples", "nan", "--out", o],
     ["--base-samples", "finite"]),
    ("toy-data-pairs-1", lambda f, o: ["toy", "data", "--pairs", "1", "--out", o], ["--pairs", ">= 2"]),
    ("toy-pickscore-lr-negative", lambda f, o: ["toy", "pickscore", "--pairs", f / "pairs.parquet", "--lr", "-0.1",
                                                "--out", o], ["--lr", "> 0"]),
    ("toy-pickscore-val-fraction-nan", lambda f, o: ["toy", "pickscore", "--pairs", f / "pairs.parquet",
                                                     "--val-fraction", "nan", "--out", o], ["--val-fraction", "finite"]),
    # -- devices: one parser for every command ----------------------------------------------------------
    ("generate-device-gpu0", lambda f, o: [*GEN, "--device", "gpu0", "--out", o], ["--device", "'gpu0'", "not a device"]),
    ("eval-device-cuda-x", lambda f, o: ["eval", "--metrics", "toy_aesthetic", "--images", f / "images", "--device",
                                         "cuda:x"], ["--device", "'cuda:x'"]),
    ("reproduce-device-tpu", lambda f, o: ["reproduce", "table1", "--device", "tpu", "--out", o], ["--device", "'tpu'"]),
    ("train-spm-device-cpu1", lambda f, o: ["train-spm", "--pairs", f / "pairs.parquet", "--device", "cpu:1",
                                            "--out", o], ["--device", "'cpu:1'"]),
    # -- trainer settings and config files ----------------------------------------------------------------
    ("set-threshold-nan", lambda f, o: ["train", "spo", "--set", "threshold=nan", "--out", o],
     ["--set", "'threshold'", "finite"]),
    ("set-lr-nan", lambda f, o: ["train", "spo", "--set", "lr=nan", "--out", o], ["--set", "'lr'", "finite"]),
    ("set-prompts-empty", lambda f, o: ["train", "spo", "--set", "prompts=", "--out", o], ["'prompts'", "is empty"]),
    ("config-beta-nan", lambda f, o: ["train", "spo", "--config", f / "nan.toml", "--out", o],
     [lambda f: f / "nan.toml", "'beta'", "finite"]),
    ("config-utf16", lambda f, o: ["train", "spo", "--config", f / "utf16.toml", "--out", o],
     [lambda f: f / "utf16.toml", "not valid UTF-8"]),
    ("d3po-scorer-is-reward", lambda f, o: ["train", "d3po", "--set", "scorer=metric:toy_aesthetic", "--out", o],
     ["'scorer'", "did you mean 'reward'"]),
    # -- prompt files -------------------------------------------------------------------------------------
    ("prompts-nul-after-8k", lambda f, o: ["generate", "--prompts", f / "late-nul.txt", "--out", o],
     [lambda f: f"{f / 'late-nul.txt'}:1001", "binary"]),
    ("prompts-zero-width", lambda f, o: ["generate", "--prompts", f / "zero-width.txt", "--out", o],
     [lambda f: f"{f / 'zero-width.txt'}:2", "no visible characters"]),
    ("prompt-set-file-without-file", lambda f, o: ["generate", "--prompt-set", "file", "--out", o],
     ["--prompt-set 'file'", "--prompts FILE"]),
    # -- recipes: numbers and confinement -------------------------------------------------------------------
    ("recipe-cfg-nan", lambda f, o: ["reproduce", _recipe(f, "cfgnan", "limit = 2", "limit = 2\ncfg = nan"), "--out", o],
     ["cfgnan.toml", "generate.cfg", "finite"]),
    ("recipe-beta-inf", lambda f, o: ["reproduce", _recipe(f, "betainf", "beta = 10.0", "beta = inf"), "--out", o],
     ["betainf.toml", "cells.spo.train.beta", "finite"]),
    ("recipe-hub-abs-path", lambda f, o: ["reproduce", _recipe(f, "hubabs", 'model = "random:0"', 'model = "hub:/etc"'),
                                          "--out", o], ["hubabs.toml", "model", "not a hub id"]),
    ("recipe-bare-scorer", lambda f, o: ["reproduce", _recipe(f, "bare", 'scorer = "metric:toy_aesthetic"',
                                                              'scorer = "spm"'), "--out", o],
     ["bare.toml", "cells.spo.train.scorer", "bare name"]),
    ("recipe-toy-clip-patch", lambda f, o: ["reproduce", _recipe(f, "patch", "[cells.base]",
                                                                 '[inputs.clip]\nkind = "toy-clip"\npatch = 64\n[cells.base]'),
                                            "--out", o], ["patch.toml", "inputs.clip.patch", "divide"]),
]


@pytest.mark.parametrize("make, names", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_value_is_one_named_line(files, tmp_path, make, names):
    out = tmp_path / "out"
    before = snapshot(out)
    r = run(*make(files, out), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert_clean_failure(r.returncode, r.stderr, [n(files) if callable(n) else n for n in names], out, before)


def test_cuda_that_is_not_there_is_one_line(files, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    r = run(*GEN, "--device", "cuda", "--out", out)
    assert r.returncode == 2
    assert_clean_failure(r.returncode, r.stderr, ["--device", "'cuda'", "CUDA is not available"], out, None)


def test_hub_id_shadowed_by_a_local_folder(files, tmp_path):
    """`hub:org/name` while ./org/name exists: the loader would read the folder, not the hub model."""
    (tmp_path / "org" / "name").mkdir(parents=True)
    recipe = _recipe(tmp_path, "shadow", 'model = "random:0"', 'model = "hub:org/name"')
    out = tmp_path / "out"
    r = run("reproduce", recipe, "--out", out, cwd=tmp_path)
    assert r.returncode == 2
    assert_clean_failure(r.returncode, r.stderr, ["shadow.toml", "hub:org/name", "current directory"], out, None)
