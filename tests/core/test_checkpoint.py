"""Checkpoints: atomic folders that restore LoRA, optimizer, scheduler and RNG states exactly."""

import copy
import json
import random

import numpy as np
import pytest
import torch

from spobench.core.checkpoint import (LoraWeights, capture_rng, checkpoint_dir, latest_checkpoint,
                                        list_checkpoints, load_checkpoint, read_checkpoint, restore_rng, save_checkpoint)
from spobench.core.errors import InputError, ModelLoadError


def _setup(rank=4, seed=0):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(seed)
    params = bb.add_lora(rank, seed=seed)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    return bb, params, opt, sched


def _step(params, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(tmp_path, bb, opt, sched, index=1, keep=None, trainer="spo"):
    return save_checkpoint(tmp_path, index, weights=LoraWeights(bb), optimizer=opt, scheduler=sched,
                           progress={"epoch": 0, "round": index, "rounds_done": index, "step": 3 * index},
                           config={"k": 4}, trainer=trainer, keep=keep)


def test_roundtrip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    bb, params, opt, sched = _setup()
    _step(params, opt, sched, 1)
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    path = _save(tmp_path, bb, opt, sched)
    expect_rand = (torch.rand(3), np.random.rand(3), random.random())
    want = [p.detach().clone() for p in params]
    want_opt = copy.deepcopy(opt.state_dict())

    _step(params, opt, sched, 2)  # diverge, then restore
    load_checkpoint(path, weights=LoraWeights(bb), optimizer=opt, scheduler=sched, trainer="spo")
    assert all(torch.equal(p, w) for p, w in zip(params, want))
    got = opt.state_dict()
    for i, s in want_opt["state"].items():
        assert all(torch.equal(s[k], got["state"][i][k]) for k in s)
    assert sched.last_epoch == 1
    assert torch.equal(torch.rand(3), expect_rand[0])
    assert np.array_equal(np.random.rand(3), expect_rand[1]) and random.random() == expect_rand[2]
    # continuing from the restored state is exactly continuing from the saved one
    _step(params, opt, sched, 2)
    after_restore = [p.detach().clone() for p in params]
    load_checkpoint(path, weights=LoraWeights(bb), optimizer=opt, scheduler=sched)
    _step(params, opt, sched, 2)
    assert all(torch.equal(p, a) for p, a in zip(params, after_restore))


def test_manifest_lists_contents_and_identity(tmp_path):
    bb, params, opt, sched = _setup()
    path = _save(tmp_path, bb, opt, sched, index=7)
    assert path == checkpoint_dir(tmp_path, 7) and path.name == "checkpoint-000007"
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "spobench-checkpoint" and m["trainer"] == "spo" and m["lora_rank"] == 4
    assert m["backbone"]["backbone"] == "tiny" and m["backbone"]["source"] == "build(seed=0)"
    assert set(m["files"]) >= {"lora/pytorch_lora_weights.safetensors", "optimizer.pt", "scheduler.pt",
                               "progress.json", "config.json", "rng_rank0.pt"}
    ck = read_checkpoint(path)
    assert ck.progress["rounds_done"] == 7 and ck.config == {"k": 4}
    assert not list(tmp_path.glob("checkpoints/.*"))  # no temp folders left behind


def test_files_load_without_pickle(tmp_path):
    bb, params, opt, sched = _setup()
    path = _save(tmp_path, bb, opt, sched)
    for name in ("optimizer.pt", "scheduler.pt", "rng_rank0.pt"):
        torch.load(path / name, weights_only=True)


def test_latest_and_keep_last_n(tmp_path):
    bb, params, opt, sched = _setup()
    for i in (1, 2, 3, 4):
        _save(tmp_path, bb, opt, sched, index=i, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000003", "checkpoint-000004"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-000004"
    # a folder without a manifest (an interrupted copy) is not a checkpoint
    (tmp_path / "checkpoints" / "checkpoint-000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-000004"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_checkpoint_from_another_backbone_is_refused(tmp_path):
    bb, params, opt, sched = _setup(seed=0)
    path = _save(tmp_path, bb, opt, sched)
    other, p2, o2, s2 = _setup(seed=1)  # another base model (source build(seed=1))
    with pytest.raises(ModelLoadError, match="base model 'build\\(seed=0\\)'.*'build\\(seed=1\\)'"):
        load_checkpoint(path, weights=LoraWeights(other), optimizer=o2, scheduler=s2)
    m = json.loads((path / "manifest.json").read_text())
    m["backbone"]["backbone"] = "sd15"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelLoadError, match="backbone 'sd15', but this run uses 'tiny'"):
        load_checkpoint(path, weights=LoraWeights(bb), optimizer=opt, scheduler=sched)


def test_other_rank_or_trainer_is_refused(tmp_path):
    bb, params, opt, sched = _setup(rank=4)
    path = _save(tmp_path, bb, opt, sched)
    bb8, p8, o8, s8 = _setup(rank=8)
    with pytest.raises(ModelLoadError, match="LoRA rank 4, this run uses rank 8"):
        load_checkpoint(path, weights=LoraWeights(bb8), optimizer=o8, scheduler=s8)
    with pytest.raises(ModelLoadError, match="trainer 'spo', not 'mspo'"):
        load_checkpoint(path, weights=LoraWeights(bb), optimizer=opt, scheduler=sched, trainer="mspo")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="not a checkpoint"):
        read_checkpoint(tmp_path)


def test_rng_capture_restore():
    state = capture_rng()
    a = (torch.randn(2), np.random.randn(2), random.gauss(0, 1))
    restore_rng(state)
    b = (torch.randn(2), np.random.randn(2), random.gauss(0, 1))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
