"""D3PO: the loss against a hand computation and the reference formula, ties, the 1+1-forward
batching, the two trajectories from one x_T, and `spobench train d3po` end to end with exact resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from clitools import run, run_together
from spobench.trainers.d3po import D3POTrainer, d3po_loss

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


def brightness(images, t, prompts):
    return images.mean(dim=(1, 2, 3))


def make_trainer(tmp_path, sets=(), reward=brightness, perturb=True):
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(0)
    base = ["num_steps=4", "rollout_batch=2", "train_batch_size=4", "grad_accum=1", "epochs=1"]
    cfg = D3POTrainer.prepare_config(D3POTrainer.Config.load(None, base + list(sets)), "tiny", bb.defaults)
    tr = D3POTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS, reward_fn=reward)
    if perturb:  # LoRA B starts at 0 (policy == reference); give it weight so that log-ratios differ
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in bb.unet.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tr


# -- the loss on given log-probs ---------------------------------------------------------------------
def test_loss_matches_hand_computation():
    lp = torch.tensor([[-1.00, -2.10], [-1.0, -1.0]])
    ref = torch.tensor([[-1.05, -1.90], [-1.0, -1.0]])
    h = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    loss, st = d3po_loss(lp, ref, h, beta=2.0, clamp_eps=None)
    # item 0: lr = (0.05, -0.20): margin 2 * (0.05 + 0.20) = 0.5 ; item 1: lr = (0, 0): margin 0
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log(2)], abs=1e-6)
    assert st["accuracy"].tolist() == [1.0, 0.5] and st["ties"].tolist() == [0.0, 0.0]
    # with the default clip (eps 0.1): lr_1 = -0.20 is clipped to log 0.9, lr_0 = 0.05 is not
    loss, st = d3po_loss(lp[:1], ref[:1], h[:1], beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * (0.05 - math.log(0.9)))), abs=1e-7)
    assert st["clamp_frac"].item() == 0.5


def test_loss_equals_the_reference_exp_clamp_log_in_value_and_gradient():
    torch.manual_seed(0)
    lr = (torch.randn(64, 2) * 0.2).requires_grad_(True)
    h = torch.tensor([1.0, -1.0]).repeat(64, 1)
    h[::2] = -h[::2]
    ours, _ = d3po_loss(lr, torch.zeros(64, 2), h, beta=0.1, clamp_eps=0.1)
    (g_ours,) = torch.autograd.grad(ours.sum(), lr)
    r0 = torch.clamp(torch.exp(lr[:, 0]), 0.9, 1.1)  # yk7333/d3po scripts/rm/train_d3po.py
    r1 = torch.clamp(torch.exp(lr[:, 1]), 0.9, 1.1)
    official = -torch.log(torch.sigmoid(0.1 * torch.log(r0) * h[:, 0] + 0.1 * torch.log(r1) * h[:, 1]))
    (g_off,) = torch.autograd.grad(official.sum(), lr)
    assert torch.allclose(ours, official, atol=1e-6)
    assert torch.allclose(g_ours, g_off, atol=1e-6)


def test_a_tie_gives_ln2_and_zero_gradient():
    lr = torch.randn(5, 2, requires_grad=True)
    loss, st = d3po_loss(lr, torch.zeros(5, 2), torch.zeros(5, 2))
    (g,) = torch.autograd.grad(loss.sum(), lr)
    assert torch.allclose(loss, torch.full((5,), math.log(2))) and (g == 0).all() and st["ties"].sum() == 5


# -- the trainer -----------------------------------------------------------------------------------------
def test_two_trajectories_share_x_T_and_the_reward_labels_them(tmp_path):
    tr = make_trainer(tmp_path, perturb=False)
    tr.bb.counters.reset()
    items, stats = tr.collect(0, 0, [0, 1])
    c = tr.bb.counters
    assert c.unet_rows_nograd == 2 * 2 * 2 * 4  # 2 prompts x 2 sides x CFG x 4 steps, one rollout
    assert c.reward_image_passes == 4 and c.vae_decodes == 4 and c.unet_rows_grad == 0
    assert stats["pairs"] == 2 and len(items) == 2 * 4  # timestep_fraction 1: every step of both pairs
    first = {it.prompt: it for it in items if it.t == 951}
    for it in first.values():
        assert torch.equal(it.x_t[0], it.x_t[1])  # the same x_T ...
        assert not torch.equal(it.x_prev[0], it.x_prev[1])  # ... then different noise
    last = {it.prompt: it for it in items if it.t == 1}
    for it in last.values():  # h follows the reward (brightness) of the final samples
        b0, b1 = (brightness((x / 2 + 0.5).clamp(0, 1)[None], 0, None).item() for x in it.x_prev)
        assert it.h == ((1.0, -1.0) if b0 > b1 else (-1.0, 1.0))
    again, _ = tr.collect(0, 0, [0, 1])  # seeded by (seed, epoch, round, prompt)
    assert all(torch.equal(a.x_prev, b.x_prev) for a, b in zip(items, again))


def test_timestep_fraction_trains_a_shared_subset_of_steps(tmp_path):
    tr = make_trainer(tmp_path, ["timestep_fraction=0.5"], perturb=False)
    items, _ = tr.collect(0, 0, [0, 1])
    per_pair = {}
    for it in items:
        per_pair.setdefault(it.prompt, []).append(it.t)
    assert all(len(ts) == 2 and len(set(ts)) == 2 for ts in per_pair.values())


def test_one_policy_one_reference_call_equals_four_forwards(tmp_path):
    tr = make_trainer(tmp_path)
    items, _ = tr.collect(0, 0, [0, 1])
    tr.bb.counters.reset()
    loss, _ = tr.loss(items, len(items))
    assert tr.bb.counters.unet_calls == 2 and tr.bb.counters.unet_rows_grad == 2 * 2 * len(items)
    g_ours = torch.autograd.grad(loss, tr.params)

    eng, per = tr.engine, []
    for it in items:  # the reference loop: policy and reference for each side separately
        cond, uncond = eng.encode([PROMPTS[it.prompt]])
        t = torch.tensor([it.t])
        lp = [eng.log_prob(it.x_t[s][None], t, it.x_prev[s][None], cond, uncond) for s in (0, 1)]
        with torch.no_grad(), tr.bb.lora_disabled():
            ref = [eng.log_prob(it.x_t[s][None], t, it.x_prev[s][None], cond, uncond) for s in (0, 1)]
        per.append(d3po_loss(torch.stack(lp, 1), torch.stack(ref, 1), torch.tensor([it.h]))[0])
    four = torch.cat(per).mean()
    g_four = torch.autograd.grad(four, tr.params)
    assert abs(loss.item() - four.item()) < 1e-6
    assert sum(g.abs().sum() for g in g_four) > 0
    for a, b in zip(g_ours, g_four):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)


def test_tied_pairs_give_zero_gradient(tmp_path):
    tr = make_trainer(tmp_path, reward=lambda im, t, p: torch.zeros(im.shape[0]))
    items, stats = tr.collect(0, 0, [0, 1])
    assert stats["tied_pairs"] == 2 and all(it.h == (0.0, 0.0) for it in items)
    loss, sums = tr.loss(items, len(items))
    grads = torch.autograd.grad(loss, tr.params, allow_unused=True)
    assert loss.item() == pytest.approx(math.log(2)) and all(g is None or (g == 0).all() for g in grads)
    assert sums["abs_logratio"] > 0  # the policy does differ from the reference


# -- end to end through the executable --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    root = tmp_path_factory.mktemp("d3po-cli")
    model = make_tiny_folder(root / "tiny-model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root, model


def _train_args(world, out, *extra):
    root, model = world
    sets = [f"prompts={root / 'prompts.txt'}", "reward=metric:toy_aesthetic", "num_steps=4", "rollout_batch=1",
            "train_batch_size=4", "grad_accum=1", "epochs=1", "checkpoint_every=1", "timestep_fraction=0.5"]
    return ("train", "d3po", "--backbone", "tiny", "--model", model, "--out", out,
            *[a for s in sets for a in ("--set", s)], *extra)


def test_train_then_resume_is_bit_identical(world):
    full, part = world[0] / "full", world[0] / "part"
    r, r_part = run_together(_train_args(world, full), _train_args(world, part, "--set", "max_rounds=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    c = summary["counters"]
    assert summary["complete"] and summary["progress"]["rounds_done"] == 4
    assert c["reward_image_passes"] == 4 * 2 and c["unet_rows_nograd"] > c["unet_rows_grad"] > 0
    rows = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    assert len(rounds) == 4 and all("reward_mean" in r and "tie_fraction" in r for r in rounds)
    assert all(k in rows[0] for k in ("loss", "accuracy", "margin", "clamp_frac", "grad_norm"))

    assert r_part.returncode == 0, r_part.stderr[-3000:]
    assert not json.loads((part / "summary.json").read_text())["complete"]
    r = run("train", "d3po", "--backbone", "tiny", "--model", world[1], "--out", part, "--resume",
            "--set", "max_rounds=none")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sb = json.loads((part / "summary.json").read_text())
    assert sb["counters"]["unet_rows_grad"] == c["unet_rows_grad"]


def test_two_processes_train_the_pairs_of_both(world, tmp_path):
    """2 gloo processes on a CPU: each rolls out its own prompts' pairs, the pairs of the round are gathered
    and shared out, and both processes end with the same LoRA (checked at every checkpoint)."""
    import os
    import subprocess
    import sys

    from clitools import EXE

    root, model = world
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    sets = [f"prompts={root / 'prompts.txt'}", "reward=metric:toy_aesthetic", "num_steps=4", "rollout_batch=1",
            "train_batch_size=4", "grad_accum=1", "epochs=1", "checkpoint_every=1", "timestep_fraction=0.5"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([*launcher, EXE, "train", "d3po", "--backbone", "tiny", "--model", str(model), "--out",
                        str(out), *[a for s in sets for a in ("--set", s)]],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["complete"] and summary["progress"]["rounds_done"] == 2
    assert summary["counters"]["reward_image_passes"] == 4 * 2  # 4 prompts, 2 trajectories each, once
    rounds = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["pairs"] for r in rounds if r["kind"] == "round"] == [2.0, 2.0]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
