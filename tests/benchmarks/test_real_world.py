"""benchmarks/real_world.py --tiny: the script's builders and every measured CLI command (issue 13's
official-SPM import and `reproduce table2 --released` included) run at test widths and are recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_world.py"
CLI_STEPS = ["train spo sd15", "generate sd15", "eval 4 metrics", "spm import official", "reproduce table2 --released"]


@pytest.mark.slow
def test_tiny_sd15_records_every_step(tmp_path):
    out = tmp_path / "rw.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--parts", "sd15", "--nice", "0",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = json.loads(out.read_text())["parts"]["sd15"]
    names = [s["name"] for s in steps]
    assert names[-len(CLI_STEPS):] == CLI_STEPS
    assert {"build spm-official", "build released"} <= set(names)
    for s in steps:
        assert s["rc"] == 0, (s["name"], s["output_tail"])
        assert s["peak_rss_gib"] > 0 and s["wall_s"] >= 0, s["name"]
    imported = next(s for s in steps if s["name"] == "spm import official")
    assert "spm import" in imported["command"] and "spm-official.bin" in imported["command"]
    reproduce = next(s for s in steps if s["name"] == "reproduce table2 --released")
    assert "--released --limit 2" in reproduce["command"]
    assert not (tmp_path / "work").exists()  # the --work folder is removed without --keep
