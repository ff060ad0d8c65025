"""Tiny-world grammar: round trips, tags, vocabulary, disjoint deterministic splits."""

import numpy as np
import pytest

from spobench.toyworld import grammar as g
from spobench.toyworld.grammar import Obj, Scene
from spobench.toyworld.words import WORDS

EXAMPLES = {
    "a large circle": "single_object",
    "a red circle": "colors",
    "an orange square": "colors",
    "a large blue square on the left": "position",
    "two green triangles": "counting",
    "three circles": "counting",
    "a red circle above a green triangle": "position",
    "a photo of a circle to the right of a square": "position",
    "a yellow square and a blue circle": "color_attr",
    "a circle and a red square": "two_object",
    "an image of a small white triangle in the center": "position",
}


@pytest.mark.parametrize("prompt,tag", EXAMPLES.items())
def test_examples_parse_round_trip_and_tag(prompt, tag):
    s = g.parse(prompt)
    assert g.to_prompt(s) == prompt
    assert g.parse(g.to_prompt(s)) == s
    assert s.tag == tag


def test_parse_structure():
    s = g.parse("a red circle above a green triangle")
    assert s.objects == (Obj("circle", "red"), Obj("triangle", "green")) and s.relation == "above"
    s = g.parse("a large blue square on the left")
    assert s.objects == (Obj("square", "blue", 1, "large", "left"),) and s.relation is None
    assert g.parse("two green triangles").objects[0].count == 2
    assert g.parse("  A Red   Circle ") == g.parse("a red circle")


@pytest.mark.parametrize("bad", ["a dog", "a red circle and", "an red circle", "a orange circle",
                                 "two circle", "a circle on the moon", "red circle", "a circle above"])
def test_parse_rejects_non_grammar(bad):
    with pytest.raises(ValueError):
        g.parse(bad)


def test_every_pool_scene_round_trips_and_uses_only_vocabulary():
    vocab = set(WORDS)
    for split in ("train", "val"):
        for s in g.pool(split):
            for prefix in (None,) + g.PREFIXES:
                p = g.to_prompt(Scene(s.objects, s.relation, prefix))
                assert set(p.split()) <= vocab, p
                back = g.parse(p)
                assert back.content() == s and g.to_prompt(back) == p


def test_every_tag_has_train_and_val_scenes():
    for tag in g.TAGS:
        assert g.pool("train", tag) and g.pool("val", tag), tag
        assert all(s.tag == tag for s in g.pool("val", tag))


def test_splits_are_disjoint_deterministic_and_sized():
    val, train = g.val_prompts(), g.train_prompts()
    assert len(val) == 500 == len(set(val))
    assert len(train) == 4000 == len(set(train))
    assert not set(val) & set(train)
    # disjoint in meaning too: no val content appears (with any prefix) in train
    assert not {g.parse(p).content() for p in val} & {g.parse(p).content() for p in train}
    assert g.val_prompts() == val and g.train_prompts() == train
    assert g.sample_prompts(100, 7, "train") == g.sample_prompts(100, 7, "train")
    assert g.sample_prompts(100, 7, "train") != g.sample_prompts(100, 8, "train")
    # any seed of one split stays disjoint from any seed of the other
    assert not set(g.sample_prompts(300, 3, "val")) & set(g.sample_prompts(3000, 9, "train"))
    assert all(g.split_of(p) == "val" for p in val[:50])
    counts = g.describe(val)
    assert all(counts[t] >= 10 for t in g.TAGS), counts


def test_sample_scene_is_seeded_and_in_split():
    a = [g.sample_scene(np.random.default_rng(3), "val") for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = g.sample_scene(rng, "val")
        assert g.split_of(s) == "val"
    assert g.sample_scene(np.random.default_rng(0), tag="counting").tag == "counting"


def test_too_many_prompts_is_an_error():
    with pytest.raises(ValueError, match="distinct prompts"):
        g.sample_prompts(10**6, 0, "val")
