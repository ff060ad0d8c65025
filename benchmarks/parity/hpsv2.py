"""HPSv2 parity: the ``hpsv2`` package (tgxs002/HPSv2, its own open_clip copy) vs spobench's ``hpsv2``.

Reference side, in the parity venv: ``hpsv2.src.open_clip.create_model_and_transforms`` with the
arguments of ``hpsv2.img_score.initialize_model`` on a tiny ViT config registered beside ViT-H-14,
the checkpoint loaded as ``img_score.score`` loads it (``model.load_state_dict(ckpt["state_dict"])``),
``preprocess_val`` on the PNG files, and the score ``diag(image_features @ text_features.T)``.
spobench side: ``spobench.metrics.hpsv2.HPSv2`` on the same folder (tests/metrics/official_weights.py's
``build_hpsv2``) and the same files. Also compared: ``preprocess_val`` at 224 on 7 image sizes, and
HPSv2's tokenizer vs the metric's on the full BPE vocabulary (the file the hpsv2 package ships).

    python benchmarks/parity/hpsv2.py          (or benchmarks/parity/driver.py for every metric)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRIC = "hpsv2"
REFERENCE = "hpsv2 (tgxs002/HPSv2: img_score + its open_clip copy)"
REQUIREMENTS = ("hpsv2==1.2.0", "open_clip_torch")  # open_clip only for the BPE file (see add_missing_bpe)
# hpsv2 1.2.0's wheel lacks its tokenizer's BPE file (hpsv2/src/open_clip/bpe_simple_vocab_16e6.txt.gz,
# present in the repository); the usual fix is to copy open_clip's, which is the same OpenAI CLIP file.
ADD_BPE = """
import pathlib, shutil, open_clip, importlib.util
dst = pathlib.Path(importlib.util.find_spec("hpsv2").submodule_search_locations[0]) / "src/open_clip"
name = "bpe_simple_vocab_16e6.txt.gz"
if not (dst / name).exists():
    shutil.copy(pathlib.Path(open_clip.__file__).parent / name, dst / name)
    print("copied")
"""
WORDS = [["a", "red", "cat"], ["the", "green", "tree", "on", "a", "photo"], ["painting"], ["a"] * 75,
         ["a", "blue", "car", "on", "the", "tree"]]
TEXT = {"width": 64, "layers": 2, "heads": 1, "context": 77, "mlp": 256}  # clip_fixtures.TEXT, mlp_ratio 4
SIZES = [(640, 480), (480, 640), (224, 224), (100, 50), (333, 777), (1024, 1024), (225, 224), (48, 40)]
TOKEN_PROMPTS = [
    "a photo of a red cat on the green tree",
    "An astronaut riding a horse, 4k, trending on artstation!!",
    "Café au lait &amp; croissants   —   oil painting, \"impressionism\"",
    "a " + "very " * 90 + "long prompt",
    "A dog's 3 toys: ball/rope; bone.",
    "! !! !!! wow!",
]


def images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


# -- reference side (parity venv: torch 2.14.1, torchvision, hpsv2) ------------------------------

def reference_side(work: Path) -> None:
    import clip_fixtures as cf
    import torch
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer
    from hpsv2.src.open_clip import factory, image_transform
    from PIL import Image

    v, t = cf.VISION, TEXT
    factory._MODEL_CONFIGS["tiny-ViT"] = {  # ViT-H-14.json's fields at the fixture's sizes
        "embed_dim": cf.EMBED,
        "vision_cfg": {"image_size": v["image"], "layers": v["layers"], "width": v["width"],
                       "head_width": v["width"] // v["heads"], "mlp_ratio": v["mlp"] / v["width"],
                       "patch_size": v["patch"]},
        "text_cfg": {"context_length": t["context"], "vocab_size": cf.vocab_size(), "width": t["width"],
                     "heads": t["heads"], "layers": t["layers"], },
    }
    kwargs = dict(precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
                  force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None,
                  image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
                  with_score_predictor=False, with_region_predictor=False)
    model, _, preprocess_val = create_model_and_transforms("tiny-ViT", None, **kwargs)
    checkpoint = torch.load(work / "weights" / "HPS_v2.1_compressed.pt", map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    files = sorted((work / "images").glob("*.png"))
    ids = torch.stack([cf.open_clip_ids(w) for w in WORDS])
    scores = []
    with torch.no_grad():
        for f, text in zip(files, ids):
            image = preprocess_val(Image.open(f)).unsqueeze(0)
            out = model(image, text[None])
            scores.append(float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0]))
        preprocess_224 = image_transform(224, is_train=False, resize_longest_max=True)  # ViT-H-14's preprocess_val
        pixels = [preprocess_224(Image.open(f)) for f in files]
    tokens = get_tokenizer("ViT-H-14")(TOKEN_PROMPTS)
    import hpsv2.src.open_clip as oc

    bpe = Path(oc.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    torch.save({"scores": torch.tensor(scores, dtype=torch.float64), "pixels": pixels, "tokens": tokens,
                "bpe": str(bpe)}, work / "reference.pt")


# -- spobench side -------------------------------------------------------------------------------

def tokenizer_from_bpe(bpe_gz: str):
    """The metric's tokenizer (``load_open_clip_tokenizer``) on open_clip's own BPE file, laid out as a
    laion/... folder whose config has pad token "!" (which the metric must ignore)."""
    import gzip

    from clip_fixtures import bytes_to_unicode
    from spobench.metrics.clip_common import load_open_clip_tokenizer

    with gzip.open(bpe_gz) as f:  # open_clip's SimpleTokenizer: the first 49152 - 256 - 2 merges
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        (Path(d) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "!", "model_max_length": 77}))
        return load_open_clip_tokenizer(d, 77)


def spobench_side(venv: Path) -> dict:
    import clip_fixtures as cf
    import torch
    from spobench.metrics import hpsv2
    from spobench.metrics.clip_common import open_clip_ids, resize_longest_pad

    t0 = time.perf_counter()
    py = common.ensure_venv(METRIC, REQUIREMENTS, venv)
    copied = subprocess.run([str(py), "-c", ADD_BPE], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        (work / "weights").mkdir()
        (work / "images").mkdir()
        # official_weights.build_hpsv2's layout, with the text MLP at 4x width: HPSv2's open_clip copy
        # hard-wires the text tower's mlp_ratio to 4 (as in ViT-H-14); the fixture's is 2
        torch.save({"state_dict": cf.open_clip_state_dict(seed=1, text=TEXT)},
                   work / "weights" / hpsv2.CHECKPOINTS["v2.1"])
        cf.write_tokenizer(work / "weights" / hpsv2.TOKENIZER_DIR)
        for i, im in enumerate(images()):
            im.save(work / "images" / f"{i:02d}.png")
        ref = common.run_reference(py, Path(__file__), work)
        from PIL import Image

        files = sorted((work / "images").glob("*.png"))
        pil = [Image.open(f) for f in files]
        prompts = [" ".join(w) for w in WORDS]
        n = min(len(files), len(WORDS))
        ours = hpsv2.HPSv2(weights=work / "weights").score(pil[:n], prompts[:n]).scores
        ours_px = [resize_longest_pad(im, 224) for im in pil]
    tok = tokenizer_from_bpe(ref["bpe"])
    ids = open_clip_ids(tok, [hpsv2.clean_prompt(p) for p in TOKEN_PROMPTS], 77)
    same = (ids == ref["tokens"]).all(dim=1)
    checks = {
        f"score (tiny ViT, {n} PNGs of {len(SIZES)} sizes)": common.max_abs(ours, ref["scores"].numpy()[:n]),
        f"preprocess_val at 224 ({len(SIZES)} sizes, normalised pixels)":
            max(float((a - b).abs().max()) for a, b in zip(ours_px, ref["pixels"])),
        f"token ids, full BPE ({int(same.sum())}/{len(TOKEN_PROMPTS)} prompts identical; rows differing)":
            float((~same).sum()),
    }
    notes = [f"hpsv2 1.2.0's wheel lacks bpe_simple_vocab_16e6.txt.gz; open_clip_torch "
             f"{common.package_version(py, 'open_clip_torch')}'s copy of that file is put beside it"
             f"{' (this run)' if copied else ''}",
             "runs in float32 on CPU (img_score's torch.cuda.amp.autocast is a no-op there)",
             "ftfy's mojibake repair is not applied by spobench (no prompt here needs it)"]
    return common.row(METRIC, REFERENCE, "hpsv2 " + common.package_version(py, "hpsv2"), checks, notes, t0)


if __name__ == "__main__":
    common.script_main(METRIC, REFERENCE, spobench_side, reference_side)
