"""Parity of spobench's open_clip -> transformers CLIP conversion (used by the hpsv2 metric) with the
real open_clip, on a tiny random open_clip-layout state dict. NOT a test and NOT a dependency:
open_clip_torch needs torchvision, which does not import beside the project's torch, so open_clip
runs in a separate virtual environment, in a subprocess of this script.

Set up once (outside the repository)::

    python3 -m venv /tmp/oc
    /tmp/oc/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch

Run from the repository root with the project's venv::

    python benchmarks/parity_open_clip.py --open-clip-python /tmp/oc/bin/python [--vit-h]

What is compared (max abs differences printed; exit 1 if any exceeds --tol, default 1e-5):

* image and text features of open_clip's ``CLIP`` (built with the tiny shapes, ``load_state_dict``
  strict) vs spobench's converted transformers ``CLIPModel`` on the same pixels and token ids;
* HPSv2's preprocessing: open_clip/HPSv2's ``ResizeMaxSize`` written with torchvision's functional
  ops on PIL images vs ``spobench.metrics.clip_common.resize_longest_pad``; and OpenAI CLIP's
  ``Resize(224, BICUBIC) + CenterCrop(224)`` vs ``resize_center_crop``;
* tokens: open_clip's ``SimpleTokenizer`` (ViT-H-14) vs the hpsv2 metric's tokenizer
  (``load_open_clip_tokenizer`` + ``open_clip_ids``) built from the same BPE file (open_clip's bundled
  ``bpe_simple_vocab_16e6.txt.gz``) with a laion-style config (pad token "!") beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a photo of a red cat on the green tree",
    "An astronaut riding a horse, 4k, trending on artstation!!",
    "Café au lait &amp; croissants   —   oil painting, \"impressionism\"",
    "a " + "very " * 90 + "long prompt",  # truncated to 77 with end-of-text kept last
    "A dog's 3 toys: ball/rope; bone.",
    "! !! !!! wow!",  # "!" is laion's pad token: transformers with laion's config splits it out
]
SIZES = [(640, 480), (480, 640), (224, 224), (100, 50), (333, 777), (1024, 1024), (225, 224)]


# -- the open_clip side (runs under the open_clip venv; imports only torch, torchvision, open_clip) --

def open_clip_side(work: Path) -> None:
    import gzip  # noqa: F401  (open_clip's tokenizer reads the gz)

    import numpy as np
    import open_clip
    import torch
    import torchvision.transforms.functional as TF
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from PIL import Image
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    spec = json.loads((work / "spec.json").read_text())
    sd = torch.load(work / "state_dict.pt", weights_only=True)
    v, t = spec["vision"], spec["text"]
    model = CLIP(
        embed_dim=spec["embed"],
        vision_cfg=CLIPVisionCfg(layers=v["layers"], width=v["width"], head_width=v["width"] // v["heads"],
                                 mlp_ratio=v["mlp"] / v["width"], patch_size=v["patch"], image_size=v["image"]),
        text_cfg=CLIPTextCfg(context_length=t["context"], vocab_size=spec["vocab"], width=t["width"], heads=t["heads"],
                             layers=t["layers"], mlp_ratio=t["mlp"] / t["width"]),
        quick_gelu=False,
    )
    model.load_state_dict(sd, strict=True)
    model.eval()
    inputs = torch.load(work / "inputs.pt", weights_only=True)
    with torch.no_grad():
        img = model.encode_image(inputs["pixels"])
        txt = model.encode_text(inputs["ids"])

    def resize_max_size(im, max_size):  # hpsv2/src/open_clip/transform.py ResizeMaxSize, fill=0
        width, height = im.size
        scale = max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            im = TF.resize(im, new_size, InterpolationMode.BICUBIC)
            pad_h, pad_w = max_size - new_size[0], max_size - new_size[1]
            im = TF.pad(im, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return im

    rng = np.random.default_rng(0)
    pads, crops = [], []
    for w, h in SIZES:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pads.append(TF.to_tensor(resize_max_size(im, 224).convert("RGB")))
        crops.append(TF.to_tensor(CenterCrop(224)(Resize(224, interpolation=InterpolationMode.BICUBIC)(im))))
    tok = open_clip.get_tokenizer("ViT-H-14")
    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    torch.save({"image": img, "text": txt, "pads": pads, "crops": crops, "tokens": tok(PROMPTS), "bpe": str(bpe),
                "versions": {"open_clip": str(open_clip.__version__), "torch": str(torch.__version__)}}, work / "open_clip.pt")


def open_clip_vit_h_side(work: Path) -> None:
    """open_clip's real ViT-H-14 (random init, no download), weights rounded to float16 and saved as
    ``{"state_dict": ...}`` like HPS_v2_compressed.pt; features of fixed pixels and prompts."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, work / "HPS_like_vit_h.pt")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer("ViT-H-14")(PROMPTS[:2])
    with torch.no_grad():
        img, txt = model.encode_image(pixels), model.encode_text(tokens)
    torch.save({"pixels": pixels, "tokens": tokens, "image": img, "text": txt}, work / "vit_h.pt")


# -- the spobench side ---------------------------------------------------------------------------

def tokenizer_from_bpe(bpe_gz: str):
    """A transformers CLIPTokenizer with open_clip's SimpleTokenizer vocabulary (same construction)."""
    import gzip

    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    from clip_fixtures import bytes_to_unicode
    from spobench.metrics.clip_common import load_open_clip_tokenizer

    with gzip.open(bpe_gz) as f:  # open_clip's SimpleTokenizer: the first 49152 - 256 - 2 merges
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:  # the files a laion/... folder has, read the way the metric reads them
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps({  # laion's pad "!": must be ignored
            "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77}))
        return load_open_clip_tokenizer(d, 77)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--open-clip-python", default="/tmp/oc/bin/python", help="python of a venv with open_clip_torch")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--vit-h", action="store_true",
                    help="also compare on open_clip's full-size ViT-H-14 (random weights; ~4 GB, minutes on CPU)")
    ap.add_argument("--side", choices=["spobench", "open_clip", "open_clip_vit_h"], default="spobench",
                    help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "open_clip":
        open_clip_side(Path(args.work))
        return 0
    if args.side == "open_clip_vit_h":
        open_clip_vit_h_side(Path(args.work))
        return 0

    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    import clip_fixtures as cf
    from spobench.metrics.clip_common import (
        open_clip_ids,
        resize_center_crop,
        resize_longest_pad,
        to_normalized_tensor,
    )
    from spobench.metrics.convert_open_clip import load_open_clip_state_dict
    from spobench.metrics.hpsv2 import clean_prompt

    failures = []

    def report(what, diff):
        ok = diff <= args.tol
        print(f"{what:<58s} max|diff| = {diff:.3e}  {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        sd = cf.open_clip_state_dict(seed=0)
        torch.save(sd, work / "state_dict.pt")
        spec = {"vision": cf.VISION, "text": cf.TEXT, "embed": cf.EMBED, "vocab": cf.vocab_size()}
        (work / "spec.json").write_text(json.dumps(spec))
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(4, 3, cf.VISION["image"], cf.VISION["image"], generator=g)
        ids = torch.stack([cf.open_clip_ids(w) for w in (["a", "red", "cat"], ["the", "green", "tree", "on", "a", "photo"],
                                                        ["painting"], ["a"] * 75)])
        torch.save({"pixels": pixels, "ids": ids}, work / "inputs.pt")
        subprocess.run([args.open_clip_python, __file__, "--side", "open_clip", "--work", str(work)], check=True)
        ref = torch.load(work / "open_clip.pt", weights_only=True)

        print(f"open_clip {ref['versions']['open_clip']} (torch {ref['versions']['torch']}) vs spobench "
              f"(torch {torch.__version__}); tiny ViT width {cf.VISION['width']}, text width {cf.TEXT['width']}")
        model = load_open_clip_state_dict(sd)
        with torch.no_grad():
            img = model.get_image_features(pixel_values=pixels).pooler_output
            txt = model.get_text_features(input_ids=ids).pooler_output
        report("image features (4 images)", float((img - ref["image"]).abs().max()))
        report("text features (4 prompts, incl. a full 77-token one)", float((txt - ref["text"]).abs().max()))

        rng = np.random.default_rng(0)
        mean = torch.tensor(cf.CLIP_MEAN)[:, None, None]
        std = torch.tensor(cf.CLIP_STD)[:, None, None]
        pad_diff = crop_diff = 0.0
        for (w, h), pad_ref, crop_ref in zip(SIZES, ref["pads"], ref["crops"]):
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ours = resize_longest_pad(im, 224) * std + mean  # back to [0, 1] to compare with ToTensor
            pad_diff = max(pad_diff, float((ours - pad_ref).abs().max()))
            crop = to_normalized_tensor(resize_center_crop(im, 224)) * std + mean
            crop_diff = max(crop_diff, float((crop - crop_ref).abs().max()))
        report(f"HPSv2 ResizeMaxSize+pad ({len(SIZES)} sizes, [0,1] pixels)", pad_diff)
        report(f"CLIP Resize+CenterCrop ({len(SIZES)} sizes, [0,1] pixels)", crop_diff)

        tok = tokenizer_from_bpe(ref["bpe"])
        ours = open_clip_ids(tok, [clean_prompt(p) for p in PROMPTS], 77)
        same = (ours == ref["tokens"]).all(dim=1)
        report(f"token ids ({int(same.sum())}/{len(PROMPTS)} prompts identical)", float((~same).sum()))
        for p, s in zip(PROMPTS, same):
            if not s:
                print(f"    differs: {p!r}")

        if args.vit_h:
            import time

            from spobench.metrics.hpsv2 import load_model

            subprocess.run([args.open_clip_python, __file__, "--side", "open_clip_vit_h", "--work", str(work)], check=True)
            ref = torch.load(work / "vit_h.pt", weights_only=True)
            t0 = time.perf_counter()
            model = load_model(work / "HPS_like_vit_h.pt")  # the hpsv2 metric's loader: weights_only, strict
            print(f"ViT-H-14 checkpoint loaded and converted in {time.perf_counter() - t0:.1f} s "
                  f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters, heads "
                  f"{model.config.vision_config.num_attention_heads}/{model.config.text_config.num_attention_heads})")
            with torch.no_grad():
                img = model.get_image_features(pixel_values=ref["pixels"]).pooler_output
                txt = model.get_text_features(input_ids=ref["tokens"]).pooler_output
            report(f"ViT-H-14 image features (|max| {float(ref['image'].abs().max()):.2f})",
                   float((img - ref["image"]).abs().max()))
            report(f"ViT-H-14 text features (|max| {float(ref['text'].abs().max()):.2f})",
                   float((txt - ref["text"]).abs().max()))
            cos_ref = torch.nn.functional.cosine_similarity(ref["image"], ref["text"])
            cos = torch.nn.functional.cosine_similarity(img, txt)
            report("ViT-H-14 HPS score (cosine, 2 pairs)", float((cos - cos_ref).abs().max()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
