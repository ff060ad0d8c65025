"""Run the installed `spobench` executable the way a user does."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

EXE = shutil.which("spobench", path=str(Path(sys.executable).parent)) or "spobench"


def run(*args, cwd=None, env=None, timeout=600):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


def run_together(*commands, cwd=None, env=None, timeout=600):
    """Independent commands (each the argument tuple `run` takes) at the same time, their results in the
    order given. Each run is single-threaded (OMP_NUM_THREADS=1), so run one by one they leave the second
    core of a 2-core test machine idle; nothing two of them write may overlap."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = [pool.submit(run, *args, cwd=cwd, env=env, timeout=timeout) for args in commands]
        return [f.result() for f in futures]
