"""SPO's candidate pools (paper Sec. 4.1-4.3, Fig. 3c; MSPO segments Sec. 4.5): the sampling half of
SPO and MSPO (``spo.py``, ``mspo.py``), built on the shared rollout engine (``spobench.engine.rollout``:
CFG, prompt cache, per-row generators) and the backbone family's step sampler (``spobench.engine.samplers``:
DDIM with eta on the U-Nets; Flow-GRPO's SDE on flow backbones, the step written t -> t-1 below being
t_i -> t_{i+1} of the flow grid, x0_hat = x_t - t v). One loop serves both families.

Sampling runs plain DDIM while x_{t-1} is too noisy to judge (t_prev > kappa). From then on, at
each step:

1. ONE (CFG-batched) UNet call on the shared x_t gives the step's Gaussian N(mean, sigma_t^2);
   k candidates x_{t-1}^i = mean + sigma_t z_i are drawn around it (no UNet call per candidate).
2. Each candidate's x0_hat comes from its OWN prediction at t-1 (one UNet call on B*k rows); the
   chosen candidate's prediction is reused as the next step's mean, so it is never recomputed.
   After the last step the candidates are x_0 themselves.
3. A ``scorer`` hook (the SPM, or any reward) scores the k x0_hat; the best and worst form the pair
   (or a random pair, Table 9).
4. The next x_t is drawn uniformly from the pool (the step-wise resampler, Sec. 4.3), or is the
   winner / loser (Table 4's ``win`` / ``lose`` initialisation).

MSPO (Sec. 4.5): with ``inner_steps`` j > 1 each candidate is denoised j-1 more steps (own noise)
before scoring, and the pool's label covers each transition of the segment.

Where the last transition (t = 1 -> 0) falls when segments of j are laid from kappa on is set by
``PoolConfig.tail``. The official SD-1.5 SPO pipeline makes every step a pool, the last one
included (``tail = "own"``). The official SDXL (MSPO) pipeline decides at each step whether the
open segment is complete, except at the last step, where it always finishes the open segment with
one more transition and scores x_0: a segment that would start at t = 1 is instead appended to
the segment still open (``tail = "merge"``; RockeyCoss/SPO @ 27a86428edcff3b25dcce8001be94a7a01608f58,
spo_training_and_inference/spo/custom_diffusers/multi_sample_pipeline_sdxl.py, the
``i == len(timesteps) - 1`` branch). At 20 steps with kappa = 750 (16 pooled transitions) the two
differ exactly where 16 = 1 (mod j), i.e. j = 1, 3, 5: "merge" gives a last segment of j + 1.

With the official schedule (20 steps, "leading" spacing, kappa = 750) the pooled transitions are
t = 751 -> 701, ..., 1 -> 0: 16 of them, costing per prompt 5 + 15k UNet rows (x2 for CFG) and 16k
x0_hat scorings, the official loop's counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from spobench.engine.rollout import Generators, Scorer, randn
from spobench.engine.samplers import as_step_sampler


def randint(high: int, generators: Generators) -> torch.Tensor:
    """One draw in [0, high) per row, each row from its own generator (the pool resampler)."""
    return torch.cat([torch.randint(high, (1,), generator=g, device=g.device) for g in generators]).cpu()


@dataclass
class PoolConfig:
    k: int = 4  # candidates per pool (Table 6)
    kappa: int = 750  # pools only where t_prev <= kappa (Sec. 4.3, Table 8)
    inner_steps: int = 1  # j: denoising steps per candidate before scoring (MSPO, Table 7)
    init: Literal["random", "win", "lose"] = "random"  # which candidate continues (Table 4)
    pair: Literal["best-worst", "random"] = "best-worst"  # how the pair is chosen (Table 9)
    t_min: int = 0  # pools only where t_prev >= t_min (timestep-range ablations, Table 8)
    # the last transition: its own pool ("own", official SD-1.5 SPO) or, when a segment would start
    # there, the end of the segment still open ("merge", official SDXL MSPO); see the module docstring
    tail: Literal["own", "merge"] = "own"

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be >= 2 (got {self.k})")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1 (got {self.inner_steps})")
        if self.init not in ("random", "win", "lose"):
            raise ValueError(f"init must be random|win|lose (got {self.init!r})")
        if self.pair not in ("best-worst", "random"):
            raise ValueError(f"pair must be best-worst|random (got {self.pair!r})")
        if self.tail not in ("own", "merge"):
            raise ValueError(f"tail must be own|merge (got {self.tail!r})")

    def pools_at(self, t_prev: int) -> bool:
        """Whether a transition whose result sits at scorer timestep ``t_prev`` (>= 0) is a pool:
        t_prev in [t_min, kappa]."""
        return self.t_min <= t_prev <= self.kappa

    def is_pooled(self, t: int, step_ratio: int) -> bool:
        """Whether the DDIM transition from ``t`` (to t - ``step_ratio``) is a pool."""
        return self.pools_at(max(t - step_ratio, 0))

    def segment_steps(self, i: int, n: int, pooled) -> int:
        """Transitions in the segment that starts at step ``i`` of ``n``; ``pooled(j)``: whether step j is a pool."""
        length = min(self.inner_steps, n - i)
        if self.tail == "merge" and i + length == n - 1 and pooled(i + length):
            length += 1  # a lone last transition joins this segment (official SDXL pipeline)
        return length

    def segment_length(self, i: int, n: int, t: int, step_ratio: int) -> int:
        """:meth:`segment_steps` on a DDIM grid: step ``i`` at timestep ``t``, steps ``step_ratio`` apart."""
        return self.segment_steps(i, n, lambda j: self.is_pooled(t - (j - i) * step_ratio, step_ratio))


@dataclass
class PoolStep:
    """One pooled step for a batch of B prompts: k candidate segments from one shared x_t."""

    timesteps: torch.Tensor  # (j+1,) t, t-1, ..., t-j of the segment
    x_t: torch.Tensor  # (B, C, H, W) shared start
    segments: torch.Tensor  # (B, k, j, C, H, W): x_{t-1} ... x_{t-j} of each candidate
    log_probs: torch.Tensor  # (B, k, j) under the rollout policy (no grad)
    scores: torch.Tensor  # (B, k)
    win: torch.Tensor  # (B,) index into k
    lose: torch.Tensor  # (B,)
    chosen: torch.Tensor  # (B,) the candidate that continues

    @property
    def t(self) -> int:
        return int(self.timesteps[0])

    @property
    def candidates(self) -> torch.Tensor:
        """x_{t-1}^i, the first transition's samples (B, k, C, H, W)."""
        return self.segments[:, :, 0]


@dataclass
class PoolRollout:
    x0: torch.Tensor  # (B, C, H, W) the final samples
    steps: list[PoolStep] = field(default_factory=list)


@torch.no_grad()
def pool_rollout(engine, prompts: Sequence[str], generators: Generators, pool: PoolConfig,
                 scorer: Scorer, x_T: torch.Tensor | None = None) -> PoolRollout:
    """Sample with candidate pools; returns every pool (the training pairs) and the final x_0.

    ``engine``: a ``RolloutEngine`` (its family's step sampler) or an ``engine.samplers.StepSampler``: the
    family's step (DDIM, or the flow SDE) comes from it, so this one loop serves both families. Positions
    (``PoolStep.timesteps``) are the sampler's: DDIM timesteps, or flow grid indices."""
    steps = as_step_sampler(engine)
    steps.check_log_probs()
    eng, reduction = steps.engine, steps.engine.sampler.reduction
    B, k = len(prompts), pool.k
    cond, uncond = eng.encode(prompts)
    cond_k, uncond_k = cond.repeat_interleave(k), uncond.repeat_interleave(k)
    prompt_idx = torch.arange(B).repeat_interleave(k)
    x = eng.initial_noise(generators) if x_T is None else x_T
    ts = steps.positions()
    pooled = [pool.pools_at(steps.scorer_timestep(steps.next(t))) for t in ts]  # by the next sample's timestep
    rollout = PoolRollout(x0=x)
    out = None  # the model output at (x, t) when already known
    i = 0
    while i < len(ts):
        t = ts[i]
        if out is None:
            out = steps.predict(x, t, cond, uncond)
        if not pooled[i]:
            dist = steps.distribution(out, x, t)
            x = dist.sample(randn(x.shape[1:], generators, device=x.device))
            out, i = None, i + 1
            continue
        # 1. k candidates around ONE mean
        dist = steps.distribution(out, x, t)
        z = randn((k, *x.shape[1:]), generators, device=x.device)  # (B, k, C, H, W)
        cand = dist.mean.unsqueeze(1) + dist.std.unsqueeze(1) * z
        seg, lps = [cand], [dist.log_prob(cand, reduction)]
        flat = cand.flatten(0, 1)
        seg_ts = [t]
        t_cur = steps.next(t)
        steps_left = pool.segment_steps(i, len(ts), lambda j: pooled[j])
        # 2. MSPO: j-1 more steps per candidate, then each candidate's own prediction for x0_hat
        cand_out = None
        for s in range(steps_left):
            seg_ts.append(t_cur)
            if steps.is_final(t_cur):
                break
            cand_out = steps.predict(flat, t_cur, cond_k, uncond_k)
            if s == steps_left - 1:
                break
            d = steps.distribution(cand_out, flat, t_cur)
            zz = randn((k, *x.shape[1:]), generators, device=x.device).flatten(0, 1)
            flat = d.sample(zz)
            seg.append(flat.unflatten(0, (B, k)))
            lps.append(d.log_prob(flat, reduction).unflatten(0, (B, k)))
            t_cur = steps.next(t_cur)
            cand_out = None
        t_end = seg_ts[-1]
        x0_hat = flat if steps.is_final(t_end) else steps.x0_hat(cand_out, flat, t_end)
        # 3. score and pick the pair
        scores = scorer(x0_hat, steps.scorer_timestep(t_end), prompt_idx).reshape(B, k).float().cpu()
        if pool.pair == "best-worst":
            win, lose = scores.argmax(1), scores.argmin(1)
        else:
            perm = torch.stack([torch.randperm(k, generator=g) for g in generators])[:, :2]
            a, b_ = perm[:, 0], perm[:, 1]
            first_better = scores.gather(1, a[:, None]).squeeze(1) >= scores.gather(1, b_[:, None]).squeeze(1)
            win, lose = torch.where(first_better, a, b_), torch.where(first_better, b_, a)
        # 4. the next x_t
        chosen = {"random": lambda: randint(k, generators), "win": lambda: win, "lose": lambda: lose}[pool.init]()
        rows = torch.arange(B)
        segments = torch.stack(seg, dim=2)  # (B, k, j', C, H, W)
        rollout.steps.append(PoolStep(
            timesteps=torch.tensor(seg_ts), x_t=x, segments=segments, log_probs=torch.stack(lps, dim=2),
            scores=scores, win=win, lose=lose, chosen=chosen,
        ))
        x = segments[rows, chosen, -1]
        out = None if cand_out is None else cand_out.unflatten(0, (B, k))[rows, chosen]
        i += len(seg_ts) - 1
    rollout.x0 = x
    return rollout
