"""Tiny-world generic preference pairs (Pick-a-Pic format) and the tiny prompt sets."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spobench.core import catalog
from spobench.data.prompts import load_prompt_file
from spobench.toyworld import grammar as g
from spobench.toyworld import pairs as P
from spobench.toyworld.render import Knobs, render


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    stats = P.make_pairs(150, 0, path)
    return path, stats


def test_parquet_has_pickapic_columns_and_decodable_images(pairs_file):
    path, _ = pairs_file
    t = pq.read_table(path)
    assert t.num_rows == 150
    assert tuple(t.column_names[:7]) == P.PICKAPIC_COLUMNS
    assert set(P.ANALYSIS_COLUMNS) <= set(t.column_names)
    types = {f.name: f.type for f in t.schema}
    assert types["caption"] == pa.string()
    assert types["jpg_0"] == types["jpg_1"] == pa.binary()
    assert types["label_0"] == types["label_1"] == pa.float64()
    assert types["has_label"] == types["are_different"] == pa.bool_()
    rows = t.slice(0, 5).to_pylist()
    for r in rows:
        for k in ("jpg_0", "jpg_1"):
            im = Image.open(io.BytesIO(r[k]))
            assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"
    d = t.to_pydict()
    for l0, l1 in zip(d["label_0"], d["label_1"]):
        assert (l0, l1) in {(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)}
    assert all(d["has_label"]) and all(d["are_different"])
    assert all(a != b for a, b in zip(d["generator_0"], d["generator_1"]))
    assert all(g.split_of(c) == "train" for c in d["caption"])
    assert set(d["align_0"]) <= {0.0, 1.0}
    assert all(0 <= q <= 10 for q in d["aesth_0"] + d["aesth_1"])


def test_analysis_columns_match_the_oracles(pairs_file):
    from spobench.toyworld import oracle

    d = pq.read_table(pairs_file[0]).slice(0, 4).to_pydict()
    for i in range(4):
        img = np.asarray(Image.open(io.BytesIO(d["jpg_0"][i])))
        assert oracle.alignment(img, d["caption"][i])[0] == d["align_0"][i]
        assert oracle.aesthetic(img)[0] == pytest.approx(d["aesth_0"][i])


def test_label_stats_are_sane(pairs_file):
    _, s = pairs_file
    assert s["n_rows"] == 150 and s["n_labeled"] == 150
    assert 0.0 <= s["tie_rate"] <= 0.15
    assert 0.35 <= s["first_win_rate"] <= 0.65
    assert 0.15 <= s["disagreement_rate"] <= 0.6  # generic labels often pick the uglier image
    assert s["winner_less_aligned_rate"] < 0.2  # ... but rarely the less aligned one
    assert s["disagreement_rate"] + s["aesthetic_agreement_rate"] <= 1.0
    by = s["by_generator"]
    assert by["artist"]["aesthetic"] > by["literal"]["aesthetic"]
    assert by["literal"]["alignment"] > by["artist"]["alignment"]


def test_aesthetic_only_annotator_never_disagrees():
    lm = P.LabelModel(w_align=0.0, w_aesth=1.0, temperature=1e-6, label_noise=0.0, p_tie=0.0)
    s = P.make_pairs(30, 1, label_model=lm)
    assert s["disagreement_rate"] == 0.0 and s["tie_rate"] == 0.0


def test_pairs_are_deterministic():
    a = P.make_pairs(6, 3)["table"].to_pydict()
    b = P.make_pairs(6, 3)["table"].to_pydict()
    assert a == b
    c = P.make_pairs(6, 4)["table"].to_pydict()
    assert a["jpg_0"] != c["jpg_0"]


def test_extra_generator_hook_and_unlabeled_rows():
    calls = []

    def base_model(prompts, seed):
        calls.append((list(prompts), seed))
        return [render(g.parse(p), Knobs(blur=0.5), i) for i, p in enumerate(prompts)]

    s = P.make_pairs(20, 2, extra_generator=base_model, p_extra=0.5, p_unlabeled=0.3)
    d = s["table"].to_pydict()
    n_extra = sum(x == "extra" for x in d["generator_0"] + d["generator_1"])
    assert len(calls) == 1 and len(calls[0][0]) == n_extra > 0
    assert not any(a == b == "extra" for a, b in zip(d["generator_0"], d["generator_1"]))
    assert "extra" in s["by_generator"]
    assert 0 < s["n_labeled"] < 20

    with pytest.raises(ValueError, match="returned"):
        P.make_pairs(4, 2, extra_generator=lambda prompts, seed: [], p_extra=1.0)


def test_prompt_lists_files_and_loaders(tmp_path):
    paths = P.write_prompt_lists(tmp_path)
    train = json.loads(paths["train"].read_text())
    assert len(train) == 4000 and train[0].keys() == {"caption", "trainset_idx"}
    assert [r["trainset_idx"] for r in train] == list(range(4000))
    assert [r["caption"] for r in train] == P.tiny_train_prompts() == load_prompt_file(paths["train"])
    val = json.loads(paths["val"].read_text())
    assert val == P.tiny_val_prompts() == load_prompt_file(paths["val"]) and len(val) == 500
    assert catalog.PROMPT_SETS.get("tiny-val")() == val
    assert catalog.PROMPT_SETS.get("tiny-train")() == [r["caption"] for r in train]


def test_make_dataset_writes_everything(tmp_path):
    s = P.make_dataset(tmp_path / "ds", n_pairs=4, seed=0)
    for f in ("pairs.parquet", "train_prompts.json", "val_prompts.json", "stats.json"):
        assert (tmp_path / "ds" / f).exists()
    assert json.loads((tmp_path / "ds" / "stats.json").read_text())["n_pairs"] == 4 == s["n_rows"]
