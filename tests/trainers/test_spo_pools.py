"""SPO's candidate pools (spobench/trainers/spo_pools.py): mechanics, counts, seeding, MSPO segments."""

import pytest
import torch
from diffusers import DDIMScheduler

from fakes import FakeBackbone
from spobench.core.errors import ModelLoadError
from spobench.engine.ddim import step_distribution
from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators
from spobench.trainers.spo_pools import PoolConfig, pool_rollout

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def _engine(**kw):
    return RolloutEngine(FakeBackbone(), SamplerConfig(**kw))


def _score_by_mean(x0, t, idx):
    return x0.mean(dim=(1, 2, 3))


def test_pool_counts_match_official_cost_structure():
    """kappa=750: pools at t=751..1 (16 transitions); per prompt 5 + 15k UNet rows (x2 CFG)."""
    eng, k = _engine(), 4
    eng.backbone.counters.reset()
    roll = pool_rollout(eng, PROMPTS, make_generators([0, 1, 2]), PoolConfig(k=k, kappa=750), _score_by_mean)
    assert [s.t for s in roll.steps] == list(range(751, 0, -50))
    B = len(PROMPTS)
    assert eng.backbone.counters.unet_rows_nograd == 2 * B * (5 + 15 * k)


def test_pool_candidates_share_one_mean():
    eng = _engine()
    seen = []
    roll = pool_rollout(eng, PROMPTS[:1], make_generators([0]), PoolConfig(k=6, kappa=750),
                            lambda x0, t, idx: (seen.append(t), x0.mean(dim=(1, 2, 3)))[1])
    cond, uncond = eng.encode(PROMPTS[:1])
    step = roll.steps[3]
    out = eng.predict(step.x_t, step.t, cond, uncond)
    dist = step_distribution(out, step.x_t, step.t, eng.sched)
    z = (step.candidates - dist.mean[:, None]) / dist.std[:, None]
    # every candidate is the one recomputed mean plus sigma_t times a standard-normal draw
    assert z.mean().item() == pytest.approx(0.0, abs=0.1)
    assert z.std().item() == pytest.approx(1.0, abs=0.1)
    assert seen[-1] == 0 and seen[0] == 701  # the SPM judges x_{t-1} at t-1; the last pool is x_0


def test_pair_is_best_and_worst_and_next_x_t_is_from_the_pool():
    eng = _engine()
    roll = pool_rollout(eng, PROMPTS, make_generators([3, 4, 5]), PoolConfig(k=4), _score_by_mean)
    for prev, nxt in zip(roll.steps, roll.steps[1:]):
        assert torch.equal(prev.win, prev.scores.argmax(1)) and torch.equal(prev.lose, prev.scores.argmin(1))
        assert torch.equal(nxt.x_t, prev.candidates[torch.arange(3), prev.chosen])
    last = roll.steps[-1]
    assert torch.equal(roll.x0, last.candidates[torch.arange(3), last.chosen])


@pytest.mark.parametrize("init", ["win", "lose"])
def test_win_lose_initialisation(init):
    eng = _engine()
    roll = pool_rollout(eng, PROMPTS, make_generators([3, 4, 5]), PoolConfig(k=4, init=init), _score_by_mean)
    for s in roll.steps:
        assert torch.equal(s.chosen, s.win if init == "win" else s.lose)


def test_resampler_is_uniform_and_seeded():
    eng = _engine(num_steps=4)
    counts = torch.zeros(4)
    seeds = list(range(200))
    roll = pool_rollout(eng, ["a"] * 200, make_generators(seeds), PoolConfig(k=4, kappa=1000), _score_by_mean)
    again = pool_rollout(eng, ["a"] * 200, make_generators(seeds), PoolConfig(k=4, kappa=1000), _score_by_mean)
    for s, s2 in zip(roll.steps, again.steps):
        assert torch.equal(s.chosen, s2.chosen)
        counts += torch.bincount(s.chosen, minlength=4)
    # 800 uniform draws over 4: each bin 200 +- ~4.3 sigma
    assert counts.min() > 150 and counts.max() < 250, counts


def test_random_pair_choice_orders_by_score():
    eng = _engine()
    roll = pool_rollout(eng, PROMPTS, make_generators([0, 1, 2]), PoolConfig(k=4, pair="random"), _score_by_mean)
    for s in roll.steps:
        r = torch.arange(3)
        assert (s.win != s.lose).all()
        assert (s.scores[r, s.win] >= s.scores[r, s.lose]).all()


def test_mspo_inner_steps_segments():
    eng, k, j = _engine(), 3, 4
    eng.backbone.counters.reset()
    roll = pool_rollout(eng, PROMPTS[:1], make_generators([0]), PoolConfig(k=k, inner_steps=j), _score_by_mean)
    # 16 pooled transitions in segments of 4
    assert [s.t for s in roll.steps] == [751, 551, 351, 151]
    assert all(s.segments.shape[:3] == (1, k, j) for s in roll.steps)
    # 5 plain rows, then per segment k*j rows except the last segment ends at x_0 (k*(j-1))
    assert eng.backbone.counters.unet_rows_nograd == 2 * (5 + 3 * k * j + k * (j - 1))


def test_pool_config_validation():
    with pytest.raises(ValueError, match="k must be"):
        PoolConfig(k=1)
    with pytest.raises(ValueError, match="init"):
        PoolConfig(init="best")


# Segments (the start timestep of each transition) at 20 steps, kappa = 750, as the official SDXL
# pipeline lays them (RockeyCoss/SPO @ 27a86428, spo/custom_diffusers/multi_sample_pipeline_sdxl.py,
# num_inner_step = j - 1): a segment closes after j transitions, except that the last step always
# finishes the segment still open and scores x_0, so a segment never starts at t = 1.
OFFICIAL_SDXL_SEGMENTS = {
    1: [[t] for t in range(751, 100, -50)] + [[51, 1]],
    2: [[751, 701], [651, 601], [551, 501], [451, 401], [351, 301], [251, 201], [151, 101], [51, 1]],
    3: [[751, 701, 651], [601, 551, 501], [451, 401, 351], [301, 251, 201], [151, 101, 51, 1]],
    4: [[751, 701, 651, 601], [551, 501, 451, 401], [351, 301, 251, 201], [151, 101, 51, 1]],
    5: [[751, 701, 651, 601, 551], [501, 451, 401, 351, 301], [251, 201, 151, 101, 51, 1]],
    6: [[751, 701, 651, 601, 551, 501], [451, 401, 351, 301, 251, 201], [151, 101, 51, 1]],
}


def _segments(roll):
    return [s.timesteps[:-1].tolist() for s in roll.steps]


@pytest.mark.parametrize("j", sorted(OFFICIAL_SDXL_SEGMENTS))
def test_merge_tail_lays_segments_as_the_official_sdxl_pipeline(j):
    eng, k = _engine(), 2
    eng.backbone.counters.reset()
    roll = pool_rollout(eng, PROMPTS[:2], make_generators([0, 1]), PoolConfig(k=k, inner_steps=j, tail="merge"),
                            _score_by_mean)
    want = OFFICIAL_SDXL_SEGMENTS[j]
    assert _segments(roll) == want
    assert sum(map(len, want)) == 16
    for s, seg in zip(roll.steps, want):
        assert s.segments.shape[:3] == (2, k, len(seg)) and s.log_probs.shape == (2, k, len(seg))
    assert roll.steps[-1].timesteps[-1] < 0  # the last segment ends at x_0, scored as x_0
    # the official loop's cost whatever the grouping: 5 shared rows (951 ... 751), then one row per
    # candidate at each of the 15 pooled states before x_0 (the chosen one's is reused); x2 CFG, x2 prompts
    assert eng.backbone.counters.unet_rows_nograd == 2 * 2 * (5 + 15 * k)


@pytest.mark.parametrize("j", [1, 2, 3, 4, 5, 6])
def test_own_tail_gives_the_last_transition_its_own_pool(j):
    roll = pool_rollout(_engine(), PROMPTS[:1], make_generators([0]), PoolConfig(k=2, inner_steps=j),
                                  _score_by_mean)
    starts = list(range(751, 0, -50))
    want = [starts[a:a + j] for a in range(0, 16, j)]
    assert _segments(roll) == want
    if j == 1:  # the official SD-1.5 SPO pipeline: 16 one-transition pools, the last scored at x_0
        assert len(roll.steps) == 16 and roll.steps[-1].timesteps.tolist() == [1, -49]


def test_merge_and_own_agree_where_the_official_pipelines_do():
    for j in (2, 4, 6):
        a = pool_rollout(_engine(), PROMPTS[:1], make_generators([3]), PoolConfig(k=2, inner_steps=j, tail="merge"),
                                   _score_by_mean)
        b = pool_rollout(_engine(), PROMPTS[:1], make_generators([3]), PoolConfig(k=2, inner_steps=j),
                                   _score_by_mean)
        assert _segments(a) == _segments(b) and torch.equal(a.x0, b.x0)
    with pytest.raises(ValueError, match="tail"):
        PoolConfig(tail="last")


def test_pools_refuse_a_scheduler_without_a_last_log_prob():
    bb = FakeBackbone()
    bb.scheduler = DDIMScheduler.from_config({**bb.scheduler.config, "set_alpha_to_one": True})
    eng = RolloutEngine(bb, SamplerConfig(num_steps=4, eta=1.0))
    with pytest.raises(ModelLoadError, match=r"^fake: scheduler set_alpha_to_one = true .*set_alpha_to_one\": false"):
        pool_rollout(eng, ["a"], make_generators([0]), PoolConfig(k=2), lambda x0, t, idx: x0.mean((1, 2, 3)))
