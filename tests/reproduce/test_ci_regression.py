"""The CI regression recipe (spobench/recipes/ci_regression.toml) with its numbers pinned: base vs SPO on the
tiny backbone with explicit random weights (random:0 = TinyBackbone.build(0), so a shipped
pretrained tiny model does not move them), 3 SPO rounds, 6 validation prompts. CPU runs are
deterministic, so a change to the math of SPO (loss, pools, pair choice, clamp, log-probs), the
DDIM sampler, LoRA, generation or the oracle metrics moves at least one of these numbers.

If a change is MEANT to alter the math, re-pin: run
``OMP_NUM_THREADS=1 spobench reproduce ci_regression --out /tmp/ci`` and copy the new values from
/tmp/ci/report.json, cells/spo/train/log.jsonl and the LoRA (the helper below prints them all:
``python tests/reproduce/test_ci_regression.py /tmp/ci``)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

PINNED = {
    "aesthetic": {"base": 1.0018429708368666, "spo": 1.0017959545661992},
    "alignment": {"base": 0.0, "spo": 0.0},
    "losses": [0.6931471824645996, 0.6890907287597656, 0.6823800206184387, 0.6927853226661682, 0.6947030425071716,
               0.6795148253440857, 0.685091495513916, 0.6867249608039856, 0.6960486173629761],
    "kept": [12.0, 12.0, 12.0],
    "score": [0.9016414218478732, 0.9570579528808594, 0.9627909130520291],
    "lora_up_sq": 0.14627820659195634,
    "lora_up_sum": -0.17525380964616488,
    "pixdiff": 10.365017361111112,
    "counters": {"unet_rows_grad": 72.0, "unet_rows_nograd": 264.0, "vae_decodes": 108.0,
                 "reward_image_passes": 108.0},
}


def pins(out: Path) -> dict:
    from PIL import Image
    from safetensors.torch import load_file

    out = Path(out)
    rep = json.loads((out / "report.json").read_text())
    cells = {c["id"]: c for c in rep["cells"]}
    log = [json.loads(line) for line in (out / "cells/spo/train/log.jsonl").read_text().splitlines()]
    lora = load_file(out / "cells/spo/train/lora/pytorch_lora_weights.safetensors")
    up = [t.double() for k, t in lora.items() if ".lora.up." in k or "lora_B" in k]  # zero at init: all training
    diffs = []
    for f in sorted((out / "cells/base/images").glob("*.png")):
        a = np.asarray(Image.open(f), dtype=float)
        b = np.asarray(Image.open(out / "cells/spo/images" / f.name), dtype=float)
        diffs.append(np.abs(a - b).mean())
    return {
        "aesthetic": {k: c["metrics"]["toy_aesthetic"]["mean"] for k, c in cells.items()},
        "alignment": {k: c["metrics"]["toy_alignment"]["mean"] for k, c in cells.items()},
        "losses": [r["loss"] for r in log if r["kind"] == "train"],
        "kept": [r["kept_pairs"] for r in log if r["kind"] == "round"],
        "score": [r["mean_score"] for r in log if r["kind"] == "round"],
        "lora_up_sq": float(sum((t ** 2).sum() for t in up)),
        "lora_up_sum": float(sum(t.sum() for t in up)),
        "pixdiff": float(np.mean(diffs)),
        "counters": {k: cells["spo"]["train"]["counters"][k] for k in PINNED["counters"]},
        "wall_s": rep["wall_s"],
        "n_images": {k: c["n_images"] for k, c in cells.items()},
    }


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    from clitools import run

    out = tmp_path_factory.mktemp("ci") / "run"
    r = run("reproduce", "ci_regression", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_ci_regression_numbers_are_pinned(ci_run):
    got = pins(ci_run)
    assert got["n_images"] == {"base": 6, "spo": 6}
    assert got["counters"] == PINNED["counters"]  # exact: the work done
    assert got["kept"] == PINNED["kept"]
    assert got["losses"] == pytest.approx(PINNED["losses"], abs=2e-5)
    assert got["score"] == pytest.approx(PINNED["score"], abs=1e-5)
    assert got["lora_up_sq"] == pytest.approx(PINNED["lora_up_sq"], rel=1e-3)
    assert got["lora_up_sum"] == pytest.approx(PINNED["lora_up_sum"], rel=1e-3, abs=1e-4)
    assert got["pixdiff"] == pytest.approx(PINNED["pixdiff"], abs=0.05)
    for cell in ("base", "spo"):
        assert got["aesthetic"][cell] == pytest.approx(PINNED["aesthetic"][cell], abs=2e-6)
        assert got["alignment"][cell] == pytest.approx(PINNED["alignment"][cell], abs=1e-9)


def test_ci_regression_stays_short(ci_run):
    # the run itself (not counting the interpreter's start): well under 2 minutes on one core
    assert pins(ci_run)["wall_s"] < 90


if __name__ == "__main__":  # print the numbers of a run folder, for re-pinning
    print(json.dumps(pins(Path(sys.argv[1])), indent=1))
