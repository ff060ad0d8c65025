"""A minimal valid recipe (a base cell and a one-round SPO cell on random tiny weights) that tests edit
one field at a time: the malformed-recipe, bad-input and path-escape tests start from the same text."""

from __future__ import annotations

from pathlib import Path

SPO_TRAIN = 'k = 4, kappa = 750, beta = 10.0, scorer = "metric:toy_aesthetic"'

_TEMPLATE = """\
name = "{name}"
title = "{title}"
backbones = ["tiny", "sd15"]
model = "random:0"
budget = "tiny: 1 round"
[sd15]
model = "default"
[train]
prompts = "tiny-train"
max_rounds = 1
[generate]
prompt_set = "tiny-val"
limit = 2
[evaluate]
metrics = ["toy_aesthetic"]
[cells.base]
method = "base"
[cells.spo]
method = "spo"
train = {{ {spo_train} }}
"""


def minimal_recipe(name: str = "bad", title: str = "t", spo_train: str = SPO_TRAIN) -> str:
    return _TEMPLATE.format(name=name, title=title, spo_train=spo_train)


def write_recipe(root: Path, name: str = "bad", old: str = "", new: str = "", **kw) -> Path:
    """``minimal_recipe`` with ``old`` replaced by ``new`` (``old`` must occur), written to ``root/name.toml``."""
    text = minimal_recipe(name, **kw)
    assert old in text, old
    path = Path(root) / f"{name}.toml"
    path.write_text(text.replace(old, new, 1))
    return path
