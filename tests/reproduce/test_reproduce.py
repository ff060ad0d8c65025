"""`spobench reproduce` end to end on the tiny backbone (through the installed executable), reuse of
finished cells, and every refusal that must come before any work: a planned trainer, missing
backbone weights, missing metric weights, a changed recipe under --resume. The HTML report is
checked in a real headless Chromium."""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import run
from spobench.core.errors import MissingWeightsError, ModelLoadError, NotImplementedYet

# A tiny recipe touching every stage: prepared inputs (pairs -> tiny CLIP -> SPM), an explicit cell,
# an ablation grid, a base cell, per-tag metrics, win rates, the paper block.
E2E = """
name = "tiny_e2e"
title = "end-to-end test recipe"
backbones = ["tiny", "sd15"]
model = "random:0"
budget = "a few seconds"

[train]
prompts = "tiny-train"
prompt_limit = 4
max_rounds = 1
rollout_batch = 2
train_batch_size = 4
num_steps = 4
kappa = 800
threshold = 0.0
checkpoint_every = 5

[generate]
prompt_set = "tiny-val"
limit = 4
steps = 4
batch_size = 4

[evaluate]
metrics = ["toy_aesthetic", "toy_alignment"]

[report]
grid_prompts = 3
grid_tile = 32

[inputs.pairs]
kind = "toy-pairs"
n = 40

[inputs.clip]
kind = "toy-clip"
hidden = 16
layers = 1
patch = 8

[inputs.spm]
kind = "spm"
pairs = "input:pairs"
init = "input:clip"
steps = 2
batch_size = 4

[cells.base]
label = "base"
method = "base"
paper_row = "SD-1.5"

[ablation]
param = "k"
values = [2, 3]
chosen = 2
train = { scorer = "input:spm" }

[paper]
backbone = "SD-1.5"
columns = ["P-S", "AE"]
digits = [2, 3]
rows = [{ row = "SD-1.5", values = [20.53, 5.365] }, { row = "2", values = [21.43, 5.887] }, { row = "MAPO", values = [22.11, 6.096] }]

[sd15]
model = "default"

[sd15.evaluate]
metrics = ["pickscore"]
"""


def write_recipe(folder: Path, text: str = E2E, name: str = "tiny_e2e") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.toml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    recipe = write_recipe(root / "recipes")
    out = root / "run"
    r = run("reproduce", str(recipe), "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return root, recipe, out, r


def test_e2e_writes_every_stage_and_the_report(e2e):
    root, recipe, out, r = e2e
    data = json.loads((out / "report.json").read_text())
    assert [c["id"] for c in data["cells"]] == ["base", "k-2", "k-3"]
    for name in ("report.md", "report.html", "report.json", "grid.png", "metrics.png", "training.png", "plan.json"):
        assert (out / name).is_file(), name
    for c in data["cells"]:
        cell = out / "cells" / c["id"]
        assert len(list((cell / "images").glob("*.png"))) == 4
        assert set(c["metrics"]) == {"toy_aesthetic", "toy_alignment"}
        lo, hi = c["metrics"]["toy_aesthetic"]["ci95"]
        assert lo <= c["metrics"]["toy_aesthetic"]["mean"] <= hi
        assert c["metrics"]["toy_alignment"]["per_tag"]  # GenEval-style per-tag means
        if c["id"] != "base":
            assert (cell / "train" / "lora" / "pytorch_lora_weights.safetensors").exists()
            assert (cell / "train" / "reproduce-done.json").exists()
            assert c["train"]["rounds"] == 1 and c["train"]["counters"]["unet_rows_nograd"] > 0
            assert c["train"]["settings"]["scorer"] == str(out / "inputs" / "spm" / "spm")
            assert c["compare"]["toy_aesthetic"]["win_rate"] is not None  # vs the base cell
    # the same prompts and seeds in every cell
    manifests = [[json.loads(x) for x in (out / "cells" / c / "images" / "manifest.jsonl").read_text().splitlines()]
                 for c in ("base", "k-2", "k-3")]
    assert all([(m["prompt"], m["seed"]) for m in ms] == [(m["prompt"], m["seed"]) for m in manifests[0]]
               for ms in manifests)
    assert [m["seed"] for m in manifests[0]] == [0, 1, 2, 3]
    assert manifests[1][0]["lora"].endswith("cells/k-2/train/lora")
    # inputs were prepared: pairs, a tiny CLIP, an SPM evaluated on held-out pairs
    assert (out / "inputs" / "pairs" / "pairs.parquet").exists()
    assert (out / "inputs" / "spm" / "spm").is_dir() and "eval" in data["inputs"]["spm"]
    # the ablation's setting reached the trainer
    cfg = json.loads((out / "cells" / "k-3" / "train" / "config.json").read_text())
    assert cfg["k"] == 3 and cfg["max_rounds"] == 1
    md = (out / "report.md").read_text()
    assert "| paper: P-S | paper: AE |" in md and "| MAPO | (paper only) |" in md
    assert "| k-2 " not in md and "| k = 2 * | spo |" in md  # rows are labels; * marks the paper's choice
    assert "20.53" in md and "5.365" in md and "Budget: a few seconds" in md
    # progress and the summary
    assert "[1/" in r.stderr and "train k = 2 (spo)" in r.stderr
    assert "toy_aesthetic" in r.stdout and "report:" in r.stdout


def test_grid_rows_are_cells_with_the_same_prompts(e2e):
    _, _, out, _ = e2e
    img = np.asarray(Image.open(out / "grid.png").convert("L"), dtype=float)
    assert img.shape[0] > 100 and img.shape[1] > 200 and img.std() > 10


def test_second_run_reuses_finished_cells(e2e):
    root, recipe, out, _ = e2e
    stamps = {c: (out / "cells" / c / "train" / "summary.json").stat().st_mtime_ns for c in ("k-2", "k-3")}
    spm = (out / "inputs" / "spm" / "metrics.json").stat().st_mtime_ns
    before = json.loads((out / "report.json").read_text())

    refused = run("reproduce", str(recipe), "--out", str(out))
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    # --compile changes how cells train, not what they are: finished cells are still reused
    r = run("reproduce", str(recipe), "--out", str(out), "--resume", "--compile", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the finished cell 'k-2'" in r.stderr and "reusing the finished cell 'k-3'" in r.stderr
    for c, t in stamps.items():
        assert (out / "cells" / c / "train" / "summary.json").stat().st_mtime_ns == t
    assert (out / "inputs" / "spm" / "metrics.json").stat().st_mtime_ns == spm
    after = json.loads((out / "report.json").read_text())
    for a, b in zip(before["cells"], after["cells"]):
        assert a["metrics"] == b["metrics"]
        assert b["generate"]["reused"] and b["evaluate"]["reused"]
        if b["train"]:
            assert b["train"]["reused"] and b["train"]["wall_s"] == a["train"]["wall_s"]


def test_compile_reaches_the_trainer_but_not_the_cell_identity(tmp_path):
    from types import SimpleNamespace

    from spobench.reproduce.runner import DONE, Runner
    from spobench.trainers.spo import SPOConfig

    seen = {}

    class FakeTrainer:
        @staticmethod
        def run(cfg, **kw):  # the cell's typed config itself, not --set strings
            seen.update(kw, cfg=cfg)
            (kw["out"] / "lora").mkdir(parents=True)
            return {"complete": True, "progress": {}, "counters": {}, "config": {}}

    for compile_ in (True, False):
        seen.clear()
        runner = Runner.__new__(Runner)
        runner.console = None
        runner.plan = SimpleNamespace(compile=compile_, recipe=SimpleNamespace(backbone="tiny"), model_source=None)
        config = SPOConfig.from_dict({"k": 2, "epochs": 1})
        cell = SimpleNamespace(id="k-2", train_dir=tmp_path / str(compile_) / "train", dir=tmp_path / str(compile_),
                               settings={"k": 2, "epochs": 1}, trainer=FakeTrainer, config=config)
        info = runner.train(cell)
        assert isinstance(seen["cfg"], SPOConfig) and seen["cfg"].compile is compile_ and seen["cfg"].k == 2
        assert config.compile is False  # the plan's config is not changed by a run's compile
        assert info["settings"] == {"k": 2, "epochs": 1}
        assert json.loads((cell.train_dir / DONE).read_text())["settings"] == {"k": 2, "epochs": 1}


def test_resume_refuses_a_changed_cell(e2e, tmp_path):
    root, recipe, out, _ = e2e
    changed = write_recipe(tmp_path, E2E.replace("kappa = 800", "kappa = 700"))
    r = run("reproduce", str(changed), "--out", str(out), "--resume")
    assert r.returncode == 2, r.stderr
    assert "changed since this run started" in r.stderr and "kappa: 800 -> 700" in r.stderr


def test_only_some_cells(e2e, tmp_path):
    _, recipe, _, _ = e2e
    r = run("reproduce", str(recipe), "--out", str(tmp_path / "o"), "--cells", "base,nope")
    assert r.returncode == 2 and "--cells: 'nope' is not a cell of tiny_e2e (cells: base, k-2, k-3)" in r.stderr


# -- refusals before any work ----------------------------------------------------------------------------
def test_cell_with_a_planned_trainer_is_refused_before_any_work(tmp_path, monkeypatch):
    from spobench.core import catalog
    from spobench.core.registry import Entry
    from spobench.reproduce.runner import reproduce

    monkeypatch.setitem(catalog.TRAINERS._entries, "future-algo", Entry("future-algo", None, "not built yet"))
    recipe = write_recipe(tmp_path, E2E.replace('method = "base"', 'method = "base"\n\n[cells.future]\n'
                                                'method = "future-algo"'))
    out = tmp_path / "run"
    with pytest.raises(NotImplementedYet) as err:
        reproduce(recipe, "tiny", out)
    assert str(err.value).startswith("not implemented yet: trainer 'future-algo'")
    assert "cells.future" in str(err.value)
    assert not out.exists()  # nothing was written: not even the run folder


def test_missing_backbone_weights_are_refused_before_any_work(tmp_path):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "SPOBENCH_WEIGHTS": str(tmp_path / "w")}
    r = run("reproduce", str(recipe), "--backbone", "sd15", "--out", str(out), env=env)
    assert r.returncode == 2, r.stderr
    assert "sd15: hub id stable-diffusion-v1-5/stable-diffusion-v1-5 is not in the local Hugging Face cache" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_missing_metric_weights_are_refused_before_any_work(tmp_path, monkeypatch):
    from spobench.models.backbones.testing import make_sd15_folder
    from spobench.reproduce.runner import reproduce

    weights = tmp_path / "w"
    make_sd15_folder(weights / "sd15")
    monkeypatch.setenv("SPOBENCH_WEIGHTS", str(weights))
    recipe = write_recipe(tmp_path, E2E.replace('[sd15]\nmodel = "default"', '[sd15]\nmodel = "{weights}/sd15"'))
    out = tmp_path / "run"
    with pytest.raises(MissingWeightsError, match="metric 'pickscore' needs"):
        reproduce(recipe, "sd15", out)
    assert not out.exists()


def test_missing_input_is_refused_before_any_work(tmp_path, monkeypatch):
    from spobench.reproduce.runner import reproduce

    monkeypatch.setenv("SPOBENCH_WEIGHTS", str(tmp_path / "w"))
    text = E2E.replace('[inputs.spm]\nkind = "spm"\npairs = "input:pairs"\ninit = "input:clip"\nsteps = 2\nbatch_size = 4',
                       '[inputs.spm]\nkind = "path"\npath = "{weights}/spm-tiny"\nhow = "Train one first."')
    recipe = write_recipe(tmp_path, text)
    out = tmp_path / "run"
    with pytest.raises(MissingWeightsError, match=r"inputs.spm: .*spm-tiny not found. Train one first."):
        reproduce(recipe, "tiny", out)
    assert not out.exists()


def test_unknown_recipe_name_suggests():
    r = run("reproduce", "tabel4")
    assert r.returncode == 2 and "unknown recipe 'tabel4'; did you mean 'table4'?" in r.stderr


# -- the HTML report in a real browser ------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight, ok: i.complete}; });
  document.body.setAttribute('data-probe', JSON.stringify({images: imgs,
    tables: document.querySelectorAll('table').length, rows: document.querySelectorAll('tbody tr').length,
    h1: document.querySelector('h1').textContent}));
});
</script>"""


def _chromium(*args, user_dir):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={user_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI: apt-get install -y chromium)")
def test_html_report_renders_in_chromium(e2e, tmp_path):
    import html as html_lib
    import re

    _, _, out, _ = e2e
    page = (out / "report.html").read_text()
    assert page.count("<img") == 3
    probe = out / "_probe.html"  # the same page plus a script that reports what the browser loaded
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        r = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "u1")
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r'data-probe="([^"]*)"', r.stdout)
        assert m, r.stdout[-2000:]
        info = json.loads(html_lib.unescape(m.group(1)))
    finally:
        probe.unlink()
    assert info["h1"].startswith("tiny_e2e")
    assert info["tables"] >= 4 and info["rows"] >= 8
    assert sorted(i["src"] for i in info["images"]) == ["grid.png", "metrics.png", "training.png"]
    for img in info["images"]:  # every image decoded: the files exist and are PNGs
        assert img["ok"] and img["w"] > 100 and img["h"] > 100, img

    shot = tmp_path / "shot.png"
    r = _chromium("--window-size=1280,2400", f"--screenshot={shot}", (out / "report.html").as_uri(),
                  user_dir=tmp_path / "u2")
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 5  # not a blank page


def test_default_tiny_model_is_pinned_before_any_work(tmp_path, monkeypatch):
    """`model = "default"` is resolved once, at the start: a tiny-base shipped while a run goes on (or
    between its sessions) never mixes into it; --resume then refuses the changed model."""
    import spobench.models.backbones.tiny as tiny
    from spobench.models.backbones.testing import make_tiny_folder
    from spobench.reproduce.recipe import load_recipe
    from spobench.reproduce.plan import _check_backbone

    recipe = load_recipe(write_recipe(tmp_path, E2E.replace('model = "random:0"', 'model = "default"')), "tiny")
    shipped = tmp_path / "tiny-base"
    monkeypatch.setattr(tiny, "PRETRAINED_DIR", shipped)
    source, identity, seed = _check_backbone(recipe, tmp_path / "run")
    assert source is None and seed == 0 and "tiny-random-seed0" in identity  # materialised as random:0
    make_tiny_folder(shipped, seed=3)
    source, identity2, seed = _check_backbone(recipe, tmp_path / "run")
    assert source == str(shipped) and seed is None and identity2.startswith("shipped tiny-base (unet sha256 ")
    assert identity2 != identity
