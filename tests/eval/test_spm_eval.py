"""Paired held-out comparison of preference models (spobench eval-spm)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FakeBackbone
from pickapic_fixtures import write_pairs

from spobench.core.errors import InputError
from spobench.toyworld.tiny_clip import make_tiny_clip_folder
from spobench.eval.spm_eval import compare_spms, held_out_rows, load_scorer, paired_difference
from spobench.trainers.spm import train_spm
from spobench.data.pairs import PairTable

BUCKETS = ["0", "250", "500", "750", "950"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-eval")
    clip = make_tiny_clip_folder(root / "clip", seed=2, image_size=16, patch_size=4)
    train = write_pairs(root / "train.parquet", n=24, seed=0, ties=0)
    test = write_pairs(root / "test.parquet", n=20, seed=3, ties=2, caption=[f"held-out pair {i}" for i in range(20)])
    # the SPM learns "the brighter image wins"; this random CLIP (seed 2) prefers the darker one at t = 0
    train_spm(FakeBackbone(), train, clip, root / "run",
              dict(steps=24, batch_size=8, lr=1e-3, seed=0, val_fraction=0.0, log_every=0, save_every=0))
    return {"clip": clip, "train": train, "test": test, "spm": root / "run" / "spm", "root": root}


def test_paired_difference_by_hand():
    a = np.array([1.0, 1.0, 0.0, 1.0, 0.5])
    b = np.array([0.0, 1.0, 0.0, 0.0, 0.5])
    d = paired_difference(a, b, np.arange(5), n_boot=200)
    assert d["diff"] == pytest.approx(0.4)
    assert (d["a_only"], d["b_only"]) == (2, 0)
    assert d["mcnemar_p"] == pytest.approx(0.5)  # two discordant pairs, both for a: 2 * 0.5**2
    assert d["ci95"][0] <= 0.4 <= d["ci95"][1]
    same = paired_difference(a, a, np.arange(5), n_boot=200)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0] and same["mcnemar_p"] == 1.0


def test_held_out_rows_leave_out_training_captions(world, tmp_path):
    test = PairTable(world["test"])
    assert held_out_rows(test) == list(range(len(test)))
    overlap = write_pairs(tmp_path / "overlap.parquet", n=4, seed=9, ties=0, caption=test.captions[:4])
    assert held_out_rows(test, [overlap]) == list(range(4, len(test)))


def test_compare_is_paired_and_finds_the_trained_model(world):
    res = compare_spms(FakeBackbone(), [world["clip"], world["spm"]], world["test"], exclude=[world["train"]],
                       n_boot=300)
    assert res["n_pairs"] == 18 and res["reference"] == str(world["clip"])  # 20 pairs, 2 ties
    plain, spm = res["models"][str(world["clip"])], res["models"][str(world["spm"])]
    assert not plain["time_conditioned"] and spm["time_conditioned"]
    vs = spm["vs_reference"]
    for t, d in vs["per_t"].items():
        assert d["diff"] == pytest.approx(spm["accuracy"][t] - plain["accuracy"][t])
        got = np.asarray(spm["outcome"][t]) - np.asarray(plain["outcome"][t])
        assert (d["a_only"], d["b_only"]) == (int((got > 0).sum()), int((got < 0).sum()))
    assert vs["mean"]["diff"] == pytest.approx(spm["mean_accuracy"] - plain["mean_accuracy"])
    assert plain["accuracy"]["0"] <= 0.2 and spm["accuracy"]["0"] >= 0.8
    assert vs["per_t"]["0"]["ci95"][0] > 0 and vs["per_t"]["0"]["mcnemar_p"] < 0.01
    mean_diff = np.mean([spm["outcome"][t] for t in BUCKETS], 0) - np.mean([plain["outcome"][t] for t in BUCKETS], 0)
    assert (vs["mean"]["a_only"], vs["mean"]["b_only"]) == (int((mean_diff > 0).sum()), int((mean_diff < 0).sum()))
    assert "vs_reference" not in plain and len(res["rows"]) == 18


def test_compare_rejects_bad_input(world, tmp_path):
    with pytest.raises(InputError, match="given twice"):
        compare_spms(FakeBackbone(), [world["clip"], world["spm"], world["clip"]], world["test"])
    with pytest.raises(InputError, match="not a folder"):
        compare_spms(FakeBackbone(), [tmp_path / "nope"], world["test"])
    with pytest.raises(InputError, match="no non-tie pair"):
        compare_spms(FakeBackbone(), [world["clip"]], world["test"], exclude=[world["test"]])
    with pytest.raises(InputError, match="pairs parquet not found"):
        compare_spms(FakeBackbone(), [world["clip"]], tmp_path / "missing.parquet")
    assert not load_scorer(world["clip"]).time_conditioned


def test_cli_writes_json_and_table(world, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spobench.cli import app

    monkeypatch.setattr("spobench.models.backbones.load_backbone", lambda *a, **k: FakeBackbone())
    out = tmp_path / "cmp.json"
    r = CliRunner().invoke(app, ["eval-spm", str(world["clip"]), str(world["spm"]), "--pairs", str(world["test"]),
                                 "--exclude", str(world["train"]), "--timesteps", "0,500", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["eval_timesteps"] == [0, 500] and list(res["models"][str(world["spm"])]["accuracy"]) == ["0", "500"]
    assert "McNemar" in r.output and "t=500" in r.output
    for ts, msg in (("0,x", "comma-separated integers"), ("5000", "must lie in")):
        bad = CliRunner().invoke(app, ["eval-spm", str(world["clip"]), "--pairs", str(world["test"]), "--timesteps", ts])
        assert isinstance(bad.exception, InputError) and msg in str(bad.exception)


def test_installed_command_reports_a_missing_parquet(world, tmp_path):
    from clitools import run

    r = run("eval-spm", world["clip"], "--pairs", tmp_path / "nope.parquet")
    assert r.returncode != 0 and "nope.parquet: pairs parquet not found" in r.stderr + r.stdout


def test_scoring_several_models_at_once_equals_one_at_a_time(world):
    from spobench.trainers.spm import SPMTrainConfig, evaluate_spm, evaluate_spms

    bb, pairs = FakeBackbone(), PairTable(world["test"])
    cfg = SPMTrainConfig(eval_batch_size=5, eval_timesteps=(0, 750))
    models = [load_scorer(world["clip"]), load_scorer(world["spm"])]
    seen = []
    joint = evaluate_spms(bb, models, pairs, range(len(pairs)), cfg, 8, per_pair=True,
                          progress=lambda done, total: seen.append((done, total)))
    alone = [evaluate_spm(bb, m, pairs, range(len(pairs)), cfg, 8, per_pair=True) for m in models]
    assert joint == alone and joint[0] != joint[1]
    assert seen == [(5, 18), (10, 18), (15, 18), (18, 18)]
