"""Bad metric weights through the installed CLI (issue 14, "Made-up numbers" and "Tracebacks where a
line is owed"): ``spobench eval --metrics M --weights M=DIR`` with weights in the official layout,
spoiled one way, must exit 2 with ONE error line naming the weights file (and the key, where there is
one), no traceback, no results file and the images folder unchanged. The first case is the original
bug: a PickScore folder missing a key was scored by a randomly re-initialised model, exit 0.

The same spoilings for every metric and every weights file, through the Python API:
tests/metrics/test_strict_weights.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import run
from contract import assert_clean_failure, snapshot

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "metrics"))
import official_weights as ow  # noqa: E402

TARGET = {(t.metric, t.file.split("/")[0]): t for t in ow.TARGETS}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder as `spobench generate` writes it: PNGs + manifest.jsonl (a GenEval prompt, so that
    every metric can read it)."""
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i in range(2):
        ow.image(64, 48).save(folder / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": "a photo of a bench", "prompt_index": i, "seed": i})
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    built: dict[str, Path] = {}

    def get(metric: str) -> Path:
        if metric not in built:
            built[metric] = tmp_path_factory.mktemp(metric)
            ow.BUILD[metric](built[metric])
        return built[metric]

    return get


def _spoil(path: Path, target, how: str) -> None:
    if how == "missing":
        ow.edit(path, target, lambda sd: sd.pop(target.key))
    elif how == "extra":
        ow.edit(path, target, lambda sd: sd.__setitem__(ow.EXTRA, torch.zeros(3)))
    elif how == "shape":
        ow.edit(path, target, lambda sd: sd.__setitem__(target.shape_key, ow.wrong_shape(sd[target.shape_key])))
    elif how == "truncated":
        ow.truncate(path)
    elif how == "non-tensor":
        ow.edit(path, target, lambda sd: sd.__setitem__(target.key, 3))
    elif how == "pickle-only":  # the official release has model.safetensors; a pickle in its place is refused
        path.unlink()
        torch.save({target.key: torch.zeros(1)}, path.parent / "pytorch_model.bin")
    elif how == "nan":
        ow.edit(path, target, lambda sd: ow.poison(sd, target.key))
    else:
        raise AssertionError(how)


# (metric, weights file's first path part, spoiling, what the error line must name besides the file).
# Each is one CLI process (~7 s of CPU: torch + transformers imports and a tiny model); all but the
# first of each issue-14 class are marked slow.
FAST = {("pickscore", "PickScore_v1", "missing"), ("imagereward", "ImageReward.pt", "shape"),
        ("geneval", "clip-vit-large-patch14", "truncated")}
CASES = [
    ("pickscore", "PickScore_v1", "missing", "key"),  # the original bug: scored, exit 0
    ("pickscore", "PickScore_v1", "truncated", None),
    ("pickscore", "PickScore_v1", "shape", "shape_key"),
    ("pickscore", "PickScore_v1", "pickle-only", None),
    ("aesthetic", "clip-vit-large-patch14", "missing", "key"),
    ("aesthetic", "clip-vit-large-patch14", "truncated", None),
    ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth", "non-tensor", "key"),
    ("hpsv2", "HPS_v2.1_compressed.pt", "shape", "shape_key"),
    ("hpsv2", "HPS_v2.1_compressed.pt", "truncated", None),
    ("imagereward", "ImageReward.pt", "shape", "shape_key"),  # was a size-mismatch traceback
    ("imagereward", "ImageReward.pt", "extra", "extra"),
    ("geneval", "mask2former-swin-small-coco-instance", "truncated", None),
    ("geneval", "clip-vit-large-patch14", "missing", "key"),
    ("geneval", "clip-vit-large-patch14", "truncated", None),
    ("toy_pickscore", "model.safetensors", "nan", "key"),
]


CASES = [pytest.param(*c, id=f"{c[0]}:{c[1].split('.')[0]}:{c[2]}",
                      marks=() if c[:3] in FAST else pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("metric,part,how,names", CASES)
def test_bad_weights_are_one_line(metric, part, how, names, images, pristine, tmp_path):
    target = TARGET[(metric, part)]
    folder = tmp_path / metric
    shutil.copytree(pristine(metric), folder)
    path = folder / target.file
    _spoil(path, target, how)
    named = {"key": target.key, "shape_key": target.shape_key, "extra": ow.EXTRA, None: None}[names]
    shown = path.parent / "pytorch_model.bin" if how == "pickle-only" else path
    out = tmp_path / "results.json"
    before = snapshot(images)
    r = run("eval", "--metrics", metric, "--weights", f"{metric}={folder}", "--images", images, "--out", out,
            env={"HF_HUB_CACHE": str(tmp_path / "no-hf-cache")})
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert_clean_failure(r.returncode, r.stderr, [shown] + ([named] if named else []), out, None)
    assert snapshot(images) == before  # no score cache written for a model that did not load


def test_intact_weights_score(images, pristine, tmp_path):
    """The same folder unspoiled is scored (so the failures above are the spoiling's doing)."""
    out = tmp_path / "results.json"
    shutil.copytree(images, tmp_path / "images")  # its score cache stays out of the shared folder
    r = run("eval", "--metrics", "pickscore", "--weights", f"pickscore={pristine('pickscore')}", "--images",
            tmp_path / "images", "--out", out, env={"HF_HUB_CACHE": str(tmp_path / "no-hf-cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.isfinite(json.loads(out.read_text())["metrics"]["pickscore"]["mean"])
