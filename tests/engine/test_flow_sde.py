"""The flow SDE step (spobench/engine/flow_sde.py): its Gaussian against torch.distributions.Normal, a = 0
against diffusers' FlowMatchEulerDiscreteScheduler.step, the t = 1 cap, and the SDE's marginals against
the ODE's on a 2-D flow whose velocity is known in closed form."""

import math

import pytest
import torch

from spobench.engine.flow_sde import FlowSchedule, sample_sde, sde_step, step_distribution

# stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (the SD3 shift)
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def sd3_scheduler(num_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    s.set_timesteps(num_steps)
    return s


# -- a Gaussian-to-Gaussian flow: x_0 ~ N(MU, diag(S^2)), eps ~ N(0, I), x_t = (1 - t) x_0 + t eps ---------
MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = torch.tensor([0.5, 2.0], dtype=torch.float64)


def marginal(t):
    """p_t = N((1 - t) MU, (1 - t)^2 S^2 + t^2) per dimension."""
    return (1 - t) * MU, ((1 - t) ** 2 * S**2 + t**2).sqrt()


def velocity(x, t):
    """E[eps - x_0 | x_t = x] in closed form (jointly Gaussian): -MU + (t - (1 - t) S^2) / var_t (x - m_t)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    m, sd = marginal(t)
    return -MU + (t - (1 - t) * S**2) / sd**2 * (x - m)


def run(sched, x, seed, correct=True):
    g = torch.Generator().manual_seed(seed)
    if correct:
        return sample_sde(velocity, x, sched, lambda i: torch.randn(x.shape, generator=g, dtype=x.dtype))
    kept = [x]  # the control: the same noise without the score term in the drift (plain v dt + noise)
    for i in range(sched.num_steps):
        t = sched.sigmas[i].double()
        d = step_distribution(velocity(x, t), x, i, sched)
        x = x + velocity(x, t) * (sched.sigmas[i + 1] - t).double() + d.std * torch.randn(x.shape, generator=g,
                                                                                           dtype=x.dtype)
        kept.append(x)
    return torch.stack(kept, 1)


# -- the Gaussian -------------------------------------------------------------------------------------
def test_log_prob_equals_torch_normal_for_mixed_steps():
    sched = FlowSchedule(sd3_scheduler(10).sigmas, noise_level=0.7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    v = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    step = torch.tensor([0, 1, 4, 8, 9])  # t = 1 (capped), interior steps, the last one (to t = 0)
    d = step_distribution(v, x, step, sched)
    x_next = d.sample(torch.randn(x.shape, generator=g, dtype=torch.float64))
    ref = torch.distributions.Normal(d.mean, d.std.expand_as(d.mean)).log_prob(x_next)
    assert torch.allclose(d.log_prob(x_next, "sum"), ref.sum((1, 2, 3)), rtol=1e-12, atol=1e-9)
    assert torch.allclose(d.log_prob(x_next, "mean"), ref.mean((1, 2, 3)), rtol=1e-12, atol=1e-9)
    # the mean and std by hand, in the reference's own arrangement of the same terms
    # (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py: x (1 + s^2 dt / 2t) + v (1 + s^2 (1 - t) / 2t) dt)
    sig = sched.sigmas.double()
    for row, j in enumerate(step.tolist()):
        t, dt = sig[j], sig[j + 1] - sig[j]
        s = 0.7 * math.sqrt(t / (1 - (sig[1] if t == 1 else t)))
        mean = x[row] * (1 + s**2 / (2 * t) * dt) + v[row] * (1 + s**2 * (1 - t) / (2 * t)) * dt
        assert torch.allclose(d.mean[row], mean, rtol=1e-12, atol=1e-12)
        assert float(d.std[row]) == pytest.approx(s * math.sqrt(-dt), rel=1e-6)
        assert torch.equal(d.x0_hat[row], x[row] - t * v[row])


def test_sde_step_draws_or_scores_like_the_distribution():
    sched = FlowSchedule(sd3_scheduler(10).sigmas, noise_level=0.7)
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    d = step_distribution(v, x, 3, sched)
    x_next, lp = sde_step(v, x, 3, sched, noise=z, reduction="sum")
    assert torch.equal(x_next, d.mean + d.std * z)
    assert torch.allclose(lp, d.log_prob(x_next, "sum"))
    given = torch.randn(3, 2, 4, 4, generator=g)
    same, lp_given = sde_step(v, x, 3, sched, prev_sample=given)
    assert same is given and torch.allclose(lp_given, d.log_prob(given, "mean"))


# -- a = 0: diffusers' Euler ODE step ------------------------------------------------------------------
def test_noise_level_zero_is_diffusers_flow_match_euler_step_exactly():
    scheduler = sd3_scheduler(10)
    sched = FlowSchedule(scheduler.sigmas, noise_level=0.0)

    def field(x, t):  # a nonlinear velocity, so that any reordering of the arithmetic would show
        return torch.tanh(x) * torch.as_tensor(t).reshape(-1, 1, 1, 1) - 0.3 * x + 0.1

    x0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    x_ref = x0.clone()
    for i, ts in enumerate(scheduler.timesteps):
        t = sched.sigmas[i].expand(2)
        x_ref = scheduler.step(field(x_ref, t), ts, x_ref, return_dict=False)[0]
    x_ours, lp = sde_step(field(x0, sched.sigmas[0].expand(2)), x0, 0, sched)
    assert lp is None  # no density at a = 0
    traj = sample_sde(field, x0, sched, noise=lambda i: torch.full_like(x0, float("nan")))  # noise never used
    assert torch.equal(traj.x0, x_ref)
    assert torch.equal(traj.latents[:, 1], x_ours)
    assert torch.equal(traj.log_probs, torch.zeros(2, 10))


def test_schedule_is_checked_and_a_zero_has_no_log_probs():
    from spobench.core.errors import InputError

    for bad in ([1.0, 0.5], [1.0, 0.5, 0.7, 0.0], [1.5, 0.5, 0.0], [0.0]):
        with pytest.raises(ValueError):
            FlowSchedule(torch.tensor(bad))
    with pytest.raises(InputError, match="noise level a = 0"):
        FlowSchedule(torch.tensor([1.0, 0.5, 0.0]), noise_level=0.0).check_log_probs()
    FlowSchedule(torch.tensor([1.0, 0.5, 0.0])).check_log_probs()


# -- t = 1 ---------------------------------------------------------------------------------------------
def test_first_step_at_t_one_uses_the_second_time_in_the_cap():
    """At t = 1 every flow has v(x) = x - E[x_0] (x_1 is the noise itself), so the capped step is known in
    closed form: mean = x (1 - h - a^2/2) + h E[x_0] and std = a exactly, h = 1 - t_1."""
    sched = FlowSchedule(sd3_scheduler(10).sigmas.double(), noise_level=0.7)
    assert float(sched.sigmas[0]) == 1.0  # SD3's shift keeps t_0 = 1
    h = 1 - sched.t_cap
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = step_distribution(velocity(x, 1.0), x, 0, sched)
    assert torch.isfinite(d.mean).all()
    assert torch.allclose(d.std.squeeze(), torch.full((4,), 0.7, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(d.mean, x * (1 - h - 0.7**2 / 2) + h * MU, rtol=1e-6, atol=1e-7)


# -- marginals -----------------------------------------------------------------------------------------
N = 40_000  # samples; each moment below is checked in units of the per-dimension data std


def _check_moments(x, t, tol_bias):
    """Standardised by the exact marginal, the mean must be 0 and the std 1 within 4 Monte-Carlo standard
    errors (1/sqrt(N) for a mean, 1/sqrt(2N) for a std: 0.020 and 0.014 here) plus ``tol_bias`` for the
    Euler-Maruyama discretisation (measured below, and for the ODE, on the same grid)."""
    m, sd = marginal(torch.tensor(t, dtype=torch.float64))
    z = (x - m) / sd
    assert z.mean(0).abs().max() < 4 / math.sqrt(N) + tol_bias, z.mean(0)
    assert (z.std(0) - 1).abs().max() < 4 / math.sqrt(2 * N) + tol_bias, z.std(0)


def test_sde_marginals_match_the_ode_and_the_exact_flow():
    """From the exact marginal at t = 0.8 (away from t = 1's cap), 200 uniform steps: the SDE (a = 0.7 and
    a = 1), the ODE and the exact p_t agree at the midpoint and at t = 0; the same noise without the
    score term in the drift fails by far (its std is 1.2-1.4x)."""
    t0, steps = 0.8, 200
    sched = torch.cat([torch.linspace(t0, t0 / steps, steps), torch.zeros(1)])
    m, sd = marginal(torch.tensor(t0, dtype=torch.float64))
    x = m + sd * torch.randn(N, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mid = steps // 2  # t = 0.4
    t_mid = float(sched[mid])
    # Euler's own bias on this grid: 0.7% of a std (the ODE's, measured); 1% bounds the SDE's (measured: 0.65%)
    for a in (0.0, 0.7, 1.0):
        traj = run(FlowSchedule(sched, noise_level=a), x, seed=5)
        _check_moments(traj.latents[:, mid], t_mid, tol_bias=0.01)
        _check_moments(traj.x0, 0.0, tol_bias=0.01)
    wrong = run(FlowSchedule(sched, noise_level=0.7), x, seed=5, correct=False)
    with pytest.raises(AssertionError):
        _check_moments(wrong[:, -1], 0.0, tol_bias=0.01)
    assert ((wrong[:, -1] - MU) / S).std(0).min() > 1.1  # 15-40% too wide, against a 2.4% tolerance


def test_sde_from_t_one_keeps_the_marginals_within_the_caps_overshoot():
    """From x_1 ~ N(0, I) on the full grid (t_0 = 1, capped): the first step adds variance a^4/4 = 0.06
    (test above: (1 - a^2/2)^2 + a^2 at h -> 0), 2.6-4.1% of a std at t_1 (measured); the later steps' score
    drift pulls it back to 0.5% at t = 0 (measured; the ODE's own Euler bias is 1.1% on this grid)."""
    steps = 200
    sched = FlowSchedule(torch.cat([torch.linspace(1.0, 1 / steps, steps), torch.zeros(1)]), noise_level=0.7)
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    traj = run(sched, x, seed=7)
    first = traj.latents[:, 1]
    _, sd1 = marginal(torch.tensor(float(sched.sigmas[1]), dtype=torch.float64))
    assert float((first.std(0) / sd1).min()) > 1.02  # the overshoot is there at t_1 ...
    _check_moments(traj.x0, 0.0, tol_bias=0.015)  # ... and gone (within Euler's bias) at t = 0


# -- on the real SD3 component classes -------------------------------------------------------------------
def test_noise_level_zero_on_an_sd3_folder_is_the_pipelines_sample(tmp_path):
    """a = 0 on the backbone's own grid (``FlowSchedule.from_backbone``: shift 3) with its guided velocity
    gives StableDiffusion3Pipeline's latents; a = 0.7 from the same x_1 does not (the noise is there)."""
    from spobench.engine.rollout import make_generators, randn
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd3_folder

    bb = load_backbone("sd3", str(make_sd3_folder(tmp_path / "m")))
    prompts = ["a blue square", "two green triangles"]
    lat = torch.randn(2, *bb.latent_shape(16), generator=torch.Generator().manual_seed(0))
    ref = bb.pipeline()(prompt=prompts, num_inference_steps=4, guidance_scale=4.5, latents=lat.clone(), height=16,
                        width=16, output_type="latent").images
    cond, uncond = bb.encode_prompts(prompts), bb.encode_unconditional(2)

    def v(x, t):
        return bb.predict(x, t, cond, uncond=uncond, guidance_scale=4.5)

    ode = sample_sde(v, lat.clone(), FlowSchedule.from_backbone(bb, 4, noise_level=0.0), noise=None)
    assert torch.allclose(ode.x0, ref, atol=1e-6)  # the pipeline batches CFG its own way: float rounding
    gens = make_generators([1, 2])
    sched = FlowSchedule.from_backbone(bb, 4)
    assert float(sched.sigmas[0]) == 1.0 and sched.t_cap == pytest.approx(float(bb.sigmas(4)[1]))
    sde = sample_sde(v, lat.clone(), sched, noise=lambda i: randn(lat.shape[1:], gens))
    assert torch.isfinite(sde.log_probs).all() and (sde.x0 - ref).abs().max() > 1e-2
