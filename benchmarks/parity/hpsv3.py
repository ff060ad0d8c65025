"""HPSv3 parity: the ``hpsv3`` package's own inference (``HPSv3RewardInferencer``: its
create_model_and_processor, strict load of HPSv3.safetensors, prepare_batch and Qwen2VLRewardModelBT's
forward) on transformers 4.45.2 (the version hpsv3 1.0.0 pins) in the parity venv, vs spobench's ``hpsv3``
on transformers 5 on the same tiny official-layout files (tests/metrics/test_hpsv3_fixtures.py's
``build_hpsv3``) and the same PNG files and prompts.

    python benchmarks/parity/hpsv3.py

The package's config is its own ``HPSv3_7B.yaml`` with four keys changed for the tiny model on a CPU:
``model_name_or_path`` (the tiny Qwen2-VL folder), ``bf16: false`` + ``torch_dtype: float32`` (its
rm_head autocast is CUDA-only, so bf16 cannot run on a CPU), ``report_to: none``; ``output_dir`` points
into the work folder. The tiny Qwen folder gets random base weights because the package calls
``from_pretrained`` before loading HPSv3.safetensors over every one of them (strict=True).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "hpsv3"
REFERENCE = "hpsv3 (MizzenAI/HPSv3: HPSv3RewardInferencer.reward)"
# hpsv3 1.0.0's requirements minus what inference never imports (deepspeed, diffusers, timm, opencv, the
# training-only extras); the package itself without its dependencies, so that deepspeed is not built
REQUIREMENTS = ("transformers==4.45.2", "trl==0.11.4", "peft==0.13.2", "accelerate==1.0.1", "datasets==3.0.1",
                "pandas", "matplotlib", "tensorboard", "omegaconf", "pyyaml", "fire", "einops", "tqdm", "rich",
                "qwen-vl-utils==0.0.8")
NO_DEPS = ("hpsv3==1.0.0",)
PROMPTS = ["a red cat", "the image of a dog on the green tree, 4k", "Café au lait!!", "x",
           "an astronaut riding a horse, highly detailed, trending on artstation " * 3, "RED CAT ON A TREE"]
SIZES = [(64, 48), (500, 380), (30, 90), (448, 448), (1000, 200), (77, 77)]
OVERRIDES = {"bf16": False, "torch_dtype": "float32", "report_to": "none"}


def files(work: Path) -> list[Path]:
    return sorted((work / "images").glob("*.png"))


def reference_side(work: Path) -> None:
    import importlib.resources

    import torch
    import transformers
    import yaml
    from hpsv3 import HPSv3RewardInferencer

    config = yaml.safe_load((importlib.resources.files("hpsv3") / "config" / "HPSv3_7B.yaml").read_text())
    config.update(OVERRIDES, model_name_or_path=str(work / "weights" / "Qwen2-VL-7B-Instruct"),
                  output_dir=str(work / "out"))
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    inferencer = HPSv3RewardInferencer(config_path=str(work / "tiny.yaml"),
                                       checkpoint_path=str(work / "weights" / "HPSv3.safetensors"), device="cpu")
    paths = [str(f) for f in files(work)]
    batch = inferencer.prepare_batch(paths, PROMPTS)
    with torch.no_grad():
        rewards = inferencer.reward(paths, PROMPTS)  # one batch of all six: right padding exercised
    ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    torch.save({"rewards": rewards.double(), "ids": json.dumps(ids), "pixel_values": batch["pixel_values"].float(),
                "grid": batch["image_grid_thw"], "transformers": transformers.__version__}, work / "reference.pt")


def spobench_side(venv: Path) -> dict:
    import numpy as np
    import test_hpsv3_fixtures as hf
    import torch
    from PIL import Image
    from spobench.metrics.hpsv3 import HPSv3

    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv, no_deps=NO_DEPS)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "images").mkdir()
        hf.build_hpsv3(work / "weights", base_weights=True)
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(work / "images" / f"{i:02d}.png")
        ref = common.run_reference(py, Path(__file__), work)
        images = [Image.open(f) for f in files(work)]
        metric = HPSv3(weights=work / "weights", batch_size=len(PROMPTS))
        scores = metric.score(images, PROMPTS).scores
        one_by_one = HPSv3(weights=work / "weights", batch_size=1).score(images, PROMPTS).scores
        batch = metric.inputs(images, PROMPTS)
        with torch.no_grad():
            out = metric.load()(**batch).double()
    ours_ids = [row[mask.bool()].tolist() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    differ = sum(a != b for a, b in zip(ours_ids, json.loads(ref["ids"])))
    if tuple(batch["pixel_values"].shape) != tuple(ref["pixel_values"].shape):
        raise common.NotRun(f"pixel shapes differ: {tuple(batch['pixel_values'].shape)} vs "
                            f"{tuple(ref['pixel_values'].shape)}")
    n = len(PROMPTS)
    checks = {
        f"score = mu ({n} PNGs of {n} sizes x own prompt, one batch)": common.max_abs(scores, ref["rewards"][:, 0]),
        "sigma (the second output; not reported by spobench)": common.max_abs(out[:, 1], ref["rewards"][:, 1]),
        f"token ids, template + <|Reward|> ({n} prompts; rows differing)": float(differ),
        "pixel values (normalised patches)": common.max_abs(batch["pixel_values"], ref["pixel_values"]),
        "image grids (t, h, w)": common.max_abs(batch["image_grid_thw"], ref["grid"]),
    }
    notes = [f"reference: hpsv3 1.0.0 on transformers {ref['transformers']} (float32, CPU, sdpa); spobench: "
             "transformers 5's Qwen2-VL modules in float32",
             "hpsv3's config is its HPSv3_7B.yaml with bf16 false, torch_dtype float32, report_to none and the tiny "
             "model's folder (its rm_head autocast is CUDA-only, so its bf16 path cannot run on a CPU)",
             f"spobench one image per batch vs all {n} in one: max abs diff "
             f"{float(np.abs(one_by_one - scores).max()):.2e} (right padding)",
             "installed without deepspeed, diffusers, timm and opencv (hpsv3 --no-deps): its inference imports none"]
    return common.row(METRIC, REFERENCE, "hpsv3 1.0.0, transformers " + ref["transformers"], checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
