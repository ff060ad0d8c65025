"""PickScore parity: the PickScore README's inference recipe (yuvalkirstain/PickScore, "Inference with
PickScore": AutoProcessor + AutoModel, logit_scale.exp() * cos) on transformers 4.x in the parity venv,
the release line the recipe was written for (its slow, PIL image processor and fast tokenizer are
AutoProcessor's defaults there), vs spobench's ``pickscore`` on the same folder
(tests/metrics/official_weights.py's ``build_pickscore``) and the same PNG files.

    python benchmarks/parity/pickscore.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "pickscore"
REFERENCE = "PickScore README recipe (transformers AutoProcessor + AutoModel)"
REQUIREMENTS = ("transformers<5",)
PROMPTS = ["a red cat", "a photo of a dog on the green tree", "A Blue Car!", "painting of the red tree!!",
           "a cat, a dog & a car", "the   green  photo", "an astronaut riding a horse, 4k",
           "RED CAT ON A TREE", "a" * 40, "café au lait", "a photo of " * 20, "! !! wow!", "a dog's toy"]
SIZES = [(48, 40), (40, 48), (32, 32), (100, 50), (33, 77), (64, 64), (31, 32)]


def files(work: Path) -> list[Path]:
    return sorted((work / "images").glob("*.png"))


def reference_side(work: Path) -> None:
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    folder = work / "weights"
    processor = AutoProcessor.from_pretrained(str(folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    model = AutoModel.from_pretrained(str(folder / "PickScore_v1")).eval()
    scores = []
    with torch.no_grad():
        for f, prompt in zip(files(work), PROMPTS):  # the README's calc_probs, one image and its prompt
            image_inputs = processor(images=[Image.open(f)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
            image_embs = model.get_image_features(**image_inputs)
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = model.get_text_features(**text_inputs)
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            scores.append(float((model.logit_scale.exp() * (text_embs @ image_embs.T))[0, 0]))
    from transformers import CLIPTokenizer  # transformers 4's slow (pure-Python) variant, for the record

    slow = CLIPTokenizer.from_pretrained(str(folder / "CLIP-ViT-H-14-laion2B-s32B-b79K"))
    ids = [processor(text=p, truncation=True, max_length=77).input_ids for p in PROMPTS]
    slow_ids = [slow(p, truncation=True, max_length=77).input_ids for p in PROMPTS]
    torch.save({"ids": json.dumps(ids), "slow_ids": json.dumps(slow_ids),
                "scores": torch.tensor(scores, dtype=torch.float64), "transformers": transformers.__version__,
                "tokenizer": type(processor.tokenizer).__name__,
                "image_processor": type(processor.image_processor).__name__}, work / "reference.pt")


def spobench_side(venv: Path) -> dict:
    import numpy as np
    import official_weights as ow
    from PIL import Image
    from spobench.metrics import pickscore

    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "weights").mkdir()
        (work / "images").mkdir()
        ow.build_pickscore(work / "weights")
        # the laion processor repo also holds its CLIP config.json, which AutoProcessor reads for the
        # model type; the fixture's processor folder has only the processor files
        (work / "weights" / pickscore.PROCESSOR_DIR / "config.json").write_text(
            (work / "weights" / pickscore.MODEL_DIR / "config.json").read_text())
        for i, p in enumerate(PROMPTS):
            w, h = SIZES[i % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(work / "images" / f"{i:02d}.png")
        ref = common.run_reference(py, Path(__file__), work)
        metric = pickscore.PickScore(weights=work / "weights")
        ours = metric.score([Image.open(f) for f in files(work)], PROMPTS).scores
        our_ids = [metric._tokenizer(p, truncation=True, max_length=77).input_ids for p in PROMPTS]
    ref_ids, slow_ids = json.loads(ref["ids"]), json.loads(ref["slow_ids"])
    differ = [p for p, a, b in zip(PROMPTS, our_ids, ref_ids) if a != b]
    slow_differ = [p for p, a, b in zip(PROMPTS, slow_ids, ref_ids) if a != b]
    diff = np.abs(ours - ref["scores"].numpy())
    checks = {f"score ({len(PROMPTS)} images x own prompt; {int((diff > 1e-4).sum())} differ by > 1e-4)":
              float(diff.max()),
              f"token ids vs the recipe's tokenizer ({len(PROMPTS)} prompts; rows differing)": float(len(differ))}
    notes = [f"reference ran {ref['image_processor']} + {ref['tokenizer']} on transformers {ref['transformers']}; "
             "spobench runs transformers 5's CLIPImageProcessorPil + CLIPTokenizer",
             f"transformers 4's slow CLIPTokenizer (use_fast=False) gives other ids than the recipe's fast one on "
             f"{len(slow_differ)} of {len(PROMPTS)} prompts" + (f": {slow_differ}" if slow_differ else "")
             + "; spobench follows the fast one"]
    return common.row(METRIC, REFERENCE, "transformers " + ref["transformers"], checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
