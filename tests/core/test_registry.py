import pytest

from spobench.core.errors import NotImplementedYet
from spobench.core.registry import DuplicateNameError, Registry, UnknownNameError


def test_lazy_target_is_imported_on_get_only():
    reg: Registry = Registry("thing")
    reg.declare("json-dumps", "json:dumps", "lazy")
    entry = reg.entry("json-dumps")
    assert entry.obj is None and entry.status == "ready"
    import json

    assert reg.get("json-dumps") is json.dumps


def test_duplicate_name_raises():
    reg: Registry = Registry("thing")
    reg.declare("a", "json:dumps")
    with pytest.raises(DuplicateNameError):
        reg.declare("a", "json:loads")

    @reg.register("b")
    def b():
        """B."""

    with pytest.raises(DuplicateNameError, match="already registered"):
        reg.register("b")(lambda: None)
    assert reg.entry("b").summary == "B."


def test_decorator_fills_its_own_declared_entry():
    reg: Registry = Registry("thing")

    def f():
        pass

    reg.declare("f", f"{f.__module__}:{f.__qualname__}")
    assert reg.register("f")(f) is f  # the declared target itself is not a duplicate
    assert reg.get("f") is f


def test_unknown_name_suggests_nearest():
    reg: Registry = Registry("trainer")
    for n in ("spo", "mspo", "ddpo"):
        reg.declare(n, None)
    with pytest.raises(UnknownNameError, match="did you mean 'spo'") as e:
        reg.get("sop")
    assert "unknown trainer 'sop'" in str(e.value)


def test_planned_entry_is_not_implemented_yet():
    reg: Registry = Registry("metric")
    reg.declare("geneval", None, "later")
    assert reg.entry("geneval").status == "planned"
    with pytest.raises(NotImplementedYet, match="not implemented yet: metric 'geneval'"):
        reg.get("geneval")


def test_bad_target_format():
    with pytest.raises(ValueError):
        Registry("x").declare("a", "no_colon")


def test_catalog_targets_resolve():
    """Every 'ready' entry of the built-in catalog must import (a typo would only show at use)."""
    from spobench.core import catalog

    for reg in (catalog.TRAINERS, catalog.METRICS, catalog.BACKBONES, catalog.PROMPT_SETS):
        for e in reg:
            if e.status == "ready":
                assert reg.get(e.name) is not None, e.name
