"""Metric cost: images/s of each metric plugin on tiny random weights, and FLOPs per image at the real sizes.

Run (see benchmarks/README.md)::

    OMP_NUM_THREADS=1 pytest benchmarks/bench_metrics.py --benchmark-only -s

* ``test_images_per_s[...]``: ``Metric.score`` on 16 random RGB images of 512x512 (SD-1.5) or 1024x1024
  (SDXL) with their prompts, through each plugin's real loading code on tiny random checkpoints written in
  the official layouts (the builders of ``tests/metrics``). The model is tiny, so the figure is the
  plugin's per-image overhead (PIL resize/crop to the model's input, tokenising, batching), a ceiling on
  what the real model can do, not a prediction of it. ``extra_info`` holds ``images_per_s`` (mean round)
  and ``images_per_s_best`` (fastest round: the figure least disturbed by other load on the machine).
* ``test_flops_per_image``: matmul FLOPs (2 x multiply-accumulates; convolutions as matmuls; softmax,
  norms, activations and the final cosine not counted) of one image's score at the real sizes, computed
  analytically from the architectures below and checked against ``torch.utils.flop_counter`` run on the
  same architectures built on the meta device (no weights, no compute). Writes
  ``benchmarks/results/metric_flops.json`` and prints a table.

Architectures (the published checkpoints' shapes):

* PickScore v1 and HPSv2/v2.1: open_clip ViT-H-14 (laion2B): vision 32 x 1280 (MLP 5120), patch 14 at
  224 -> 257 tokens; text 24 x 1024 (MLP 4096) over 77 tokens; embeddings 1024. HPSv2 always pads to 77
  tokens; PickScore pads to the batch's longest prompt, so 77 is its upper bound.
* Aesthetic (LAION improved-aesthetic-predictor v2): OpenAI CLIP ViT-L/14 vision tower, 24 x 1024 (MLP 4096),
  patch 14 at 224 -> 257 tokens, projection 768; head 768-1024-128-64-16-1. No text tower (prompt-free).
* ImageReward v1.0: BLIP ViT-L/16, 24 x 1024 (MLP 4096), patch 16 at 224 -> 197 tokens; BERT-base text
  encoder (12 x 768, MLP 3072) over 35 tokens with cross-attention to the 197 image tokens in every layer;
  MLP head 768-1024-128-64-16-1.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N_IMAGES = 16
IMAGE_SIZES = (512, 1024)
METRICS = ("pickscore", "hpsv2", "aesthetic", "imagereward")


# -- analytic FLOPs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ViT:
    width: int
    layers: int
    mlp: int
    patch: int
    image: int
    heads: int = 16  # does not change the FLOPs; kept to build the same model
    proj: int = 0  # output projection of the pooled token (0: none)

    @property
    def tokens(self) -> int:
        return (self.image // self.patch) ** 2 + 1  # patches + class token


@dataclass(frozen=True)
class TextTower:
    width: int
    layers: int
    mlp: int
    seq: int
    heads: int = 16
    proj: int = 0
    cross_width: int = 0  # width of the image tokens attended to (0: no cross-attention)
    cross_tokens: int = 0


def encoder_layer_macs(n: int, d: int, m: int) -> int:
    """Pre/post-norm transformer layer on n tokens of width d, MLP width m: QKV + out projections (4nd^2),
    QK^T and attention x V (2n^2 d), MLP (2ndm)."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def vit_macs(v: ViT) -> int:
    patches = v.tokens - 1
    return patches * 3 * v.patch * v.patch * v.width + v.layers * encoder_layer_macs(v.tokens, v.width, v.mlp) \
        + v.width * v.proj


def text_macs(t: TextTower) -> int:
    per_layer = encoder_layer_macs(t.seq, t.width, t.mlp)
    if t.cross_width:  # BLIP/MED: Q and out on text, K and V on every image token, scores and x V
        per_layer += 2 * t.seq * t.width * t.width + 2 * t.cross_tokens * t.cross_width * t.width \
            + 2 * t.seq * t.cross_tokens * t.width
    return t.layers * per_layer + t.width * t.proj


def mlp_macs(widths: tuple[int, ...]) -> int:
    return sum(a * b for a, b in itertools.pairwise(widths))


VIT_H14 = ViT(width=1280, layers=32, mlp=5120, patch=14, image=224, proj=1024)
TEXT_H14 = TextTower(width=1024, layers=24, mlp=4096, seq=77, proj=1024)
VIT_L14 = ViT(width=1024, layers=24, mlp=4096, patch=14, image=224, proj=768)
BLIP_VIT_L16 = ViT(width=1024, layers=24, mlp=4096, patch=16, image=224)
BLIP_BERT = TextTower(width=768, layers=12, mlp=3072, seq=35, heads=12, cross_width=1024, cross_tokens=197)
HEAD = (768, 1024, 128, 64, 16, 1)  # aesthetic and ImageReward MLP heads (same widths)

ARCH = {
    "pickscore": {"vision": VIT_H14, "text": TEXT_H14, "head": None},
    "hpsv2": {"vision": VIT_H14, "text": TEXT_H14, "head": None},
    "aesthetic": {"vision": VIT_L14, "text": None, "head": HEAD},
    "imagereward": {"vision": BLIP_VIT_L16, "text": BLIP_BERT, "head": HEAD},
}


def analytic_flops(name: str) -> dict[str, int]:
    a = ARCH[name]
    out = {"vision": 2 * vit_macs(a["vision"]),
           "text": 2 * text_macs(a["text"]) if a["text"] else 0,
           "head": 2 * mlp_macs(a["head"]) if a["head"] else 0}
    out["total"] = out["vision"] + out["text"] + out["head"]
    return out


# -- the same architectures on the meta device, counted by torch ---------------------------------

def _clip_config(vision: ViT, text: TextTower | None):
    from transformers import CLIPConfig

    t = text or TextTower(width=768, layers=12, mlp=3072, seq=77, heads=12, proj=vision.proj)  # OpenAI L/14's, unused
    return CLIPConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=t.mlp, num_hidden_layers=t.layers,
                         num_attention_heads=t.heads, max_position_embeddings=77, vocab_size=49408,
                         projection_dim=t.proj),
        vision_config=dict(hidden_size=vision.width, intermediate_size=vision.mlp, num_hidden_layers=vision.layers,
                           num_attention_heads=vision.heads,
                           image_size=vision.image, patch_size=vision.patch, projection_dim=vision.proj),
        projection_dim=vision.proj)


def counted_flops(name: str) -> dict[str, int]:
    """FLOPs that torch's FlopCounterMode sees for one image's score, models built on the meta device."""
    a = ARCH[name]
    return dict(_counted(name == "imagereward", a["vision"], a["text"], a["head"]))


@functools.cache
def _counted(blip: bool, v: ViT, text: TextTower | None, head_widths: tuple | None) -> tuple:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        return int(fc.get_total_flops())

    a = {"vision": v, "text": text, "head": head_widths}
    pixels = torch.zeros(1, 3, v.image, v.image, device="meta")
    if not blip:
        from transformers import CLIPModel

        with torch.device("meta"):
            model = CLIPModel(_clip_config(v, a["text"])).eval()
        out = {"vision": count(lambda: model.get_image_features(pixel_values=pixels)), "text": 0, "head": 0}
        if a["text"]:
            ids = torch.zeros(1, a["text"].seq, dtype=torch.long, device="meta")
            out["text"] = count(lambda: model.get_text_features(input_ids=ids))
        if a["head"]:
            from spobench.metrics.aesthetic import AestheticHead

            with torch.device("meta"):
                head = AestheticHead(a["head"][0]).eval()
            out["head"] = count(lambda: head(torch.zeros(1, a["head"][0], device="meta")))
    else:  # imagereward: the plugin's own config derivation and model class
        from spobench.metrics import imagereward as ir

        t = a["text"]
        grid = v.image // v.patch
        state = {"blip.visual_encoder.cls_token": torch.zeros(1, 1, v.width, device="meta"),
                 "blip.visual_encoder.pos_embed": torch.zeros(1, grid * grid + 1, v.width, device="meta"),
                 "blip.visual_encoder.patch_embed.proj.weight": torch.zeros(v.width, 3, v.patch, v.patch, device="meta"),
                 **{f"blip.visual_encoder.blocks.{i}.mlp.fc1.weight": torch.zeros(v.mlp, v.width, device="meta")
                    for i in range(v.layers)}}
        med = {"vocab_size": 30524, "hidden_size": t.width, "intermediate_size": t.mlp, "num_hidden_layers": t.layers,
               "num_attention_heads": t.heads, "max_position_embeddings": 512, "add_cross_attention": True}
        vision_cfg, text_cfg = ir._configs(state, med)
        with torch.device("meta"):
            model = ir.ImageRewardModel(vision_cfg, text_cfg).eval()
        ids = torch.zeros(1, t.seq, dtype=torch.long, device="meta")
        image_tokens = model.vision(pixel_values=pixels).last_hidden_state
        # masks left out: all-ones masks (what the score passes for full-length ids and the image) cost no
        # matmul, and building them reads tensor values, which meta tensors do not have
        out = {"vision": count(lambda: model.vision(pixel_values=pixels)),
               "text": count(lambda: model.text(input_ids=ids, encoder_hidden_states=image_tokens, is_decoder=False)),
               "head": count(lambda: model.mlp(torch.zeros(1, t.width, device="meta")))}
    out["total"] = out["vision"] + out["text"] + out["head"]
    return tuple(out.items())


def flops_table() -> dict:
    rows = {}
    for name in METRICS:
        mine = analytic_flops(name)
        torch_count = counted_flops(name)
        a = ARCH[name]
        rows[name] = {
            "gflops_per_image": {k: v / 1e9 for k, v in mine.items()},
            "flops_per_image": mine,
            "flop_counter_total": torch_count["total"],
            "flop_counter_matches": torch_count == mine,
            "architecture": {k: (asdict(x) if hasattr(x, "__dataclass_fields__") else x) for k, x in a.items()},
        }
    return {
        "what": "matmul FLOPs (2 x MACs) of one image's score at the real model sizes; softmax, norms, activations "
                "and the final cosine not counted; PickScore's text at its 77-token upper bound",
        "metrics": rows,
    }


def format_table(table: dict) -> str:
    lines = [f"{'metric':<12} {'vision':>9} {'text':>9} {'head':>9} {'total':>9}  (GFLOPs / image)  torch check",
             "-" * 78]
    for name, r in table["metrics"].items():
        g = r["gflops_per_image"]
        lines.append(f"{name:<12} {g['vision']:>9.2f} {g['text']:>9.2f} {g['head']:>9.4f} {g['total']:>9.2f}"
                     f"  {'' :17} {'ok' if r['flop_counter_matches'] else 'MISMATCH'}")
    return "\n".join(lines)


def test_flops_per_image(benchmark, capsys):
    table = benchmark.pedantic(flops_table, rounds=1, iterations=1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    from spobench.core.io import atomic_write_json

    atomic_write_json(RESULTS / "metric_flops.json", table)
    for name, r in table["metrics"].items():
        benchmark.extra_info[f"{name}_gflops"] = round(r["gflops_per_image"]["total"], 3)
    with capsys.disabled():
        print("\n" + format_table(table) + f"\nwritten to {RESULTS / 'metric_flops.json'}")
    assert all(r["flop_counter_matches"] for r in table["metrics"].values()), format_table(table)


# -- throughput on tiny random weights in the official layouts ----------------------------------

def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clip_fixtures():
    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    import clip_fixtures

    return clip_fixtures


def build_pickscore(folder: Path):
    from spobench.metrics import pickscore

    cf = _clip_fixtures()
    cf.write_clip_model(folder / pickscore.MODEL_DIR, seed=3)
    cf.write_processor_folder(folder / pickscore.PROCESSOR_DIR, size=32)
    return pickscore.PickScore(weights=folder, batch_size=N_IMAGES), cf.WORDS


def build_hpsv2(folder: Path):
    import torch
    from spobench.metrics import hpsv2

    cf = _clip_fixtures()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": cf.open_clip_state_dict(seed=1)}, folder / hpsv2.CHECKPOINTS[hpsv2.DEFAULT_VERSION])
    cf.write_tokenizer(folder / hpsv2.TOKENIZER_DIR)
    return hpsv2.HPSv2(weights=folder, batch_size=N_IMAGES), cf.WORDS


def build_aesthetic(folder: Path):
    import torch
    from spobench.metrics import aesthetic

    cf = _clip_fixtures()
    cf.write_clip_model(folder / aesthetic.CLIP_DIR, seed=5, hidden_act="quick_gelu")
    torch.save(cf.aesthetic_head_state_dict(cf.EMBED, seed=6), folder / aesthetic.HEAD_FILE)
    return aesthetic.Aesthetic(weights=folder, batch_size=N_IMAGES), cf.WORDS


def build_imagereward(folder: Path):
    import torch
    from spobench.metrics import imagereward as ir

    t = _load_module("_bench_imagereward_fixtures", ROOT / "tests" / "metrics" / "test_imagereward.py")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(t.official_state_dict(), folder / ir.CHECKPOINT)
    (folder / ir.MED_CONFIG).write_text(json.dumps(t.MED))
    (folder / ir.TOKENIZER_DIR).mkdir()
    (folder / ir.TOKENIZER_DIR / "vocab.txt").write_text("\n".join(t.WORDS) + "\n")
    return ir.ImageReward(weights=folder, batch_size=N_IMAGES), [w for w in t.WORDS if w.isalpha()]


BUILDERS = {"pickscore": build_pickscore, "hpsv2": build_hpsv2, "aesthetic": build_aesthetic,
            "imagereward": build_imagereward}


@pytest.fixture(scope="module")
def tiny_metrics(tmp_path_factory):
    built = {}
    for name, build in BUILDERS.items():
        try:
            metric, words = build(tmp_path_factory.mktemp(name))
            metric.load()
            built[name] = (metric, words)
        except (ImportError, AttributeError, FileNotFoundError) as e:  # a plugin or its test builder not there
            built[name] = e
    return built


def _workload(size: int, words, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(N_IMAGES)]
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(N_IMAGES)]
    return images, prompts


@pytest.mark.parametrize("size", IMAGE_SIZES)
@pytest.mark.parametrize("name", METRICS)
def test_images_per_s(benchmark, tiny_metrics, name, size):
    entry = tiny_metrics[name]
    if isinstance(entry, Exception):
        pytest.skip(f"{name}: cannot build the tiny checkpoint ({entry})")
    metric, words = entry
    images, prompts = _workload(size, words)
    result = benchmark.pedantic(metric.score, args=(images, prompts), rounds=5, iterations=1, warmup_rounds=1)
    assert result.scores.shape == (N_IMAGES,) and np.isfinite(result.scores).all()
    benchmark.extra_info.update({"images": N_IMAGES, "image_size": size,
                                 "images_per_s": round(N_IMAGES / benchmark.stats.stats.mean, 1),
                                 "images_per_s_best": round(N_IMAGES / benchmark.stats.stats.min, 1),
                                 "threads": __import__("torch").get_num_threads()})


if __name__ == "__main__":  # the FLOPs table alone, without pytest
    t = flops_table()
    print(format_table(t))
