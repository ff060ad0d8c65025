"""Tiny-world oracles on renders with known knobs: the aesthetic falls with every knob, alignment is
right on clean and moderately spoiled renders and near zero on mismatched prompts."""

import itertools

import numpy as np
import pytest
from PIL import Image

from spobench.toyworld import grammar as g
from spobench.toyworld import oracle as O
from spobench.toyworld import render as R
from spobench.toyworld.render import Knobs

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _aesthetic(an):
    return float(np.clip(10 - sum(O.WEIGHTS[k] * v for k, v in O.penalties(an).items()), 0, 10))


@pytest.fixture(scope="module")
def sweep():
    """(knob, level) -> (aesthetic scores, alignment verdicts) over 20 validation scenes."""
    scenes = [g.parse(p) for p in g.val_prompts()[:20]]
    out = {}
    clean = [O.analyze(R.render(s, Knobs(), i)) for i, s in enumerate(scenes)]
    for name in Knobs.names():
        for v in LEVELS:
            ans = clean if v == 0 else [O.analyze(R.render(s, Knobs(**{name: v}), i)) for i, s in enumerate(scenes)]
            out[name, v] = (np.array([_aesthetic(a) for a in ans]), np.array([O.check(a, s)[0] for a, s in zip(ans, scenes)]))
    return out


@pytest.mark.parametrize("knob", Knobs.names())
def test_aesthetic_strictly_decreases_in_each_knob(sweep, knob):
    means = [sweep[knob, v][0].mean() for v in LEVELS]
    assert all(a > b + 0.05 for a, b in itertools.pairwise(means)), (knob, np.round(means, 3))
    assert means[0] - means[-1] > 1.0, (knob, np.round(means, 3))


def test_clean_renders_score_high(sweep):
    q = sweep["grain", 0.0][0]
    assert q.min() >= 8.0 and q.mean() >= 9.5, q


@pytest.mark.parametrize("knob", Knobs.names())
def test_alignment_is_robust_to_moderate_spoils(sweep, knob):
    assert sweep[knob, 0.5][1].mean() >= 0.9, knob


def test_alignment_on_clean_and_mismatched_prompts():
    scenes = [g.parse(p) for p in g.val_prompts()[:300]]
    ans = [O.analyze(R.render(s, Knobs(), i)) for i, s in enumerate(scenes)]
    clean = np.mean([O.check(a, s)[0] for a, s in zip(ans, scenes)])
    rng = np.random.default_rng(0)
    other = [scenes[(i + 1 + int(rng.integers(len(scenes) - 1))) % len(scenes)] for i in range(len(scenes))]
    mismatched = np.mean([O.check(a, s)[0] for a, s in zip(ans, other)])
    assert clean >= 0.95, clean
    assert mismatched <= 0.1, mismatched


def test_alignment_with_all_knobs_at_once():
    scenes = [g.parse(p) for p in g.val_prompts()[300:360]]
    ok = [O.alignment(R.render(s, Knobs(*(0.5,) * 7), i), s)[0] for i, s in enumerate(scenes)]
    assert np.mean(ok) >= 0.85


def test_layout_errors_fail_alignment():
    rng = np.random.default_rng(1)
    fails = []
    for i, p in enumerate(g.train_prompts()[:120]):
        s = g.parse(p)
        bad, _ = R.perturb_scene(s, rng)
        fails.append(O.alignment(R.render(bad, Knobs(), i), s)[0] == 0.0)
    assert np.mean(fails) >= 0.95


def test_check_rules_on_known_scenes():
    s = g.parse("a red circle above a green triangle")
    img = R.render(s, Knobs(), 0)
    assert O.alignment(img, s)[0] == 1.0
    for wrong in ("a red circle below a green triangle", "a green circle above a red triangle",
                  "a red square above a green triangle", "a red circle", "two red circles"):
        score, det = O.alignment(img, wrong)
        assert score == 0.0, (wrong, det["reason"])
    an = O.analyze(img)
    assert sorted((o.color, o.shape) for o in an.objects) == [("green", "triangle"), ("red", "circle")]
    big = R.render(g.parse("a large white square"), Knobs(), 1)
    assert O.alignment(big, "a large white square")[0] == 1.0
    assert O.alignment(big, "a small white square")[0] == 0.0
    assert O.alignment(big, "a white square")[0] == 1.0  # no size asked: any size


def test_any_rgb_image_is_accepted():
    s = g.parse("two blue squares")
    img = R.render(s, Knobs(), 2, size=64)
    assert O.alignment(Image.fromarray(img), s)[0] == 1.0  # resampled to 32 x 32
    blank = np.full((32, 32, 3), 40, np.uint8)
    score, det = O.alignment(blank, s)
    assert score == 0.0 and det["objects"] == []
    q, d = O.aesthetic(blank)
    assert q < 5 and d["n_objects"] == 0
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert O.aesthetic(noise)[0] < 3
    assert O.alignment(noise, s)[0] == 0.0
    with pytest.raises(ValueError):
        O.analyze(np.zeros((32, 32)))


def test_label_matches_a_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = rng.random((11, 13)) < 0.45
        lab, n = O.label(m)
        seen = -np.ones(m.shape, int)
        c = 0
        for i, j in zip(*np.nonzero(m)):
            if seen[i, j] >= 0:
                continue
            stack, seen[i, j] = [(i, j)], c
            while stack:
                y, x = stack.pop()
                for yy in range(max(0, y - 1), min(11, y + 2)):
                    for xx in range(max(0, x - 1), min(13, x + 2)):
                        if m[yy, xx] and seen[yy, xx] < 0:
                            seen[yy, xx] = c
                            stack.append((yy, xx))
            c += 1
        assert n == c
        assert all(len(set(seen[lab == k])) == 1 for k in range(1, n + 1))
        assert ((lab > 0) == m).all()


def test_classify_color_palette_and_washed_colours():
    for name, rgb in R.PALETTE.items():
        assert O.classify_color(rgb)[0] == name
        washed = 128 + (R._saturate(np.array(rgb, float), 0.55) - 128) * 0.5
        assert O.classify_color(washed, bg_value=83)[0] == name
