"""`spobench reproduce <table> --released`: the paper's rows from the published checkpoints, as recipe data.

The [released] tables of recipes/table1-3.toml are checked against the paper (the rows they name exist and
carry the paper's numbers); the path runs end to end through the installed CLI on a miniature user machine
(tests/released_world.py: the released checkpoints in a hub cache under their real ids and layouts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import released_world as world
from clitools import run
from spobench.reproduce.recipe import load_recipe, released_backbone

RECIPES = Path(__file__).resolve().parents[2] / "spobench" / "recipes"

# the released rows and the checkpoints the paper evaluated (paper Tables 1-3; the hub ids the authors publish)
EXPECTED = {
    "table1": ("sdxl", {"base": {}, "dpo": {"unet": "hub:mhdang/dpo-sdxl-text2image-v1"},
                        "mapo": {"unet": "hub:mapo-t2i/mapo-beta", "vae": "hub:madebyollin/sdxl-vae-fp16-fix"},
                        "spo": {"lora": "hub:SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA",
                                "vae": "hub:madebyollin/sdxl-vae-fp16-fix"}}),
    "table2": ("sd15", {"base": {}, "dpo": {"unet": "hub:mhdang/dpo-sd1.5-text2image-v1"},
                        "spo": {"lora": "hub:SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"}}),
    "table3": ("sdxl", {"base": {}, "dpo": {"unet": "hub:mhdang/dpo-sdxl-text2image-v1"},
                        "spo": {"lora": "hub:SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA",
                                "vae": "hub:madebyollin/sdxl-vae-fp16-fix"}}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_released_cells_are_recipe_data(name):
    backbone, cells = EXPECTED[name]
    path = RECIPES / f"{name}.toml"
    assert released_backbone(path) == backbone
    r = load_recipe(path, backbone, released=True)
    assert r.is_released and r.backbone == backbone
    assert {c.id: {k: getattr(c, k) for k in ("model", "unet", "vae", "lora") if getattr(c, k)}
            for c in r.cell_list} == cells
    assert all(not c.trained for c in r.cell_list)
    for c in r.cell_list:  # each released row is one of the paper's rows, so its numbers are the paper's
        assert r.paper.row(c.paper_row) is not None, c.paper_row
    # the protocol of the trained cells: Sec. 5.1 (DDIM, CFG 5, 20 steps) / Table 3's 50 steps
    g = r.generate
    assert (g.cfg, g.steps, g.eta) == (5.0, 50 if name == "table3" else 20, 0.0)
    assert g.prompt_set == ("geneval" if name == "table3" else "pickapic-validation-unique")
    assert r.paper.scale == ([100.0] * 7 if name == "table3" else [1.0, 100.0, 1.0, 1.0])
    trained = load_recipe(path, backbone)  # without --released: the trained cells, unchanged
    assert any(c.trained for c in trained.cell_list) and not trained.is_released


def test_paper_numbers_of_the_released_rows():
    """Spot checks against the paper's tables as printed (Table 1: SDXL, Table 2: SD-1.5)."""
    t1 = load_recipe(RECIPES / "table1.toml", "sdxl", released=True).paper
    assert t1.row("MAPO").values == [22.11, 28.22, 0.7165, 6.096]
    assert t1.row("SPO").values == [23.06, 31.80, 1.0803, 6.364]
    t2 = load_recipe(RECIPES / "table2.toml", "sd15", released=True).paper
    assert t2.row("Diff.-DPO").values == [20.98, 25.05, 0.1115, 5.505]
    assert t2.row("SPO").values[2] == 0.1712  # the ImageReward users compare with (issue 13)


def test_paper_comparison_is_ours_on_the_paper_scale_minus_the_paper():
    from spobench.eval.report_tables import paper_comparison

    data = {"paper": {"columns": ["A", "B"], "digits": [2, 2], "metrics": ["m", "g:overall"], "scale": [100, 100],
                      "rows": [{"row": "R", "values": [30.0, 50.0]}]},
            "cells": [{"label": "x", "paper_row": "R", "metrics": {
                "m": {"mean": 0.25, "ci95": [0.2, 0.3]}, "g": {"overall": 0.5, "per_tag": {}}}},
                      {"label": "y", "paper_row": "other", "metrics": {}}]}
    rows = paper_comparison(data)
    assert [(r["column"], r["paper"]) for r in rows] == [("A", 30.0), ("B", 50.0)]
    a, b = rows
    assert a["ours"] == pytest.approx(25.0) and a["diff"] == pytest.approx(-5.0)
    assert a["diff_ci95"] == pytest.approx([-10.0, 0.0])
    assert b["diff"] == pytest.approx(0.0) and b["diff_ci95"] is None  # per-tag means carry no CI


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    world.build(root, ("sd15", "sdxl"))
    recipes = root / "recipes"
    recipes.mkdir()
    for name in ("table1", "table2"):  # the shipped recipe, sampled at 32 px so the tiny models run in seconds
        text = (RECIPES / f"{name}.toml").read_text() + "\n[released.generate]\nresolution = 32\n"
        (recipes / f"{name}.toml").write_text(text)
    return root


def _pngs(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))]


END_TO_END = ["table2", "table1"]


def _reproduce(machine: Path, name: str, out: Path, *extra) -> tuple:
    return ("reproduce", machine / "recipes" / f"{name}.toml", "--released", "--limit", "2", "--out", out, *extra)


@pytest.fixture(scope="module")
def first_runs(machine, tmp_path_factory, request):
    """The first run of each table that this session tests end to end, side by side (each run is
    single-threaded; they share only read-only inputs): name -> (--out, result)."""
    from clitools import run_together

    names = [n for n in END_TO_END if any(getattr(item, "originalname", None) == "test_released_path_end_to_end"
                                          and item.callspec.params["name"] == n for item in request.session.items)]
    outs = [tmp_path_factory.mktemp(f"released-{n}") / "run" for n in names]
    results = run_together(*[_reproduce(machine, n, out) for n, out in zip(names, outs)], env=world.env(machine))
    return dict(zip(names, zip(outs, results)))


@pytest.mark.slow
@pytest.mark.parametrize("name", END_TO_END)
def test_released_path_end_to_end(name, machine, first_runs):
    out, r = first_runs[name]
    assert r.returncode == 0, r.stderr[-4000:]
    backbone, cells = EXPECTED[name]
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["released"] is True and rep["backbone"]["name"] == backbone
    assert [c["id"] for c in rep["cells"]] == list(cells)
    assert rep["generate"]["prompts"]["n"] == 2 and rep["generate"]["resolution"] == 32
    for c in rep["cells"]:
        assert set(c["metrics"]) == {"pickscore", "hpsv2", "imagereward", "aesthetic"} and c["n_images"] == 2
        want = {k: v.removeprefix("hub:") for k, v in cells[c["id"]].items()}
        got = dict(c["checkpoint"] or {})
        if "lora" in got:
            assert got["lora"].endswith("pytorch_lora_weights.safetensors")
            got["lora"] = want.get("lora")
        assert got == want
    base = _pngs(out / "cells" / "base" / "images")
    for cid in cells:
        if cid != "base":  # another UNet / LoRA / VAE: other pixels from the same seeds
            assert _pngs(out / "cells" / cid / "images") != base, cid
    manifest = [json.loads(ln) for ln in (out / "cells" / "dpo" / "images" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["backbone"]["overrides"]["unet"].startswith(cells["dpo"]["unet"].removeprefix("hub:") + "@")
    # the paper's rows beside ours, with the difference and its CI (stdout table and report.md)
    for row in ("SPO", "Diff.-DPO"):
        assert row in r.stdout
    spo = next(x for x in rep["cells"] if x["id"] == "spo")
    paper = load_recipe(RECIPES / f"{name}.toml", backbone, released=True).paper.row("SPO").values
    assert f"{paper[2]:.4f}" in r.stdout
    assert "ours - paper" in r.stdout and "Ours beside the paper" in (out / "report.md").read_text()
    assert spo["metrics"]["hpsv2"]["mean"] is not None
    # a second run reuses every cell (nothing regenerated)
    again = run(*_reproduce(machine, name, out, "--resume"), env=world.env(machine))
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(c["generate"]["reused"] for c in json.loads((out / "report.json").read_text())["cells"])
    shutil.rmtree(out)
