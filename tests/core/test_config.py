"""The one config schema (spobench.core.config): types, bounds, unknown keys, and every error naming
where the value came from - a TOML file, --set, a checkpoint's config.json, a recipe field."""

from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from spobench.core.config import Config, SettingError, Source, parse_text, setting
from spobench.core.errors import InputError


@dataclass
class Knobs(Config):
    steps: int = setting(10, "steps", min=1)
    lr: float | None = setting(None, "learning rate", gt=0, backbone=("knob_lr", "lr"))
    mode: Literal["a", "b"] = setting("a", "mode")
    on: bool = setting(False, "switch")
    name: str | None = setting(None, "a file or a name")
    sizes: list[int] = setting(None, "sizes", min=0, factory=lambda: [1, 2])

    def check(self) -> None:
        if self.on and self.steps < 2:
            raise SettingError("steps", "must be >= 2 when on")


@dataclass(kw_only=True)
class Inner(Config):
    noun: ClassVar[str] = "key"
    x: float = setting(0.0, "x", max=1)


@dataclass(kw_only=True)
class Outer(Config):
    noun: ClassVar[str] = "key"
    title: str = setting(help="required")
    inner: Inner = setting(None, "a table", factory=Inner)
    rows: list[Inner] = setting(None, "tables", factory=list)


@pytest.mark.parametrize("values,message", [
    ({"steps": 0}, "setting 'steps' must be >= 1 (got 0)"),
    ({"steps": 2.5}, "setting 'steps' must be an integer (got 2.5)"),
    ({"steps": True}, "setting 'steps' must be an integer (got True)"),
    ({"lr": 0.0}, "setting 'lr' must be > 0 (got 0.0)"),
    ({"lr": float("nan")}, "setting 'lr' must be a finite number (got nan)"),
    ({"lr": "fast"}, "setting 'lr' must be a number (got 'fast')"),
    ({"mode": "c"}, "setting 'mode' must be one of 'a', 'b' (got 'c')"),
    ({"on": "maybe"}, "setting 'on' must be true or false (got 'maybe')"),
    ({"sizes": [1, -1]}, "setting 'sizes[1]' must be >= 0 (got -1)"),
    ({"on": True, "steps": 1}, "setting 'steps' must be >= 2 when on"),
    ({"stepz": 3}, "unknown setting 'stepz' (did you mean 'steps'?)"),
    ({"learning_rate": 3}, "unknown setting 'learning_rate' (did you mean 'lr'?)"),
])
def test_bad_values_and_unknown_keys(values, message):
    with pytest.raises(InputError) as e:
        Knobs.from_dict(values)
    assert str(e.value) == message


def test_good_values_are_coerced():
    k = Knobs.from_dict({"steps": 3.0, "lr": 1, "sizes": [0, 4]})
    assert k.steps == 3 and isinstance(k.steps, int) and k.lr == 1.0 and isinstance(k.lr, float)
    assert Knobs.coerce(None) == Knobs() and Knobs.coerce({"steps": 2}).steps == 2
    with pytest.raises(InputError, match="setting 'steps' must be >= 1"):
        Knobs.coerce(Knobs(steps=0))  # an instance built in Python is checked too


def test_toml_then_set_and_each_source_is_named(tmp_path):
    f = tmp_path / "k.toml"
    f.write_text('steps = 4\nmode = "b"\n')
    k = Knobs.load(f, ["steps=7", "name=123", "on=yes", "lr=none"])
    assert (k.steps, k.mode, k.name, k.on, k.lr) == (7, "b", "123", True, None)  # --set wins over the file
    f.write_text("steps = 0\n")
    with pytest.raises(InputError, match=rf"^{f}: setting 'steps' must be >= 1 \(got 0\)$"):
        Knobs.load(f)
    with pytest.raises(InputError, match=r"^--set: setting 'lr' must be > 0 \(got -1.0\)$"):
        Knobs.load(None, ["lr=-1"])
    with pytest.raises(InputError, match=r"^--set 'steps': expected key=value$"):
        Knobs.load(None, ["steps"])
    f.write_text("steps = [")
    with pytest.raises(InputError, match=rf"^{f}: invalid TOML"):
        Knobs.load(f)
    ckpt = Source(str(tmp_path / "checkpoint-3" / "config.json"))
    with pytest.raises(InputError, match=r"checkpoint-3/config.json: setting 'mode' must be one of"):
        Knobs.from_dict({"mode": "z"}, ckpt)


def test_parse_text_reads_a_set_value_for_its_type():
    assert parse_text(int, "4") == 4 and parse_text(float | None, "none") is None
    assert parse_text(str | None, "123") == "123" and parse_text(str, "metric:x") == "metric:x"
    assert parse_text(bool, "no") is False and parse_text(bool, "true") is True
    assert parse_text(float, "abc") == "abc"  # left for the type check to refuse, as written


def test_recipe_tables_name_the_field_path():
    src = Source("r.toml [tiny]", "")
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: title: is required$"):
        Outer.from_dict({}, src)
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: inner.x: must be <= 1 \(got 2.0\)$"):
        Outer.from_dict({"title": "t", "inner": {"x": 2.0}}, src)
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: rows\[1\].x: must be a finite number"):
        Outer.from_dict({"title": "t", "rows": [{"x": 0.5}, {"x": float("inf")}]}, src)
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: inner.xx: unknown key \(did you mean 'x'\?\); known: x$"):
        Outer.from_dict({"title": "t", "inner": {"xx": 1}}, src)
    # flat settings inside a recipe table: named by the recipe field, said as a setting
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: cells.spo.train.stepz: unknown setting 'stepz'"):
        Knobs.from_dict({"stepz": 1}, Source("r.toml [tiny]", "cells.spo.train"))
    with pytest.raises(InputError, match=r"^r.toml \[tiny\]: cells.spo.train.steps: must be >= 2 when on$"):
        Knobs.from_dict({"on": True, "steps": 1}, Source("r.toml [tiny]", "cells.spo.train"))


def test_per_backbone_defaults_and_help_come_from_the_declaration():
    from types import SimpleNamespace

    assert Knobs().resolve(SimpleNamespace(knob_lr=None, lr=0.5)).lr == 0.5  # the first that is set
    assert Knobs().resolve(SimpleNamespace(knob_lr=0.1, lr=0.5)).lr == 0.1
    assert Knobs(lr=0.2).resolve(SimpleNamespace(knob_lr=0.1)).lr == 0.2  # a given value stays
    lines = Knobs.describe().splitlines()
    assert lines[0] == "steps (int, default 10): steps"
    assert "mode ('a' | 'b', default 'a'): mode" in lines and "sizes (list[int], default [1, 2]): sizes" in lines
    assert "lr (float | None, default None): learning rate" in lines
    assert "title (str, required): required" in Outer.describe().splitlines()


def test_a_recipe_cell_becomes_a_typed_trainer_config_without_strings(tmp_path, monkeypatch):
    """recipe -> cell_config -> Trainer.run: the object itself, never re-parsed from --set text."""
    from recipe_fixtures import minimal_recipe

    from spobench.reproduce.recipe import cell_config, load_recipe
    from spobench.trainers.spo import SPOConfig

    path = tmp_path / "bad.toml"
    path.write_text(minimal_recipe())
    recipe = load_recipe(path, "tiny")
    cell = next(c for c in recipe.cell_list if c.trained)

    def no_text(*a, **k):
        raise AssertionError("settings went through text")

    monkeypatch.setattr(SPOConfig, "from_text", classmethod(no_text))
    monkeypatch.setattr(SPOConfig, "load", classmethod(no_text))
    cfg = cell_config(recipe, cell)
    assert isinstance(cfg, SPOConfig) and cfg.k == cell.train["k"] and cfg.beta == cell.train["beta"]
    bad = dict(cell.train, kappa=1000)
    with pytest.raises(InputError, match=rf"^{path} \[tiny\]: cells.spo.train.kappa: must be < 1000 \(got 1000\)$"):
        cell_config(recipe, cell, bad)
    with pytest.raises(InputError, match=r"cells.spo.train.scorer: 'spm' is a bare name"):
        cell_config(recipe, cell, dict(cell.train, scorer="spm"))


def test_the_recipe_reference_comes_from_the_schema():
    from spobench.reproduce.schema import GenerateSpec, describe

    text = describe()
    for line in GenerateSpec.describe().splitlines():
        assert f"  {line}" in text
    assert "[generate]" in text and "[cells.<id>]" in text and "[inputs.<name> (kind = 'spm')]" in text
    assert "  steps (int, default 20): DDIM steps (paper: 20)" in text
