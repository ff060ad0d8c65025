"""`bash scripts/setup.sh` prints errors and one summary line, nothing else; pyproject.toml gives setuptools
nothing to warn about (the `license` table was deprecated: an SPDX string + `license-files` now)."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# a stand-in for .venv/bin/python: pip is noisy (as this machine's pip config and setuptools make it) and
# fails when asked for the package named in FAIL
STUB = """#!/usr/bin/env bash
echo "+ $*" >> "$(dirname "$0")/../calls.txt"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "WARNING: Location 'file:///opt/pypi-more/simple/x/' is ignored: it is neither a file nor a directory." >&2
  echo "  BuildBackendWarning: Editable installation." >&2
  echo "Successfully installed something"
  for a in "$@"; do
    if [ -n "${FAIL:-}" ] && [ "$a" = "$FAIL" ]; then echo "ERROR: No matching distribution found for $a" >&2; exit 1; fi
  done
  exit 0
fi
echo "spobench 0.1.0, torch 2.13.0+cpu"
"""


def _setup_copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    py = repo / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(STUB)
    py.chmod(0o755)
    return repo


def test_setup_prints_one_line_and_keeps_pips_output_in_a_log(tmp_path):
    repo = _setup_copy(tmp_path)
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("setup: .venv ready (spobench 0.1.0, torch 2.13.0+cpu)")
    calls = (repo / ".venv" / "calls.txt").read_text()
    assert "-m pip -q --disable-pip-version-check install torch==2.13.0" in calls  # still pinned
    assert "install -e .[test]" in calls
    assert "Editable installation" in (repo / ".venv" / "setup.log").read_text()


def test_setup_failure_shows_pips_error(tmp_path):
    repo = _setup_copy(tmp_path)
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "FAIL": "torch==2.13.0"})
    assert r.returncode == 1 and r.stdout == ""
    assert "ERROR: No matching distribution found for torch==2.13.0" in r.stderr
    assert "'pip install torch==2.13.0' failed" in r.stderr and "setup.log" in r.stderr
    assert "WARNING: Location" not in r.stderr
    assert "install -e" not in (repo / ".venv" / "calls.txt").read_text()  # stopped at the failure


def test_pyproject_gives_setuptools_nothing_to_warn_about():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert not [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"
    for f in dist.metadata.license_files:
        assert (ROOT / f).is_file(), f
    assert "spobench" in dist.packages and "spobench.metrics" in dist.packages


@pytest.mark.slow
def test_building_the_wheel_prints_no_setuptools_warning(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "wheels"), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout + r.stderr
    noise = [ln for ln in text.splitlines() if "Warning" in ln or "deprecated" in ln.lower()]
    assert not noise, noise
