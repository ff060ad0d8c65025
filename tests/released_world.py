"""A user's machine for `spobench reproduce <table> --released`, in miniature: a Hugging Face cache holding
the released checkpoints under their real hub ids and in their published layouts (tiny random weights),
Pick-a-Pic's validation_unique parquet in $SPOBENCH_DATA, and the four preference metrics' official-layout
checkpoints in $SPOBENCH_WEIGHTS (the tiny ones of tests/metrics)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CAPTIONS = ["a red cat", "a photo of a blue car", "the green tree on a painting", "a dog on the car",
            "a red car", "a painting of a cat"]


def hf_cache(root: Path, backbone: str) -> Path:
    """The released checkpoints of spobench/recipes/table1.toml (sdxl) or table2.toml (sd15) [released], in a
    hub cache at ``root``. SD-1.5's SPO LoRA uses save_lora_weights' current key names, SDXL's the
    older attention-processor ones (both are published layouts)."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import (
        fake_hub_cache,
        make_lora_file,
        make_sd15_folder,
        make_sdxl_folder,
        make_unet_folder,
        make_vae_folder,
    )

    work = root.parent / f"{root.name}-build-{backbone}"
    if backbone == "sd15":
        base = make_sd15_folder(work / "sd15")
        fake_hub_cache(root, "stable-diffusion-v1-5/stable-diffusion-v1-5", base)
        fake_hub_cache(root, "mhdang/dpo-sd1.5-text2image-v1", make_unet_folder(work / "dpo", base, layout="unet"))
        lora = make_lora_file(work / "spo", load_backbone("sd15", str(base)), style="diffusers")
        fake_hub_cache(root, "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA", lora.parent)
    else:
        base = make_sdxl_folder(work / "sdxl")
        fake_hub_cache(root, "stabilityai/stable-diffusion-xl-base-1.0", base)
        fake_hub_cache(root, "mhdang/dpo-sdxl-text2image-v1", make_unet_folder(work / "dpo", base, layout="unet"))
        fake_hub_cache(root, "mapo-t2i/mapo-beta", make_unet_folder(work / "mapo", base, layout="top", seed=4))
        fake_hub_cache(root, "madebyollin/sdxl-vae-fp16-fix", make_vae_folder(work / "vae", base))
        lora = make_lora_file(work / "spo", load_backbone("sdxl", str(base)), style="attn-procs")
        fake_hub_cache(root, "SPO-Diffusion-Models/SPO-SDXL_4k-p_10ep_LoRA", lora.parent)
    return root


def pickapic(data: Path, captions=CAPTIONS) -> Path:
    """``$SPOBENCH_DATA/pickapic/validation_unique-00000-of-00001.parquet`` with Pick-a-Pic's caption column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = data / "pickapic"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": list(captions), "has_label": [True] * len(captions)}),
                   folder / "validation_unique-00000-of-00001.parquet")
    return folder


def metric_weights(root: Path) -> Path:
    """PickScore, HPSv2, ImageReward and Aesthetic checkpoints in their official layouts (tiny)."""
    sys.path.insert(0, str(HERE / "metrics"))
    import clip_fixtures as cf
    import test_imagereward as tir

    from spobench.metrics import aesthetic, hpsv2, pickscore

    cf.write_clip_model(root / "pickscore" / pickscore.MODEL_DIR, seed=3)
    cf.write_processor_folder(root / "pickscore" / pickscore.PROCESSOR_DIR, size=32)
    (root / "hpsv2").mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": cf.open_clip_state_dict(seed=1)}, root / "hpsv2" / "HPS_v2.1_compressed.pt")
    cf.write_tokenizer(root / "hpsv2" / hpsv2.TOKENIZER_DIR)
    cf.write_clip_model(root / "aesthetic" / aesthetic.CLIP_DIR, seed=5, hidden_act="quick_gelu")
    torch.save(cf.aesthetic_head_state_dict(cf.EMBED, seed=6), root / "aesthetic" / aesthetic.HEAD_FILE)
    ir = root / "imagereward"
    (ir / "bert-base-uncased").mkdir(parents=True, exist_ok=True)
    torch.save(tir.official_state_dict(), ir / "ImageReward.pt")
    (ir / "med_config.json").write_text(json.dumps(tir.MED))
    (ir / "bert-base-uncased" / "vocab.txt").write_text("\n".join(tir.WORDS) + "\n")
    return root


def env(root: Path) -> dict:
    return {"HF_HUB_CACHE": str(root / "hf"), "HF_HUB_OFFLINE": "1", "SPOBENCH_DATA": str(root / "data"),
            "SPOBENCH_WEIGHTS": str(root / "weights")}


def build(root: Path, backbones=("sd15",)) -> dict:
    for b in backbones:
        hf_cache(root / "hf", b)
    pickapic(root / "data")
    metric_weights(root / "weights")
    return env(root)
