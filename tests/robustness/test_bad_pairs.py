"""Bad Pick-a-Pic shards through the installed CLI (issue 13 part 3, issue 14 "input that costs far
more than it looks"): for `train-spm` and `train diffusion-dpo`, each case asserts the bad-input
contract (tests/contract.py): exit code 2, ONE error line naming the shard file (and column/row where
there is one), no traceback, and no --out folder left behind.

The shards are written in the published schema (``spobench.data.pairs.write_shard``) with real JPEG
bytes; each case spoils one thing in a folder of two good-looking shards."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clitools import run
from contract import assert_clean_failure, snapshot
from pickapic_fixtures import shard_columns
from spobench.data.pairs import write_shard

slow = pytest.mark.slow


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, name: str, spoil) -> tuple[Path, Path]:
    """A folder of two shards; ``spoil(columns)`` edits the second one's columns (or returns the
    bytes to write instead). Returns (folder, the spoiled shard)."""
    folder = root / name
    folder.mkdir()
    write_shard(folder / "train-00000-of-00002.parquet", shard_columns(4), 2)
    bad = folder / "train-00001-of-00002.parquet"
    cols = shard_columns(4, 4)
    out = spoil(cols, folder)
    if isinstance(out, bytes):
        bad.write_bytes(out)
    elif out != "skip":
        write_shard(bad, cols, 2)
    return folder, bad


def _broken_jpeg(c, _):
    c["jpg_1"][3] = c["jpg_1"][3][:200]


def _garbage_jpeg(c, _):
    c["jpg_0"][2] = b"\xff\xd8\xff\xe0 this is not the rest of a JPEG"


def _bomb(c, _):
    c["jpg_0"][3] = _png(1_000_000, 1)  # ~1 KB; decoded and resized it would be 32 x 32,000,000


def _no_label_1(c, folder):
    write_shard(folder / "tmp.parquet", c, 2)
    t = pq.read_table(folder / "tmp.parquet").drop(["label_1"])
    (folder / "tmp.parquet").unlink()
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def _truncated(c, folder):
    write_shard(folder / "tmp.parquet", c, 2)
    data = (folder / "tmp.parquet").read_bytes()
    (folder / "tmp.parquet").unlink()
    return data[: len(data) * 2 // 3]


def _not_parquet(c, _):
    return b"caption,jpg_0,jpg_1\na cat,xx,yy\n"


def _bad_label(c, _):
    c["label_0"][1], c["label_1"][1] = 0.7, 0.7


def _null_caption(c, _):
    c["caption"][2] = None


def _all_unusable(c, folder):
    for f in folder.glob("*.parquet"):
        f.unlink()
    c["has_label"] = [False] * 4  # and a folder of one shard


# name: (spoil, words the error names besides the shard file)
CASES = {
    "broken-jpeg": (_broken_jpeg, ["column jpg_1 row 3", "image"]),
    "garbage-jpeg": (_garbage_jpeg, ["column jpg_0 row 2"]),
    "png-1x1000000": (_bomb, ["column jpg_0 row 3", "1000000 x 1"]),
    "missing-column": (_no_label_1, ["label_1"]),
    "truncated-parquet": (_truncated, ["not a readable parquet"]),
    "not-a-parquet": (_not_parquet, ["not a readable parquet"]),
    "label-sum": (_bad_label, ["row 1", "label_0 + label_1"]),
    "null-caption": (_null_caption, ["column caption row 2"]),
}


def _spm(folder: Path, out: Path) -> list:
    return ["train-spm", "--pairs", folder, "--backbone", "tiny", "--steps", "4", "--batch-size", "4",
            "--out", out]


def _dpo(folder: Path, out: Path) -> list:
    sets = [f"pairs={folder}", "rollout_batch=8", "train_batch_size=4", "grad_accum=1", "epochs=1"]
    return ["train", "diffusion-dpo", "--backbone", "tiny", "--out", out, *[a for s in sets for a in ("--set", s)]]


def _check(argv, names, out):
    before = snapshot(out)
    r = run(*argv)
    assert r.returncode == 2, r.stderr[-2000:]
    return assert_clean_failure(r.returncode, r.stderr, names, out, before)


@slow  # ~30 s each on the shared 2-core machine (the CLI starts torch); the same errors in-process:
@pytest.mark.parametrize("case", list(CASES))  # tests/data/test_pickapic.py
@pytest.mark.parametrize("command", ["spm", "dpo"])
def test_bad_shard_is_named(case, command, tmp_path):
    spoil, words = CASES[case]
    folder, bad = _folder(tmp_path, "pickapic_v2", spoil)
    out = tmp_path / "run"
    argv = _spm(folder, out) if command == "spm" else _dpo(folder, out)
    _check(argv, [bad, *words], out)


@slow
@pytest.mark.parametrize("command", ["spm", "dpo"])
def test_no_usable_pairs(command, tmp_path):
    folder, bad = _folder(tmp_path, "pickapic_v2", _all_unusable)
    out = tmp_path / "run"
    argv = _spm(folder, out) if command == "spm" else _dpo(folder, out)
    _check(argv, [folder, "4 unlabeled"], out)


@slow
@pytest.mark.parametrize("command", ["spm", "dpo"])
def test_empty_folder(command, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "run"
    argv = _spm(tmp_path / "empty", out) if command == "spm" else _dpo(tmp_path / "empty", out)
    _check(argv, [tmp_path / "empty", "no *.parquet"], out)
