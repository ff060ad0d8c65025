"""SPO cost pieces at the real SD-1.5 / SDXL sizes (random weights): seconds, rows/s, achieved TFLOP/s.

Meant for a GPU session (see benchmarks/real_size.md)::

    OMP_NUM_THREADS=8 python benchmarks/bench_real_size.py --device cuda --dtype bf16 --batch 8 --repeats 5
    python benchmarks/bench_real_size.py --flops-only          # FLOP table only: meta device, CPU, seconds

and, on a CPU, at a reduced size to test the script (flags recorded in the JSON)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_real_size.py --device cpu --dtype fp32 \\
        --size-scale 8 --tiny-widths --batch 1 --repeats 1

Every network is built from the published architecture configs written below (diffusers'
``UNet2DConditionModel`` / ``AutoencoderKL``, transformers' ``CLIPVisionModelWithProjection``), with random
weights: nothing is downloaded. The pieces, and where they sit in one SPO round per prompt (official cost
structure, issue 4: 20 DDIM steps, 4 plain + 16 pooled steps, k = 4 candidates):

* ``unet_fwd``: UNet forward, no grad, on a CFG batch (2 x --batch rows), no adapter. SPO: the reference
  forward of training (LoRA switched off), 2 rows per kept pair.
* ``unet_fwd_lora``: the same with the LoRA adapter active. SPO: the official rollout, 2 * (5 + 15k) = 130 rows.
* ``unet_fwd_merged``: the same with the LoRA merged into the frozen weights (``Backbone.lora_merged``, the
  ``merge_lora`` setting): spobench's rollout, the same 130 rows.
* ``unet_fwd_bwd_lora``: forward + backward, only the LoRA (rank 4 for SD-1.5, 64 for SDXL, on
  ``to_q, to_k, to_v, to_out.0``) requires grad; frozen weights in --dtype, LoRA in float32 (as spobench's
  ``Backbone.add_lora``: peft casts the LoRA input to float32 and its output back, no autocast unless
  --autocast). SPO: the policy forward + backward of training, 2 rows per kept pair.
* ``vae_decode``: SD VAE decode of --batch latents to pixels (512x512 / 1024x1024). SPO: 16k = 64 decodes
  (each pooled step decodes the k candidates' x0_hat).
* ``vae_decode_cl``: the same decode with the VAE and its input in ``torch.channels_last``.
* ``spm_vit``: the step-aware preference model's image tower, sized as PickScore's CLIP ViT-H/14 at 224
  (32 x 1280, MLP 5120, 16 heads, projection 1024), on --batch images. SPO: 16k = 64 image passes.

FLOPs per sample come from ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no
compute): matmuls, convolutions and attention as 2 x multiply-accumulates; norms, softmax, activations,
element-wise ops and up-sampling are not counted. Achieved TFLOP/s = FLOPs per row x rows / median seconds.
The per-prompt round estimate assumes every pool keeps a pair (16 pairs per prompt), per-row times as
measured at --batch, and leaves out the SPM's text tower, image resizing, the DDIM arithmetic and the
optimizer step.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded

RESULTS = Path(__file__).resolve().parent / "results"

# -- the published architectures ------------------------------------------------------------------
# runwayml/stable-diffusion-v1-5 unet/config.json (here and below: diffusers' defaults for what is not listed)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, act_fn="silu",
)
# vae/config.json of both (same architecture; SDXL's differs in sample_size and scaling_factor)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, act_fn="silu", sample_size=512,
)
# PickScore / HPSv2's CLIP ViT-H/14 vision tower (the SPM's image side)
VIT_H14 = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
               patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")

BACKBONES = {
    "sd15": dict(unet=SD15_UNET, vae=SD_VAE, latent=64, context=(77, 768), added_cond=False, lora_rank=4),
    "sdxl": dict(unet=SDXL_UNET, vae={**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
                 latent=128, context=(77, 2048), added_cond=True, lora_rank=64),
}
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# --tiny-widths (CPU tests of the script only): channel widths replaced, depths and block types kept
TINY = {
    "sd15": dict(unet=dict(block_out_channels=(32, 64, 64, 64)), vae=dict(block_out_channels=(32, 32, 64, 64))),
    "sdxl": dict(unet=dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4)),
                 vae=dict(block_out_channels=(32, 32, 64, 64))),
}
TINY_VIT = dict(hidden_size=64, num_attention_heads=4, intermediate_size=256, projection_dim=64, num_hidden_layers=2)

# figures stated in the issue, GFLOP per sample at the real sizes
REFERENCE_GFLOP = {("sd15", "unet_fwd"): 803.0, ("sd15", "vae_decode"): 2515.0, ("sdxl", "unet_fwd"): 6761.0}

# one SPO round per prompt at the paper's settings (official cost structure)
K = 4  # candidates per pool
N_PLAIN, N_POOLED = 4, 16  # 20 DDIM steps: 4 before the first pooled step, 16 pooled
PAIRS = N_POOLED  # assumption: every pool keeps a pair
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PIECES = ("unet_fwd", "unet_fwd_lora", "unet_fwd_merged", "unet_fwd_bwd_lora", "vae_decode", "vae_decode_cl", "spm_vit")
# dense peak TFLOP/s for MFU (vendor datasheets, without sparsity), by a substring of the device name and dtype;
# --peak-tflops overrides (a CPU has no entry: give it, or MFU stays empty)
PEAK_TFLOPS = {("H200", "bf16"): 989.4, ("H200", "fp16"): 989.4, ("H200", "fp32"): 66.9,
               ("H100", "bf16"): 989.4, ("H100", "fp16"): 989.4, ("H100", "fp32"): 66.9,
               ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 19.5}


# -- configs at the chosen size -------------------------------------------------------------------
def configs(backbone: str, size_scale: float = 1.0, tiny_widths: bool = False, vit_layers: int | None = None) -> dict:
    """The architecture configs and input sizes to run; the published ones unless the test flags say otherwise."""
    spec = BACKBONES[backbone]
    unet, vae, vit = copy.deepcopy(spec["unet"]), copy.deepcopy(spec["vae"]), dict(VIT_H14)
    if tiny_widths:
        unet.update(TINY[backbone]["unet"])
        vae.update(TINY[backbone]["vae"])
        vit.update(TINY_VIT)
    if vit_layers:
        vit["num_hidden_layers"] = vit_layers
    latent = spec["latent"] / size_scale
    down = 2 ** (len(unet["block_out_channels"]) - 1)
    if latent != int(latent) or int(latent) % down:
        raise SystemExit(f"--size-scale {size_scale}: {backbone} latent {spec['latent']}/{size_scale} must be an "
                         f"integer multiple of {down}")
    latent = int(latent)
    unet["sample_size"] = latent
    vae["sample_size"] = latent * 8
    return dict(unet=unet, vae=vae, vit=vit, latent=latent, image=latent * 8, context=spec["context"],
                added_cond=spec["added_cond"], lora_rank=spec["lora_rank"])


def build_unet(cfg: dict, device, dtype=None):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    if dtype is not None:
        torch.nn.Module.to(unet, dtype)  # (ModelMixin.to warns about from_pretrained's keep-in-fp32 modules: none here)
    return unet.requires_grad_(False)


def add_lora(unet, rank: int) -> list:
    """As spobench's ``Backbone.add_lora``: peft adapter, only its (float32) parameters require grad."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGETS)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def build_vae(cfg: dict, device, dtype=None):
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**cfg)
    if dtype is not None:
        torch.nn.Module.to(vae, dtype)  # (ModelMixin.to warns about from_pretrained's keep-in-fp32 modules: none here)
    return vae.requires_grad_(False).eval()


def build_vit(cfg: dict, device, dtype=None):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(device):
        vit = CLIPVisionModelWithProjection._from_config(CLIPVisionConfig(**cfg), attn_implementation="sdpa")
    if dtype is not None:
        vit.to(dtype)
    return vit.requires_grad_(False).eval()


def unet_inputs(c: dict, rows: int, device, dtype) -> dict:
    g = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    kw = dict(sample=g(rows, 4, c["latent"], c["latent"]),
              timestep=torch.randint(0, 1000, (rows,), device=device),
              encoder_hidden_states=g(rows, *c["context"]))
    if c["added_cond"]:  # SDXL: pooled text embedding (1280) + micro-conditioning time ids (6)
        size = float(c["image"])
        kw["added_cond_kwargs"] = {"text_embeds": g(rows, 1280),
                                   "time_ids": torch.tensor([size, size, 0.0, 0.0, size, size], device=device,
                                                            dtype=dtype).repeat(rows, 1)}
    return kw


def _fwd_bwd(unet, kw, params, autocast: bool, dtype):
    use = autocast and dtype != torch.float32
    with torch.autocast(kw["sample"].device.type, dtype=dtype) if use else contextlib.nullcontext():
        pred = unet(**kw).sample
    pred.float().square().mean().backward()
    for p in params:
        p.grad = None


# -- FLOPs on the meta device ---------------------------------------------------------------------
def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def count_flops(c: dict) -> dict:
    """FLOPs per sample of every piece: one UNet row, one latent decoded, one image scored (meta device)."""
    meta = torch.device("meta")
    out = {}
    unet = build_unet(c["unet"], meta)
    kw = unet_inputs(c, 1, meta, torch.float32)
    with torch.no_grad():
        out["unet_fwd"] = _count(lambda: unet(**kw))
    params = add_lora(unet, c["lora_rank"])
    with torch.no_grad():
        out["unet_fwd_lora"] = _count(lambda: unet(**kw))
    out["unet_fwd_merged"] = out["unet_fwd"]  # the merged LoRA is in the weights: the base UNet's matmuls
    out["unet_fwd_bwd_lora"] = _count(lambda: _fwd_bwd(unet, kw, params, False, torch.float32))
    vae = build_vae(c["vae"], meta)
    with torch.no_grad():
        out["vae_decode"] = _count(lambda: vae.decode(torch.zeros(1, 4, c["latent"], c["latent"], device=meta)))
    out["vae_decode_cl"] = out["vae_decode"]
    vit = build_vit(c["vit"], meta)
    px = torch.zeros(1, 3, c["vit"]["image_size"], c["vit"]["image_size"], device=meta)
    with torch.no_grad():
        out["spm_vit"] = _count(lambda: vit(pixel_values=px))
    return out


def flop_table(backbones, args) -> dict:
    table = {}
    real = args.size_scale == 1 and not args.tiny_widths and not args.vit_layers
    for b in backbones:
        c = configs(b, args.size_scale, args.tiny_widths, args.vit_layers)
        t0 = time.perf_counter()
        flops = count_flops(c)
        rows = {}
        for piece, f in flops.items():
            ref = REFERENCE_GFLOP.get((b, piece)) if real else None
            rows[piece] = {"gflop_per_sample": f / 1e9, "flops_per_sample": f, "reference_gflop": ref,
                           "diff_vs_reference": (f / 1e9 - ref) / ref if ref else None}
        table[b] = {"pieces": rows, "count_s": round(time.perf_counter() - t0, 2), "latent": c["latent"],
                    "image": c["image"]}
    return table


LABELS = {"unet_fwd": "UNet fwd, 1 row", "unet_fwd_lora": "UNet fwd + LoRA, 1 row",
          "unet_fwd_merged": "UNet fwd, LoRA merged, 1 row", "vae_decode_cl": "VAE decode channels-last",
          "unet_fwd_bwd_lora": "UNet fwd+bwd, LoRA grads only", "vae_decode": "VAE decode, 1 latent",
          "spm_vit": "SPM ViT-H/14 @224, 1 image"}


def format_flops(table: dict) -> str:
    lines = [f"{'backbone':<8} {'piece':<30} {'GFLOP/sample':>13} {'issue':>7} {'diff':>8}", "-" * 70]
    for b, t in table.items():
        for piece, r in t["pieces"].items():
            ref = f"{r['reference_gflop']:>7.0f}" if r["reference_gflop"] else f"{'':>7}"
            diff = f"{100 * r['diff_vs_reference']:>+7.3f}%" if r["reference_gflop"] else ""
            label = LABELS[piece] + (f" {t['image']}px" if piece == "vae_decode" else "")
            lines.append(f"{b:<8} {label:<30} {r['gflop_per_sample']:>13.2f} {ref} {diff}")
    return "\n".join(lines)


# -- timing -----------------------------------------------------------------------------------------
class _AttentionOps(TorchDispatchMode):
    """Names of the attention kernels a forward dispatches to (which SDPA backend ran)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if "attention" in name or "scaled_dot" in name:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _oom_types() -> tuple:
    return tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                 if t is not None) or (RuntimeError,)


class _PeakRSS:
    """The process's peak resident memory while a piece runs (CPU: no allocator statistics), sampled every
    5 ms from /proc/self/statm; weights and everything else the process holds included."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(0.005)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def peak_tflops(device: torch.device, dtype: str, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for (sub, dt), v in PEAK_TFLOPS.items() if sub in name and dt == dtype), None)


def time_piece(make, batch: int, rows_per_item: int, gflop_per_row: float, args, device) -> dict:
    """Warm-up, then --repeats timed calls (synchronised) of ``make(n)``'s callable; on CUDA out-of-memory the
    batch is halved and the piece retried."""
    n, ooms = batch, []
    if getattr(args, "on_piece", None):
        args.on_piece()  # the caller writes the pieces done so far (a slow CPU run keeps them if stopped)
    rss = _PeakRSS() if device.type == "cpu" else contextlib.nullcontext()
    with rss:
        res = _time_piece(make, n, ooms, args, device)
    ts, n = res
    rows = n * rows_per_item
    med = statistics.median(ts)
    peak = getattr(args, "peak", None)
    achieved = gflop_per_row * rows / med / 1e3
    return {"batch": n, "rows": rows, "oom_at_batch": ooms,
            "seconds": {"median": med, "min": min(ts), "all": ts},
            "rows_per_s": rows / med, "gflop_per_row": gflop_per_row,
            "achieved_tflops": achieved, "mfu": achieved / peak if peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "peak_rss_gib": rss.peak / 2**30 if device.type == "cpu" else None}


def _time_piece(make, n: int, ooms: list, args, device):
    while True:
        fn = ts = None
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn = make(n)
            for _ in range(args.warmup):
                fn()
                _sync(device)
            ts = []
            for _ in range(args.repeats):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                ts.append(time.perf_counter() - t0)
        except _oom_types() as e:
            if device.type != "cuda" or n == 1 or "out of memory" not in str(e).lower():
                raise
            ts = None
        if ts is not None:
            break
        ooms.append(n)  # outside the except block, so that its traceback no longer holds the tensors
        fn = None
        _free(device)
        n //= 2
    return ts, n


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_backbone(c: dict, flops: dict, args, device, dtype, out: dict | None = None) -> dict:
    """Every piece of one backbone; each network built, timed and freed in turn (into ``out``, so that a
    partial result can be written while it runs)."""
    g = {k: v["gflop_per_sample"] for k, v in flops.items()}
    out = {} if out is None else out
    out.update({"config": {k: c[k] for k in ("unet", "vae", "vit", "latent", "image", "context", "lora_rank")},
                "pieces": {}, "build_s": {}})
    for bench, names in ((_bench_unet, PIECES[:4]), (_bench_vae, PIECES[4:6]), (_bench_vit, PIECES[6:])):
        if set(names) & set(args.pieces):
            bench(c, g, args, device, dtype, out)
            if getattr(args, "on_piece", None):
                args.on_piece()
        _free(device)
    if all(p in out["pieces"] for p in PIECES):
        out["spo_round_per_prompt"] = round_estimate(out["pieces"])
    out["round_table"] = round_table(out["pieces"], args.round_prompts, getattr(args, "peak", None))
    return out


def _bench_unet(c, g, args, device, dtype, out):
    t0 = time.perf_counter()
    unet = build_unet(c["unet"], device, dtype)
    out["build_s"]["unet"] = time.perf_counter() - t0
    out["attention_processors"] = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    # which attention kernel runs, and torch's FLOP count of one row on the device (cross-check of the meta count)
    kw1 = unet_inputs(c, 1, device, dtype)
    with torch.no_grad(), _AttentionOps() as ops:
        dev_flops = _count(lambda: unet(**kw1))
    out["attention_kernels"] = dict(ops.ops)
    out["device_counted_gflop_unet_fwd"] = dev_flops / 1e9
    out["device_count_note"] = ("FlopCounterMode over one real UNet row on the device; equals the meta count when "
                                "the attention kernel has a flop formula (CUDA flash / efficient / cuDNN SDPA), "
                                "lower on CPU (its flash-attention kernel has none)")

    def forward(n):
        kw = unet_inputs(c, 2 * n, device, dtype)
        return lambda: unet(**kw)

    from spobench.models.backbones.base import Backbone

    want = set(args.pieces)
    with torch.no_grad():
        if "unet_fwd" in want:
            out["pieces"]["unet_fwd"] = time_piece(forward, args.batch, 2, g["unet_fwd"], args, device)
        params = add_lora(unet, c["lora_rank"])
        out["lora_params"] = sum(p.numel() for p in params)
        if "unet_fwd_lora" in want:
            out["pieces"]["unet_fwd_lora"] = time_piece(forward, args.batch, 2, g["unet_fwd_lora"], args, device)
    if "unet_fwd_merged" in want:
        bb = Backbone(unet=unet, scheduler=None)  # spobench's merge, on this UNet and its peft adapter
        bb.lora_rank = c["lora_rank"]
        with bb.lora_merged(reduced_precision=True) as merged:
            assert merged
            out["pieces"]["unet_fwd_merged"] = time_piece(forward, args.batch, 2, g["unet_fwd_merged"], args, device)

    def train(n):
        kw = unet_inputs(c, 2 * n, device, dtype)
        return lambda: _fwd_bwd(unet, kw, params, args.autocast, dtype)

    if "unet_fwd_bwd_lora" in want:
        out["pieces"]["unet_fwd_bwd_lora"] = time_piece(train, args.batch, 2, g["unet_fwd_bwd_lora"], args, device)


def _bench_vae(c, g, args, device, dtype, out):
    t0 = time.perf_counter()
    vae = build_vae(c["vae"], device, dtype)
    out["build_s"]["vae"] = time.perf_counter() - t0

    def decode(n):
        z = torch.randn(n, 4, c["latent"], c["latent"], device=device, dtype=dtype)
        return lambda: vae.decode(z).sample

    def decode_cl(n):
        z = torch.randn(n, 4, c["latent"], c["latent"], device=device, dtype=dtype).to(memory_format=torch.channels_last)
        return lambda: vae.decode(z).sample

    with torch.no_grad():
        if "vae_decode" in args.pieces:
            out["pieces"]["vae_decode"] = time_piece(decode, args.batch, 1, g["vae_decode"], args, device)
        if "vae_decode_cl" in args.pieces:
            vae.to(memory_format=torch.channels_last)
            out["pieces"]["vae_decode_cl"] = time_piece(decode_cl, args.batch, 1, g["vae_decode_cl"], args, device)


def _bench_vit(c, g, args, device, dtype, out):
    t0 = time.perf_counter()
    vit = build_vit(c["vit"], device, dtype)
    out["build_s"]["vit"] = time.perf_counter() - t0
    out["vit_attn_implementation"] = vit.config._attn_implementation

    def score(n):
        px = torch.randn(n, 3, c["vit"]["image_size"], c["vit"]["image_size"], device=device, dtype=dtype)
        return lambda: vit(pixel_values=px).image_embeds

    if "spm_vit" in args.pieces:
        with torch.no_grad():
            out["pieces"]["spm_vit"] = time_piece(score, args.batch, 1, g["spm_vit"], args, device)


def round_estimate(p: dict) -> dict:
    """One SPO round per prompt from the measured per-row times (see the module docstring)."""
    per_row = {k: v["seconds"]["median"] / v["rows"] for k, v in p.items()}
    counts = {"rollout_unet_rows_nograd": 2 * (N_PLAIN + 1 + (N_POOLED - 1) * K), "vae_decodes": N_POOLED * K,
              "spm_image_passes": N_POOLED * K, "pairs": PAIRS,
              "train_policy_rows_fwd_bwd": 2 * PAIRS, "train_reference_rows_fwd": 2 * PAIRS}
    s = {"rollout_unet": counts["rollout_unet_rows_nograd"] * per_row["unet_fwd_lora"],
         "vae_decode": counts["vae_decodes"] * per_row["vae_decode"],
         "spm_image": counts["spm_image_passes"] * per_row["spm_vit"],
         "train_policy_fwd_bwd": counts["train_policy_rows_fwd_bwd"] * per_row["unet_fwd_bwd_lora"],
         "train_reference_fwd": counts["train_reference_rows_fwd"] * per_row["unet_fwd"]}
    s["total"] = sum(s.values())
    tf = {"rollout_unet": counts["rollout_unet_rows_nograd"] * p["unet_fwd_lora"]["gflop_per_row"],
          "vae_decode": counts["vae_decodes"] * p["vae_decode"]["gflop_per_row"],
          "spm_image": counts["spm_image_passes"] * p["spm_vit"]["gflop_per_row"],
          "train_policy_fwd_bwd": counts["train_policy_rows_fwd_bwd"] * p["unet_fwd_bwd_lora"]["gflop_per_row"],
          "train_reference_fwd": counts["train_reference_rows_fwd"] * p["unet_fwd"]["gflop_per_row"]}
    tf = {k: v / 1e3 for k, v in tf.items()}
    tf["total"] = sum(tf.values())
    # the official training loop runs four CFG forwards per pair (policy and reference, winner and loser)
    official_train = 2 * (s["train_policy_fwd_bwd"] + s["train_reference_fwd"])
    return {"settings": {"ddim_steps": N_PLAIN + N_POOLED, "plain_steps": N_PLAIN, "pooled_steps": N_POOLED,
                         "k": K, "cfg_rows_per_call": 2},
            "assumptions": ["every pool keeps a pair: 16 pairs per prompt",
                            "per-row time as measured at --batch (rollout calls batch B*k rows in practice)",
                            "training as spobench runs it: per pair 1 policy CFG fwd+bwd + 1 reference CFG fwd "
                            "(the official loop runs 2 of each: 'train_official_4_forwards_s')",
                            "not included: SPM text tower, image resize to 224, DDIM arithmetic, optimizer step, "
                            "data movement between pieces"],
            "counts": counts, "seconds": s, "tflop": tf,
            "train_official_4_forwards_s": official_train,
            "total_with_official_training_s": s["total"] - s["train_policy_fwd_bwd"] - s["train_reference_fwd"]
            + official_train}


# The whole round as spobench runs it, B prompts, k candidates, 20 DDIM steps (4 plain + 16 pooled), P kept
# pairs per prompt (assumed 16: every pool keeps one), extrapolated linearly from each piece's per-row median:
ROUND_FORMULA = ("seconds(piece) = B x rows_per_prompt(piece) x median_s(piece) / rows_timed(piece); rows per prompt: "
                 "rollout 2(5 + 15k) = 130 UNet rows (LoRA merged when unet_fwd_merged was timed, else active), "
                 "decode 16k = 64 latents (the faster of vae_decode / vae_decode_cl), SPM 16k = 64 images, "
                 "training 2P = 32 policy rows fwd+bwd + 2P = 32 reference rows fwd (P = 16 pairs); "
                 "share = seconds / sum; MFU = GFLOP/row x rows / seconds / peak")


def round_table(p: dict, prompts: int, peak: float | None) -> dict:
    """Seconds and share per piece of one spobench SPO round of ``prompts`` prompts (``ROUND_FORMULA``)."""
    rows = {"rollout_unet": 2 * (N_PLAIN + 1 + (N_POOLED - 1) * K), "vae_decode": N_POOLED * K,
            "spm_image": N_POOLED * K, "train_policy_fwd_bwd": 2 * PAIRS, "train_reference_fwd": 2 * PAIRS}
    decodes = [d for d in ("vae_decode", "vae_decode_cl") if d in p]
    source = {"rollout_unet": "unet_fwd_merged" if "unet_fwd_merged" in p else "unet_fwd_lora",
              "vae_decode": min(decodes, key=lambda d: p[d]["seconds"]["median"] / p[d]["rows"]) if decodes else None,
              "spm_image": "spm_vit", "train_policy_fwd_bwd": "unet_fwd_bwd_lora", "train_reference_fwd": "unet_fwd"}
    out = {}
    for piece, src in source.items():
        if src not in p:
            continue
        x = p[src]
        sec = prompts * rows[piece] * x["seconds"]["median"] / x["rows"]
        tflop = prompts * rows[piece] * x["gflop_per_row"] / 1e3
        out[piece] = {"measured_as": src, "rows_per_prompt": rows[piece], "rows": prompts * rows[piece],
                      "seconds": sec, "tflop": tflop, "mfu": tflop / sec / peak if peak else None,
                      "peak_mem_gib": x["peak_mem_gib"], "peak_rss_gib": x.get("peak_rss_gib")}
    total = sum(v["seconds"] for v in out.values())
    for v in out.values():
        v["share"] = v["seconds"] / total if total else None
    tflop = sum(v["tflop"] for v in out.values())
    return {"prompts": prompts, "formula": ROUND_FORMULA, "complete": len(out) == len(source), "pieces": out,
            "total_s": total, "total_tflop": tflop, "mfu": tflop / total / peak if peak and total else None,
            "peak_tflops": peak}


def format_round(res: dict) -> str:
    lines = []
    for b, r in res["backbones"].items():
        t = r["round_table"]
        lines.append(f"{b}: one spobench SPO round of {t['prompts']} prompts (extrapolated: {t['formula']})")
        lines.append(f"  {'piece':<22} {'as':<18} {'rows':>6} {'seconds':>10} {'share':>7} {'TFLOP':>8} {'MFU':>6} "
                     f"{'peak GiB':>9}")
        for piece, v in t["pieces"].items():
            mfu = f"{100 * v['mfu']:>5.1f}%" if v["mfu"] is not None else f"{'-':>6}"
            mem = v["peak_mem_gib"] if v["peak_mem_gib"] is not None else v["peak_rss_gib"]
            lines.append(f"  {piece:<22} {v['measured_as']:<18} {v['rows']:>6} {v['seconds']:>10.2f} "
                         f"{100 * v['share']:>6.1f}% {v['tflop']:>8.1f} {mfu} {mem if mem is None else round(mem, 2)!s:>9}")
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "- (no peak TFLOP/s for this device: --peak-tflops)"
        lines.append(f"  {'total':<22} {'':<18} {'':>6} {t['total_s']:>10.2f} {'':>7} {t['total_tflop']:>8.1f}  MFU {mfu}"
                     + ("" if t["complete"] else "  (INCOMPLETE: not every piece was timed)"))
    return "\n".join(lines)


def format_results(res: dict) -> str:
    lines = [f"{'backbone':<8} {'piece':<18} {'rows':>5} {'median s':>9} {'rows/s':>9} {'GFLOP/row':>10} "
             f"{'TFLOP/s':>8} {'peak GiB':>9}", "-" * 82]
    for b, r in res["backbones"].items():
        for piece, x in r["pieces"].items():
            m = x["peak_mem_gib"] if x["peak_mem_gib"] is not None else x.get("peak_rss_gib")
            mem = f"{m:>9.2f}" if m is not None else f"{'-':>9}"
            lines.append(f"{b:<8} {piece:<18} {x['rows']:>5} {x['seconds']['median']:>9.4f} {x['rows_per_s']:>9.2f} "
                         f"{x['gflop_per_row']:>10.2f} {x['achieved_tflops']:>8.2f} {mem}"
                         + (f"  (OOM at batch {x['oom_at_batch']})" if x["oom_at_batch"] else ""))
    lines.append("")
    lines.append("one SPO round per prompt (20 DDIM steps, k=4; ASSUMES every pool keeps a pair: 16 pairs/prompt):")
    lines.append(f"{'backbone':<8} {'rollout':>8} {'decode':>8} {'SPM img':>8} {'train pol':>10} {'train ref':>10} "
                 f"{'total s':>8} {'TFLOP':>7} {'official-train total s':>23}")
    for b, r in res["backbones"].items():
        if "spo_round_per_prompt" not in r:
            continue
        e = r["spo_round_per_prompt"]
        s = e["seconds"]
        lines.append(f"{b:<8} {s['rollout_unet']:>8.3f} {s['vae_decode']:>8.3f} {s['spm_image']:>8.3f} "
                     f"{s['train_policy_fwd_bwd']:>10.3f} {s['train_reference_fwd']:>10.3f} {s['total']:>8.3f} "
                     f"{e['tflop']['total']:>7.1f} {e['total_with_official_training_s']:>23.3f}")
    for b, r in res["backbones"].items():
        lines.append(f"{b}: attention processors {r.get('attention_processors')}, kernels {r.get('attention_kernels')}, "
                     f"ViT attention '{r.get('vit_attn_implementation')}'")
    return "\n".join(lines) + "\n\n" + format_round(res)


def _uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from spobench.core.io import cpu_name

    return cpu_name()


def _versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", choices=("sd15", "sdxl", "both"), default="both")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="frozen weights and activations")
    p.add_argument("--batch", type=int, default=8, help="prompts per call: UNet pieces run 2x this many rows (CFG), "
                   "decode and SPM this many")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per piece (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per piece before timing")
    p.add_argument("--autocast", action="store_true", help="fwd+bwd under torch.autocast(--dtype) (default: none, "
                   "as spobench's trainer; peft casts around the float32 LoRA)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matmuls and convolutions")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--flops-only", action="store_true", help="only the FLOP table (meta device, no weights)")
    p.add_argument("--size-scale", type=float, default=1.0, help="TEST ONLY: latent and image size divided by this")
    p.add_argument("--tiny-widths", action="store_true", help="TEST ONLY: small channel widths (UNet, VAE, ViT)")
    p.add_argument("--vit-layers", type=int, default=None,
                   help="TEST ONLY: ViT depth (default 32, 2 with --tiny-widths)")
    p.add_argument("--pieces", type=lambda v: tuple(x for x in v.split(",") if x), default=PIECES,
                   help="comma-separated pieces to time (default: all): " + ",".join(PIECES))
    p.add_argument("--round-prompts", type=int, default=10, help="prompts per round in the whole-round table (B)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak TFLOP/s at --dtype for "
                   "MFU (default: known GPUs, see PEAK_TFLOPS; none for a CPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default benchmarks/results/real_size-<device>.json; --flops-only: none)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    backbones = ("sd15", "sdxl") if args.backbone == "both" else (args.backbone,)
    real = args.size_scale == 1 and not args.tiny_widths and not args.vit_layers
    command = " ".join(["benchmarks/bench_real_size.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python {command}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": _versions(),
              "real_size": real,
              "test_flags": {"size_scale": args.size_scale, "tiny_widths": args.tiny_widths,
                             "vit_layers": args.vit_layers},
              "flops_what": "torch.utils.flop_counter.FlopCounterMode on the meta device, one sample: matmuls, "
                            "convolutions and attention as 2 x MACs (backward: input grads through the frozen "
                            "layers + the LoRA's weight grads); norms, softmax, activations, element-wise ops "
                            "and up-sampling not counted"}
    t0 = time.perf_counter()
    table = flop_table(backbones, args)
    result["flop_table"] = table
    result["flop_table_s"] = round(time.perf_counter() - t0, 2)
    if real:
        result["reference_note"] = (
            "the issue's figures (SD-1.5 UNet 803, SD VAE decode to 512x512 2,515, SDXL UNet 6,761 GFLOP per "
            "sample) are given in whole GFLOP: a diff_vs_reference within +-0.5 GFLOP is that rounding, so they "
            "likely count what FlopCounterMode counts. Norms, activations, softmax, residual adds and up-sampling "
            "are not counted: memory-bound work that the achieved TFLOP/s does not credit")
    print(format_flops(table) + f"\n(FLOP counts: {result['flop_table_s']} s on the meta device; "
          + ("published sizes)" if real else "REDUCED TEST SIZE, not comparable with the issue's figures)"))
    if args.flops_only:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.out}")
        return result

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    bad = sorted(set(args.pieces) - set(PIECES))
    if bad:
        raise SystemExit(f"--pieces: unknown {bad}; choose from {','.join(PIECES)}")
    args.peak = peak_tflops(device, args.dtype, args.peak_tflops)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 or torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.tf32 or torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    result.update({
        "device": {"type": device.type, "name": _device_name(device),
                   "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
                   "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "peak_tflops": args.peak, "uptime_start": _uptime(),
        "dtype": args.dtype, "lora_dtype": "fp32", "autocast": args.autocast, "batch": args.batch,
        "repeats": args.repeats, "warmup": args.warmup,
        "backend_flags": {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                          "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "flash_sdp": torch.backends.cuda.flash_sdp_enabled(),
                          "mem_efficient_sdp": torch.backends.cuda.mem_efficient_sdp_enabled(),
                          "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
                          "math_sdp": torch.backends.cuda.math_sdp_enabled()},
        "backbones": {},
    })
    torch.manual_seed(0)
    out = args.out or RESULTS / f"real_size-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def partial():  # after every timed piece (the previous one's figures), marked incomplete until the end
        out.write_text(json.dumps(result | {"partial": True}, indent=2, default=str) + "\n")

    args.on_piece = partial
    for b in backbones:
        c = configs(b, args.size_scale, args.tiny_widths, args.vit_layers)
        result["backbones"][b] = {}
        bench_backbone(c, table[b]["pieces"], args, device, dtype, result["backbones"][b])
    if device.type == "cpu":
        result["device"]["loadavg_end"] = list(os.getloadavg())
        result["uptime_end"] = _uptime()
    print()
    print(format_results(result))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
