"""Tiny-world renderer: determinism, knobs that spoil quality but never move shapes, layout errors."""

import numpy as np
import pytest

from spobench.toyworld import grammar as g
from spobench.toyworld import render as R
from spobench.toyworld.render import Knobs


def test_render_shape_dtype_and_determinism():
    s = g.parse("a red circle above a green triangle")
    kn = Knobs(grain=0.5, blobs=0.5, jagged=0.5, bg_tint=0.5, color_shift=0.5)
    a, b = R.render(s, kn, 11), R.render(s, kn, 11)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, R.render(s, kn, 12))
    assert R.render(s, Knobs(), 3, size=64).shape == (64, 64, 3)


def test_clean_render_has_palette_colours_on_a_flat_background():
    img = R.render(g.parse("a large red square"), Knobs(), 0).astype(int)
    assert (img[0, 0] == np.array(R.BACKGROUND)).all()
    assert (img == np.array(R.PALETTE["red"])).all(-1).sum() > 100  # interior pixels exactly red


def test_knobs_do_not_move_the_layout():
    # layout() takes no knobs; check that spoiled renders' objects sit where the clean one's do
    s = g.parse("a large blue square on the left")
    clean = R.render(s, Knobs(), 5).astype(float)
    mask = np.abs(clean - np.array(R.BACKGROUND)).sum(-1) > 60
    for name in ("blur", "washout", "color_shift", "jagged"):
        spoiled = R.render(s, Knobs(**{name: 0.5}), 5).astype(float)
        m2 = np.abs(spoiled - spoiled[0, 0]).sum(-1) > 30
        assert (m2 & mask).sum() / mask.sum() > 0.8, name


def test_knob_values_are_validated():
    with pytest.raises(ValueError):
        Knobs(grain=1.5)
    assert Knobs.names() == ("grain", "blur", "washout", "color_shift", "blobs", "jagged", "bg_tint")


def test_each_knob_changes_the_image():
    s = g.parse("a yellow square and a blue circle")
    clean = R.render(s, Knobs(), 4)
    for name in Knobs.names():
        assert not np.array_equal(clean, R.render(s, Knobs(**{name: 0.25}), 4)), name


def test_layouts_keep_boxes_apart_and_inside():
    for i, p in enumerate(g.train_prompts()[:300]):
        placed = R.layout(g.parse(p), i)
        for k, a in enumerate(placed):
            assert a.r <= a.cx <= 1 - a.r and a.r <= a.cy <= 1 - a.r
            for b in placed[:k]:
                gap = max(abs(a.cx - b.cx) - a.r - b.r, abs(a.cy - b.cy) - a.r - b.r)
                assert gap >= R.GAP - 1e-9, p


def test_perturb_scene_changes_what_the_prompt_asks():
    rng = np.random.default_rng(0)
    kinds = set()
    for p in g.train_prompts()[:300]:
        s = g.parse(p)
        bad, kind = R.perturb_scene(s, rng)
        kinds.add(kind)
        assert bad != s and kind in R.ERROR_KINDS
    assert kinds == set(R.ERROR_KINDS)
