"""Pick-a-Pic as published (issue 13 part 3): shards in EXACTLY the published schema with real JPEG
bytes, several row groups, a folder of two shards; ties and unlabelled rows counted and dropped;
broken images, absurd image sizes, missing columns and damaged files named; images read a row group
at a time with a column projection; both trainers consume such a folder through the installed CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from clitools import run
from spobench.data import pairs as pairs_data
from spobench.core.errors import InputError
from spobench.data.pairs import PICKAPIC_COLUMNS, PairTable, split_rows, write_shard
from pickapic_fixtures import COLORS, shard_columns

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """train-00000-of-00002.parquet (7 rows, row groups of 3) and train-00001 (5 rows): 12 rows,
    2 ties, 2 unlabelled."""
    root = tmp_path_factory.mktemp("pickapic") / "pickapic_v2"
    root.mkdir()
    write_shard(root / "train-00000-of-00002.parquet", shard_columns(7, 0, ties=[2], unlabelled=[5]), 3)
    write_shard(root / "train-00001-of-00002.parquet", shard_columns(5, 7, ties=[0], unlabelled=[4]), 3)
    return root


def test_schema_is_the_published_one(shards):
    pf = pq.ParquetFile(sorted(shards.glob("*.parquet"))[0])
    assert tuple(pf.schema_arrow.names) == PICKAPIC_COLUMNS and len(PICKAPIC_COLUMNS) == 18
    assert pf.num_row_groups == 3 and str(pf.schema_arrow.field("jpg_0").type) == "binary"


def test_folder_of_shards_rows_counts_and_labels(shards):
    pairs = PairTable(shards)
    assert len(pairs) == 12 and len(pairs.files) == 2
    assert pairs.captions[7] == "prompt 7" and pairs.loc[7].tolist() == [1, 0, 0, 0]  # second shard, row 0
    rows, counts = pairs.usable(keep_ties=False)
    assert counts == {"rows": 12, "unlabeled": 2, "ties": 2, "used": 8}
    assert 2 not in rows and 7 not in rows and 5 not in rows and 11 not in rows
    rows_t, counts_t = pairs.usable(keep_ties=True)
    assert counts_t["used"] == 10 and 2 in rows_t and 7 in rows_t and 5 not in rows_t
    assert pairs.describe(counts, False) == "pairs: 8 of 12 rows (2 ties dropped, 2 unlabeled)"
    assert pairs.usable(False, limit=3)[0] == rows[:3]
    # label_0 = 1 means jpg_0 is preferred; images decode to the colours written
    a, b = pairs.images([0, 8], 16)
    assert a.shape == b.shape == (2, 3, 16, 16)
    for img, colour in ((a[0], COLORS[0]), (b[0], COLORS[1]), (a[1], COLORS[2]), (b[1], COLORS[3])):
        assert np.allclose(img.mean((1, 2)).numpy() * 255, colour, atol=6)
    assert pairs.labels[[0, 8, 9]].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert pairs.image_size(0, "jpg_0") == (48, 40) and pairs.image_size(0, "jpg_1") == (40, 56)


def test_split_keeps_only_usable_rows(shards):
    pairs = PairTable(shards)
    rows, _ = pairs.usable(keep_ties=True)
    train, val = split_rows(pairs, 0.3, rows)
    assert sorted(train + val) == rows and val
    assert not {pairs.captions[i] for i in train} & {pairs.captions[i] for i in val}


def test_images_stream_by_row_group_with_a_projection(shards, monkeypatch):
    """Opening reads only the small columns; images are read one row group at a time, at most
    CACHED_GROUPS held, never a whole shard."""
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *a, **k):
        calls.append((tuple(k.get("columns") or ()), k.get("row_groups")))
        return real(self, *a, **k)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    pairs = PairTable(shards)
    assert calls and all("jpg_0" not in cols and "jpg_1" not in cols for cols, _ in calls)
    assert not pairs._groups
    calls.clear()
    for i in range(len(pairs)):
        pairs.image(i, "jpg_1", 8)
        assert len(pairs._groups) <= pairs_data.CACHED_GROUPS
    assert all(set(cols) == {"jpg_0", "jpg_1"} and len(groups) == 1 for cols, groups in calls)
    assert sorted(g[0] for _, g in calls) == [0, 0, 1, 1, 2]  # each row group once (3 + 2 of them)


def test_broken_jpeg_names_shard_and_row(tmp_path):
    cols = shard_columns(5)
    cols["jpg_1"][4] = cols["jpg_1"][4][: len(cols["jpg_1"][4]) // 2]  # truncated JPEG body
    f = tmp_path / "train-00000.parquet"
    write_shard(f, cols, 2)
    pairs = PairTable(f)
    pairs.images([0, 1, 2, 3], 8)
    with pytest.raises(InputError) as e:
        pairs.image(4, "jpg_1", 8)
    assert str(f) in str(e.value) and "column jpg_1 row 4" in str(e.value)
    cols["jpg_0"][1] = b"\xff\xd8 not a jpeg"
    write_shard(f, cols, 2)
    with pytest.raises(InputError, match="column jpg_0 row 1: (truncated or corrupt|not a readable|not an image)"):
        PairTable(f).image(1, "jpg_0", 8)


def test_absurd_image_refused_before_decoding(tmp_path, monkeypatch):
    """Issue 14: a 4 KB 1 x 1,000,000 PNG must not be decoded (it resizes to 32 x 32,000,000)."""
    from PIL import Image, ImageFile

    buf = io.BytesIO()
    Image.new("L", (1_000_000, 1)).save(buf, format="PNG")
    bomb = buf.getvalue()
    assert len(bomb) < 8192
    cols = shard_columns(3)
    cols["jpg_0"][2] = bomb
    f = tmp_path / "bomb.parquet"
    write_shard(f, cols)

    def no_decode(self, *a, **k):
        raise AssertionError("decoded")

    buf = io.BytesIO()
    Image.new("1", (7000, 7000)).save(buf, format="PNG")
    square = buf.getvalue()
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    pairs = PairTable(f)
    for call in (lambda: pairs.image(2, "jpg_0", 32), lambda: pairs.image_size(2, "jpg_0")):
        with pytest.raises(InputError) as e:
            call()
        assert str(f) in str(e.value) and "row 2" in str(e.value) and "1000000 x 1" in str(e.value)
    with pytest.raises(InputError, match="49,000,000 pixels, more than"):  # too many pixels, however square
        pairs_data.image_size(square, "x")


def test_bad_files_are_named(tmp_path, shards):
    f = tmp_path / "nolabel.parquet"
    cols = shard_columns(2)
    write_shard(f, cols)
    t = pq.read_table(f)
    pq.write_table(t.drop(["label_1"]), f)
    with pytest.raises(InputError) as e:
        PairTable(f)
    assert str(f) in str(e.value) and "label_1" in str(e.value)

    good = sorted(shards.glob("*.parquet"))[0].read_bytes()
    cut = tmp_path / "truncated.parquet"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="truncated.parquet: not a readable parquet"):
        PairTable(cut)
    junk = tmp_path / "folder"
    junk.mkdir()
    (junk / "a.parquet").write_bytes(good)
    (junk / "b.parquet").write_text("caption,jpg_0\nnot,a parquet\n")
    with pytest.raises(InputError, match="b.parquet: not a readable parquet"):
        PairTable(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no \\*.parquet"):
        PairTable(tmp_path / "empty")


def test_labelled_rows_are_checked_unlabelled_are_not(tmp_path):
    cols = shard_columns(4, unlabelled=[1])
    cols["label_0"][3], cols["label_1"][3] = 0.7, 0.7
    f = tmp_path / "labels.parquet"
    write_shard(f, cols)
    with pytest.raises(InputError, match="labels.parquet: row 3: label_0 \\+ label_1"):
        PairTable(f)


# -- both trainers through the installed CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("pickapic-model") / "tiny-model")


@pytest.mark.slow  # ~30 s on the shared machine
def test_train_spm_reads_a_folder_of_shards(shards, tmp_path):
    out = tmp_path / "spm"
    r = run("train-spm", "--pairs", shards, "--out", out, "--backbone", "tiny", "--steps", "2", "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs: 10 of 12 rows (2 ties kept, 2 unlabeled)" in r.stderr
    res = json.loads((out / "metrics.json").read_text())
    assert res["pairs"] == {"rows": 12, "unlabeled": 2, "ties": 2, "used": 10}
    assert res["n_train_pairs"] + res["n_val_pairs"] == 10 and len(res["losses"]) == 2
    assert all(np.isfinite(res["losses"])) and (out / "spm" / "spm_config.json").exists()


@pytest.mark.slow
def test_train_diffusion_dpo_reads_a_folder_of_shards(shards, tiny_model, tmp_path):
    out = tmp_path / "dpo"
    sets = [f"pairs={shards}", "rollout_batch=4", "train_batch_size=2", "grad_accum=1", "epochs=1", "max_rounds=1"]
    r = run("train", "diffusion-dpo", "--backbone", "tiny", "--model", tiny_model, "--out", out,
            *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs: 8 of 12 rows (2 ties dropped, 2 unlabeled)" in r.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x for x in rows if x.get("kind") == "train"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_image_feature_structs_are_read(tmp_path):
    """Shards re-saved by `datasets` with the Image feature store {bytes, path} structs."""
    import pyarrow as pa

    cols = shard_columns(3)
    t = pq.read_table(_write(tmp_path / "plain.parquet", cols))
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for c in ("jpg_0", "jpg_1"):
        arr = pa.array([{"bytes": b, "path": None} for b in cols[c]], type=struct)
        t = t.set_column(t.schema.get_field_index(c), c, arr)
    pq.write_table(t, tmp_path / "struct.parquet")
    pairs = PairTable(tmp_path / "struct.parquet")
    a, _ = pairs.images([1], 8)
    assert np.allclose(a[0].mean((1, 2)).numpy() * 255, COLORS[1], atol=6)


def _write(path, cols):
    write_shard(path, cols)
    return path
