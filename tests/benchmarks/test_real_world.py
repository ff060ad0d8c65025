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


def run_tiny(tmp_path, parts: str) -> dict:
    out = tmp_path / "rw.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--parts", parts, "--nice", "0",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_tiny_sd15_records_every_step(tmp_path):
    result = run_tiny(tmp_path, "sd15,released")
    assert set(result["part_settings"]) == {"sd15", "released"}
    steps = result["parts"]["sd15"] + result["parts"]["released"]
    names = [s["name"] for s in steps]
    assert [n for n in names if not n.startswith("build ")] == CLI_STEPS
    assert {"build spm-official", "build released"} <= set(names)
    for s in steps:
        assert s["rc"] == 0, (s["name"], s["output_tail"])
        assert s["peak_rss_gib"] > 0 and s["wall_s"] >= 0, s["name"]
    imported = next(s for s in steps if s["name"] == "spm import official")
    assert "spm import" in imported["command"] and "spm-official.bin" in imported["command"]
    reproduce = next(s for s in steps if s["name"] == "reproduce table2 --released")
    assert "--released --limit 2" in reproduce["command"]
    assert not (tmp_path / "work").exists()  # the --work folder is removed without --keep


@pytest.mark.slow
def test_tiny_sd3_trains_spo_or_falls_back_to_flow_grpo(tmp_path):
    """Issue 18's SD3.5-Medium case at test widths: SPO on the flow backbone where this spobench has it,
    else its clean refusal is recorded and Flow-GRPO runs; then generate with that LoRA."""
    steps = run_tiny(tmp_path, "sd3")["parts"]["sd3"]
    by_name = {s["name"]: s for s in steps}
    assert by_name["build sd3"]["rc"] == 0
    built = by_name["build sd3"]["built"]
    assert built["t5"] is False and built["config"]["transformer"]["qk_norm"] == "rms_norm"
    spo = by_name["train spo sd3"]
    if spo["rc"]:  # no SPO for flow backbones here: exit 2 with one error line, then Flow-GRPO ran
        assert spo["rc"] == 2 and spo["fell_back_to"] == "train flow-grpo sd3", spo["output_tail"]
        assert any(line.startswith("error: ") for line in spo["output_tail"])
        trained = by_name["train flow-grpo sd3"]
        assert "train flow-grpo --backbone sd3" in trained["command"] and "group_size=2" in trained["command"]
    else:
        trained = spo
    assert trained["rc"] == 0, trained["output_tail"]
    gen = by_name["generate sd3"]
    assert "--lora" in gen["command"] and "train-sd3/lora" in gen["command"]
    if gen["rc"]:  # generate without flow sampling: a clean one-line refusal, nothing else
        assert gen["rc"] == 2 and any(line.startswith("error: ") for line in gen["output_tail"]), gen["output_tail"]
