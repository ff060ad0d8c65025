"""SPM training on Pick-a-Pic-format pairs with a fake backbone and a tiny CLIP."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fakes import FakeBackbone
from pickapic_fixtures import write_pairs

from spobench.core.checkpoint import latest_checkpoint
from spobench.trainers import spm as spm_train
from spobench.core.errors import InputError
from spobench.models.spm import StepAwarePreferenceModel
from spobench.toyworld.tiny_clip import make_tiny_clip_folder
from spobench.trainers.spm import SPMTrainConfig, train_spm
from spobench.data.pairs import BatchOrder, PairTable, split_rows

BUCKETS = ["0", "250", "500", "750", "950"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-train")
    clip = make_tiny_clip_folder(root / "tiny-clip", seed=5, image_size=16, patch_size=4)
    pairs = write_pairs(root / "pairs.parquet", row_group_size=6)
    return {"clip": clip, "pairs": pairs, "root": root}


def _cfg(**kw):
    base = dict(steps=24, batch_size=8, lr=1e-3, seed=0, val_fraction=0.0, eval_batch_size=16, log_every=4,
                save_every=0)
    base.update(kw)
    return base


def test_training_lowers_loss_and_reports_buckets(world, tmp_path):
    bb = FakeBackbone()
    out = tmp_path / "run"
    cfg = _cfg(val_pairs=str(world["pairs"]), eval_init=True)  # evaluate on the training pairs themselves
    res = train_spm(bb, world["pairs"], world["clip"], out, cfg)
    assert res["variant"] == "spm"
    ev0, ev = res["eval_init"], res["eval"]
    assert ev["n_pairs"] == 14  # ties excluded
    assert list(ev["accuracy"]) == BUCKETS
    assert all(0 <= a <= 1 for a in ev["accuracy"].values())
    assert res["train_loss_last"] < res["train_loss_first"]
    # the evaluation loss goes down (averaged over buckets and at the near-clean one), and the
    # brighter image wins wherever x0_hat still shows it
    assert np.mean(list(ev["loss"].values())) < 0.7 * np.mean(list(ev0["loss"].values()))
    assert ev["loss"]["0"] < ev0["loss"]["0"]
    assert ev["accuracy"]["0"] >= 0.8 and ev["accuracy"]["250"] >= ev0["accuracy"]["250"]
    # outputs
    assert json.loads((out / "metrics.json").read_text())["eval"] == json.loads(json.dumps(ev))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    model = StepAwarePreferenceModel.load(out / "spm")
    assert model.time_conditioned
    assert res["counters"]["unet_rows_nograd"] > 0 and res["counters"]["reward_image_passes"] > 0


def test_no_step_and_plain_pickscore_variants(world, tmp_path):
    bb = FakeBackbone()
    res = train_spm(bb, world["pairs"], world["clip"], tmp_path / "nostep", _cfg(steps=4, no_step=True))
    assert res["variant"] == "spm-no-step"
    assert not StepAwarePreferenceModel.load(tmp_path / "nostep" / "spm").time_conditioned
    # Table 5's third row: the plain CLIP (PickScore) with no step training, evaluated only
    val = str(world["pairs"])
    res0 = train_spm(bb, world["pairs"], world["clip"], tmp_path / "plain", _cfg(steps=0, no_step=True, val_pairs=val))
    assert res0["variant"] == "pickscore" and res0["losses"] == [] and res0["steps"] == 0
    assert list(res0["eval"]["accuracy"]) == BUCKETS and res0["eval"]["n_pairs"] == 14
    # a time-conditioned SPM at init scores exactly like the plain CLIP, on the same x0_hat
    res1 = train_spm(bb, world["pairs"], world["clip"], tmp_path / "init", _cfg(steps=0, val_pairs=val))
    assert res1["eval"] == res0["eval"]


def test_resume_continues_exactly(world, tmp_path):
    full = train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / "a", _cfg(steps=6, log_every=1))
    part = train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / "b", _cfg(steps=3, log_every=1))
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-000003"
    with pytest.raises(InputError, match="--resume or --overwrite"):
        train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / "b", _cfg(steps=6))
    resumed = train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / "b", _cfg(steps=6, log_every=1),
                        resume=True)
    np.testing.assert_allclose(resumed["losses"], full["losses"], rtol=1e-4, atol=1e-5)
    assert resumed["losses"][:3] == part["losses"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_parquet_errors(world, tmp_path):
    bb = FakeBackbone()
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"1"], "label_0": [1.0], "label_1": [0.0]}), missing)
    with pytest.raises(InputError) as e:
        PairTable(missing)
    assert str(missing) in str(e.value) and "jpg_1" in str(e.value)

    good = write_pairs(tmp_path / "ok.parquet", n=4, ties=0)
    t = pq.read_table(good).to_pydict()
    t["jpg_1"][2] = b"definitely not an image"
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table(t), broken)
    with pytest.raises(InputError) as e:
        train_spm(bb, broken, world["clip"], tmp_path / "run", _cfg(steps=2, batch_size=4))
    assert str(broken) in str(e.value) and "jpg_1" in str(e.value) and "row 2" in str(e.value)

    t = pq.read_table(good).to_pydict()
    t["label_0"][1] = 0.7
    bad_labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table(t), bad_labels)
    with pytest.raises(InputError, match="row 1"):
        PairTable(bad_labels)
    with pytest.raises(InputError, match="not found"):
        PairTable(tmp_path / "nope.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="junk.parquet"):
        PairTable(tmp_path / "junk.parquet")


def test_split_and_order_are_deterministic(world):
    pairs = PairTable(world["pairs"])
    assert len(pairs) == 16 and pairs.is_tie(15) and not pairs.is_tie(0)
    train, val = split_rows(pairs, 0.25)
    assert val and train and not set(train) & set(val)
    assert not {pairs.captions[i] for i in train} & {pairs.captions[i] for i in val}
    assert split_rows(pairs, 0.25) == (train, val)
    o1 = BatchOrder(pairs, train, 4, seed=0)
    o2 = BatchOrder(pairs, train, 4, seed=0)
    assert [o1.batch(s) for s in range(5)] == [o2.batch(s) for s in range(5)]
    epoch = [r for s in range(len(train) // 4) for r in o1.batch(s)] if len(train) % 4 == 0 else None
    if epoch is not None:
        assert sorted(epoch) == sorted(train)
    img = pairs.image(0, "jpg_0", 8)
    assert img.shape == (3, 8, 8) and 0 <= img.min() and img.max() <= 1


def test_x0_estimate_shares_noise_within_a_pair(world):
    """Both images of a pair get the same t and noise: identical images give identical x0_hat."""
    bb = FakeBackbone()
    img = torch.rand(2, 3, 8, 8)
    images = torch.cat([img, img])
    t = torch.tensor([10, 700])
    x0 = spm_train.estimate_x0_images(bb, images, ["a", "b"], t, torch.Generator().manual_seed(0))
    assert x0.shape == (4, 3, 8, 8)
    torch.testing.assert_close(x0[:2], x0[2:])
    # near t = 0 the estimate is close to the clean image
    assert (x0[0] - img[0]).abs().mean() < 0.05


def test_cli_command(world, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from spobench.cli import app

    monkeypatch.setattr("spobench.models.backbones.load_backbone", lambda *a, **k: FakeBackbone())
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["train-spm", "--pairs", str(world["pairs"]), "--init", str(world["clip"]),
                                 "--out", str(out), "--steps", "2", "--batch-size", "4", "--no-step",
                                 "--time-lr-mult", "2"])
    assert r.exit_code == 0, r.output
    assert "t= 950" in r.output and (out / "spm" / "spm_config.json").exists()
    res = json.loads((out / "metrics.json").read_text())
    assert res["variant"] == "spm-no-step" and res["config"]["batch_size"] == 4
    assert res["config"]["time_lr_mult"] == 2


def test_config_rejects_unknown_settings():
    with pytest.raises(InputError, match="bogus"):
        SPMTrainConfig.from_dict({"bogus": 1})
    assert SPMTrainConfig().lr_for("sd15") == 3e-6 and SPMTrainConfig().lr_for("sdxl") == 1e-6
    assert SPMTrainConfig(lr=0.5).lr_for("sdxl") == 0.5


@pytest.mark.parametrize("values, message", [
    ({"lr": -1.0}, "SPM training setting 'lr' must be > 0 (got -1.0)"),  # gradient ascent
    ({"lr": float("nan")}, "SPM training setting 'lr' must be a finite number (got nan)"),
    ({"time_lr_mult": float("inf")}, "setting 'time_lr_mult' must be a finite number"),
    ({"max_grad_norm": -1.0}, "setting 'max_grad_norm' must be >= 0"),
    ({"val_fraction": 1.0}, "setting 'val_fraction' must be < 1"),
    ({"steps": -1}, "setting 'steps' must be >= 0 (got -1)"),
    ({"steps": 2.5}, "setting 'steps' must be an integer (got 2.5)"),
    ({"lr": "fast"}, "setting 'lr' must be a number (got 'fast')"),
    ({"learning_rat": 1e-4}, "unknown SPM training setting 'learning_rat'"),
])
def test_config_checks_every_number(values, message):
    with pytest.raises(InputError) as e:
        SPMTrainConfig.from_dict(values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_toy_pickscore_config_checks_the_clip_shape():
    from spobench.toyworld.pickscore_train import ToyPickScoreConfig

    with pytest.raises(InputError, match="setting 'patch' must divide the image size 32 \\(got 64\\)"):
        ToyPickScoreConfig.from_dict({"patch": 64})
    with pytest.raises(InputError, match="setting 'lr' must be a finite number"):
        ToyPickScoreConfig.from_dict({"lr": float("nan")})


def test_time_lr_mult_speeds_up_only_the_time_conditioning(world, tmp_path):
    init = StepAwarePreferenceModel.from_clip(world["clip"])
    start = {n: p.detach().clone() for n, p in init.named_parameters()}
    moved = {}
    for mult in (1.0, 10.0):
        train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / f"m{mult}",
                  _cfg(steps=3, lr=1e-4, time_lr_mult=mult, max_grad_norm=0))
        m = StepAwarePreferenceModel.load(tmp_path / f"m{mult}" / "spm")
        delta = {n: float((p.detach() - start[n]).abs().max()) for n, p in m.named_parameters()}
        # the zero-initialised modulation heads (the embedder MLP's random init differs per instance)
        zero = [n for n, p in start.items() if not n.startswith("clip.") and not p.any()]
        assert zero
        moved[mult] = (max(delta[n] for n in zero), max(v for n, v in delta.items() if n.startswith("clip.")))
    # Adam's step is about lr per parameter: 10x the lr moves the time layers about 10x as far, the CLIP alike
    assert moved[10.0][0] > 5 * moved[1.0][0]
    assert moved[10.0][1] == pytest.approx(moved[1.0][1], rel=0.5)
    with pytest.raises(InputError, match="time_lr_mult"):
        train_spm(FakeBackbone(), world["pairs"], world["clip"], tmp_path / "bad", _cfg(time_lr_mult=0))
