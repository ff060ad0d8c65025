"""The tiny world's oracle metrics through the Metric interface and the evaluator."""

import json

import numpy as np
import pytest
from PIL import Image

from spobench.core import catalog
from spobench.core.errors import InputError
from spobench.eval.evaluate import evaluate_folder
from spobench.metrics.base import Metric, MetricOutput
from spobench.toyworld import grammar as g
from spobench.toyworld.render import Knobs, render

PROMPTS = ["a red circle", "two green triangles", "a yellow square and a blue circle",
           "a large blue square on the left", "a red circle above a green triangle", "a large circle"]


def _images(prompts, knobs=None):
    knobs = knobs or Knobs()
    return [Image.fromarray(render(g.parse(p), knobs, i)) for i, p in enumerate(prompts)]


def test_registered_classes_follow_the_interface():
    align, aesth = catalog.METRICS.get("toy_alignment"), catalog.METRICS.get("toy_aesthetic")
    assert issubclass(align, Metric) and issubclass(aesth, Metric)
    assert align.name == "toy_alignment" and align.needs_prompt
    assert aesth.name == "toy_aesthetic" and not aesth.needs_prompt
    m = align()  # no weights needed
    assert m.identity().key().startswith("toy_alignment@")


def test_alignment_scores_tags_and_details():
    m = catalog.METRICS.get("toy_alignment")()
    out = m.score(_images(PROMPTS), PROMPTS)
    assert isinstance(out, MetricOutput)
    assert out.scores.shape == (6,) and out.scores.tolist() == [1.0] * 6
    assert out.tags == ["colors", "counting", "color_attr", "position", "position", "single_object"]
    assert out.details[0]["reason"] == "ok" and out.details[0]["objects"][0]["color"] == "red"
    wrong = m.score(_images(PROMPTS), PROMPTS[1:] + PROMPTS[:1])
    assert wrong.scores.sum() == 0.0
    with pytest.raises(InputError, match="tiny-world"):
        m.score(_images(PROMPTS[:1]), ["a cat on a mat"])
    with pytest.raises(InputError):
        m.score(_images(PROMPTS[:2]), PROMPTS[:1])


def test_aesthetic_scores_clean_above_spoiled():
    m = catalog.METRICS.get("toy_aesthetic")()
    clean = m.score(_images(PROMPTS), PROMPTS)
    spoiled = m.score(_images(PROMPTS, Knobs(grain=0.5, blur=0.5, blobs=0.5)), [""] * 6)
    assert clean.tags is None
    assert (clean.scores >= 8).all() and (spoiled.scores < clean.scores).all()
    assert ((0 <= spoiled.scores) & (spoiled.scores <= 10)).all()
    assert set(clean.details[0]["penalties"]) == {"noise", "soft_edges", "misfit", "impurity", "low_contrast",
                                                  "specks", "background"}
    # prompt-free: the same image scores the same under any prompt
    assert m.score(_images(PROMPTS[:1]), ["x"]).scores[0] == clean.scores[0]


def test_evaluator_reports_per_tag_accuracy(tmp_path):
    rows = []
    prompts = PROMPTS + ["two green triangles"]
    for i, img in enumerate(_images(prompts)):
        img.save(tmp_path / f"{i:05d}.png")
        rows.append({"index": i, "file": f"{i:05d}.png", "prompt": prompts[i], "prompt_index": i, "seed": i})
    # the last image answers another prompt: counting is half right
    Image.fromarray(render(g.parse("three green triangles"), Knobs(), 0)).save(tmp_path / "00006.png")
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    classes = {n: catalog.METRICS.get(n) for n in ("toy_alignment", "toy_aesthetic")}
    res = evaluate_folder(tmp_path, classes)
    al = res["metrics"]["toy_alignment"]
    assert al["per_tag"]["counting"] == 0.5 and al["per_tag"]["colors"] == 1.0
    assert al["overall"] == pytest.approx(np.mean([1, 0.5, 1, 1, 1]))
    assert "per_tag" not in res["metrics"]["toy_aesthetic"]
