"""The built wheel, installed into a fresh venv, carries the namespace mapping and the data files."""

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
