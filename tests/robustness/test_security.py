"""Security checks (issue 8): weights load only through safetensors or ``torch.load(weights_only=True)``,
no remote code (``trust_remote_code``) and no pickle, and paths in recipes cannot leave the run directory.

The source checks parse every .py file of the package (spobench/, trainers/, metrics/) with ``ast``,
so a call split over several lines, or a keyword given by ``**kwargs``, is still seen. Unit tests of
the recipe path guard (``..``, absolute paths, placeholders, a symlink inside the run folder that
points out of it) are in tests/reproduce/test_recipes.py; here the guard is checked end to end."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clitools import run
from recipe_fixtures import write_recipe

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "spobench").rglob("*.py"))


def _calls(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    """Dotted name of a call target: torch.load, pickle.loads, np.load..."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str, any_kwargs: bool = False):
    """The constant value of keyword ``name`` (``...`` when it is passed but not a constant; with
    ``any_kwargs`` also when a ``**kwargs`` could carry it)."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
        if kw.arg is None and any_kwargs:
            return ...
    return None


def test_sources_were_found():
    names = {p.relative_to(ROOT / "spobench").parts[0] for p in SOURCES}
    assert {"trainers", "metrics", "core", "models"} <= names and len(SOURCES) > 30


def test_every_torch_load_is_weights_only():
    bad = [f"{p.relative_to(ROOT)}:{c.lineno}" for p in SOURCES for c in _calls(p)
           if _name(c.func) == "torch.load" and _keyword(c, "weights_only", any_kwargs=True) is not True]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_pickle_and_no_remote_code():
    bad = []
    for p in SOURCES:
        text = p.read_text()
        where = p.relative_to(ROOT)
        for c in _calls(p):
            name = _name(c.func)
            if name.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "shelve") or name == "torch.jit.load":
                bad.append(f"{where}:{c.lineno}: {name}")
            if _keyword(c, "trust_remote_code") not in (None, False):
                bad.append(f"{where}:{c.lineno}: trust_remote_code={ast.unparse(c)[:60]}")
            if _keyword(c, "allow_pickle") not in (None, False):
                bad.append(f"{where}:{c.lineno}: allow_pickle")
        if "trust_remote_code=True" in text.replace(" ", ""):
            bad.append(f"{where}: trust_remote_code=True")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m.split(".")[0] in ("pickle", "cPickle", "dill") for m in mods):
                    bad.append(f"{where}:{node.lineno}: imports {mods}")
    assert not bad, bad


@pytest.mark.parametrize("old, new, field, why", [
    ('prompt_set = "tiny-val"', 'prompt_set = "../../../etc/hostname"', "generate.prompt_set", "cannot escape"),
    ('prompt_set = "tiny-val"', 'prompt_set = "/etc/hostname"', "generate.prompt_set", "absolute paths"),
    ('prompt_set = "tiny-val"', 'prompt_set = "{weights}/../../etc/hostname"', "generate.prompt_set", "cannot escape"),
    ('scorer = "metric:toy_aesthetic"', 'scorer = "../elsewhere/spm"', "cells.spo.train.scorer", "cannot escape"),
    ('[cells.base]\nmethod = "base"', '[cells.base]\nmethod = "base"\n[cells."../../evil"]\nmethod = "base"',
     "../../evil", "not a plain name"),
])
def test_recipe_paths_cannot_escape_the_run_directory(tmp_path, old, new, field, why):
    path = write_recipe(tmp_path, "escape", old, new, title="escape", spo_train='k = 2, scorer = "metric:toy_aesthetic"')
    out = tmp_path / "run"
    r = run("reproduce", path, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(path) in errors[0] and field in errors[0] and why in errors[0], r.stderr
    assert not out.exists() and not (tmp_path / "evil").exists()
