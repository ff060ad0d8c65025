"""The tiny world's prompt grammar: typed scenes, their canonical prompts, and fixed train/val splits.

A :class:`Scene` is one or two object clauses plus an optional relation; every prompt the grammar
writes uses only words of :mod:`spobench.toyworld.words` (one tokenizer token each), and
``parse(to_prompt(s)) == s`` / ``to_prompt(parse(p)) == p`` for every scene and canonical prompt.

Grammar (``[...]`` optional, ``|`` alternatives)::

    prompt   := [prefix] body
    prefix   := "a photo of" | "a picture of" | "a drawing of" | "an image of"
    body     := clause
              | clause "and" clause                               (two different objects)
              | clause relation clause                            (A is <relation> B)
              | clause place                                      (one object, absolute position)
    clause   := article [size] [colour] shape                     (count 1; "an" before "orange")
              | ("two" | "three") [colour] shapes                 (count 2-3, plural shape word)
    relation := "above" | "below" | "to the left of" | "to the right of"
    place    := "on the left" | "on the right" | "on the top" | "on the bottom" | "in the center"

Tags (GenEval's six categories, derived from the structure, see :attr:`Scene.tag`):

=============== ===================================================== ==============================
tag             structure                                             example
=============== ===================================================== ==============================
single_object   one object, no colour, optional size                  "a large circle"
colors          one object with a colour, optional size               "a red circle"
counting        one clause with count 2 or 3, optional colour         "two green triangles"
two_object      two different objects, not both coloured              "a circle and a red square"
color_attr      two different objects, both coloured                  "a yellow square and a blue circle"
position        absolute place (one object, optional size/colour) or  "a large blue square on the left",
                a relation between two objects (both or neither       "a red circle above a green
                coloured)                                             triangle"
=============== ===================================================== ==============================

An object without a colour may be drawn in any palette colour, and its colour is not checked.

Splits: every tag's *contents* (prompts without the prefix) are enumerated, ordered by a stable hash
and the first ``VAL_FRACTION`` of each tag is the validation pool, the rest the training pool. A
content and all its prefixed variants therefore sit in the same split, so validation prompt strings
(and their meanings) never occur in training, whatever seeds are used to sample from the pools.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from spobench.toyworld import words as W

COLORS: tuple[str, ...] = W.COLORS
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SINGULAR = {v: k for k, v in PLURAL.items()}
SIZES: tuple[str, ...] = W.SIZES
POSITIONS: tuple[str, ...] = W.POSITIONS
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
PREFIXES: tuple[str, ...] = ("a photo of", "a picture of", "a drawing of", "an image of")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS = {2: "two", 3: "three"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
_REL_WORDS = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
_PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "on the top", "bottom": "on the bottom",
                "center": "in the center"}
VAL_FRACTION = 0.2
VAL_SIZE = 500
TRAIN_SIZE = 4000
VAL_SEED = 1234
TRAIN_SEED = 0


@dataclass(frozen=True)
class Obj:
    """One object clause: ``count`` copies of a ``shape`` (singular name) in ``color`` (None = any)."""

    shape: str
    color: str | None = None
    count: int = 1
    size: str | None = None  # small | large | None (medium)
    position: str | None = None  # left | right | top | bottom | center | None (anywhere)

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r} (one of {SHAPES})")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r} (one of {COLORS})")
        if self.count not in (1, 2, 3):
            raise ValueError(f"count must be 1-3, got {self.count}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for. ``relation`` reads ``objects[0] <relation> objects[1]``."""

    objects: tuple[Obj, ...]
    relation: str | None = None  # above | below | left of | right of
    prefix: str | None = None  # one of PREFIXES; no meaning, only prompt variety

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError("a scene has one or two object clauses")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}")
            if len(self.objects) != 2:
                raise ValueError("a relation needs two objects")
        if self.prefix is not None and self.prefix not in PREFIXES:
            raise ValueError(f"unknown prefix {self.prefix!r}")

    @property
    def tag(self) -> str:
        """GenEval-like category, a pure function of the structure (see the module table)."""
        if self.relation is not None or any(o.position for o in self.objects):
            return "position"
        if len(self.objects) == 2:
            return "color_attr" if all(o.color for o in self.objects) else "two_object"
        o = self.objects[0]
        if o.count > 1:
            return "counting"
        return "colors" if o.color else "single_object"

    @property
    def n_instances(self) -> int:
        return sum(o.count for o in self.objects)

    def content(self) -> Scene:
        """The scene without its (meaningless) prefix."""
        return replace(self, prefix=None)


# -- writing ----------------------------------------------------------------------------------------

def _clause(o: Obj) -> str:
    if o.count > 1:
        parts = [COUNT_WORDS[o.count]] + ([o.size] if o.size else []) + ([o.color] if o.color else []) + [PLURAL[o.shape]]
        return " ".join(parts)
    rest = ([o.size] if o.size else []) + ([o.color] if o.color else []) + [o.shape]
    article = "an" if rest[0] == "orange" else "a"
    return " ".join([article] + rest)


def to_prompt(scene: Scene) -> str:
    """The canonical prompt of ``scene`` (only words of words.WORDS)."""
    a = scene.objects[0]
    if scene.relation is not None:
        b = scene.objects[1]
        body = f"{_clause(a)} {_REL_WORDS[scene.relation]} {_clause(b)}"
    elif len(scene.objects) == 2:
        body = f"{_clause(a)} and {_clause(scene.objects[1])}"
    else:
        body = _clause(a)
    if len(scene.objects) == 1 and a.position:
        body += " " + _PLACE_WORDS[a.position]
    elif any(o.position for o in scene.objects):
        raise ValueError("absolute positions are only written for one-object scenes")
    return f"{scene.prefix} {body}" if scene.prefix else body


# -- reading ----------------------------------------------------------------------------------------

class _Tokens:
    def __init__(self, prompt: str):
        self.prompt = prompt
        self.toks = prompt.strip().lower().split()
        self.i = 0

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self, *expected: str) -> bool:
        n = len(expected)
        if tuple(self.toks[self.i:self.i + n]) == expected:
            self.i += n
            return True
        return False

    def fail(self, what: str):
        raise ValueError(f"not a tiny-world prompt: {self.prompt!r} ({what} at word {self.i + 1})")


def _parse_clause(t: _Tokens) -> Obj:
    w = t.peek()
    if w in ("a", "an"):
        t.i += 1
        size = t.peek() if t.peek() in SIZES else None
        t.i += size is not None
        color = t.peek() if t.peek() in COLORS else None
        t.i += color is not None
        shape = t.peek()
        if shape not in SHAPES:
            t.fail("expected a shape")
        t.i += 1
        first = size or color or shape
        if w != ("an" if first == "orange" else "a"):
            t.fail(f"wrong article {w!r}")
        return Obj(shape, color, 1, size)
    if w in WORD_COUNTS:
        t.i += 1
        size = t.peek() if t.peek() in SIZES else None
        t.i += size is not None
        color = t.peek() if t.peek() in COLORS else None
        t.i += color is not None
        shape = SINGULAR.get(t.peek() or "")
        if shape is None:
            t.fail("expected a plural shape")
        t.i += 1
        return Obj(shape, color, WORD_COUNTS[w], size)
    t.fail("expected 'a', 'an', 'two' or 'three'")
    raise AssertionError  # unreachable


def parse(prompt: str) -> Scene:
    """Parse a grammar prompt (case and spacing are normalised); raises ValueError otherwise."""
    t = _Tokens(prompt)
    prefix = None
    for p in PREFIXES:
        if t.take(*p.split()):
            prefix = p
            break
    a = _parse_clause(t)
    objects, relation = [a], None
    if t.peek() is None:
        pass
    elif t.take("and"):
        objects.append(_parse_clause(t))
    else:
        for rel, words in _REL_WORDS.items():
            if t.take(*words.split()):
                relation = rel
                objects.append(_parse_clause(t))
                break
        else:
            for place, words in _PLACE_WORDS.items():
                if t.take(*words.split()):
                    objects[0] = replace(a, position=place)
                    break
            else:
                t.fail("expected 'and', a relation or a place")
    if t.peek() is not None:
        t.fail("unexpected trailing words")
    return Scene(tuple(objects), relation, prefix)


# -- enumeration and splits ---------------------------------------------------------------------------

def _colour_opts():
    return (None,) + COLORS


@lru_cache(maxsize=1)
def _contents() -> dict[str, tuple[Scene, ...]]:
    """Every prefix-free scene the sampler can produce, by tag (deterministic order)."""
    out: dict[str, list[Scene]] = {t: [] for t in TAGS}
    sizes = (None,) + SIZES
    for shape in SHAPES:
        for size in sizes:
            out["single_object"].append(Scene((Obj(shape, None, 1, size),)))
            for c in COLORS:
                out["colors"].append(Scene((Obj(shape, c, 1, size),)))
            for c in _colour_opts():
                for pos in POSITIONS:
                    out["position"].append(Scene((Obj(shape, c, 1, size, pos),)))
        for n in (2, 3):
            for c in _colour_opts():
                out["counting"].append(Scene((Obj(shape, c, n),)))
    singles = [Obj(s, c) for s in SHAPES for c in _colour_opts()]
    for a in singles:
        for b in singles:
            if a.shape == b.shape and (a.color is None or b.color is None or a.color == b.color):
                continue  # "a circle and a circle" / "a red circle and a circle" are ambiguous
            both, none = bool(a.color and b.color), not (a.color or b.color)
            if a.shape != b.shape:
                out["color_attr" if both else "two_object"].append(Scene((a, b)))
            elif both:
                out["color_attr"].append(Scene((a, b)))
            if both or none:
                for rel in RELATIONS:
                    out["position"].append(Scene((a, b), rel))
    return {k: tuple(v) for k, v in out.items()}


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@lru_cache(maxsize=1)
def _pools() -> dict[str, dict[str, tuple[Scene, ...]]]:
    pools: dict[str, dict[str, tuple[Scene, ...]]] = {"train": {}, "val": {}}
    for tag, scenes in _contents().items():
        ordered = sorted(scenes, key=lambda s: _stable_hash(to_prompt(s)))
        k = max(1, round(VAL_FRACTION * len(ordered)))
        pools["val"][tag] = tuple(ordered[:k])
        pools["train"][tag] = tuple(ordered[k:])
    return pools


def split_of(prompt_or_scene: str | Scene) -> str:
    """'train' or 'val': which split a prompt's content belongs to."""
    s = parse(prompt_or_scene) if isinstance(prompt_or_scene, str) else prompt_or_scene
    c = s.content()
    return "val" if c in set(_pools()["val"][c.tag]) else "train"


def pool(split: str, tag: str | None = None) -> tuple[Scene, ...]:
    """The prefix-free scenes of a split (optionally of one tag)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    p = _pools()[split]
    return p[tag] if tag else tuple(s for t in TAGS for s in p[t])


def _with_prefix(scene: Scene, rng: np.random.Generator, p_prefix: float) -> Scene:
    if rng.random() < p_prefix:
        return replace(scene, prefix=PREFIXES[int(rng.integers(len(PREFIXES)))])
    return scene


def sample_scene(rng: np.random.Generator, split: str = "train", tag: str | None = None,
                 p_prefix: float = 0.5) -> Scene:
    """A random scene of ``split``: tag uniform over the six (unless given), content uniform within it."""
    tag = tag or TAGS[int(rng.integers(len(TAGS)))]
    scenes = pool(split, tag)
    return _with_prefix(scenes[int(rng.integers(len(scenes)))], rng, p_prefix)


def sample_prompts(n: int, seed: int, split: str = "train", p_prefix: float = 0.5) -> list[str]:
    """``n`` distinct prompts of ``split``, deterministic in (n, seed, split).

    Tags are balanced as far as each tag's pool allows (a tag whose pool runs out leaves its share to
    the others); order is shuffled. Raises ValueError if the split has fewer than ``n`` prompt strings.
    """
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    variants = (None,) + PREFIXES
    ordered: dict[str, list[tuple[Scene, str | None]]] = {}
    for tag in TAGS:
        contents = pool(split, tag)
        # first one prompt per content (random order, prefixed with probability p_prefix), then the
        # remaining prefix variants in a random order: contents repeat only once a tag runs out
        first, used = [], set()
        for c in rng.permutation(len(contents)):
            v = PREFIXES[int(rng.integers(len(PREFIXES)))] if rng.random() < p_prefix else None
            first.append((contents[c], v))
            used.add((int(c), v))
        rest = [(contents[c], v) for c in range(len(contents)) for v in variants if (c, v) not in used]
        ordered[tag] = first + [rest[k] for k in rng.permutation(len(rest))]
    total = sum(len(v) for v in ordered.values())
    if n > total:
        raise ValueError(f"split {split!r} has only {total} distinct prompts, asked for {n}")
    quota = {t: 0 for t in TAGS}
    left = n
    while left:
        open_tags = [t for t in TAGS if quota[t] < len(ordered[t])]
        share = max(1, left // len(open_tags))
        for t in open_tags:
            add = min(share, len(ordered[t]) - quota[t], left)
            quota[t] += add
            left -= add
            if not left:
                break
    out = [to_prompt(replace(c, prefix=v)) for t in TAGS for c, v in ordered[t][:quota[t]]]
    return [out[i] for i in rng.permutation(len(out))]


@lru_cache(maxsize=8)
def _cached_prompts(n: int, seed: int, split: str) -> tuple[str, ...]:
    return tuple(sample_prompts(n, seed, split))


def train_prompts(n: int = TRAIN_SIZE, seed: int = TRAIN_SEED) -> list[str]:
    """The fixed training list (the ``tiny-train`` prompt set by default)."""
    return list(_cached_prompts(n, seed, "train"))


def val_prompts(n: int = VAL_SIZE, seed: int = VAL_SEED) -> list[str]:
    """The fixed validation list (the ``tiny-val`` prompt set by default)."""
    return list(_cached_prompts(n, seed, "val"))


def describe(prompts: Sequence[str]) -> dict[str, int]:
    """Count of prompts per tag."""
    counts = {t: 0 for t in TAGS}
    for p in prompts:
        counts[parse(p).tag] += 1
    return counts
