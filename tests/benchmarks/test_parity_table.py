"""benchmarks/parity/driver.py's table writing, on a made-up result list (no venv, no reference run)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "parity"))
import common  # noqa: E402
import driver  # noqa: E402

FAKE = [
    common.row("hpsv2", "hpsv2 (img_score)", "hpsv2 1.2.0", {"score": 1.5e-7, "token ids (rows differing)": 0.0},
               ["float32 on CPU"]),
    common.row("pickscore", "README recipe", "transformers 4.57.1", {"score": 3.25e-3}),
    common.not_run("geneval", "GenEval evaluate_images.py", "not on PyPI | needs mmdet"),
    {"metric": "aesthetic", "status": "failed", "reference": None, "reference_version": None, "checks": {},
     "max_abs_diff": None, "notes": [], "reason": "RuntimeError: boom"},
]


def test_row_max_is_over_checks():
    assert FAKE[0]["max_abs_diff"] == 1.5e-7 and FAKE[0]["status"] == "ran"
    assert FAKE[2]["max_abs_diff"] is None and FAKE[2]["reason"].startswith("not on PyPI")


def test_markdown_has_one_row_per_metric_with_diff_version_and_command():
    md = driver.render_markdown(FAKE, "python benchmarks/parity/driver.py", {"date": "2026-12-02"})
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| metric") and "---" not in ln]
    assert [r.split(" | ")[0] for r in rows] == ["| hpsv2", "| pickscore", "| geneval", "| aesthetic"]
    assert "| hpsv2 (img_score) | hpsv2 1.2.0 | 1.50e-07 | ran |" in rows[0]
    assert "3.25e-03" in rows[1] and "transformers 4.57.1" in rows[1]
    # a reference that did not run shows its reason and no number; a "|" in it cannot break the table
    assert rows[2].endswith("| - | not run: not on PyPI / needs mmdet |") and rows[2].count("|") == 6
    assert rows[3].endswith("| failed: RuntimeError: boom |")
    assert "    python benchmarks/parity/driver.py" in md and "date: 2026-12-02." in md
    assert "- token ids (rows differing): max abs diff 0" in md and "- note: float32 on CPU" in md


def test_write_results_writes_md_and_json(tmp_path):
    md, js = driver.write_results(FAKE, tmp_path / "results", "cmd --x", {"python": "3.11"})
    assert md.name == "metric_parity.md" and js.name == "metric_parity.json" and md.read_text().startswith("# ")
    data = json.loads(js.read_text())
    assert data["command"] == "cmd --x" and data["python"] == "3.11"
    assert [m["metric"] for m in data["metrics"]] == ["hpsv2", "pickscore", "geneval", "aesthetic"]
    assert data["metrics"][1]["checks"] == {"score": 3.25e-3}
