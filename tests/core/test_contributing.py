"""CONTRIBUTING.md's two examples, run as they are written there: the trainer file and its catalog line
train one round on the tiny backbone; the metric file and its catalog line score images."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spobench.core import catalog

DOC = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"


def _blocks() -> dict[str, str]:
    """Python blocks by their first line: the file they show (``# spobench/...py``) or the catalog line."""
    out = {}
    for code in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        first = code.splitlines()[0]
        out[first[2:].strip() if first.startswith("# ") else first.split("(")[0]] = code
    return out


@pytest.fixture
def example(tmp_path, monkeypatch):
    """Install a block as a module of a throw-away package and run its catalog line; undone afterwards."""
    blocks = _blocks()
    pkg = tmp_path / "contrib_example"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    added = []

    def install(path: str, registry, kind: str):
        name = Path(path).stem
        (pkg / f"{name}.py").write_text(blocks[path])
        line = next(c for k, c in blocks.items() if k == f"{kind}.declare").strip()
        line = line.replace(path.replace("/", ".")[:-3], f"contrib_example.{name}")
        reg = registry
        exec(line, {kind: reg})
        entry_name = re.match(r'\w+\.declare\("([^"]+)"', line).group(1)
        added.append((reg, entry_name))
        return entry_name

    yield install
    for reg, name in added:
        reg._entries.pop(name, None)
    sys.modules.pop("contrib_example", None)
    for m in [m for m in sys.modules if m.startswith("contrib_example.")]:
        sys.modules.pop(m)


def test_the_examples_are_in_the_document():
    blocks = _blocks()
    assert {"spobench/trainers/rwr.py", "spobench/metrics/brightness.py", "TRAINERS.declare", "METRICS.declare"} <= set(blocks)


def test_the_metric_example_scores(example):
    name = example("spobench/metrics/brightness.py", catalog.METRICS, "METRICS")
    metric = catalog.METRICS.get(name)()
    black, white = Image.new("RGB", (8, 8)), Image.new("RGB", (16, 4), (255, 255, 255))
    out = metric.score([black, white, Image.new("RGB", (4, 4), (255, 0, 0))])
    np.testing.assert_allclose(out.scores, [0.0, 1.0, 76 / 255])  # PIL's L of pure red: 299/1000 * 255 -> 76
    assert metric.identity().higher_is_better


def test_the_trainer_example_trains_a_round(example, tmp_path):
    import json

    name = example("spobench/trainers/rwr.py", catalog.TRAINERS, "TRAINERS")
    cls = catalog.TRAINERS.get(name)
    assert importlib.import_module(cls.__module__).__name__ == "contrib_example.rwr"
    out = tmp_path / "run"
    cls.cli(backbone="tiny", model=None, out=out, config=None, resume=False, overwrite=False,
            overrides=["prompts=tiny-train", "prompt_limit=2", "rollout_batch=2", "train_batch_size=2",
                       "num_steps=2", "epochs=1", "timestep_fraction=0.5", "reward=metric:toy_aesthetic"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert train and all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in train)
    assert json.loads((out / "config.json").read_text())["temperature"] == 1.0
    from safetensors.torch import load_file

    lora = load_file(next((out / "lora").glob("*.safetensors")))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora.up" in k)  # zero at init: the optimizer stepped
