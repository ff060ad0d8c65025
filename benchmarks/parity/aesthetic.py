"""LAION aesthetic parity: improved-aesthetic-predictor's ``simple_inference.py`` pipeline, i.e. OpenAI's
``clip`` package (``clip.model.build_model`` on a tiny OpenAI-layout state dict, ``clip.clip._transform``,
``encode_image``), the L2 normalisation, and the predictor's ``MLP`` class (that repo is not on PyPI;
its MLP definition ships unchanged in the ``image-reward`` package as
``ImageReward/models/AestheticScore.py``, loaded from that file alone) vs spobench's ``aesthetic`` on
the same weights (the OpenAI-layout CLIP converted to a transformers folder by spobench's
``convert_open_clip``; the head file as released) and the same PNG files.

    python benchmarks/parity/aesthetic.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "aesthetic"
REFERENCE = "improved-aesthetic-predictor simple_inference (openai clip + MLP)"
REQUIREMENTS = ("openai-clip==1.0.1", "setuptools<81")  # clip.py imports pkg_resources
NO_DEPS = ("image-reward==1.5",)  # only for the MLP file
SIZES = [(48, 40), (40, 48), (32, 32), (100, 50), (33, 77), (64, 64), (31, 32), (500, 300)]


def reference_side(work: Path) -> None:
    import importlib.util

    import clip
    import numpy as np
    import torch
    from PIL import Image

    spec = importlib.util.find_spec("ImageReward")
    path = Path(spec.submodule_search_locations[0]) / "models" / "AestheticScore.py"
    mod_spec = importlib.util.spec_from_file_location("laion_aesthetic_mlp", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    state = torch.load(work / "ViT-tiny.pt", map_location="cpu")
    model = clip.model.build_model(state).float().eval()  # clip.load(..., device="cpu") does .float()
    preprocess = clip.clip._transform(model.visual.input_resolution)
    head = torch.load(work / "weights" / "sac+logos+ava1-l14-linearMSE.pth", map_location="cpu")
    mlp = mod.MLP(int(head["layers.0.weight"].shape[1]))
    mlp.load_state_dict(head)
    mlp.eval()

    def normalized(a, axis=-1, order=2):  # simple_inference.py's numpy L2 normalisation
        l2 = np.atleast_1d(np.linalg.norm(a, order, axis))
        l2[l2 == 0] = 1
        return a / np.expand_dims(l2, axis)

    scores = []
    with torch.no_grad():
        for f in sorted((work / "images").glob("*.png")):
            image = preprocess(Image.open(f)).unsqueeze(0)
            im_emb_arr = normalized(model.encode_image(image).cpu().detach().numpy())
            scores.append(float(mlp(torch.from_numpy(im_emb_arr).float())[0, 0]))
    torch.save({"scores": torch.tensor(scores, dtype=torch.float64)}, work / "reference.pt")


def spobench_side(venv: Path) -> dict:
    import clip_fixtures as cf
    import numpy as np
    import torch
    from PIL import Image
    from spobench.metrics import aesthetic
    from spobench.metrics.convert_open_clip import load_open_clip_state_dict

    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv, no_deps=NO_DEPS)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "images").mkdir()
        weights = work / "weights"
        weights.mkdir()
        # OpenAI CLIP's key layout (open_clip kept it); OpenAI's build_model hard-wires 4x MLPs and
        # 64-wide heads, so both towers use those here (the fixture's default MLPs are 2x)
        state = cf.open_clip_state_dict(seed=5, vision={**cf.VISION, "mlp": 4 * cf.VISION["width"]},
                                        text={**cf.TEXT, "mlp": 4 * cf.TEXT["width"]})
        # fp16-exact values, as OpenAI's released ViT-L-14.pt holds (build_model casts to fp16, then
        # clip.load's .float() on CPU; openai/clip-vit-large-patch14 stores the same values in fp32)
        state = {k: v.half().float() for k, v in state.items()}
        torch.save(state, work / "ViT-tiny.pt")
        load_open_clip_state_dict(state, hidden_act="quick_gelu").save_pretrained(str(weights / aesthetic.CLIP_DIR))
        torch.save(cf.aesthetic_head_state_dict(cf.EMBED, seed=6), weights / aesthetic.HEAD_FILE)
        for i, (w, h) in enumerate(SIZES):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(work / "images" / f"{i:02d}.png")
        ref = common.run_reference(py, Path(__file__), work)
        files = sorted((work / "images").glob("*.png"))
        ours = aesthetic.Aesthetic(weights=weights).score([Image.open(f) for f in files]).scores
    checks = {f"score ({len(SIZES)} PNGs, tiny ViT quick_gelu)": common.max_abs(ours, ref["scores"].numpy())}
    notes = ["CLIP in float32 on CPU in both (the predictor runs it in float16 on CUDA)"]
    version = (f"openai-clip {common.package_version(py, 'openai-clip')}, MLP from image-reward "
               f"{common.package_version(py, 'image-reward')}")
    return common.row(METRIC, REFERENCE, version, checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
