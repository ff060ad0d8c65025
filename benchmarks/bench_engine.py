"""Rollout-engine speed on the tiny backbone (run: pytest benchmarks/bench_engine.py --benchmark-only).

One plain DDIM step vs one pooled SPO step for the same batch, measured in one run so the ratio is
what matters, plus the UNet-call counts that explain it: the k candidates of a pool are drawn
around ONE mean (one UNet call for the shared x_t), and their own x0_hat predictions cost one more
call over B*k rows - never k separate calls.
"""

import pytest
import torch

from spobench.models.backbones.tiny import TinyBackbone
from spobench.engine.ddim import step_distribution
from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators, randn
from spobench.trainers.spo_pools import PoolConfig, pool_rollout

B, K = 8, 4


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return RolloutEngine(TinyBackbone.build(0), SamplerConfig())


@pytest.fixture(scope="module")
def state(engine):
    prompts = ["a red circle"] * B
    cond, uncond = engine.encode(prompts)
    gens = make_generators(range(B))
    x = engine.initial_noise(gens)
    return prompts, cond, uncond, gens, x


@torch.no_grad()
def plain_step(engine, state):
    _, cond, uncond, gens, x = state
    out = engine.predict(x, 501, cond, uncond)
    dist = step_distribution(out, x, 501, engine.sched)
    return dist.sample(randn(x.shape[1:], gens))


@torch.no_grad()
def pool_step(engine, state):
    """Shared mean (1 call) + k draws + each candidate's own prediction (1 call over B*k rows)."""
    _, cond, uncond, gens, x = state
    out = engine.predict(x, 501, cond, uncond)
    dist = step_distribution(out, x, 501, engine.sched)
    cand = dist.mean[:, None] + dist.std[:, None] * randn((K, *x.shape[1:]), gens)
    flat = cand.flatten(0, 1)
    return engine.predict(flat, 451, cond.repeat_interleave(K), uncond.repeat_interleave(K))


def test_plain_step(benchmark, engine, state):
    benchmark(plain_step, engine, state)


def test_pool_step(benchmark, engine, state):
    benchmark(pool_step, engine, state)


def test_pool_of_k_costs_one_call_for_its_k_draws(engine, state):
    c = engine.backbone.counters
    c.reset()
    pool_step(engine, state)
    assert c.unet_calls == 2  # the shared mean + the candidates' own predictions, for any k
    assert c.unet_rows_nograd == 2 * B + 2 * B * K  # x2 for CFG, batched into the same calls
    c.reset()
    prompts = state[0]
    pool_rollout(engine, prompts, make_generators(range(B)), PoolConfig(k=K), lambda x0, t, i: x0.mean((1, 2, 3)))
    print(f"\nfull pool rollout, B={B} k={K}: {c.unet_calls} UNet calls, {c.unet_rows_nograd} rows "
          f"(official loop: per prompt 2*(5+15k) = {2 * (5 + 15 * K)} rows)")
    assert c.unet_rows_nograd == B * 2 * (5 + 15 * K)
