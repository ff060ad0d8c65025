"""DDIM step and log-prob parity with diffusers and torch.distributions (<= 1e-6 in fp32)."""

import pytest
import torch
from diffusers import DDIMScheduler

from spobench.engine.ddim import NoiseSchedule, ddim_step, predict_x0, step_distribution


def _sched(prediction_type):
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                      prediction_type=prediction_type)
    s.set_timesteps(20)
    ns = NoiseSchedule(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 20, prediction_type)
    return s, ns


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_step_matches_diffusers(prediction_type, eta):
    sched, ns = _sched(prediction_type)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps:  # includes t=1, whose previous step is the final alpha
        x = torch.randn(3, 4, 8, 8, generator=g)
        out = torch.randn(3, 4, 8, 8, generator=g)
        z = torch.randn(3, 4, 8, 8, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        ours, lp = ddim_step(out, x, t, ns, eta=eta, noise=z)
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (int(t), (ours - ref).abs().max())
        assert (lp is None) == (eta == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_matches_normal(reduction):
    _, ns = _sched("epsilon")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([951, 751, 51, 1])  # a batch may mix timesteps
    prev, lp = ddim_step(out, x, t, ns, eta=1.0, noise=torch.randn(4, 3, 8, 8, generator=g), reduction=reduction)
    dist = step_distribution(out, x, t, ns, 1.0)
    ref = torch.distributions.Normal(dist.mean, dist.std.expand_as(dist.mean)).log_prob(prev)
    ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
    assert torch.allclose(lp, ref, atol=1e-6 if reduction == "mean" else 1e-3, rtol=1e-6)


def test_per_row_timesteps_equal_separate_steps():
    sched, ns = _sched("v_prediction")
    g = torch.Generator().manual_seed(2)
    x, out, z = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([901, 1])
    both, _ = ddim_step(out, x, t, ns, noise=z)
    for i in range(2):
        one, _ = ddim_step(out[i:i + 1], x[i:i + 1], int(t[i]), ns, noise=z[i:i + 1])
        assert torch.allclose(both[i], one[0], atol=1e-7)


def test_candidates_share_one_mean_and_log_prob_broadcasts():
    _, ns = _sched("epsilon")
    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    dist = step_distribution(out, x, 501, ns)
    cands = dist.mean[:, None] + dist.std[:, None] * torch.randn(2, 5, 3, 4, 4, generator=g)
    lp = dist.log_prob(cands, "sum")
    assert lp.shape == (2, 5)
    for i in range(5):
        assert torch.allclose(lp[:, i], dist.log_prob(cands[:, i], "sum"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_prediction_inverts_noising(prediction_type):
    sched, ns = _sched(prediction_type)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([700, 300])
    xt = sched.add_noise(x0, eps, t)
    out = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    assert torch.allclose(predict_x0(out, xt, t, ns), x0, atol=1e-4)


def _alpha_to_one_backbone():
    from fakes import FakeBackbone

    bb = FakeBackbone()
    bb.scheduler = DDIMScheduler.from_config({**bb.scheduler.config, "set_alpha_to_one": True})
    return bb


def test_set_alpha_to_one_makes_the_last_log_prob_non_finite():
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading")
    ns = NoiseSchedule(s.alphas_cumprod, float(s.final_alpha_cumprod), 1000, 20)
    x = torch.randn(2, 4, 8, 8)
    dist = step_distribution(torch.randn_like(x), x, 1, ns, eta=1.0)
    assert float(dist.std.max()) == 0.0
    assert not torch.isfinite(dist.log_prob(dist.mean)).any()  # the reason it is refused
    assert ns.last_step_deterministic
    assert not _sched("epsilon")[1].last_step_deterministic


def test_set_alpha_to_one_is_refused_where_log_probs_are_needed_and_sampled_where_not():
    from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators
    from spobench.core.errors import ModelLoadError

    # SPO's pools refuse it too: tests/trainers/test_spo_pools.py
    eng = RolloutEngine(_alpha_to_one_backbone(), SamplerConfig(num_steps=4, eta=1.0))
    gens = make_generators([0])
    with pytest.raises(ModelLoadError, match=r"^fake: scheduler set_alpha_to_one = true .*set_alpha_to_one\": false"):
        eng.sample(["a"], gens)  # DDPO / D3PO rollouts
    cond, uncond = eng.encode(["a"])
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ModelLoadError, match="set_alpha_to_one"):
        eng.log_prob(x, 951, x, cond, uncond)
    # generation needs no log-prob: eta = 1 samples end at the (finite) mean of the last step
    traj = eng.sample(["a"], make_generators([0]), log_probs=False)
    assert torch.isfinite(traj.x0).all() and not traj.log_probs.any()
    eng0 = RolloutEngine(_alpha_to_one_backbone(), SamplerConfig(num_steps=4, eta=0.0))
    assert torch.isfinite(eng0.sample(["a"], make_generators([0])).x0).all()
