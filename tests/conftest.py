import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py and friends
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(autouse=True)
def _seeded_torch():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def finished_spo_run(tmp_path_factory):
    """``finished_spo_run(settings)``: the folder of a finished tiny ``spobench train spo --set ...`` run,
    made once a session for each settings list and shared by the modules that ask for the same one. Read it
    only; a test that edits or resumes a run copies it first."""
    from clitools import run

    made = {}

    def get(settings) -> Path:
        key = tuple(settings)
        if key not in made:
            out = tmp_path_factory.mktemp("spo-run") / "run"
            r = run("train", "spo", "--out", out, *[a for s in settings for a in ("--set", s)])
            assert r.returncode == 0, r.stderr[-3000:]
            made[key] = out
        return made[key]

    return get
