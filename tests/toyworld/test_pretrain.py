"""Tiny-world pretraining: deterministic steps, exact resume, a loadable export."""

import torch

from spobench.models.backbones.tiny import TinyBackbone
from spobench.toyworld.pretrain import PretrainConfig, Pretrainer, toy_batch, web_knobs


def _trainer(out, steps=2):
    cfg = PretrainConfig(steps=steps, batch_size=4, checkpoint_every=1, warmup=2, seed=3)
    return Pretrainer(TinyBackbone.build(0), cfg, toy_batch, out)


def _weights(tr):
    return {k: v.clone() for k, v in tr.modules.state_dict().items()}


def test_two_steps_are_deterministic(tmp_path):
    a, b = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    la = [a.train_step() for _ in range(2)]
    lb = [b.train_step() for _ in range(2)]
    assert la == lb
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fresh = TinyBackbone.build(0).unet.state_dict()
    assert any(not torch.equal(wa[f"unet.{k}"], v) for k, v in fresh.items())  # it did train


def test_resume_continues_exactly(tmp_path):
    full = _trainer(tmp_path / "full", steps=3)
    full.run()
    part = _trainer(tmp_path / "part", steps=2)
    part.run()  # checkpoints every step; a kill after step 2 loses nothing
    resumed = _trainer(tmp_path / "part", steps=3)
    assert resumed.load_checkpoint() and resumed.step == 2
    resumed.run()
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert full.losses == resumed.losses


def test_export_loads_through_the_tiny_loader(tmp_path):
    tr = _trainer(tmp_path / "run", steps=1)
    tr.run()
    folder = tr.export(tmp_path / "model")
    bb = TinyBackbone.load(folder)
    ema = tr.ema["unet"].state_dict()
    assert all(torch.equal(ema[k], v) for k, v in bb.unet.state_dict().items())
    # the live (non-EMA) weights are back in place after export
    assert not all(torch.equal(ema[k], v) for k, v in tr.modules["unet"].state_dict().items())


def test_batches_mix_quality_and_follow_the_grammar():
    import numpy as np

    from spobench.toyworld.grammar import parse

    prompts, images = toy_batch(0, 5, 16)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert all(parse(p) is not None for p in prompts)
    knobs = [web_knobs(np.random.default_rng(i)) for i in range(400)]
    clean = sum(all(v == 0 for v in k.as_dict().values()) for k in knobs)
    assert 0.2 < clean / 400 < 0.45  # P_CLEAN plus spoiled draws that happen to have no knob on
