"""The GPU check of issue 13 part 5 (run it through ``benchmarks/gpu_check.sh``; at most 8 minutes on one H100/H200).

(a) Real-size, random-weight SPO rounds through spobench's own trainers, bf16: SD-1.5 with SPO (k = 4, 20 DDIM
    steps, 8 prompts per round) and SDXL with MSPO (its defaults: k = 2, j = 4, 1024 px; 2 prompts per round).
    The networks are the published architectures (``bench_real_size.py``'s UNet/VAE configs, the CLIP text
    encoders and PickScore-sized SPM of ``real_world.py``), built on the GPU with random weights; nothing is
    downloaded or written to disk. Round 1 warms up (cuDNN autotuning, allocator); round 2 is measured. Per
    piece: seconds, TFLOP/s and MFU (against the chip's dense bf16 peak), with FLOPs per row from
    FlopCounterMode on the meta device (``bench_real_size.count_flops``: matmuls, convolutions, attention)
    times the rows spobench's counters saw:

    * ``rollout_unet``: UNet forwards of the pooled rollout (LoRA on, no grad, CFG rows);
    * ``vae_decode``: the x0_hat decodes the SPM scores (the rollout's, one per candidate and pool);
    * ``spm``: the SPM's image tower (ViT-H/14 @224; its adaLN modulation and the text tower not counted);
    * ``training``: the training half of the round (policy fwd + bwd with LoRA grads, reference fwd,
      optimizer step), FLOPs = grad rows x fwd+bwd + no-grad rows x fwd;

    plus the round's seconds and peak GPU memory (``torch.cuda.max_memory_allocated``).
(b) The tiny headline recipe (``spobench reproduce headline``) on the GPU, with whatever time is left.

``--dry-run``: the same code at test sizes on the CPU (fp32, 4 steps, 1 prompt, k = 2, tiny widths), in
seconds, and (b) only planned; tests/benchmarks/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gpu_check.json"
BUDGET_S = 480  # the whole check, (a) and (b)
PROMPTS = ["a photo of a red cat on the green tree", "a blue car on the road", "a dog painting a tree",
           "the green tree in a painting", "a red car and a blue dog", "a photo of the cat",
           "a painting of a blue tree", "a green dog on a red car"]
# dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts; no sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H100 PCIe": 756.0, "A100": 312.0, "L40S": 362.0}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return name, PEAK_BF16_TFLOPS[key]
    return name, None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Seconds per named piece; ``timed`` wraps a callable with device syncs around it."""

    def __init__(self, device):
        self.device = device
        self.s: dict[str, float] = {}
        self.phase = "idle"

    def add(self, key: str, dt: float):
        self.s[key] = self.s.get(key, 0.0) + dt

    def timed(self, key: str, fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            _sync(self.device)
            self.add(key, time.perf_counter() - t0)
            return out
        return run


# -- random-weight models at the published sizes ---------------------------------------------------------
def build_backbone(name: str, device, dry: bool, tokdir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from spobench.models.backbones import testing
    from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone

    bench, rw = _load("_bench_real_size", HERE / "bench_real_size.py"), _load("_real_world", HERE / "real_world.py")
    c = bench.configs(name, 8 if dry else 1, tiny_widths=dry)
    vae_cfg = {"scaling_factor": 0.18215, **c["vae"]}
    specs = [(rw.CLIP_L_TEXT, CLIPTextModel, "<|endoftext|>")]
    if name == "sdxl":
        specs.append((rw.CLIP_BIGG_TEXT, CLIPTextModelWithProjection, "!"))
    if dry:  # 32-wide text towers (SDXL's pooled projection stays 1280 wide: the UNet's added embedding)
        specs = [({**spec, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2}, klass, pad) for spec, klass, pad in specs]
        width = 32 * len(specs)
        c["unet"] = {**c["unet"], "cross_attention_dim": width}
        c["context"] = (c["context"][0], width)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**c["unet"])
        vae = AutoencoderKL(**vae_cfg)
        encoders = [klass(rw._text_config(spec, rw.CLIP_VOCAB)) for spec, klass, _ in specs]
    toks = [CLIPTokenizer.from_pretrained(str(rw.write_clip_tokenizer(tokdir / f"{name}-{i}", pad)))
            for i, (_, _, pad) in enumerate(specs)]
    cls, sched = ((SD15Backbone, testing.SD15_SCHEDULER_CONFIG) if name == "sd15"
                  else (SDXLBackbone, testing.SDXL_SCHEDULER_CONFIG))
    bb = cls(unet=unet, vae=vae, text_encoders=encoders, tokenizers=toks, scheduler=cls.ddim_from_config(sched),
             source=f"random-weights:{name}")
    return bb, c, bench


def build_spm(device, dtype, dry: bool, tokdir: Path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.models.spm_preprocess import read_preprocess

    rw = _load("_real_world", HERE / "real_world.py")
    text, vision = dict(rw.PICK_TEXT), dict(rw.PICK_VISION)
    if dry:
        text.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=16)
    proc = rw.write_processor(tokdir / "spm-processor", 224, rw.CLIP_VOCAB)
    config = CLIPConfig(text_config=rw._text_config(text, rw.CLIP_VOCAB).to_dict(), vision_config=vision,
                        projection_dim=text["projection_dim"])
    torch.manual_seed(1)
    with torch.device(device):
        clip = CLIPModel(config)
    spm = StepAwarePreferenceModel(clip, CLIPTokenizer.from_pretrained(str(proc)),
                                   preprocess=read_preprocess(proc, 224), base="random-weights:pickscore-size")
    return spm.to(device=device, dtype=dtype).eval().requires_grad_(False), vision


# -- (a) SPO / MSPO rounds -------------------------------------------------------------------------------
def spo_rounds(name: str, args, device, dtype, tmp: Path) -> dict:
    from spobench.trainers.mspo import MSPOTrainer
    from spobench.trainers.spo import SPOTrainer

    t_build = time.perf_counter()
    bb, c, bench = build_backbone(name, device, args.dry_run, tmp)
    spm, vision = build_spm(device, dtype, args.dry_run, tmp)
    build_s = time.perf_counter() - t_build
    trainer_cls = SPOTrainer if name == "sd15" else MSPOTrainer
    n_prompts = 1 if args.dry_run else (8 if name == "sd15" else 2)
    prompts = (PROMPTS * 2)[:n_prompts]
    values = {"prompts": "gpu-check", "scorer": "random-weights SPM (in memory)", "rollout_batch": n_prompts,
              "train_batch_size": 8, "epochs": args.rounds, "max_rounds": args.rounds, "checkpoint_every": 1000,
              "keep_checkpoints": 1, "dtype": "fp32" if args.dry_run else "bf16",
              "num_steps": 4 if args.dry_run else 20,
              # random weights: the SPM's gaps are arbitrary; 0 keeps every untied pair, so training is measured
              "threshold": 0.0}
    if name == "sd15":
        values["k"] = 2 if args.dry_run else 4
    if args.dry_run:
        values["resolution"] = c["image"]  # the test size (else the backbone's 512 / 1024 px)
    cfg = trainer_cls.Config.from_dict(values)
    cfg = trainer_cls.prepare_config(cfg, name, type(bb).defaults)
    spm.counters = bb.counters
    trainer = trainer_cls(cfg, bb, tmp / f"run-{name}", prompts=prompts, step_scorer=spm)

    clock = Clock(device)
    unet = bb.unet
    state = {"t0": 0.0}

    def pre(_m, _a):
        _sync(device)
        state["t0"] = time.perf_counter()

    def post(_m, _a, _o):
        _sync(device)
        if clock.phase == "collect" and not torch.is_grad_enabled():
            clock.add("rollout_unet", time.perf_counter() - state["t0"])

    hooks = [unet.register_forward_pre_hook(pre), unet.register_forward_hook(post)]
    bb.vae.decode = clock.timed("vae_decode", bb.vae.decode)
    spm.forward = clock.timed("spm", spm.forward)
    rounds, snaps = [], {}
    orig_collect, orig_train = trainer.collect, trainer.loop.train_items  # the loop trains a round's items

    def collect(*a, **kw):
        clock.s.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        snaps["start"] = dict(bb.counters.as_dict())
        clock.phase = "collect"
        out = clock.timed("collect", orig_collect)(*a, **kw)
        snaps["collected"] = dict(bb.counters.as_dict())
        return out

    def train_items(items):
        clock.phase = "train"
        out = clock.timed("training", orig_train)(items)
        clock.phase = "idle"
        end = dict(bb.counters.as_dict())
        rounds.append(round_report(clock.s, snaps["start"], snaps["collected"], end, len(items), device))
        return out

    trainer.collect, trainer.loop.train_items = collect, train_items
    t0 = time.perf_counter()
    trainer.train()
    for h in hooks:
        h.remove()
    flops = flops_per_row(bench, c, args)
    for r in rounds:
        add_flops(r, flops, device)
    return {"trainer": trainer_cls.name, "prompts_per_round": n_prompts,
            "settings": {k: getattr(cfg, k) for k in ("k", "num_steps", "kappa", "threshold", "dtype", "lora_rank",
                                                       "resolution", "guidance_scale")}
            | ({"inner_steps": cfg.inner_steps, "tail": cfg.tail} if name == "sdxl" else {}),
            "build_s": round(build_s, 2), "train_s": round(time.perf_counter() - t0, 2),
            "flops_per_row_gflop": {k: v / 1e9 for k, v in flops.items()},
            "rounds": rounds, "measured": rounds[-1] if rounds else None,
            "latent": c["latent"], "image": c["image"], "spm_vision": {k: vision[k] for k in ("hidden_size",
                                                                                            "num_hidden_layers")}}


def round_report(s: dict, start: dict, collected: dict, end: dict, n_items: int, device) -> dict:
    d = lambda a, b, k: int(b.get(k, 0) - a.get(k, 0))  # noqa: E731
    rows = {"rollout_unet_rows": d(start, collected, "unet_rows_nograd"),
            "vae_decodes": d(start, collected, "vae_decodes"),
            "spm_image_passes": d(start, collected, "reward_image_passes"),
            "train_rows_grad": d(collected, end, "unet_rows_grad"),
            "train_rows_nograd": d(collected, end, "unet_rows_nograd"), "train_items": n_items}
    sec = {k: round(v, 4) for k, v in s.items()}
    sec["round"] = round(s.get("collect", 0.0) + s.get("training", 0.0), 4)
    sec["rollout_other"] = round(s.get("collect", 0.0) - s.get("rollout_unet", 0.0) - s.get("vae_decode", 0.0)
                                 - s.get("spm", 0.0), 4)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": sec, "rows": rows, "peak_gpu_mem_gib": mem}


def flops_per_row(bench, c: dict, args) -> dict:
    spec = dict(c)
    if args.dry_run:  # the SPM's test widths, as built
        spec["vit"] = {**c["vit"], **bench.TINY_VIT}
    f = bench.count_flops(spec)
    return f


def add_flops(r: dict, f: dict, device) -> None:
    rows, sec = r["rows"], r["seconds"]
    tflop = {"rollout_unet": rows["rollout_unet_rows"] * f["unet_fwd_lora"],
             "vae_decode": rows["vae_decodes"] * f["vae_decode"],
             "spm": rows["spm_image_passes"] * f["spm_vit"],
             "training": rows["train_rows_grad"] * f["unet_fwd_bwd_lora"] + rows["train_rows_nograd"] * f["unet_fwd"]}
    tflop = {k: v / 1e12 for k, v in tflop.items()}
    _, peak = peak_tflops(device)
    r["tflop"] = tflop
    r["tflops_per_s"] = {k: (v / sec[k] if sec.get(k) else None) for k, v in tflop.items()}
    r["mfu"] = {k: (v / peak if (v is not None and peak) else None) for k, v in r["tflops_per_s"].items()}


# -- (b) the tiny headline recipe ------------------------------------------------------------------------
def headline(args, device, left_s: float, tmp: Path) -> dict:
    out = tmp / "headline"
    argv = [sys.executable, "-m", "spobench.cli", "reproduce", "headline", "--backbone", "tiny", "--device",
            device.type, "--out", str(out)]
    res = {"command": " ".join(argv[2:]).replace("spobench.cli", "spobench", 1), "budget_s": round(left_s, 1)}
    if args.dry_run:
        from spobench.reproduce.recipe import load_recipe
        from spobench.core.catalog import recipe_files

        recipe = load_recipe(recipe_files()["headline"])
        res.update(ran=False, why="dry run: planned only", cells=sorted(recipe.cells))
        return res
    if left_s < 30:
        return res | {"ran": False, "why": f"only {left_s:.0f} s left of the {BUDGET_S} s budget"}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=left_s, cwd=ROOT)
        res.update(ran=True, rc=p.returncode, seconds=round(time.perf_counter() - t0, 1),
                   output_tail=(p.stdout + p.stderr).splitlines()[-25:])
    except subprocess.TimeoutExpired as e:
        res.update(ran=True, rc=None, timed_out=True, seconds=round(time.perf_counter() - t0, 1),
                   output_tail=((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                                else (e.stdout or "")).splitlines()[-25:])
    report = out / "report.json"
    if report.exists():
        res["report"] = json.loads(report.read_text())
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="test sizes on the CPU in seconds; (b) only planned")
    p.add_argument("--parts", default="sd15,sdxl,headline")
    p.add_argument("--rounds", type=int, default=2, help="rounds per backbone; the last is the measured one")
    p.add_argument("--out", type=Path, default=None, help=f"JSON (default {RESULTS.relative_to(ROOT)}; dry run: "
                   "benchmarks/results/gpu_check-dry-run.json)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run on a CPU)")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    name, peak = peak_tflops(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import diffusers
    import transformers

    result = {"command": "benchmarks/gpu_check.sh " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "device": {"name": name, "peak_bf16_tflops": peak, "cores": os.cpu_count()},
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
                           "transformers": transformers.__version__},
              "budget_s": BUDGET_S, "parts": {}}
    parts = [x for x in args.parts.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in parts:
            if part in ("sd15", "sdxl"):
                result["parts"][part] = spo_rounds(part, args, device, dtype, Path(tmp))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            elif part == "headline":
                left = BUDGET_S - (time.perf_counter() - t_start) - 10
                result["parts"]["headline"] = headline(args, device, left, Path(tmp))
            else:
                raise SystemExit(f"unknown part {part!r}")
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    out = args.out or (HERE / "results" / "gpu_check-dry-run.json" if args.dry_run else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for part, r in result["parts"].items():
        m = r.get("measured") if isinstance(r, dict) else None
        if m:
            print(f"{part}: round {m['seconds']['round']:.2f} s, peak GPU {m['peak_gpu_mem_gib']} GiB, "
                  f"TFLOP/s {({k: (round(v, 1) if v else v) for k, v in m['tflops_per_s'].items()})}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
