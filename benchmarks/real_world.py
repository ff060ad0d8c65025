"""Day one at the real sizes, on this machine: the installed CLI on random-weight models in the published layouts.

Not CI. Writes, under --work (nothing is downloaded):

* ``sd15/``, ``sdxl/``: diffusers folders at the published SD-1.5 / SDXL-base architectures (the UNet and
  VAE configs of ``bench_real_size.py``; CLIP ViT-L/14 and OpenCLIP bigG/14 text encoders as those repos
  ship them), random weights, fp32 safetensors, the shipped scheduler configs;
* ``sd3/``: a StableDiffusion3Pipeline folder at stabilityai/stable-diffusion-3.5-medium's published configs
  (SD3Transformer2DModel 2.5B, 16-channel VAE, CLIP-L + CLIP-G; no T5, see ``build_sd3``), bf16 safetensors;
* ``metrics/pickscore``: a transformers CLIPModel at PickScore's size (ViT-H/14, 1024-d text tower) and its
  laion ViT-H processor folder; ``spm/``: spobench's SPM folder built from that CLIP (the step scorer);
* ``metrics/hpsv2``: ``HPS_v2.1_compressed.pt`` (an open_clip ViT-H-14 ``state_dict``); ``metrics/imagereward``:
  ``ImageReward.pt`` (BLIP ViT-L/16 + BERT-base MED), ``med_config.json``, ``bert-base-uncased/vocab.txt``;
  ``metrics/aesthetic``: ``sac+logos+ava1-l14-linearMSE.pth`` and ``clip-vit-large-patch14/``.

The metric checkpoints reuse the official-layout writers of tests/metrics (clip_fixtures.py,
test_imagereward.py) at the published widths. Tokenizers are the tests' tiny BPE / WordPiece vocabularies
padded with never-produced filler entries to the real vocabulary sizes, so the special-token ids are the
real ones (CLIP: 49406/49407; BERT: 30522 entries + [DEC], [ENC]); only the prompts' word pieces differ.

Then it runs the REAL installed CLI on them, each command in its own process under ``nice`` (the machine is
shared), and records wall seconds and peak RSS (``ru_maxrss`` from ``wait4``, what ``/usr/bin/time -v``
prints as "Maximum resident set size") with the command line, the load average and the free memory::

    spobench train spo  --backbone sd15 --model sd15 ...   (one round, 1 prompt, k = 2, --steps DDIM steps)
    spobench generate   --backbone sd15 --model sd15 --lora <that LoRA> ...
    spobench eval       --metrics pickscore,hpsv2,imagereward,aesthetic ...
    spobench spm import metrics/spm-official.bin --clip <PickScore> ...   (issue 13: an official-layout SPM)
    spobench reproduce table2 --released --limit 2   (offline hub cache of sd15/ + random released DPO UNet, SPO LoRA)
    spobench train mspo --backbone sdxl --model sdxl ...   (1024 px unless --sdxl-resolution)
    spobench train spo  --backbone sd3 --model sd3 ...     (issue 18: SD3.5-Medium's size; where this spobench
        refuses SPO on a flow backbone (exit 2), train flow-grpo one round, G = 2, the SPM as reward)
    spobench generate   --backbone sd3 --lora <that LoRA> ...

Parts (--parts): ``sd15`` (train spo, generate, eval), ``released`` (spm import, reproduce table2 --released),
``sdxl`` (train mspo), ``sd3`` (train spo or flow-grpo, generate)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_world.py --parts sd15          # the SD-1.5 path
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_world.py --parts released --released-steps 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_world.py --parts sdxl --sdxl-resolution 512 --dtype bf16 \
        --train-set train_batch_size=1 --train-set grad_accum=2 --train-set scorer_batch=1
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_world.py --parts sd3 --dtype bf16
    .venv/bin/python benchmarks/real_world.py --tiny --parts sd15,released,sd3 --out /tmp/rw.json  # test the script

Results: benchmarks/results/real_world.json (one entry per command; re-running a part replaces its entries).
The memory budget is 24 GB on 2 cores: ``budget_ok`` says whether each command stayed under it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "real_world.json"
BUDGET_GIB = 24.0
CLIP_VOCAB, BERT_VOCAB = 49408, 30522
PROMPT = "a photo of a red cat on the green tree"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def bench():
    return _load("_bench_real_size", HERE / "bench_real_size.py")


def fixtures():
    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    return _load("clip_fixtures", ROOT / "tests" / "metrics" / "clip_fixtures.py")


# -- the published text encoders and metric towers ------------------------------------------------------
# openai/clip-vit-large-patch14 (SD-1.5's text_encoder, SDXL's text_encoder, the aesthetic predictor's CLIP)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
CLIP_L_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     patch_size=14, image_size=224, hidden_act="quick_gelu", projection_dim=768)
# stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2 (OpenCLIP ViT-bigG/14 text tower)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
# yuvalkirstain/PickScore_v1 (CLIP ViT-H/14, laion2B)
PICK_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 hidden_act="gelu", projection_dim=1024)
PICK_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                   patch_size=14, image_size=224, hidden_act="gelu", projection_dim=1024)
# HPS_v2.1_compressed.pt: open_clip ViT-H-14 (image head width 80, text head width 64)
HPS_VISION = dict(width=1280, layers=32, heads=16, patch=14, image=224, mlp=5120)
HPS_TEXT = dict(width=1024, layers=24, heads=16, context=77, mlp=4096)
# ImageReward.pt: BLIP ViT-L/16 at 224 and its med_config.json (BERT-base with cross-attention)
IR_VIT = dict(width=1024, depth=24, heads=16, patch=16, image=224, mlp=4096)
IR_MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": BERT_VOCAB + 2,
    "encoder_width": 768, "add_cross_attention": True,
}


def tiny_sizes(d: dict, **small) -> dict:
    """--tiny: the same keys at test widths (to exercise the script in seconds)."""
    return {**d, **small}


# -- tokenizers at the real vocabulary sizes -------------------------------------------------------------
def write_clip_tokenizer(folder: Path, pad_token: str, vocab_size: int = CLIP_VOCAB) -> Path:
    """CLIP BPE files: the tests' tiny merges and tokens, filler entries up to the real size, then
    <|startoftext|> = size - 2 and <|endoftext|> = size - 1 as in CLIP."""
    cf = fixtures()
    vocab, merges = cf.tiny_vocab()
    tokens = [t for t in sorted(vocab, key=vocab.get) if t not in ("<|startoftext|>", "<|endoftext|>")]
    tokens += [f"<filler{i}>" for i in range(vocab_size - 2 - len(tokens))] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}))
    return folder


def write_processor(folder: Path, size: int, vocab_size: int) -> Path:
    """laion/CLIP-ViT-H-14-laion2B-s32B-b79K's processor files (tokenizer pads with "!", id 0)."""
    cf = fixtures()
    write_clip_tokenizer(folder, "!", vocab_size)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(cf.CLIP_MEAN),
        "image_std": list(cf.CLIP_STD), "resample": 3, "size": size}))
    return folder


def _text_config(spec: dict, vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                          eos_token_id=vocab_size - 1, pad_token_id=1, **spec)


# -- the diffusers folders -------------------------------------------------------------------------------
def _model_index(backbone: str, folder: Path) -> None:
    """model_index.json exactly as diffusers' pipeline writes it (taken from the tiny stand-in of the
    same pipeline class, spobench.models.backbones.testing), so that the layout is the published one."""
    import tempfile

    from spobench.models.backbones import testing

    with tempfile.TemporaryDirectory() as tmp:
        make = {"sd15": testing.make_sd15_folder, "sdxl": testing.make_sdxl_folder,
                "sd3": testing.make_sd3_folder}[backbone]
        make(Path(tmp) / "m")
        shutil.copy(Path(tmp) / "m" / "model_index.json", folder / "model_index.json")


def _save(module, folder: Path) -> None:
    # shards of <= 2 GB: safetensors builds each file's bytes in memory, so one 10 GB SDXL UNet file
    # would double the builder's peak (diffusers and transformers both read sharded folders)
    module.save_pretrained(str(folder), safe_serialization=True, max_shard_size="2GB")


def build_backbone(backbone: str, folder: Path, tiny: bool) -> dict:
    """One component at a time (built, saved, freed), so that the builder holds one network at most."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from spobench.models.backbones import testing

    b = bench()
    c = b.configs(backbone, 8 if tiny else 1, tiny_widths=tiny)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    params = {}
    unet = UNet2DConditionModel(**c["unet"])
    params["unet"] = sum(p.numel() for p in unet.parameters())
    _save(unet, folder / "unet")
    del unet
    gc.collect()
    vae_cfg = dict(c["vae"])
    vae_cfg.setdefault("scaling_factor", 0.18215)
    vae = AutoencoderKL(**vae_cfg)
    params["vae"] = sum(p.numel() for p in vae.parameters())
    _save(vae, folder / "vae")
    del vae
    gc.collect()
    small = dict(num_hidden_layers=2)  # --tiny: widths kept, they must match the UNet's cross-attention
    encoders = [("text_encoder", CLIP_L_TEXT, CLIPTextModel, "<|endoftext|>")]
    if backbone == "sdxl":
        encoders.append(("text_encoder_2", CLIP_BIGG_TEXT, CLIPTextModelWithProjection, "!"))
    for name, spec, klass, pad in encoders:
        spec = tiny_sizes(spec, **small) if tiny else spec
        enc = klass(_text_config(spec, CLIP_VOCAB))
        params[name] = sum(p.numel() for p in enc.parameters())
        _save(enc, folder / name)
        del enc
        gc.collect()
        tok_dir = folder / name.replace("text_encoder", "tokenizer")
        write_clip_tokenizer(tok_dir, pad)
        CLIPTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tok_dir))  # + added_tokens etc.
    (folder / "scheduler").mkdir(exist_ok=True)
    sched = testing.SD15_SCHEDULER_CONFIG if backbone == "sd15" else testing.SDXL_SCHEDULER_CONFIG
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    _model_index(backbone, folder)
    return {"params": params, "config": {"unet": c["unet"], "vae": vae_cfg, "latent": c["latent"], "image": c["image"]}}


# -- SD3.5-Medium (issue 18) ------------------------------------------------------------------------------
# stabilityai/stable-diffusion-3.5-medium transformer/config.json: SD3Transformer2DModel (MMDiT-X), 2.24B
# parameters + the saved 384 x 384 x 1536 sin-cos position table (0.23B; 2.47B x 2 bytes = the published
# 4.9 GB file), dual attention in the first 13 blocks, qk RMS-norm; joint_attention_dim 4096 = T5-XXL's width
# (without T5 the two CLIPs' 768 + 1280 are zero-padded to it), pooled 768 + 1280 = 2048
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# its vae/config.json: the SD VAE's blocks with 16 latent channels, no quant convs, scaling/shift of SD3
SD35M_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", sample_size=1024,
                 scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
                 force_upcast=True)
# --tiny: 2 blocks of 2 heads x 8 (the tiny sd3 folder's), the CLIP widths kept (they fix 4096 / 2048)
SD35M_TINY = dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  caption_projection_dim=16, pos_embed_max_size=64, dual_attention_layers=(0,))  # generate: 512 px


def build_sd3(folder: Path, tiny: bool) -> dict:
    """A StableDiffusion3Pipeline folder at SD3.5-Medium's size without T5 (``text_encoder_3`` null in
    model_index.json, as ``StableDiffusion3Pipeline.from_pretrained(..., text_encoder_3=None)`` saves it):
    T5-XXL is 4.8B parameters (19 GB fp32, 9.5 GB bf16) beside the 2.2B transformer, more than the 24 GB
    this runs in; SD3 is trained with T5 dropped at random and runs without it. Weights are written in
    bf16, 2 bytes a weight as the published files (transformer 4.9 GB); built in bf16 too, so that the
    builder holds 5 GB, not 10."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from spobench.models.backbones import testing

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    params = {}
    cfg = {**SD35M_TRANSFORMER, **(SD35M_TINY if tiny else {})}
    vae_cfg = {**SD35M_VAE, **(dict(block_out_channels=(32, 32, 64, 64)) if tiny else {})}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        for name, make in (("transformer", lambda: SD3Transformer2DModel(**cfg)),
                           ("vae", lambda: AutoencoderKL(**vae_cfg))):
            module = make()
            params[name] = sum(p.numel() for p in module.parameters())
            _save(module, folder / name)
            del module
            gc.collect()
        small = dict(num_hidden_layers=2)
        for name, spec, pad in (("text_encoder", CLIP_L_TEXT, "<|endoftext|>"), ("text_encoder_2", CLIP_BIGG_TEXT, "!")):
            spec = tiny_sizes(spec, **small) if tiny else spec
            enc = CLIPTextModelWithProjection(_text_config(spec, CLIP_VOCAB))
            params[name] = sum(p.numel() for p in enc.parameters())
            _save(enc, folder / name)
            del enc
            gc.collect()
            tok_dir = folder / name.replace("text_encoder", "tokenizer")
            write_clip_tokenizer(tok_dir, pad)
            CLIPTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(tok_dir))
    finally:
        torch.set_default_dtype(default)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(testing.SD3_SCHEDULER_CONFIG, indent=2) + "\n")
    _model_index("sd3", folder)
    return {"params": params, "t5": False, "dtype": "bf16",
            "config": {"transformer": {**cfg, "dual_attention_layers": list(cfg["dual_attention_layers"])},
                       "vae": vae_cfg}}


# -- the metric checkpoints and the SPM ------------------------------------------------------------------
def _clip_model(text: dict, vision: dict, folder: Path, tiny: bool) -> int:
    import torch
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        text = tiny_sizes(text, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          projection_dim=16)
        vision = tiny_sizes(vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=16)
    tc = _text_config(text, CLIP_VOCAB).to_dict()
    config = CLIPConfig(text_config=tc, vision_config=vision, projection_dim=text["projection_dim"])
    torch.manual_seed(1)
    model = CLIPModel(config)
    n = sum(p.numel() for p in model.parameters())
    _save(model, folder)
    del model
    gc.collect()
    return n


def build_pickscore_and_spm(work: Path, tiny: bool) -> dict:
    from spobench.metrics import pickscore
    from spobench.models.spm import StepAwarePreferenceModel

    root = work / "metrics" / "pickscore"
    n = _clip_model(PICK_TEXT, PICK_VISION, root / pickscore.MODEL_DIR, tiny)
    write_processor(root / pickscore.PROCESSOR_DIR, 224, CLIP_VOCAB)
    spm = StepAwarePreferenceModel.from_clip(root / pickscore.MODEL_DIR, processor=root / pickscore.PROCESSOR_DIR)
    spm.save(work / "spm")
    n_spm = sum(p.numel() for p in spm.parameters())
    del spm
    gc.collect()
    return {"pickscore_params": n, "spm_params": n_spm}


def build_hpsv2(work: Path, tiny: bool) -> dict:
    import torch

    from spobench.metrics import hpsv2

    cf = fixtures()
    folder = work / "metrics" / "hpsv2"
    folder.mkdir(parents=True, exist_ok=True)
    vision, text, embed = (cf.VISION, cf.TEXT, cf.EMBED) if tiny else (HPS_VISION, HPS_TEXT, 1024)
    sd = cf.open_clip_state_dict(seed=2, vision=vision, text=text, embed=embed, vocab=CLIP_VOCAB, attn_mask=True)
    n = sum(v.numel() for k, v in sd.items() if k != "attn_mask")
    torch.save({"state_dict": sd}, folder / hpsv2.CHECKPOINTS["v2.1"])
    del sd
    gc.collect()
    write_processor(folder / hpsv2.TOKENIZER_DIR, 224, CLIP_VOCAB)
    return {"hpsv2_params": n}


def build_imagereward(work: Path, tiny: bool) -> dict:
    import torch

    from spobench.metrics import imagereward

    sys.path.insert(0, str(ROOT / "tests" / "metrics"))
    tir = _load("_test_imagereward", ROOT / "tests" / "metrics" / "test_imagereward.py")
    folder = work / "metrics" / "imagereward"
    (folder / imagereward.TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
    words = list(tir.WORDS)
    if not tiny:  # the official writer reads these module globals: the published sizes
        words += [f"[unused{i}]" for i in range(BERT_VOCAB - len(words))]
        tir.VIT, tir.MED, tir.VOCAB = dict(IR_VIT), dict(IR_MED), BERT_VOCAB + 2
    sd = tir.official_state_dict(seed=3)
    n = sum(v.numel() for k, v in sd.items() if not k.endswith("position_ids"))
    torch.save(sd, folder / imagereward.CHECKPOINT)
    del sd
    gc.collect()
    (folder / imagereward.MED_CONFIG).write_text(json.dumps(tir.MED))
    (folder / imagereward.TOKENIZER_DIR / "vocab.txt").write_text("\n".join(words) + "\n")
    return {"imagereward_params": n}


def build_aesthetic(work: Path, tiny: bool) -> dict:
    import torch

    from spobench.metrics import aesthetic

    cf = fixtures()
    folder = work / "metrics" / "aesthetic"
    n = _clip_model(CLIP_L_TEXT, CLIP_L_VISION, folder / aesthetic.CLIP_DIR, tiny)
    write_processor(folder / aesthetic.CLIP_DIR, 224, CLIP_VOCAB)
    torch.save(cf.aesthetic_head_state_dict(in_dim=16 if tiny else 768, seed=4), folder / aesthetic.HEAD_FILE)
    return {"aesthetic_clip_params": n}


BUILDERS = {
    "sd15": lambda work, tiny: build_backbone("sd15", work / "sd15", tiny),
    "sdxl": lambda work, tiny: build_backbone("sdxl", work / "sdxl", tiny),
    "sd3": lambda work, tiny: build_sd3(work / "sd3", tiny),
    "pickscore+spm": build_pickscore_and_spm,
    "hpsv2": build_hpsv2,
    "imagereward": build_imagereward,
    "aesthetic": build_aesthetic,
    "spm-official": lambda work, tiny: build_spm_official(work, tiny),
    "released": lambda work, tiny: build_released(work, tiny),
}


# -- measuring a command ---------------------------------------------------------------------------------
def _meminfo() -> dict:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = round(int(value.split()[0]) / 2**20, 2)  # GiB
    except OSError:
        pass
    return out


def measure(name: str, argv: list[str], nice: int, env: dict | None = None) -> dict:
    """Run ``argv`` in its own process; wall seconds and the peak RSS of that process tree's largest
    process (``ru_maxrss`` of the child, as ``/usr/bin/time -v`` reports it)."""
    before = {"loadavg": list(os.getloadavg()), "mem_gib": _meminfo()}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)
    tail: list[str] = []
    for line in proc.stdout:
        print(f"  [{name}] {line.rstrip()}", flush=True)
        tail = (tail + [line.rstrip()])[-15:]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    return {"name": name, "command": shlex.join(argv), "nice": nice, "rc": proc.returncode,
            "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 3), "budget_ok": peak <= BUDGET_GIB,
            "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
            "before": before, "after": {"loadavg": list(os.getloadavg()), "mem_gib": _meminfo()},
            "output_tail": tail if proc.returncode else tail[-3:]}


def run_step(name: str, cmd: list[str], nice: int, env: dict | None) -> dict:
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    r = measure(name, cmd, nice, env=env)
    print(f"   rc {r['rc']}, {r['wall_s']} s, peak RSS {r['peak_rss_gib']} GiB", flush=True)
    return r


def spobench_cli() -> str:
    exe = Path(sys.executable).parent / "spobench"
    return str(exe) if exe.exists() else shutil.which("spobench") or "spobench"


def build_step(what: str, work: Path, tiny: bool, nice: int) -> dict:
    """Each builder in its own process too: its memory is measured and given back before the CLI runs."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--build", what, "--work", str(work)] + (
        ["--tiny"] if tiny else [])
    return measure(f"build {what}", argv, nice)


# -- the CLI runs ----------------------------------------------------------------------------------------
def cli_steps(part: str, work: Path, args) -> list[tuple[str, list[str]]]:
    """(name, argv) of the commands of one part, as a user types them."""
    cli = spobench_cli()
    prompts = work / "prompts.txt"
    common = ["--set", f"prompts={prompts}", "--set", f"scorer={work / 'spm'}", "--set", "k=2",
              "--set", f"num_steps={args.steps}", "--set", "rollout_batch=1", "--set", "train_batch_size=2",
              "--set", "epochs=1", "--set", "max_rounds=1",
              # random weights: the SPM's preference gaps are arbitrary; 0 keeps every non-tied pair so
              # that the training half of the round is measured too
              "--set", "threshold=0", "--set", f"dtype={args.dtype}"]
    common += [x for kv in args.train_set for x in ("--set", kv)]  # later --set wins: the memory options
    if args.tiny:
        common += ["--set", f"resolution={128 if part == 'sdxl' else 64}"]  # the test sizes' images
    if part == "sd15":
        run = work / "runs" / "spo-sd15"
        gen = work / "gen-sd15"
        return [
            ("train spo sd15", [cli, "train", "spo", "--backbone", "sd15", "--model", str(work / "sd15"),
                                "--out", str(run), "--overwrite", *common]),
            ("generate sd15", [cli, "generate", "--backbone", "sd15", "--model", str(work / "sd15"),
                               "--lora", str(run / "lora"), "--prompts", str(prompts), "--steps", str(args.steps),
                               "--dtype", args.dtype, "--batch-size", "1", "--out", str(gen), "--overwrite"]),
            ("eval 4 metrics", [cli, "eval", "--metrics", "pickscore,hpsv2,imagereward,aesthetic",
                                "--images", str(gen), "--out", str(work / "eval-sd15.json"),
                                *[f"--weights={m}={work / 'metrics' / m}"
                                  for m in ("pickscore", "hpsv2", "imagereward", "aesthetic")]]),
        ]
    if part == "released":
        return released_steps(work, args)
    if part == "spm-import":
        return released_steps(work, args)[:1]
    if part == "sd3":
        return sd3_steps(work, args, common)
    if part == "sdxl":
        run = work / "runs" / "mspo-sdxl"
        res = ["--set", f"resolution={args.sdxl_resolution}"] if args.sdxl_resolution else []
        return [("train mspo sdxl", [cli, "train", "mspo", "--backbone", "sdxl", "--model", str(work / "sdxl"),
                                     "--out", str(run), "--overwrite", *common, *res])]
    raise SystemExit(f"unknown part {part!r}")


def sd3_steps(work: Path, args, common: list[str]) -> list[tuple]:
    """Issue 18 at SD3.5-Medium's size: one round of SPO on the flow backbone when this spobench has it,
    else (its clean one-line refusal, exit 2) one round of Flow-GRPO (G = 2 SDE images of the prompt, the
    SPM as the reward); then ``generate`` with the LoRA of whichever ran. (name, argv, env, fallback)."""
    cli = spobench_cli()
    model, run = str(work / "sd3"), work / "runs" / "train-sd3"
    res = ["--set", f"resolution={args.sd3_resolution}"] if args.sd3_resolution and not args.tiny else []
    base = [cli, "train", "{trainer}", "--backbone", "sd3", "--model", model, "--out", str(run), "--overwrite"]
    spo = [a.format(trainer="spo") for a in base] + common + res
    pairs = [common[i:i + 2] for i in range(0, len(common), 2)]  # ("--set", "key=value")
    grpo_common = [x for kv in pairs if not kv[1].startswith(("k=", "threshold=", "scorer=")) for x in kv]
    grpo = ([a.format(trainer="flow-grpo") for a in base] + grpo_common + res
            + ["--set", f"reward={work / 'spm'}", "--set", "group_size=2", "--set", "grad_accum=1"])
    gen = [cli, "generate", "--backbone", "sd3", "--model", model, "--lora", str(run / "lora"),
           "--prompts", str(work / "prompts.txt"), "--steps", str(args.steps), "--dtype", args.dtype,
           "--batch-size", "1", "--out", str(work / "gen-sd3"), "--overwrite"]
    return [("train spo sd3", spo, None, ("train flow-grpo sd3", grpo)), ("generate sd3", gen, None)]


def build_spm_official(work: Path, tiny: bool) -> dict:
    """``metrics/spm-official.bin``: a step-aware preference model in the official checkpoint's layout
    (issue 13 part 1) around the PickScore CLIP built above - the writer of tests/models/test_spm_official.py
    (random, non-zero modulation weights, gate biases near the official init of 1) - plus the two
    ``position_ids`` buffers transformers 4.27 saved, at this CLIP's sizes."""
    import torch
    from transformers import CLIPConfig

    from spobench.metrics import pickscore

    sys.path.insert(0, str(ROOT / "tests"))
    tso = _load("_test_spm_official", ROOT / "tests" / "models" / "test_spm_official.py")
    clip_dir = work / "metrics" / "pickscore" / pickscore.MODEL_DIR
    sd = tso.official_state_dict(clip_dir, seed=6, legacy_buffers=False)
    vision = CLIPConfig.from_pretrained(str(clip_dir)).vision_config
    sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.vision_model.embeddings.position_ids"] = torch.arange((vision.image_size // vision.patch_size) ** 2 + 1)[None]
    n = sum(v.numel() for k, v in sd.items() if not k.endswith("position_ids"))
    file = work / "metrics" / "spm-official.bin"
    torch.save(sd, file)
    return {"spm_official_params": n, "bytes": file.stat().st_size}


# the hub ids of spobench/recipes/table2.toml [released]
SD15_HUB = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DPO_SD15_HUB = "mhdang/dpo-sd1.5-text2image-v1"
SPO_SD15_HUB = "SPO-Diffusion-Models/SPO-SD-v1-5_4k-p_10ep_LoRA"


def _hub_link(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> None:
    """``folder`` as huggingface_hub's cache holds a downloaded repo (``models--org--name/snapshots/<commit>``
    and ``refs/main``, as ``spobench.models.backbones.testing.fake_hub_cache`` lays it out), the snapshot a
    symlink to ``folder`` (the hub's snapshots are symlinks too): a 4 GB model is not copied."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snap = repo / "snapshots" / commit
    if snap.is_symlink() or snap.exists():
        snap.unlink()
    snap.symlink_to(folder.resolve(), target_is_directory=True)
    (repo / "refs" / "main").write_text(commit)


def build_released(work: Path, tiny: bool) -> dict:
    """A user's machine for ``reproduce table2 --released`` at the sizes above (tests/released_world.py at
    full size): the released UNet-only Diffusion-DPO (``unet/`` layout) and the SPO LoRA
    (``save_lora_weights`` keys) as random weights of ``sd15/``'s shapes, all three under their hub ids in
    ``hf/``, Pick-a-Pic's validation_unique parquet in ``data/pickapic/``."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_lora_file, make_unet_folder

    sys.path.insert(0, str(ROOT / "tests"))
    world = _load("_released_world", ROOT / "tests" / "released_world.py")
    base, rel = work / "sd15", work / "released"
    dpo = make_unet_folder(rel / "dpo", base, layout="unet")
    gc.collect()
    lora = make_lora_file(rel / "spo", load_backbone("sd15", str(base)), style="diffusers")
    gc.collect()
    for repo_id, folder in ((SD15_HUB, base), (DPO_SD15_HUB, dpo), (SPO_SD15_HUB, lora.parent)):
        _hub_link(work / "hf", repo_id, folder)
    world.pickapic(work / "data")
    if tiny:  # the shipped recipe, sampled at the --tiny images' size (as tests/reproduce/test_released.py does)
        text = (ROOT / "spobench" / "recipes" / "table2.toml").read_text() + "\n[released.generate]\nresolution = 64\n"
        (rel / "table2.toml").write_text(text)
    return {"lora_bytes": lora.stat().st_size, "hub": [SD15_HUB, DPO_SD15_HUB, SPO_SD15_HUB]}


def released_env(work: Path) -> dict:
    """The released checkpoints from the hub cache only (offline), the metrics from ``metrics/``."""
    return {**os.environ, "HF_HOME": str(work / "hf-home"), "HF_HUB_CACHE": str(work / "hf"), "HF_HUB_OFFLINE": "1",
            "SPOBENCH_DATA": str(work / "data"), "SPOBENCH_WEIGHTS": str(work / "metrics")}


def released_steps(work: Path, args) -> list[tuple]:
    """Issue 13 through the CLI: the official-layout SPM imported (part 1), and Table 2's released
    checkpoints reproduced on two prompts (part 2). (name, argv, env)."""
    from spobench.metrics import pickscore

    cli = spobench_cli()
    clip = work / "metrics" / "pickscore"
    recipe = work / "released" / "table2.toml" if args.tiny else "table2"
    if args.released_steps:  # the shipped recipe with fewer sampling steps, everything else as shipped
        recipe = work / "released" / f"steps-{args.released_steps}" / "table2.toml"  # (a recipe's name is its file's)
        recipe.parent.mkdir(parents=True, exist_ok=True)
        extra = f"steps = {args.released_steps}\n" + ("resolution = 64\n" if args.tiny else "")
        text = (ROOT / "spobench" / "recipes" / "table2.toml").read_text()
        recipe.write_text(text + "\n[released.generate]\n" + extra)
    return [
        ("spm import official", [cli, "spm", "import", str(work / "metrics" / "spm-official.bin"),
                                 "--clip", str(clip / pickscore.MODEL_DIR), "--processor",
                                 str(clip / pickscore.PROCESSOR_DIR), "--out", str(work / "spm-official"),
                                 "--overwrite"], None),
        ("reproduce table2 --released", [cli, "reproduce", str(recipe), "--released", "--limit", "2",
                                         "--out", str(work / "runs" / "table2-released")], released_env(work)),
    ]


def save(result: dict, part: str, steps: list, out: Path) -> None:
    """After every step: a run stopped part-way keeps what it measured."""
    result["parts"][part] = steps
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "spobench-real-world")
    p.add_argument("--parts", default="sd15", help="comma-separated: sd15 (train spo, generate, eval), released (spm import, reproduce "
                   "table2 --released), spm-import (the import only), sdxl (mspo), sd3 (spo or flow-grpo, "
                   "generate)")
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of the rollout and of generate")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="frozen weights of train/generate")
    p.add_argument("--sdxl-resolution", type=int, default=None, help="default: the backbone's 1024")
    p.add_argument("--sd3-resolution", type=int, default=None, help="default: the backbone's (sd3: 512, Flow-GRPO's)")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="more --set of the train commands (memory: train_batch_size=1, grad_accum=2, scorer_batch=1)")
    p.add_argument("--released-steps", type=int, default=None,
                   help="sampling steps of reproduce table2 --released (default: the recipe's 20)")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="TEST ONLY: test widths and sizes, same layouts and commands")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards (default: delete the ~25 GB)")
    p.add_argument("--reuse", action="store_true", help="keep the folders already built in --work")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: one builder, in a child process
    args = p.parse_args(argv)
    if args.build:
        info = BUILDERS[args.build](args.work, args.tiny)
        (args.work / f"build-{args.build}.json").write_text(json.dumps(info, indent=2))
        return info

    parts = [x for x in args.parts.split(",") if x]
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "prompts.txt").write_text(PROMPT + "\n")
    result = json.loads(args.out.read_text()) if args.out.exists() and not args.tiny else {}
    result.update({
        "what": "the installed spobench CLI on random-weight models at the published sizes and layouts "
                "(benchmarks/real_world.py); wall seconds and peak RSS per command",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "mem_gib": _meminfo(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "shared": "yes: other jobs ran at the same time; see each command's loadavg"},
        "budget_gib": BUDGET_GIB, "tiny": args.tiny,
    })
    result.setdefault("parts", {})
    # each part records the settings it ran with (parts are run at different times, with different memory options)
    legacy = result.pop("settings", None)
    by_part = result.setdefault("part_settings", {p: legacy for p in result["parts"]} if legacy else {})
    settings = {"date": result["date"], "steps": args.steps, "dtype": args.dtype, "k": 2, "prompts": 1, "rounds": 1,
                "threshold": 0, "sdxl_resolution": args.sdxl_resolution or 1024,
                "sd3_resolution": args.sd3_resolution or 512, "train_set": args.train_set,
                "released_steps": args.released_steps or 20}
    for part in parts:
        by_part[part] = settings
    metrics = ["pickscore+spm", "hpsv2", "imagereward", "aesthetic"]
    needs = {"sd15": ["sd15", *metrics], "released": ["sd15", *metrics, "spm-official", "released"],
             "spm-import": ["pickscore+spm", "spm-official"],
             "sdxl": ["sdxl", "pickscore+spm"], "sd3": ["sd3", "pickscore+spm"]}
    built: set[str] = set()
    for part in parts:
        steps = []
        for what in needs[part]:
            if what in built:
                continue
            if args.reuse and (args.work / f"build-{what}.json").exists():
                steps.append({"name": f"build {what}", "reused": "built by an earlier run of this script",
                              "built": json.loads((args.work / f"build-{what}.json").read_text())})
                built.add(what)
                continue
            r = build_step(what, args.work, args.tiny, args.nice)
            info = args.work / f"build-{what}.json"
            r["built"] = json.loads(info.read_text()) if info.exists() else None
            steps.append(r)
            built.add(what)
            save(result, part, steps, args.out)
            if r["rc"]:
                break
        for name, cmd, *rest in cli_steps(part, args.work, args):
            env, fallback = (rest + [None, None])[:2]
            if any(s.get("rc") and not s.get("fell_back_to") for s in steps):
                break
            steps.append(run_step(name, cmd, args.nice, env))
            if steps[-1]["rc"] == 2 and fallback:  # a clean refusal (e.g. no SPO for this backbone): the other
                steps[-1]["fell_back_to"] = fallback[0]
                save(result, part, steps, args.out)
                steps.append(run_step(*fallback, args.nice, env))
            save(result, part, steps, args.out)
        save(result, part, steps, args.out)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
