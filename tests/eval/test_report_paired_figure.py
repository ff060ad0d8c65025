"""The report's metrics figure leads with what the comparison is about: each cell's paired difference to the
reference cell with its 95% CI, per metric (absolute means whose CIs overlap can hide a clear paired
difference), above the absolute means; report.md/report.html embed it and say how to read it."""

import copy

import numpy as np
import pytest
from PIL import Image

from spobench.eval.report import html_page, markdown
from spobench.eval.report_figures import VERDICT_COLOURS, metrics_png, paired_differences

HIGHER, LOWER = "toy_aesthetic", "fid_like"


def _metric(mean, lo, hi, higher=True):
    return {"mean": mean, "ci95": [lo, hi], "std": 0.1, "overall": None, "per_tag": None,
            "id": {"higher_is_better": higher}}


def _cmp(diff, lo, hi, higher=True):
    return {"mean_diff": diff, "mean_diff_ci95": [lo, hi], "win_rate": 0.5, "win_rate_ci95": [0.2, 0.8],
            "sign_test_p": 1.0, "higher_is_better": higher}


def _cell(cid, label, metrics, compare):
    return {"id": cid, "label": label, "method": "base" if cid == "base" else "spo", "metrics": metrics,
            "compare": compare, "ablation_value": None, "checkpoint": None, "paper_row": None, "settings": {},
            "train": None, "images": f"cells/{cid}/images", "n_images": 8,
            "generate": {"reused": False, "wall_s": 1.0}, "evaluate": {"reused": False, "wall_s": 0.1}}


@pytest.fixture()
def data():
    # absolute CIs overlap everywhere; the paired CIs say: spo better on both, ddpo worse on both, d3po unclear
    cells = [
        _cell("base", "base", {HIGHER: _metric(5.0, 4.0, 6.0), LOWER: _metric(10.0, 8.0, 12.0, False)}, None),
        _cell("spo", "SPO", {HIGHER: _metric(5.3, 4.3, 6.3), LOWER: _metric(9.5, 7.5, 11.5, False)},
              {HIGHER: _cmp(0.3, 0.1, 0.5), LOWER: _cmp(-0.5, -0.8, -0.2, False)}),
        _cell("ddpo", "DDPO", {HIGHER: _metric(4.8, 3.8, 5.8), LOWER: _metric(10.4, 8.4, 12.4, False)},
              {HIGHER: _cmp(-0.2, -0.3, -0.1), LOWER: _cmp(0.4, 0.1, 0.7, False)}),
        _cell("d3po", "D3PO", {HIGHER: _metric(5.05, 4.0, 6.1), LOWER: _metric(10.0, 8.0, 12.0, False)},
              {HIGHER: _cmp(0.05, -0.1, 0.2), LOWER: _cmp(0.0, -0.3, 0.3, False)}),
    ]
    return {"recipe": {"name": "paired", "title": "t", "paper_table": None, "description": "", "budget": None},
            "backbone": {"name": "tiny", "model": "tiny-base"}, "metrics": [HIGHER, LOWER], "cells": cells,
            "compare_to": "base", "ablation": None, "paper": None, "inputs": {},
            "report": {"grid_prompts": 2, "grid_tile": 32, "plot_metrics": None},
            "generate": {"prompts": {"n": 8, "name": "tiny-val", "version": "v"}, "images_per_prompt": 1, "seed": 0,
                         "steps": 4, "eta": 0.0, "cfg": 5.0},
            "files": ["metrics.png"], "written": "now", "git": "abc", "wall_s": 1.0}


def test_paired_differences_and_their_verdicts_follow_each_metrics_direction(data):
    got = paired_differences(data, [HIGHER, LOWER])
    assert [(r["label"], r["diff"], r["ci95"], r["verdict"]) for r in got[HIGHER]] == [
        ("SPO", 0.3, [0.1, 0.5], "better"), ("DDPO", -0.2, [-0.3, -0.1], "worse"), ("D3PO", 0.05, [-0.1, 0.2], "unclear")]
    # lower is better: a negative difference whose CI excludes 0 is better
    assert [r["verdict"] for r in got[LOWER]] == ["better", "worse", "unclear"]
    no_ref = dict(data, compare_to=None)
    assert paired_differences(no_ref, [HIGHER]) == {}


def _colour_pixels(path, colour: str) -> int:
    from matplotlib.colors import to_rgb

    rgb = np.array(to_rgb(colour)) * 255
    px = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    return int((np.abs(px - rgb).sum(axis=-1) < 30).sum())


def test_metrics_png_has_the_paired_row_above_the_means(data, tmp_path):
    with_pairs = metrics_png(tmp_path, data)
    h_pairs = Image.open(with_pairs).height
    for colour in VERDICT_COLOURS.values():  # one better, one worse and one unclear marker per panel
        assert _colour_pixels(with_pairs, colour) > 20, colour

    plain = copy.deepcopy(data)
    for c in plain["cells"]:
        c["compare"] = None
    (tmp_path / "plain").mkdir()
    without = metrics_png(tmp_path / "plain", plain)
    assert h_pairs > 1.6 * Image.open(without).height  # one more row of panels
    assert _colour_pixels(without, VERDICT_COLOURS["better"]) == 0 and _colour_pixels(without, "tab:red") == 0


def test_report_embeds_the_figure_and_says_how_to_read_it(data):
    md = markdown(data)
    assert "![Metrics](metrics.png)" in md
    assert "paired difference to base" in md and "95% bootstrap CI" in md
    page = html_page(data)
    assert page.count('<img src="metrics.png"') == 1 and "paired difference to base" in page
