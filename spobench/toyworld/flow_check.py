"""A quick check of a tiny flow base: Euler ODE samples (dx = v dt from t = 1 to 0 on the backbone's sigma
grid, guided velocity) of tiny-world validation prompts, scored by the oracle's toy_alignment and
toy_aesthetic, beside the same prompts and seeds from a random-weight model.

    python -m spobench.toyworld.flow_check [MODEL_FOLDER] [--prompts 48]

This is a sanity check of the shipped base, not a sampler the trainers use (the SDE step and its log-prob
live in the engine)."""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def euler_sample(bb, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = 20,
                 guidance_scale: float = 4.5) -> np.ndarray:
    """uint8 (B, H, W, 3) images: the deterministic Euler ODE from noise drawn with one generator per seed."""
    from spobench.eval.generate import to_uint8

    shape = bb.latent_shape()
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    cond, uncond = bb.encode_prompts(list(prompts)), bb.encode_unconditional(len(prompts))
    sig = bb.sigmas(num_steps)
    for i in range(num_steps):
        x = x + (sig[i + 1] - sig[i]) * bb.predict(x, sig[i], cond, uncond=uncond, guidance_scale=guidance_scale)
    return to_uint8(bb.decode(x))


def check(model=None, n_prompts: int = 48, num_steps: int = 20, guidance_scale: float = 4.5, seed: int = 0) -> dict:
    """Mean toy_alignment / toy_aesthetic of ``model`` (a tiny-flow folder; None: the shipped base) and of a
    random-weight model (``build(seed)``) on the first ``n_prompts`` tiny-val prompts, seeds 0..n-1."""
    from PIL import Image

    from spobench.metrics.toy import ToyAesthetic, ToyAlignment
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone
    from spobench.toyworld.pairs import tiny_val_prompts

    prompts = list(tiny_val_prompts())[:n_prompts]
    out = {"prompts": len(prompts), "num_steps": num_steps, "guidance_scale": guidance_scale}
    for name, bb in (("base", TinyFlowBackbone.load(model)), ("random", TinyFlowBackbone.build(seed))):
        imgs = [Image.fromarray(a) for a in euler_sample(bb, prompts, range(len(prompts)), num_steps, guidance_scale)]
        out[name] = {"toy_alignment": float(np.mean(ToyAlignment().score(imgs, prompts).scores)),
                     "toy_aesthetic": float(np.mean(ToyAesthetic().score(imgs, prompts).scores))}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    args = ap.parse_args(argv)
    print(json.dumps(check(args.model, args.prompts, args.steps, args.guidance), indent=2))


if __name__ == "__main__":
    main()
