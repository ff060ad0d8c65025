"""benchmarks/gpu_check.sh --dry-run: the GPU check's code path (real trainers, per-piece timing, FLOPs, MFU
fields) at test sizes on the CPU."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# ~40 s of CPU (seen: 38 s user on the shared 2-core machine), most of it FlopCounterMode's Python dispatch
# over the full-depth test-width networks on the meta device
@pytest.mark.slow
def test_dry_run_writes_every_piece(tmp_path):
    out = tmp_path / "gpu_check.json"
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--rounds", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["device"]["name"] == "cpu" and r["device"]["peak_bf16_tflops"] is None
    assert set(r["parts"]) == {"sd15", "sdxl", "headline"}
    for name, trainer in (("sd15", "spo"), ("sdxl", "mspo")):
        part = r["parts"][name]
        assert part["trainer"] == trainer and len(part["rounds"]) == 1
        m = part["measured"]
        rows = m["rows"]
        # the rollout ran pools, decoded and scored every candidate, and trained on the kept pairs
        assert rows["rollout_unet_rows"] > 0 and rows["vae_decodes"] > 0 and rows["train_rows_grad"] > 0
        assert rows["spm_image_passes"] == rows["vae_decodes"]
        for piece in ("rollout_unet", "vae_decode", "spm", "training"):
            assert m["seconds"][piece] > 0 and m["tflop"][piece] > 0, piece
            assert m["tflops_per_s"][piece] > 0 and m["mfu"][piece] is None  # no peak on a CPU
        assert m["seconds"]["round"] >= m["seconds"]["collect"]
    assert r["parts"]["sdxl"]["settings"]["tail"] == "merge" and r["parts"]["sdxl"]["settings"]["k"] == 2
    assert r["parts"]["sd15"]["settings"]["k"] == 2  # dry run; 4 on the GPU
    h = r["parts"]["headline"]
    assert h["ran"] is False and "reproduce headline --backbone tiny" in h["command"] and h["cells"]
