"""Per-call cost of the tiny UNet, eager vs ``compile=true`` (torch.compile in place), for the four kinds of
UNet call an SPO round makes: the CFG rollout call (80 rows = 10 prompts x k 4 x 2), a 20-row rollout call,
the reference (LoRA off, 20 rows) and the policy forward + backward (20 rows, LoRA grads only).
Prints the first (compiling) call's seconds, the max |difference| to eager, and the speed-up of the mean of
5 calls. Not a test; timings are never asserted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_compile_unet.py
"""
import time

import torch

from spobench.models.backbones.tiny import TinyBackbone
torch.manual_seed(0)
bb = TinyBackbone.load()
params = bb.add_lora(rank=4)
with torch.no_grad():
    for n, p in bb.unet.named_parameters():
        if "lora_B" in n: p.normal_(0, 0.05)
unet = bb.unet.eval()
def inputs(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, *bb.latent_shape(32), generator=g)
    cond = bb.encode_prompts(["a red circle"]*n, 32)
    return x, torch.full((n,), 501), cond
I = {n: inputs(n) for n in (20, 80)}
def nograd(n, off=False):
    x, t, c = I[n]
    with torch.no_grad():
        if off:
            with bb.lora_disabled(): return bb.unet_forward(x, t, c)
        return bb.unet_forward(x, t, c)
def grad(n=20):
    x, t, c = I[n]
    for p in params: p.grad = None
    out = bb.unet_forward(x, t, c)
    out.square().mean().backward()
    return out.detach(), torch.cat([p.grad.flatten() for p in params])
calls = [("80 on", lambda: nograd(80)), ("20 on", lambda: nograd(20)), ("20 off", lambda: nograd(20, True)), ("20 grad", grad)]
ref = {k: f() for k, f in calls}
def timeit(f, n=5):
    t0 = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-t0)/n
eager = {k: timeit(f) for k, f in calls}
print("eager", eager, flush=True)
unet.compile()
for k, f in calls:
    t0 = time.perf_counter(); out = f(); ct = time.perf_counter()-t0
    r = ref[k]
    if isinstance(out, tuple):
        err = max((out[0]-r[0]).abs().max().item(), ((out[1]-r[1]).norm()/r[1].norm()).item())
    else: err = (out-r).abs().max().item()
    print(k, "first call (compile) s", round(ct,1), "err", err, flush=True)
# second pass: toggles should hit cached graphs
for k, f in calls:
    t0 = time.perf_counter(); f(); print(k, "second", round(time.perf_counter()-t0, 3), flush=True)
comp = {k: timeit(f) for k, f in calls}
print("compiled", comp)
print("speedup", {k: round(eager[k]/comp[k], 2) for k in eager})
