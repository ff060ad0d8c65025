"""ImageReward parity: the ``image-reward`` package (THUDM/ImageReward: ``ImageReward.load`` on a
checkpoint file + ``model.score(prompt, image_path)``, its BLIP ViT and MED BERT code) vs spobench's
``imagereward`` on the same folder (tests/metrics/official_weights.py's ``build_imagereward``) and the
same PNG files.

The official code hard-wires the full size (``BLIP_Pretrain(image_size=224, vit="large")``,
``MLP(768)``, ``_transform(224)``, ``BertTokenizer.from_pretrained("bert-base-uncased")``); for the tiny
checkpoint, exactly those are swapped for the fixture's sizes: ``create_vit``'s "large" branch
at width 128 / depth 2 / 2 heads / 32 px (BLIP's own ``VisionTransformer``), ``MLP`` (the package's
class) at the MED width, the package's ``_transform`` at 32 px, and the package's ``init_tokenizer``
reading the fixture's vocab.txt; ``BLIP_Pretrain``'s contrastive ``embed_dim`` (256) follows the
checkpoint (16; those projections are not used by the score). Everything else, loading
(``strict=False``, as released) included, is the package's code.

    python benchmarks/parity/imagereward.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "imagereward"
REFERENCE = "image-reward (THUDM/ImageReward: load + score)"
# image-reward 1.5 (2023) leaves its pins open; these are releases of its time that import together:
# med.py needs transformers 4.x internals, ReFL.py (imported by the package) diffusers of that era,
# which needs huggingface_hub's cached_download; `import clip` is undeclared, and clip needs pkg_resources.
REQUIREMENTS = ("image-reward==1.5", "transformers==4.36.2", "diffusers==0.25.1", "huggingface_hub==0.25.2",
                "openai-clip==1.0.1", "setuptools<81")
PROMPTS = ["a photo of a red cat", "two blue cars on the tree and a green dog " * 4, "an unknownword",
           "A PHOTO of the green tree", "a dog", "the red car on a tree and a cat"]
SIZES = [(48, 40), (40, 48), (32, 32), (100, 50), (33, 77), (64, 64)]


def reference_side(work: Path) -> None:
    import functools
    import importlib

    import torch
    import ImageReward as RM
    ir_module = importlib.import_module("ImageReward.ImageReward")  # the module (the package re-exports the class)
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    weights = work / "weights"
    v = json.loads((work / "vit.json").read_text())  # tests/metrics/test_imagereward.py's VIT sizes

    def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        assert vit == "large"
        return VisionTransformer(img_size=v["image"], patch_size=v["patch"], embed_dim=v["width"], depth=v["depth"],
                                 num_heads=v["heads"], mlp_ratio=v["mlp"] / v["width"],
                                 use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer,
                                 drop_path_rate=0.1 or drop_path_rate), v["width"]

    class LocalBertTokenizer(blip.BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *a, **k):
            assert name == "bert-base-uncased"
            return super().from_pretrained(str(weights / "bert-base-uncased"), *a, **k)

    blip_pretrain.create_vit = create_vit
    blip.BertTokenizer = LocalBertTokenizer
    official_mlp = ir_module.MLP
    med_width = json.loads((weights / "med_config.json").read_text())["hidden_size"]
    ir_module.MLP = lambda input_size: official_mlp(med_width)
    official_blip = ir_module.BLIP_Pretrain
    embed_dim = torch.load(weights / "ImageReward.pt", map_location="cpu")["blip.vision_proj.weight"].shape[0]
    ir_module.BLIP_Pretrain = functools.partial(official_blip, embed_dim=embed_dim)  # unused by the score
    model = RM.load(str(weights / "ImageReward.pt"), device="cpu", med_config=str(weights / "med_config.json"))
    model.preprocess = ir_module._transform(v["image"])
    files = sorted((work / "images").glob("*.png"))
    with torch.no_grad():
        scores = [model.score(p, str(f)) for p, f in zip(PROMPTS, files)]
    torch.save({"scores": torch.tensor(scores, dtype=torch.float64)}, work / "reference.pt")


def spobench_side(venv: Path) -> dict:
    import numpy as np
    import official_weights as ow
    from PIL import Image
    from spobench.metrics import imagereward

    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "weights").mkdir()
        (work / "images").mkdir()
        ow.build_imagereward(work / "weights")
        (work / "vit.json").write_text(json.dumps(ow.tir.VIT))
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(work / "images" / f"{i:02d}.png")
        ref = common.run_reference(py, Path(__file__), work)
        files = sorted((work / "images").glob("*.png"))
        ours = imagereward.ImageReward(weights=work / "weights").score([Image.open(f) for f in files], PROMPTS).scores
    checks = {f"score ({len(PROMPTS)} PNGs x prompt, tiny BLIP ViT + MED)": common.max_abs(ours, ref["scores"].numpy())}
    notes = ["the package loads with strict=False; spobench loads strictly (every checkpoint key used or listed)"]
    version = (f"image-reward {common.package_version(py, 'image-reward')}, transformers "
               f"{common.package_version(py, 'transformers')}, timm {common.package_version(py, 'timm')}")
    return common.row(METRIC, REFERENCE, version, checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
