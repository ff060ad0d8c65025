"""`generate` on a flow backbone: the Euler ODE at eta 0 (what diffusers' pipeline samples), Flow-GRPO's SDE
above it, and the manifest and report name the sampler that ran (not "ddim")."""

import json

import numpy as np
from PIL import Image

from spobench.engine.rollout import SamplerConfig, sampler_name
from spobench.eval.generate import generate
from spobench.models.backbones import load_backbone


def _pixels(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))])


def test_flow_generation_names_its_sampler(tmp_path):
    bb = load_backbone("tiny-flow", None)
    prompts = ["a red circle", "two blue squares"]
    for name, eta in (("ode", 0.0), ("ode-again", 0.0), ("sde", 1.0)):
        generate(bb, prompts, tmp_path / name, sampler=SamplerConfig(num_steps=3, eta=eta), batch_size=2)
    rows = [json.loads(ln) for ln in (tmp_path / "ode" / "manifest.jsonl").read_text().splitlines()]
    assert {r["sampler"]["name"] for r in rows} == {"euler-ode"}
    sde = json.loads((tmp_path / "sde" / "manifest.jsonl").read_text().splitlines()[0])
    assert sde["sampler"]["name"] == sampler_name("flow", 1.0) == "flow-sde (a = 0.7)"
    assert np.array_equal(_pixels(tmp_path / "ode"), _pixels(tmp_path / "ode-again"))  # deterministic
    assert not np.array_equal(_pixels(tmp_path / "ode"), _pixels(tmp_path / "sde"))  # the SDE adds noise
    assert sampler_name("diffusion", 1.0) == sampler_name("diffusion", 0.0) == "ddim"
