"""What every parity script shares: the separate reference virtual environment, the two-sided run
(reference side in that venv, spobench side in the project's), and the row each script returns.

The reference packages (hpsv2, image-reward, a second transformers, ...) are never spobench
dependencies: they live in their own venv (default /tmp/spobench-parity-venv, or
$SPOBENCH_PARITY_VENV), which :func:`ensure_venv` builds with pip from the package registry. torch
there is 2.14.1 with torchvision 0.29.1 (PyPI's torchvision does not import beside the project's
torch 2.13.0).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FIXTURES = ROOT / "tests" / "metrics"
DEFAULT_VENV = Path(os.environ.get("SPOBENCH_PARITY_VENV", "/tmp/spobench-parity-venv"))
BASE_REQUIREMENTS = ("torch==2.14.1", "torchvision==0.29.1")


class NotRun(Exception):
    """The reference could not be run here; the message is the reason recorded in the table."""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _pip(py: Path, venv: Path, reqs: list[str], no_deps: bool, log) -> None:
    """pip install ``reqs`` once (a marker file per requirement set)."""
    flags = ["--no-deps"] if no_deps else []
    marker = venv / (".spobench-parity-" + hashlib.sha256(" ".join(flags + reqs).encode()).hexdigest()[:12])
    if marker.exists() or not reqs:
        return
    log(f"pip install {' '.join(flags + reqs)} into {venv}")
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", *flags, *reqs], capture_output=True, text=True)
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip() and "Location" not in ln]
        raise NotRun(f"pip install {' '.join(reqs)} failed: {lines[-1] if lines else r.returncode}")
    marker.write_text("\n".join(reqs) + "\n")


def ensure_venv(metric: str, requirements: tuple[str, ...], venv: Path = DEFAULT_VENV,
                no_deps: tuple[str, ...] = (), log=None) -> Path:
    """The python of ``<venv>/envs/<metric>`` with ``requirements`` (and ``no_deps``, installed without
    their dependencies, for packages used for one file) installed.

    torch + torchvision (5.5 GB) are installed once, in ``<venv>`` itself; each metric's venv sees them
    through a .pth file, so that the metrics' conflicting pins (transformers, timm, protobuf) never meet."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    base_py = venv_python(venv)
    if not base_py.exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(base_py, venv, list(BASE_REQUIREMENTS), False, log)
    env = venv / "envs" / metric
    py = venv_python(env)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        (_site_packages(env) / "spobench_parity_base.pth").write_text(str(_site_packages(venv)) + "\n")
    _pip(py, env, list(requirements), False, log)
    _pip(py, env, list(no_deps), True, log)
    return py


def package_version(py: Path, dist: str) -> str:
    r = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def run_reference(py: Path, script: Path, work: Path, result: str = "reference.pt") -> dict | None:
    """Run ``script --side reference --work DIR`` under the reference venv; it writes ``result``
    (a torch file, loaded and returned; anything else is left for the caller)."""
    env = {**os.environ, "PYTHONPATH": str(FIXTURES), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([str(py), str(script), "--side", "reference", "--work", str(work)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        tail = [ln[:400] for ln in r.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"reference side of {script.name} failed: {tail[-1] if tail else r.returncode}\n"
                           + "\n".join(tail[-15:]))
    if not result.endswith(".pt"):
        return None
    import torch

    return torch.load(work / result, weights_only=True)


def max_abs(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def row(metric: str, reference: str, version: str, checks: dict[str, float], notes: list[str] | None = None,
        started: float | None = None) -> dict:
    """One metric's result: ``checks`` maps what was compared to its max abs difference."""
    return {"metric": metric, "status": "ran", "reference": reference, "reference_version": version,
            "checks": checks, "max_abs_diff": max(checks.values()) if checks else None,
            "notes": notes or [], "seconds": round(time.perf_counter() - started, 1) if started else None}


def not_run(metric: str, reference: str, reason: str) -> dict:
    return {"metric": metric, "status": "not run", "reference": reference, "reference_version": None,
            "checks": {}, "max_abs_diff": None, "notes": [], "reason": reason}


def script_main(metric: str, reference: str, spobench_side, reference_side) -> None:
    """``--side reference --work DIR`` runs the reference part (in the reference venv); otherwise the
    spobench part runs and prints its row as JSON."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["spobench", "reference"], default="spobench")
    ap.add_argument("--work")
    ap.add_argument("--venv", default=str(DEFAULT_VENV))
    args = ap.parse_args()
    if args.side == "reference":
        # the scripts are named after the metrics (hpsv2.py): their folder must not shadow the packages
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        sys.path.insert(0, str(FIXTURES))
        reference_side(Path(args.work))
        return
    sys.path.insert(0, str(FIXTURES))
    try:
        result = spobench_side(Path(args.venv))
    except NotRun as e:
        result = not_run(metric, reference, str(e))
    print(json.dumps(result, indent=1))
