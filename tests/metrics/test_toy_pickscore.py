"""toy_pickscore: the shipped tiny-world PickScore, its metric plugin and its training command."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clitools import run  # noqa: E402
from spobench.core import catalog  # noqa: E402
from spobench.core.errors import MissingWeightsError  # noqa: E402
from spobench.metrics import toy_pickscore as tp  # noqa: E402
from spobench.metrics.base import Metric, sha256_of  # noqa: E402
from spobench.toyworld import grammar as g  # noqa: E402
from spobench.toyworld.render import Knobs, render  # noqa: E402

PROMPTS = ["a red circle", "two green triangles", "a yellow square and a blue circle",
           "a large blue square on the left", "a red circle above a green triangle", "a large circle",
           "three purple squares", "a small orange triangle", "a cyan circle on the right", "a white square"]
SPOILED = Knobs(grain=0.8, blur=0.8, washout=0.8, color_shift=0.8, blobs=0.8, jagged=0.8, bg_tint=0.8)


def _images(prompts, knobs=Knobs()):
    return [Image.fromarray(render(g.parse(p), knobs, 100 + i)) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def metric():
    return catalog.METRICS.get("toy_pickscore")()


def test_registered_and_loads_shipped_weights(metric):
    cls = catalog.METRICS.get("toy_pickscore")
    assert cls is tp.ToyPickScore and issubclass(cls, Metric) and cls.needs_prompt
    assert metric.model_dir == tp.SHIPPED
    assert metric.checkpoint_sha256 == sha256_of(tp.SHIPPED / "model.safetensors")
    assert metric.identity().key().startswith("toy_pickscore@1#")
    info = json.loads((tp.SHIPPED / "toy_pickscore.json").read_text())
    assert info["eval"]["accuracy"] > 0.6 and "command" in info


def test_shipped_model_prefers_clean_renders(metric):
    clean = metric.score(_images(PROMPTS), PROMPTS).scores
    spoiled = metric.score(_images(PROMPTS, SPOILED), PROMPTS).scores
    assert clean.shape == spoiled.shape == (len(PROMPTS),) and np.isfinite(clean).all()
    assert clean.mean() > spoiled.mean() + 0.5
    assert (clean > spoiled).mean() >= 0.8


def test_deterministic_and_batch_size_independent(metric):
    images = _images(PROMPTS) + _images(PROMPTS[:5], SPOILED)
    prompts = PROMPTS + PROMPTS[:5]
    ref = metric.score(images, prompts).scores
    assert np.array_equal(ref, metric.score(images, prompts).scores)  # same call, same numbers
    again = tp.ToyPickScore(batch_size=metric.batch_size).score(images, prompts).scores  # fresh instance
    assert np.array_equal(ref, again)
    for bs in (1, 4, 7):
        other = tp.ToyPickScore(batch_size=bs).score(images, prompts).scores
        np.testing.assert_allclose(other, ref, rtol=0, atol=1e-5)
    # an image is scored on its own prompt, whatever else is in the batch
    single = metric.score(images[3:4], prompts[3:4]).scores
    np.testing.assert_allclose(single, ref[3:4], rtol=0, atol=1e-5)
    assert metric.score([], []).scores.shape == (0,)


def test_other_sizes_are_resized_to_32(metric):
    small = _images(PROMPTS[:3])
    big = [im.resize((64, 64), Image.Resampling.NEAREST) for im in small]
    a, b = metric.score(small, PROMPTS[:3]).scores, metric.score(big, PROMPTS[:3]).scores
    assert np.isfinite(b).all() and np.abs(a - b).max() < 2.0


def test_missing_weights_folder_gives_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match=r"toy_pickscore' needs config.json, model.safetensors.*"
                                                  r"spobench toy pickscore"):
        tp.ToyPickScore(weights=tmp_path / "nowhere")
    monkeypatch.setattr(tp, "SHIPPED", tmp_path / "not-shipped")
    with pytest.raises(MissingWeightsError, match="not-shipped"):
        catalog.METRICS.get("toy_pickscore")()


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    from spobench.toyworld.pairs import make_pairs

    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    make_pairs(48, 0, path)
    return path


def test_training_command_end_to_end(tiny_pairs, tmp_path):
    out = tmp_path / "run"
    r = run("toy", "pickscore", "--pairs", tiny_pairs, "--out", out, "--steps", 4, "--batch-size", 4,
            "--val-fraction", 0.3)
    assert r.returncode == 0, r.stderr
    assert "held-out pair accuracy" in r.stdout and "oracle aesthetic" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and len(m["config"]) and m["n_val_pairs"] > 0 and m["n_train_pairs"] > 0
    for ev in (m["eval_init"], m["eval"]):
        assert 0 <= ev["accuracy"] <= 1 and set(ev["oracle"]) == {"aesthetic", "alignment", "utility"}
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    # the run folder is a metric weights folder (run/model is a CLIPModel folder with its tokenizer)
    files = {p.name for p in (out / "model").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "toy_pickscore.json"} <= files
    assert "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files
    metric = tp.ToyPickScore(weights=out)
    assert metric.model_dir == out / "model"
    assert np.isfinite(metric.score(_images(PROMPTS[:2]), PROMPTS[:2]).scores).all()
    # a second run refuses the non-empty folder unless --overwrite
    r = run("toy", "pickscore", "--pairs", tiny_pairs, "--out", out, "--steps", 1)
    assert r.returncode == 2 and "--overwrite" in r.stderr


def test_training_is_deterministic(tiny_pairs, tmp_path):
    from spobench.toyworld.pickscore_train import train_toy_pickscore

    cfg = dict(steps=3, batch_size=4, hidden=16, layers=1, val_fraction=0.3, log_every=1)
    a = train_toy_pickscore(tiny_pairs, tmp_path / "a", cfg)
    b = train_toy_pickscore(tiny_pairs, tmp_path / "b", cfg)
    c = train_toy_pickscore(tiny_pairs, tmp_path / "c", cfg | {"seed": 1})
    assert a["eval"] == b["eval"] and a["train_loss_last"] == b["train_loss_last"]
    sha = {k: sha256_of(tmp_path / k / "model" / "model.safetensors") for k in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]
    # --init: continue from a CLIP folder
    d = train_toy_pickscore(tiny_pairs, tmp_path / "d", cfg | {"steps": 0}, init=tmp_path / "a" / "model")
    assert d["eval"] == a["eval"]


def test_evaluator_reports_the_three_toy_columns(tmp_path):
    from spobench.eval.evaluate import evaluate_folder

    rows = []
    for i, img in enumerate(_images(PROMPTS[:4])):
        img.save(tmp_path / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": PROMPTS[i], "prompt_index": i, "seed": i})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = ("toy_pickscore", "toy_aesthetic", "toy_alignment")
    res = evaluate_folder(tmp_path, {n: catalog.METRICS.get(n) for n in names})
    assert set(res["metrics"]) == set(names)
    assert np.isfinite(res["metrics"]["toy_pickscore"]["mean"])


def test_training_config_names_unknown_and_bad_settings(tmp_path):
    from spobench.core.errors import InputError
    from spobench.toyworld.pickscore_train import ToyPickScoreConfig, train_toy_pickscore

    with pytest.raises(InputError, match="unknown toy_pickscore training setting.*bogus"):
        ToyPickScoreConfig.from_dict({"bogus": 1, "lr": 1e-3})
    assert ToyPickScoreConfig.from_dict({"lr": 0.5}).lr == 0.5
    with pytest.raises(InputError, match="'batch_size' must be >= 1"):
        train_toy_pickscore(tmp_path / "none.parquet", tmp_path / "out", {"batch_size": 0})
    assert not (tmp_path / "out").exists()
