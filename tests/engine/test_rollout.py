"""Rollout engine: plain trajectories (schedule, seeding, batch invariance, log-probs). SPO's candidate
pools are tested with SPO: tests/trainers/test_spo_pools.py."""

import torch

from fakes import FakeBackbone
from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _engine(**kw):
    return RolloutEngine(FakeBackbone(), SamplerConfig(**kw))


def test_schedule_is_leading_951_to_1():
    ts = _engine().timesteps()
    assert ts.tolist() == list(range(951, 0, -50))


def test_sample_is_seeded_and_batch_invariant():
    eng = _engine()
    a = eng.sample(PROMPTS, make_generators([1, 2, 3]))
    b = eng.sample(PROMPTS, make_generators([1, 2, 3]))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    single = eng.sample(PROMPTS[1:2], make_generators([2]))
    assert torch.allclose(single.x0[0], a.x0[1], atol=1e-6)
    assert a.latents.shape == (3, 21, 3, 8, 8) and a.log_probs.shape == (3, 20)


def test_trajectory_log_probs_recompute_exactly():
    eng = _engine()
    traj = eng.sample(PROMPTS, make_generators([5, 6, 7]))
    cond, uncond = eng.encode(PROMPTS)
    for i in (0, 10, 19):
        t = traj.timesteps[i]
        lp = eng.log_prob(traj.latents[:, i], t, traj.latents[:, i + 1], cond, uncond)
        assert torch.allclose(lp, traj.log_probs[:, i], atol=1e-6)
