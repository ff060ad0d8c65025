"""DDPO: the PPO loss against a hand computation, zero advantages, the per-prompt stat tracker,
advantages over the whole round, and `spobench train ddpo` end to end (exact resume with the
tracker's buffers; two processes with an uneven last round)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clitools import EXE, run, run_together
from spobench.trainers.ddpo import DDPOTrainer, PerPromptStatTracker, ddpo_loss

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


def brightness(images, t, prompts):
    return images.mean(dim=(1, 2, 3))


def make_trainer(tmp_path, sets=(), reward=brightness):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(0)
    base = ["num_steps=4", "rollout_batch=2", "train_batch_size=4", "grad_accum=1", "epochs=1"]
    cfg = DDPOTrainer.prepare_config(DDPOTrainer.Config.load(None, base + list(sets)), "tiny", bb.defaults)
    return DDPOTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS, reward_fn=reward)


# -- the loss on given log-probs ---------------------------------------------------------------------
def test_loss_matches_hand_computation():
    lp = torch.tensor([0.0, 1e-3, -1e-3, 0.0, 5e-5])
    old = torch.zeros(5)
    adv = torch.tensor([2.0, 1.0, 1.0, 9.0, -3.0])
    loss, st = ddpo_loss(lp, old, adv, clip_range=1e-4, adv_clip_max=5.0)
    r = [1.0, math.exp(1e-3), math.exp(-1e-3), 1.0, math.exp(5e-5)]
    expected = [-2.0,  # ratio 1
                -1.0 * (1 + 1e-4),  # A > 0, ratio above the range: the clipped (larger) loss
                -1.0 * r[2],  # A > 0, ratio below: the unclipped one is larger
                -5.0,  # A = 9 clipped to 5
                3.0 * r[4]]  # A < 0, ratio inside the range
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert st["clipfrac"].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert st["advantage"].tolist() == [2.0, 1.0, 1.0, 5.0, -3.0]
    assert st["approx_kl"][1].item() == pytest.approx(0.5e-6, rel=1e-3)


def test_zero_advantage_gives_zero_gradient():
    lp = torch.randn(6, requires_grad=True)
    loss, _ = ddpo_loss(lp, lp.detach() + 0.01, torch.zeros(6))
    (g,) = torch.autograd.grad(loss.sum(), lp)
    assert (loss == 0).all() and (g == 0).all()


# -- the stat tracker ----------------------------------------------------------------------------------
def test_tracker_uses_batch_stats_until_a_prompt_has_min_count():
    tr = PerPromptStatTracker(buffer_size=3, min_count=3)
    adv, own = tr.update(["a", "a", "b"], [1.0, 3.0, 5.0])
    r = np.array([1.0, 3.0, 5.0])
    assert adv == pytest.approx(((r - r.mean()) / (r.std() + 1e-6)).tolist()) and own == [False] * 3
    adv, own = tr.update(["a", "b"], [2.0, 0.0])  # "a" now holds 3 (its own stats), "b" 2 (batch stats)
    a = np.array([1.0, 3.0, 2.0])
    assert adv[0] == pytest.approx((2.0 - a.mean()) / (a.std() + 1e-6))
    assert adv[1] == pytest.approx((0.0 - 1.0) / (1.0 + 1e-6)) and own == [True, False]
    tr.update(["a"], [7.0])
    assert list(tr.stats["a"]) == [3.0, 2.0, 7.0]  # bounded buffer
    again = PerPromptStatTracker(3, 3)
    again.load_state_dict(json.loads(json.dumps(tr.state_dict())))
    assert again.update(["a", "b"], [1.0, 2.0]) == tr.update(["a", "b"], [1.0, 2.0])


# -- the trainer -----------------------------------------------------------------------------------------
def test_collect_counts_and_advantages_over_the_round(tmp_path):
    tr = make_trainer(tmp_path, ["images_per_prompt=2", "timestep_fraction=0.5"])
    tr.bb.counters.reset()
    items, stats = tr.collect(0, 0, [0, 1])
    c = tr.bb.counters
    assert c.unet_rows_nograd == 4 * 2 * 4 and c.reward_image_passes == 4 and c.unet_rows_grad == 0
    assert stats["samples"] == 4 and len(items) == 4 * 2  # half of the 4 steps of each trajectory
    mine, total = tr.share(items, 0, 0)
    assert total == 8 and len(mine) == 8
    rewards = {it.key[:2]: it.reward for it in items}
    r = np.array([rewards[k] for k in sorted(rewards)])
    expected = dict(zip(sorted(rewards), (r - r.mean()) / (r.std() + 1e-6)))  # buffers below min_count
    assert all(it.advantage == pytest.approx(expected[it.key[:2]]) for it in mine)
    # the policy that sampled is the policy that trains: ratio 1 before the first update
    loss, sums = tr.loss(mine, len(mine))
    assert sums["ratio"] / len(mine) == pytest.approx(1.0, abs=1e-5) and sums["clipfrac"] == 0
    assert tr.bb.counters.unet_rows_grad == 2 * len(mine)  # no reference model: policy rows only


def test_zero_advantages_give_zero_gradient_in_the_trainer(tmp_path):
    tr = make_trainer(tmp_path, reward=lambda im, t, p: torch.ones(im.shape[0]))  # every reward equal
    items, _ = tr.collect(0, 0, [0, 1])
    mine, _ = tr.share(items, 0, 0)
    assert all(it.advantage == 0 for it in mine)
    loss, _ = tr.loss(mine, len(mine))
    grads = torch.autograd.grad(loss, tr.params, allow_unused=True)
    assert loss.item() == 0 and all(g is None or (g == 0).all() for g in grads)


# -- end to end through the executable --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    root = tmp_path_factory.mktemp("ddpo-cli")
    model = make_tiny_folder(root / "tiny-model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "prompts3.txt").write_text("\n".join(PROMPTS[:3]) + "\n")
    return root, model


def _sets(world, prompts="prompts.txt"):
    sets = [f"prompts={world[0] / prompts}", "reward=metric:toy_aesthetic", "num_steps=4", "rollout_batch=2",
            "train_batch_size=4", "grad_accum=1", "epochs=2", "checkpoint_every=1", "images_per_prompt=2",
            "stat_min_count=3", "stat_buffer=4", "timestep_fraction=0.5"]
    return [a for s in sets for a in ("--set", s)]


def test_train_then_resume_is_bit_identical(world):
    """Epoch 2 normalises with per-prompt buffers filled in epoch 1: the resumed run must restore them."""
    root, model = world
    full, part = root / "full", root / "part"
    r, r_part = run_together(  # the uninterrupted run and the first 3 rounds of the interrupted one
        ("train", "ddpo", "--backbone", "tiny", "--model", model, "--out", full, *_sets(world)),
        ("train", "ddpo", "--backbone", "tiny", "--model", model, "--out", part, *_sets(world),
         "--set", "max_rounds=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["complete"] and summary["counters"]["reward_image_passes"] == 2 * 4 * 2
    rows = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert [r["per_prompt_fraction"] for r in rounds] == [0.0, 0.0, 1.0, 1.0]
    assert all("reward_mean" in r and "counters/reward_image_passes" in r for r in rounds)
    assert all(k in rows[0] for k in ("loss", "approx_kl", "clipfrac", "ratio", "grad_norm"))
    ckpt = json.loads((full / "checkpoints" / "checkpoint-000002" / "progress.json").read_text())
    assert sorted(ckpt["trainer_state"]["stat_tracker"]) == sorted(PROMPTS)

    assert r_part.returncode == 0, r_part.stderr[-3000:]
    r = run("train", "ddpo", "--backbone", "tiny", "--model", model, "--out", part, "--resume",
            "--set", "max_rounds=none")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_with_an_empty_last_share(world, tmp_path):
    """3 prompts, 1 per process and round: in round 2 the second process has none. Advantages are
    computed over the whole round on both; round stats are reduced over differing keys."""
    import os
    import subprocess

    root, model = world
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    sets = _sets(world, "prompts3.txt") + ["--set", "rollout_batch=1", "--set", "epochs=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([*launcher, EXE, "train", "ddpo", "--backbone", "tiny", "--model", str(model), "--out",
                        str(out), *sets], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["complete"] and summary["progress"]["rounds_done"] == 2
    assert summary["counters"]["reward_image_passes"] == 3 * 2
    rounds = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rounds if r["kind"] == "round"] == [4.0, 2.0]
