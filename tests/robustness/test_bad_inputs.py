"""The catalogue of bad inputs (issue 8, Robustness). Every item runs the command a user would run
and asserts the same contract: exit code != 0, ONE error line that names the offending input (file,
field or name), no traceback (``--debug`` shows one: tests/cli/test_cli.py), and no partial output:
the ``--out`` folder is absent afterwards, or unchanged when it existed before.

Items run through the installed executable (``clitools.run``), except the two that need a fault
injected into the process (a non-finite loss mid-run, a full disk): those call ``spobench.cli.main``
in-process with a monkeypatch, and an exception escaping ``main`` would be the traceback.

Covered in more depth elsewhere (the unit-level form of an item): prompt files
tests/data/test_prompts.py; recipe fields tests/reproduce/test_recipes.py (every field); trainer settings
tests/trainers/test_spo.py::test_bad_settings_name_the_field; parquet tables
tests/trainers/test_spm.py::test_bad_parquet_errors; model folders tests/models/backbones/test_loading.py;
LoRA files tests/models/backbones/test_lora.py; checkpoints tests/core/test_checkpoint.py; non-finite
loss tests/trainers/test_spo.py::test_non_finite_loss_stops_with_a_clear_error; an existing
training --out tests/trainers/test_train_cli.py.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from clitools import run
from contract import NOISE, assert_clean_failure, snapshot  # noqa: F401
from recipe_fixtures import write_recipe

slow = pytest.mark.slow
TRAIN = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
         "prompts=tiny-train", "prompt_limit=3", "epochs=1", "checkpoint_every=1", "scorer=metric:toy_aesthetic"]


def _sets(settings):
    return [a for s in settings for a in ("--set", s)]


# -- inputs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Prompt files, recipes and parquets (cheap)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spobench.toyworld.pairs import make_dataset

    root = tmp_path_factory.mktemp("bad-inputs")
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "huge.txt").write_text("a red circle\n" + "a blue square " * 400 + "\n")
    make_dataset(root / "pairs", n_pairs=8, seed=0)
    table = pq.read_table(root / "pairs" / "pairs.parquet")
    pq.write_table(table.drop(["jpg_1"]), root / "nocolumn.parquet")
    rows = table.to_pydict()
    rows["jpg_1"] = [b"\x89PNG but not really"] * len(rows["jpg_1"])
    pq.write_table(pa.table(rows, schema=table.schema), root / "undecodable.parquet")
    return root


def recipe(root: Path, name: str, old: str = "", new: str = "") -> Path:
    return write_recipe(root, name, old, new, title="bad-input catalogue")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """An SD-1.5-shaped folder, a copy missing its UNet, and a LoRA trained for that backbone."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd15_folder

    root = tmp_path_factory.mktemp("sd15")
    model = make_sd15_folder(root / "sd15")
    shutil.copytree(model, root / "sd15-no-unet")
    shutil.rmtree(root / "sd15-no-unet" / "unet")
    bb = load_backbone("sd15", str(model))
    bb.add_lora(4)
    bb.save_lora(root / "sd15-lora")
    return root


@pytest.fixture(scope="module")
def spo_run(finished_spo_run):
    """A finished one-round tiny SPO run (a checkpoint to resume from). Shared with the other
    robustness catalogue that asks for the same settings (tests/conftest.py)."""
    return finished_spo_run(TRAIN + ["max_rounds=1"])


def _copy_run(spo_run, tmp_path):
    shutil.copytree(spo_run, tmp_path / "run")
    return tmp_path / "run"


# -- the catalogue -------------------------------------------------------------------------------------
# id -> (needs, build(inputs, tmp_path) -> (argv, names in the error, --out folder))
def _items():
    return {
        # unknown names
        "unknown-trainer": (None, lambda f, t: (["train", "spoo", "--out", t / "o"], ["'spoo'"], t / "o")),
        "unknown-metric": (None, lambda f, t: (["eval", "--metrics", "pickscor", "--images", t, "--out", t / "o.json"],
                                               ["'pickscor'"], t / "o.json")),
        "unknown-recipe": (None, lambda f, t: (["reproduce", "tabel1", "--out", t / "o"], ["'tabel1'"], t / "o")),
        "unknown-backbone": (None, lambda f, t: (["generate", "--backbone", "sd2", "--prompt-set", "tiny-val",
                                                  "--out", t / "o"], ["'sd2'"], t / "o")),
        "unknown-prompt-set/generate": (None, lambda f, t: (["generate", "--prompt-set", "tiny-vall", "--out", t / "o"],
                                                            ["'tiny-vall'"], t / "o")),
        "unknown-prompt-set/train": ("slow", lambda f, t: (["train", "spo", "--out", t / "o", *_sets(TRAIN + ["prompts=tiny-trian"])],
                                                           ["'tiny-trian'"], t / "o")),
        # malformed recipe fields
        "recipe-wrong-type": (None, lambda f, t: (["reproduce", recipe(t, "wrongtype", "k = 4", 'k = "four"'),
                                                   "--out", t / "o"], ["wrongtype.toml", "cells.spo.train.k", "integer"], t / "o")),
        "recipe-unknown-key": (None, lambda f, t: (["reproduce", recipe(t, "unknownkey", "beta = 10.0", "betta = 10.0"),
                                                    "--out", t / "o"], ["unknownkey.toml", "'betta'"], t / "o")),
        "recipe-k-out-of-range": (None, lambda f, t: (["reproduce", recipe(t, "k1", "k = 4", "k = 1"), "--out", t / "o"],
                                                      ["k1.toml", "cells.spo.train.k", ">= 2"], t / "o")),
        "recipe-kappa-out-of-range": (None, lambda f, t: (["reproduce", recipe(t, "kappa", "kappa = 750", "kappa = 1000"),
                                                           "--out", t / "o"], ["kappa.toml", "train.kappa", "< 1000"], t / "o")),
        "recipe-beta-out-of-range": (None, lambda f, t: (["reproduce", recipe(t, "beta", "beta = 10.0", "beta = -1.0"),
                                                          "--out", t / "o"], ["beta.toml", "train.beta", "> 0"], t / "o")),
        "recipe-invalid-toml": (None, lambda f, t: (["reproduce", recipe(t, "toml", "[cells.base]", "[cells.base"),
                                                     "--out", t / "o"], ["toml.toml", "invalid TOML"], t / "o")),
        # trainer settings
        "set-unknown-key": (None, lambda f, t: (["train", "spo", "--out", t / "o", "--set", "betta=5"], ["'betta'"], t / "o")),
        "set-kappa-out-of-range": (None, lambda f, t: (["train", "spo", "--out", t / "o", "--set", "kappa=1000"],
                                                       ["'kappa'", "< 1000"], t / "o")),
        "set-beta-out-of-range": (None, lambda f, t: (["train", "spo", "--out", t / "o", "--set", "beta=0"],
                                                      ["'beta'", "> 0"], t / "o")),
        "config-file-wrong-type": (None, lambda f, t: (["train", "spo", "--out", t / "o", "--config", _toml(t, "k = 'four'")],
                                                       ["cfg.toml", "'k'", "integer"], t / "o")),
        # prompt files
        "prompts-empty": (None, lambda f, t: (["generate", "--prompts", f / "empty.txt", "--out", t / "o"],
                                              [f / "empty.txt", "no prompts"], t / "o")),
        "prompts-binary": (None, lambda f, t: (["generate", "--prompts", f / "binary.txt", "--out", t / "o"],
                                               [f / "binary.txt", "binary"], t / "o")),
        "prompts-huge-line": (None, lambda f, t: (["generate", "--prompts", f / "huge.txt", "--out", t / "o"],
                                                  [f"{f / 'huge.txt'}:2", "characters long"], t / "o")),
        "prompts-empty/train": ("slow", lambda f, t: (["train", "spo", "--out", t / "o", *_sets(TRAIN + [f"prompts={f / 'empty.txt'}"])],
                                                      [f / "empty.txt", "no prompts"], t / "o")),
        # Pick-a-Pic parquets
        "parquet-missing-column/dpo": ("slow", lambda f, t: (["train", "diffusion-dpo", "--out", t / "o", "--set",
                                                              f"pairs={f / 'nocolumn.parquet'}"],
                                                             [f / "nocolumn.parquet", "jpg_1"], t / "o")),
        "parquet-undecodable-image/dpo": ("slow", lambda f, t: (
            ["train", "diffusion-dpo", "--out", t / "o", *_sets([f"pairs={f / 'undecodable.parquet'}", "rollout_batch=4",
                                                               "train_batch_size=2", "grad_accum=1", "epochs=1"])],
            [f / "undecodable.parquet", "jpg_1", "not an image"], t / "o")),
        "parquet-missing-column/spm": ("slow", lambda f, t: (["train-spm", "--pairs", f / "nocolumn.parquet", "--init",
                                                              _clip(t), "--out", t / "o"],
                                                             [f / "nocolumn.parquet", "jpg_1"], t / "o")),
        "parquet-undecodable-image/spm": ("slow", lambda f, t: (["train-spm", "--pairs", f / "undecodable.parquet", "--init",
                                                                 _clip(t), "--steps", "2", "--batch-size", "2", "--out", t / "o"],
                                                                [f / "undecodable.parquet", "jpg_1", "not an image"],
                                                                t / "o")),
        "parquet-missing-column/toy-pickscore": ("slow", lambda f, t: (
            ["toy", "pickscore", "--pairs", f / "nocolumn.parquet", "--init", _clip(t), "--out", t / "o"],
            [f / "nocolumn.parquet", "jpg_1"], t / "o")),
        "parquet-undecodable-image/toy-pickscore": ("slow", lambda f, t: (
            ["toy", "pickscore", "--pairs", f / "undecodable.parquet", "--init", _clip(t), "--steps", "2",
             "--batch-size", "2", "--out", t / "o"],
            [f / "undecodable.parquet", "jpg_1", "not an image"], t / "o")),
        # models, LoRAs, checkpoints
        "model-folder-missing-unet": ("sd15", lambda s, t: (["generate", "--backbone", "sd15", "--model", s / "sd15-no-unet",
                                                             "--prompt-set", "tiny-val", "--out", t / "o"],
                                                            ["sd15-no-unet", "unet"], t / "o")),
        "lora-from-another-backbone": ("sd15", lambda s, t: (["generate", "--backbone", "tiny", "--lora", s / "sd15-lora",
                                                              "--prompt-set", "tiny-val", "--out", t / "o"],
                                                             [s / "sd15-lora", "tiny"], t / "o")),
        "resume-with-another-config": ("spo_run", lambda r, t: (["train", "spo", "--out", _copy_run(r, t), "--resume",
                                                                 "--set", "k=3"], ["'k'", "differs"], t / "run")),
        "resume-on-another-backbone": ("spo_run+sd15", lambda rs, t: (
            ["train", "spo", "--backbone", "sd15", "--model", rs[1] / "sd15", "--out", _copy_run(rs[0], t), "--resume"],
            ["checkpoint-000001", "backbone 'tiny'", "'sd15'"], t / "run")),
        # an existing output folder (an existing training --out: tests/trainers/test_train_cli.py)
        "existing-out/generate": (None, lambda f, t: (["generate", "--prompt-set", "tiny-val", "--out", _nonempty(t / "o")],
                                                      [t / "o", "--resume", "--overwrite"], t / "o")),
        "existing-out/train": ("spo_run", lambda r, t: (["train", "spo", "--out", _copy_run(r, t), *_sets(TRAIN)],
                                                        [t / "run", "--resume", "--overwrite"], t / "run")),
    }


def _toml(t: Path, text: str) -> Path:
    (t / "cfg.toml").write_text(text + "\n")
    return t / "cfg.toml"


def _nonempty(path: Path) -> Path:
    path.mkdir()
    (path / "00000.png").write_bytes(b"someone's image")
    return path


def _clip(t: Path) -> Path:
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder

    return make_tiny_clip_folder(t / "clip", seed=0, image_size=16, patch_size=4)


ITEMS = _items()


@pytest.mark.parametrize("item", [pytest.param(k, marks=[slow] if v[0] else []) for k, v in ITEMS.items()])
def test_bad_input(item, request, tmp_path):
    needs, build = ITEMS[item]
    if needs in (None, "slow"):
        inputs = request.getfixturevalue("files")
    elif "+" in needs:
        inputs = tuple(request.getfixturevalue(n) for n in needs.split("+"))
    else:
        inputs = request.getfixturevalue(needs)
    argv, names, out = build(inputs, tmp_path)
    before = snapshot(out)
    r = run(*argv)
    assert_clean_failure(r.returncode, r.stderr, names, out, before)


# -- faults injected in-process --------------------------------------------------------------------------
def _main(capsys, *argv) -> tuple[int, str]:
    from spobench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    return exit_.value.code, capsys.readouterr().err


@slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    from spobench.trainers.spo import SPOTrainer

    calls, loss = [], SPOTrainer.loss

    def nan_from_round_two(self, items, total):  # rounds hold 2 micro-batches: calls 3+ are round 2
        calls.append(1)
        value, stats = loss(self, items, total)
        return (value * float("nan") if len(calls) > 2 else value), stats

    monkeypatch.setattr(SPOTrainer, "loss", nan_from_round_two)
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "spo", "--out", out, *_sets(TRAIN))
    last = out / "checkpoints" / "checkpoint-000001"
    line = assert_clean_failure(code, err, ["non-finite loss", "round 1", str(last)], None, None)
    assert "last good checkpoint" in line
    assert (last / "manifest.json").is_file()  # kept, and nothing newer or final was written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-000001"]
    assert not (out / "lora").exists() and not (out / "summary.json").exists()


@slow
def test_nan_before_any_checkpoint_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    from spobench.trainers.spo import SPOTrainer

    loss = SPOTrainer.loss
    monkeypatch.setattr(SPOTrainer, "loss", lambda self, items, total: (lambda v: (v[0] * float("nan"), v[1]))(
        loss(self, items, total)))
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "spo", "--out", out, *_sets(TRAIN))
    assert_clean_failure(code, err, ["non-finite loss", "no checkpoint was written yet"], out, None)


def _full_disk_at(monkeypatch, marker: str) -> None:
    """fsync (where a full disk shows for buffered writes) fails with ENOSPC for files whose path
    contains ``marker``."""
    real = os.fsync

    def fsync(fd):
        if marker in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _no_temp_files(root: Path) -> None:
    left = [p for p in root.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not left, left


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
@slow
def test_disk_full_while_writing_a_checkpoint(tmp_path, capsys, monkeypatch):
    _full_disk_at(monkeypatch, ".checkpoint-000002.")
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "spo", "--out", out, *_sets(TRAIN))
    line = assert_clean_failure(code, err, [out / "checkpoints" / "checkpoint-000002", "No space left on device"],
                                None, None)
    assert "nothing partial" in line
    _no_temp_files(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001"]  # the last good one
    assert (out / "checkpoints" / "checkpoint-000001" / "manifest.json").is_file()
    monkeypatch.undo()
    r = run("train", "spo", "--out", out, *_sets(TRAIN), "--resume")  # space is back: the run continues
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
def test_disk_full_while_writing_an_image(tmp_path, capsys, monkeypatch):
    import json

    _full_disk_at(monkeypatch, ".00001.png.")
    out = tmp_path / "images"
    code, err = _main(capsys, "generate", "--prompt-set", "tiny-val", "--limit", "3", "--batch-size", "1",
                      "--steps", "2", "--out", out)
    assert_clean_failure(code, err, [out / "00001.png", "No space left on device"], None, None)
    _no_temp_files(out)
    # what is there is whole and resumable: image 0 and a manifest that lists only it
    assert sorted(p.name for p in out.iterdir() if p.name != ".spobench-out.json") == ["00000.png", "manifest.jsonl"]
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["00000.png"]
