import json

import numpy as np
import pytest
from PIL import Image

from spobench.metrics.base import Metric, MetricOutput
from spobench.evaluate import bootstrap_ci, evaluate_folder


class Brightness(Metric):
    name = "brightness"
    version = "1"
    calls = 0

    def score(self, images, prompts, metadata=None):
        Brightness.calls += len(images)
        return MetricOutput(np.array([np.asarray(im, dtype=float).mean() / 255 for im in images]),
                            tags=["dark" if "dark" in p else "light" for p in prompts])


def _folder(tmp_path):
    rows = []
    for i, (p, v) in enumerate([("dark a", 10), ("dark b", 30), ("light a", 200), ("light b", 240)]):
        Image.new("RGB", (8, 8), (v, v, v)).save(tmp_path / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": p, "prompt_index": i, "seed": i})
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_evaluate_writes_means_cis_tags_and_caches(tmp_path):
    folder = _folder(tmp_path)
    Brightness.calls = 0
    res = evaluate_folder(folder, {"brightness": Brightness})
    m = res["metrics"]["brightness"]
    expect = np.mean([10, 30, 200, 240]) / 255
    assert m["mean"] == pytest.approx(expect)
    assert m["ci95"][0] <= expect <= m["ci95"][1]
    assert m["per_tag"]["dark"] == pytest.approx(20 / 255)
    assert m["overall"] == pytest.approx((20 + 220) / 2 / 255)
    assert m["id"]["name"] == "brightness"
    on_disk = json.loads((folder / "results.json").read_text())
    assert on_disk["per_image"][2]["brightness"] == pytest.approx(200 / 255)
    assert "git" in on_disk and "versions" in on_disk


def test_bootstrap_ci_groups_and_degenerate():
    s = np.array([1.0, 1.0, 3.0, 3.0])
    lo, hi = bootstrap_ci(s, groups=np.array([0, 0, 1, 1]))
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)


def test_missing_manifest(tmp_path):
    from spobench.errors import InputError

    with pytest.raises(InputError, match="manifest"):
        evaluate_folder(tmp_path, {"brightness": Brightness})


def test_second_run_uses_the_cache_and_keeps_tags(tmp_path):
    folder = _folder(tmp_path)
    Brightness.calls = 0
    first = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 4
    second = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 4  # nothing rescored
    assert second["metrics"]["brightness"]["per_tag"] == first["metrics"]["brightness"]["per_tag"]
    Image.new("RGB", (8, 8), (0, 0, 0)).save(folder / "00001.png")  # a changed image is rescored
    third = evaluate_folder(folder, {"brightness": Brightness})
    assert Brightness.calls == 5
    assert third["per_image"][1]["brightness"] == 0.0
