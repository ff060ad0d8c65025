"""Flow-GRPO (spobench/trainers/flow_grpo.py): the loss, the group normalisation, the clipping and the KL
against hand computations on fixed tensors; the training CFG's detached branch; the trainer on the tiny
random flow backbone (groups, counters, ratio 1 before an update, the KL against LoRA-off means); and
`spobench train flow-grpo --backbone tiny-flow` end to end (one round; and an exact resume, slow)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from clitools import run
from spobench.engine.flow_sde import FlowSchedule, step_distribution
from spobench.trainers.flow_grpo import (FlowGRPOTrainer, flow_grpo_kl, flow_grpo_loss, group_advantages,
                                         guided_velocity)

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]


# -- the math on fixed tensors ---------------------------------------------------------------------------
def test_group_advantages_by_hand():
    groups = ["a", "b", "a", "a", "b"]
    r = [1.0, 3.0, 2.0, 6.0, 5.0]
    adv = group_advantages(groups, r)
    sa, sb = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3), 1.0  # population stds; means 3 and 4
    expected = [(1 - 3) / (sa + 1e-4), (3 - 4) / (sb + 1e-4), (2 - 3) / (sa + 1e-4), (6 - 3) / (sa + 1e-4),
                (5 - 4) / (sb + 1e-4)]
    assert adv.tolist() == pytest.approx(expected, rel=1e-12)
    s = math.sqrt(sum((x - 3.4) ** 2 for x in r) / 5)  # global std: every reward of the round
    assert group_advantages(groups, r, global_std=True).tolist() == pytest.approx(
        [(1 - 3) / (s + 1e-4), (3 - 4) / (s + 1e-4), (2 - 3) / (s + 1e-4), (6 - 3) / (s + 1e-4),
         (5 - 4) / (s + 1e-4)], rel=1e-12)
    flat = group_advantages(["a", "a", "b", "b"], [2.0, 2.0, 1.0, 3.0])  # a tied group: exactly zero
    assert flat[:2].tolist() == [0.0, 0.0] and flat[2:].tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001])


def test_loss_clipping_and_kl_by_hand():
    lp = torch.tensor([0.0, 1e-3, -1e-3, 0.0, 5e-5, -2e-4])
    old = torch.zeros(6)
    adv = torch.tensor([2.0, 1.0, 1.0, 9.0, -3.0, -1.0])
    kl = torch.tensor([0.5, 0.1, 0.0, 2.0, 1.0, 0.25], requires_grad=True)
    loss, st = flow_grpo_loss(lp, old, adv, kl, beta=0.04, clip_range=1e-4, adv_clip_max=5.0)
    r = [math.exp(v) for v in lp.tolist()]
    surrogate = [-2.0,  # ratio 1
                 -1.0 * (1 + 1e-4),  # A > 0, ratio above 1 + eps: clipped
                 -1.0 * r[2],  # A > 0, ratio below 1 - eps: the unclipped term is the max
                 -5.0,  # A = 9 clipped to 5
                 3.0 * r[4],  # A < 0, ratio inside the range
                 1.0 * (1 - 1e-4)]  # A < 0, ratio below 1 - eps: clipped
    assert st["policy_loss"].tolist() == pytest.approx(surrogate, abs=1e-6)  # float32
    assert loss.tolist() == pytest.approx([s + 0.04 * k for s, k in zip(surrogate, kl.tolist())], abs=1e-6)
    assert st["clipfrac"].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert st["advantage"].tolist() == [2.0, 1.0, 1.0, 5.0, -3.0, -1.0]
    assert torch.equal(st["kl"], kl.detach())
    (g,) = torch.autograd.grad(loss.sum(), kl)
    assert torch.allclose(g, torch.full((6,), 0.04))
    no_kl, st0 = flow_grpo_loss(lp, old, adv)  # beta = 0: DDPO's surrogate exactly, no kl stat
    assert no_kl.tolist() == pytest.approx(surrogate, abs=1e-6)  # float32 and "kl" not in st0


def test_kl_is_the_step_gaussians_kl_times_dt():
    """The reference's KL term = the exact per-dimension KL of the two step Gaussians times |dt|, and the
    exact one is the paper's closed form in velocities, (|dt|/2) (1/sigma + sigma (1 - t)/(2t))^2 dv^2."""
    sched = FlowSchedule(torch.tensor([1.0, 0.75, 0.5, 0.2, 0.0], dtype=torch.float64), noise_level=0.7)
    g = torch.Generator().manual_seed(0)
    x, v, dv = (torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    step = torch.tensor([1, 2, 3])
    a, b = step_distribution(v + 0.1 * dv, x, step, sched), step_distribution(v, x, step, sched)
    t, t_next = sched.times(step)
    sigma, dt = sched.noise_std(t), (t_next - t)
    ours = flow_grpo_kl(a.mean, b.mean, sigma)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(a.mean, a.std.expand_as(a.mean)),
                                              torch.distributions.Normal(b.mean, b.std.expand_as(b.mean)))
    exact = exact.mean((1, 2, 3))
    assert torch.allclose(ours, exact * -dt, rtol=1e-10)
    closed = -dt / 2 * (1 / sigma + sigma * (1 - t) / (2 * t)) ** 2 * ((0.1 * dv) ** 2).mean((1, 2, 3))
    assert torch.allclose(exact, closed, rtol=1e-10)


def test_training_cfg_detaches_the_unconditional_branch():
    from spobench.models.backbones.base import Conditioning

    class Linear:
        p = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

        def velocity(self, x, t, cond):  # v = p * x * (the condition's first feature)
            return self.p * x * cond.hidden[:, 0, 0].reshape(-1, 1, 1, 1)

    bb = Linear()
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = Conditioning(torch.full((2, 1, 1), 3.0, dtype=torch.float64))
    uncond = Conditioning(torch.ones(2, 1, 1, dtype=torch.float64))
    v = guided_velocity(bb, x, torch.zeros(2), cond, uncond, 4.5)
    assert torch.allclose(v, 2.0 * x * (1 + 4.5 * (3 - 1)))  # u + w (c - u)
    (g,) = torch.autograd.grad(v.sum(), bb.p)
    assert g.item() == pytest.approx(4.5 * 3 * x.sum().item(), rel=1e-12)  # w dc/dp only: (1 - w) du/dp is cut
    assert torch.equal(guided_velocity(bb, x, torch.zeros(2), cond, uncond, 1.0), bb.velocity(x, 0, cond))


# -- the trainer on the tiny random flow backbone ------------------------------------------------------------
def brightness(images, t, prompts):
    return images.mean(dim=(1, 2, 3))


def make_trainer(tmp_path, sets=(), reward=brightness):
    from spobench.models.backbones.tiny_flow import TinyFlowBackbone

    bb = TinyFlowBackbone.build(0)
    base = ["num_steps=4", "rollout_batch=2", "group_size=3", "train_batch_size=6", "grad_accum=1", "epochs=1"]
    cfg = FlowGRPOTrainer.prepare_config(FlowGRPOTrainer.Config.load(None, base + list(sets)), "tiny-flow",
                                         bb.defaults)
    return FlowGRPOTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS, reward_fn=reward)


def test_collect_groups_counters_and_ratio_one(tmp_path):
    tr = make_trainer(tmp_path, ["beta=0"])
    tr.bb.counters.reset()
    items, stats = tr.collect(0, 0, [0, 1])
    c = tr.bb.counters
    assert c.unet_rows_nograd == 2 * 3 * 4 * 2 and c.reward_image_passes == 6 and c.unet_rows_grad == 0  # CFG: x2
    assert stats["samples"] == 6 and stats["groups"] == 2 and stats["rollout_steps"] == 24
    assert tr.trained_steps() == [0, 1, 2]  # int(4 * 0.99) = 3: all but the step to t = 0
    assert len(items) == 6 * 3 and {it.step for it in items} == {0, 1, 2}
    mine, total = tr.share(items, 0, 0)
    assert total == 18
    rewards = {it.key[:2]: it.reward for it in items}
    for p in (0, 1):
        r = torch.tensor([rewards[(p, c)] for c in range(3)], dtype=torch.float64)
        want = (r - r.mean()) / (r.std(unbiased=False) + 1e-4)
        got = {it.key[1]: it.advantage for it in mine if it.prompt == p}
        assert [got[c] for c in range(3)] == pytest.approx(want.tolist())
    # the images of a group differ (their own noise), and the first step starts from each image's own x_1
    x1 = {it.key[:2]: it.x_t for it in items if it.step == 0}
    assert not torch.equal(x1[(0, 0)], x1[(0, 1)])
    loss, sums = tr.loss(mine[:6], 6)
    assert sums["ratio"] / 6 == pytest.approx(1.0, abs=1e-5) and sums["clipfrac"] == 0
    assert "kl" not in sums and c.unet_rows_grad == 2 * 6 and c.unet_rows_nograd == 48  # beta = 0: no reference


def test_kl_term_against_the_lora_off_means(tmp_path):
    tr = make_trainer(tmp_path, ["beta=0.5"])
    items, _ = tr.collect(0, 0, [0, 1])
    items = tr.round_items(sorted(items, key=lambda it: it.key), 0, 0)[:4]
    with torch.no_grad():
        for p in tr.params:  # move the policy away from the reference (lora_B starts at zero)
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    loss, sums = tr.loss(items, 4)
    x_t = torch.stack([it.x_t for it in items])
    step = torch.tensor([it.step for it in items])
    t = tr.sched.sigmas[step]
    cond, uncond = tr.encode([PROMPTS[it.prompt] for it in items])
    with torch.no_grad():
        m = step_distribution(tr.bb.predict(x_t, t, cond, uncond=uncond, guidance_scale=4.5), x_t, step, tr.sched)
        with tr.bb.lora_disabled():
            r = step_distribution(tr.bb.predict(x_t, t, cond, uncond=uncond, guidance_scale=4.5), x_t, step, tr.sched)
    kl = ((m.mean - r.mean) ** 2).mean((1, 2, 3)) / (2 * tr.sched.noise_std(t) ** 2)
    assert sums["kl"] > 0 and sums["kl"] == pytest.approx(float(kl.sum()), rel=1e-4)
    assert sums["loss"] == pytest.approx(sums["policy_loss"] + 0.5 * sums["kl"], rel=1e-5, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(sums["loss"] / 4, rel=1e-5, abs=1e-7)


def test_one_round_on_an_sd3_folder(tmp_path):
    """Latent space (the 16-channel VAE decodes x_0 for the reward), shift 3 (t_0 = 1: the capped step trains)."""
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd3_folder

    bb = load_backbone("sd3", str(make_sd3_folder(tmp_path / "m")))
    sets = ["num_steps=3", "rollout_batch=1", "group_size=2", "train_batch_size=4", "grad_accum=1", "resolution=16",
            "lora_rank=2", "max_rounds=1"]
    cfg = FlowGRPOTrainer.prepare_config(FlowGRPOTrainer.Config.load(None, sets + ["prompts=x", "reward=metric:x"]), "sd3", bb.defaults)
    assert cfg.guidance_scale == 4.5 and cfg.lr == 3e-4 and cfg.beta == 0.04  # the sd3 defaults: Flow-GRPO's
    tr = FlowGRPOTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS[:1], reward_fn=brightness)
    summary = tr.train()
    c = summary["counters"]
    assert summary["progress"]["step"] == 1 and c["vae_decodes"] == 2 and c["reward_image_passes"] == 2
    assert c["unet_rows_grad"] == 2 * 2 * 2 and c["unet_rows_nograd"] == 2 * 3 * 2 + 2 * 2 * 2  # 2 trained steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = next(r for r in rows if r["kind"] == "train")
    assert train["ratio"] == pytest.approx(1.0, abs=1e-4) and math.isfinite(train["loss"])
    assert (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_refuses_a_diffusion_backbone(tmp_path):
    from spobench.core.errors import InputError
    from spobench.models.backbones.tiny import TinyBackbone

    bb = TinyBackbone.build(0)
    cfg = FlowGRPOTrainer.prepare_config(FlowGRPOTrainer.Config.load(None, ["guidance_scale=5"]), "tiny",
                                         bb.defaults)
    with pytest.raises(InputError, match="flow-matching backbones"):
        FlowGRPOTrainer(cfg, bb, tmp_path / "run", prompts=PROMPTS, reward_fn=brightness)


# -- end to end through the executable ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_flow_folder

    root = tmp_path_factory.mktemp("flow-grpo-cli")
    model = make_tiny_flow_folder(root / "tiny-flow-model")
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    return root, model


def _sets(world):
    sets = [f"prompts={world[0] / 'prompts.txt'}", "reward=metric:toy_aesthetic", "num_steps=3", "group_size=2",
            "rollout_batch=1", "train_batch_size=2", "grad_accum=2", "epochs=1", "checkpoint_every=1"]
    return [a for s in sets for a in ("--set", s)]


def test_train_one_round_end_to_end(world):
    root, model = world
    out = root / "one"
    r = run("train", "flow-grpo", "--backbone", "tiny-flow", "--model", model, "--out", out, *_sets(world),
            "--set", "max_rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["progress"]["rounds_done"] == 1 and summary["progress"]["step"] == 1
    c = summary["counters"]
    # one group of 2 images x 3 steps, CFG rows doubled; the trained transitions: policy (grad) and reference
    assert c["reward_image_passes"] == 2 and c["unet_rows_grad"] == 2 * 4
    assert c["unet_rows_nograd"] == 2 * 3 * 2 + 2 * 4
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (train,), (rnd,) = [x for x in rows if x["kind"] == "train"], [x for x in rows if x["kind"] == "round"]
    assert rnd["samples"] == 2 and rnd["groups"] == 1 and rnd["trained_transitions"] == 4  # int(3 * 0.99) = 2 steps
    assert train["ratio"] == pytest.approx(1.0, abs=1e-5) and train["kl"] == 0  # one step: still the sampler's
    assert all(k in train for k in ("loss", "policy_loss", "clipfrac", "grad_norm"))
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_train_then_resume_is_bit_identical(world):
    root, model = world
    full, part = root / "full", root / "part"
    r = run("train", "flow-grpo", "--backbone", "tiny-flow", "--model", model, "--out", full, *_sets(world))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["complete"] and summary["progress"]["rounds_done"] == 2
    rounds = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [row["samples"] for row in rounds if row["kind"] == "round"] == [2.0, 2.0]
    r = run("train", "flow-grpo", "--backbone", "tiny-flow", "--model", model, "--out", part, *_sets(world),
            "--set", "max_rounds=1")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("train", "flow-grpo", "--backbone", "tiny-flow", "--model", model, "--out", part, "--resume",
            "--set", "max_rounds=none")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-3000:]
    a = load_file(str(full / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(part / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
