"""Does torch.compile of the tiny SD-1.5-shaped UNet alone (no merge_lora) change its LoRA gradients? One forward +
backward of 10 rows, eager vs compiled, same weights and inputs. Not CI (a cold CPU compile takes minutes):

    TORCHINDUCTOR_CACHE_DIR=/tmp/probe-inductor OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probe_compile_grad.py

2026-12-02, torch 2.13.0 CPU, 2 cores at load ~1: out max diff 1.4e-06, loss diff 1.5e-08, LoRA grad relative
L2 0.117 (max 2.2e-3); eager float32 against float64 on the same inputs: 4.5e-07. So the compiled backward is
the wrong one, and spobench refuses compile=true on the CPU for backbones other than tiny
(spobench/trainers/base.py: check_compile_gradients)."""
import sys, time, torch
from pathlib import Path
from spobench.models.backbones import load_backbone
from spobench.models.backbones.testing import make_sd15_folder

torch.manual_seed(0)
import tempfile
folder = make_sd15_folder(Path(tempfile.mkdtemp()) / "sd15", seed=0)
res = {}
for mode in ("eager", "compiled"):
    bb = load_backbone("sd15", str(folder))
    bb.add_lora(rank=4)
    with torch.no_grad():  # B != 0 so the LoRA matters
        g = torch.Generator().manual_seed(1)
        for p in bb.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    if mode == "compiled":
        bb.unet.compile()
    cond = bb.encode_prompts(["a red cat", "two blue squares"] * 5)
    x = torch.randn(10, *bb.latent_shape(16), generator=torch.Generator().manual_seed(2))
    t = torch.full((10,), 500)
    merged = "--merge" in sys.argv
    if merged and hasattr(bb, "lora_merged"):
        with torch.no_grad(), bb.lora_merged():
            bb.unet_forward(x, t, cond)  # a no-grad merged call first, as the rollout does
    t0 = time.time()
    out = bb.unet_forward(x, t, cond)
    loss = (out.float() ** 2).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in bb.trainable_parameters()])
    res[mode] = (loss.item(), grads, out.detach())
    print(mode, "loss", loss.item(), "sec", round(time.time() - t0, 1), flush=True)
(le, ge, oe), (lc, gc, oc) = res["eager"], res["compiled"]
print("out max diff", (oe - oc).abs().max().item())
print("loss diff", abs(le - lc), "grad rel", ((ge - gc).norm() / ge.norm()).item(), "grad max", (ge - gc).abs().max().item())
