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
