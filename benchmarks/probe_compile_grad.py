"""Does torch.compile of the tiny SD-1.5-shaped UNet (no merge_lora) change its LoRA gradients? One forward +
backward of 10 rows, eager vs compiled, same weights and inputs, both against a float64 eager reference. Not CI
(a cold CPU compile takes minutes):

    TORCHINDUCTOR_CACHE_DIR=/tmp/probe-inductor OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_compile_grad.py \
        [--backend inductor|aot_eager|eager] [--disable GroupNorm,Attention,...] [--inductor KEY=VALUE ...] [--merge]

``--disable`` runs the forward of every submodule of those classes eagerly inside the compiled UNet
(torch.compiler.disable), to bisect which piece's compiled backward is off. ``--inductor`` sets
torch._inductor.config entries (e.g. ``fallback_random=True``). ``--minimal``: the smallest case found,
without spobench or peft: diffusers' UpBlock2D of the same UNet config alone, gradient w.r.t. its input
(inductor's is exactly zero; for an upstream report). Findings, numbers and the dates are in benchmarks/README.md."""
import argparse
import tempfile
import time
from pathlib import Path

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--backend", default="inductor")
ap.add_argument("--disable", default="", help="comma-separated module class names run eagerly")
ap.add_argument("--inductor", nargs="*", default=[], help="torch._inductor.config KEY=VALUE")
ap.add_argument("--all", action="store_true", help="list every LoRA tensor's error, not the worst 12")
ap.add_argument("--minimal", action="store_true", help="UpBlock2D alone: the input gradient, eager vs compiled")
ap.add_argument("--merge", action="store_true", help="a no-grad merged call first, as the rollout does")
args = ap.parse_args()

for kv in args.inductor:
    k, v = kv.split("=", 1)
    obj = torch._inductor.config
    *path, last = k.split(".")
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, eval(v))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()




def minimal() -> None:
    """diffusers only: the UNet of make_sd15_folder's config, its ``up_blocks[0]`` (UpBlock2D: two
    ResnetBlock2D on cat(hidden, skip), then Upsample2D) on random inputs; d loss / d hidden_states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    ).eval().requires_grad_(False)
    block = unet.up_blocks[0]
    h = torch.randn(10, 32, 4, 4, requires_grad=True)
    skips = (torch.randn(10, 16, 4, 4), torch.randn(10, 32, 4, 4))  # popped from the end: 32, then 16 channels
    temb = torch.randn(10, 64)

    def f(x):
        return block(hidden_states=x, res_hidden_states_tuple=skips, temb=temb)

    grads = {}
    for name, fn in (("eager", f), (args.backend, torch.compile(f, backend=args.backend))):
        h.grad = None
        fn(h).square().mean().backward()
        grads[name] = h.grad.clone()
    e, c = grads["eager"], grads[args.backend]
    print(f"UpBlock2D input grad: |eager| {e.norm().item():.3e}  |{args.backend}| {c.norm().item():.3e}  "
          f"relative L2 {rel(c, e):.2e}")


if args.minimal:
    minimal()
    raise SystemExit

from spobench.models.backbones import load_backbone  # noqa: E402
from spobench.models.backbones.testing import make_sd15_folder  # noqa: E402

torch.manual_seed(0)
folder = make_sd15_folder(Path(tempfile.mkdtemp()) / "sd15", seed=0)
res, per = {}, {}
for mode in ("float64", "eager", "compiled"):
    bb = load_backbone("sd15", str(folder))
    bb.add_lora(rank=4)
    with torch.no_grad():  # B != 0 so the LoRA matters
        g = torch.Generator().manual_seed(1)
        for p in bb.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cond = bb.encode_prompts(["a red cat", "two blue squares"] * 5)
    x = torch.randn(10, *bb.latent_shape(16), generator=torch.Generator().manual_seed(2))
    t = torch.full((10,), 500)
    if mode == "float64":
        bb.unet.double()  # unet_forward casts the conditioning to the UNet's dtype
        x = x.double()
    if mode == "compiled":
        names = {n for n in args.disable.split(",") if n}
        for m in bb.unet.modules():
            if type(m).__name__ in names:
                m.forward = torch.compiler.disable(m.forward)
        bb.unet.compile(backend=args.backend)
    if args.merge and mode != "float64":
        with torch.no_grad(), bb.lora_merged():
            bb.unet_forward(x, t, cond)
    t0 = time.time()
    out = bb.unet_forward(x, t, cond)
    loss = (out.double() ** 2).mean()
    loss.backward()
    named = [(n, p) for n, p in bb.unet.named_parameters() if p.requires_grad]
    grads = torch.cat([p.grad.double().flatten() for _, p in named])
    per[mode] = {n: p.grad.double().clone() for n, p in named}
    res[mode] = (loss.item(), grads, out.detach().double())
    print(mode, "loss", loss.item(), "sec", round(time.time() - t0, 1), flush=True)
(l64, g64, o64), (le, ge, oe), (lc, gc, oc) = res["float64"], res["eager"], res["compiled"]
print(f"backend={args.backend} disable={args.disable or '-'} inductor={args.inductor or '-'} merge={args.merge}")
print(f"out: eager-f64 max {(oe - o64).abs().max().item():.2e}  compiled-f64 max {(oc - o64).abs().max().item():.2e}")
print(f"grad rel L2: eager-f64 {rel(ge, g64):.2e}  compiled-f64 {rel(gc, g64):.2e}  compiled-eager {rel(gc, ge):.2e}")
bad = [(rel(per["compiled"][n], per["float64"][n]), n) for n in per["float64"]]
print("per LoRA tensor, compiled vs float64, worst first (relative L2):")
for r, n in sorted(bad, reverse=True)[:None if args.all else 12]:
    ratio = (per["compiled"][n].norm() / per["float64"][n].norm()).item()
    print(f"  {r:.2e}  {n}  |compiled|/|f64| {ratio:.3f}  (eager {rel(per['eager'][n], per['float64'][n]):.1e})")
print(f"  ... {sum(r > 1e-4 for r, _ in bad)} of {len(bad)} tensors above 1e-4")
