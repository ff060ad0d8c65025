"""Packaging: the built wheel installs into a fresh venv with its data files, and every spobench module comes
from one folder tree (issue 15: no mapped folders, so no mix of two checkouts)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv(tmp_path):
    # build from a copy of the files git would ship, so no build/ folder lands in the checkout
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                        str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(wheels.glob("spobench-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    # dependencies come from the dev venv's site-packages, put on the path *after* the fresh venv's
    # own (PYTHONPATH entries skip .pth files, so the dev checkout's editable hook stays out)
    deps = sysconfig.get_paths()["purelib"]
    code = """
import sys, pathlib, spobench, spobench.trainers, spobench.metrics, spobench.recipes
from spobench.core import catalog
from spobench.metrics.geneval_rules import geneval_prompts
root = pathlib.Path(spobench.__file__).parent
assert str(root).startswith(sys.argv[1]), root
assert pathlib.Path(spobench.metrics.__file__).parent == root / 'metrics'
assert (root / 'assets' / 'tiny_tokenizer' / 'vocab.json').exists()
assert len(geneval_prompts()) == 553
from spobench.models.backbones.tiny import tiny_tokenizer
assert tiny_tokenizer()('a red circle').input_ids
print('ok')
"""
    env = {**os.environ, "PYTHONPATH": deps}
    r = subprocess.run([str(py), "-c", code, str(env_dir)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    r = subprocess.run([str(env_dir / "bin" / "spobench"), "ls", "backbones"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "tiny" in r.stdout, r.stderr[-2000:]


def _module_names(root: Path) -> list[str]:
    pkg = root / "spobench"
    return sorted(".".join(p.relative_to(root).with_suffix("").parts[:-1] if p.name == "__init__.py"
                           else p.relative_to(root).with_suffix("").parts)
                  for p in pkg.rglob("*.py") if "assets" not in p.parts and p.name != "__main__.py")  # runs the CLI


def test_every_module_comes_from_the_package_it_belongs_to():
    """Issue 15: with trainers/, metrics/ and recipes/ mapped into spobench.* by the build backend, a
    second clone's `spobench` came with the first clone's `spobench.trainers`. Everything now lives in
    one folder tree, so a subpackage is always found through its parent's __path__."""
    import importlib

    import spobench

    root = Path(spobench.__file__).resolve().parent
    names = _module_names(root.parent)
    assert "spobench.trainers.spo" in names and "spobench.metrics.pickscore" in names
    for name in names:
        mod = importlib.import_module(name)
        assert Path(mod.__file__).resolve().is_relative_to(root), (name, mod.__file__)


def test_the_build_maps_no_folder_into_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert "package-dir" not in text
    for old in ("trainers", "metrics", "recipes"):
        assert not (ROOT / old).exists(), f"{old}/ at the top of the repo would be a second source of spobench.{old}"


@pytest.mark.slow
def test_a_second_clone_runs_whole_from_itself(tmp_path):
    """`python -m spobench.cli` from a second checkout takes every module from that checkout, even
    though this venv's editable install points at the first."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "spobench"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "clone"
    for f in files:
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    code = ("import pathlib, sys, spobench, spobench.trainers.spo, spobench.metrics.toy, spobench.core.catalog\n"
            "mods = [spobench, spobench.trainers.spo, spobench.metrics.toy, spobench.core.catalog]\n"
            "print({str(pathlib.Path(m.__file__).resolve()).startswith(sys.argv[1]) for m in mods})\n")
    r = subprocess.run([sys.executable, "-c", code, str(clone.resolve())], capture_output=True, text=True,
                       cwd=clone)
    assert r.returncode == 0 and r.stdout.strip() == "{True}", (r.stdout, r.stderr[-2000:])
