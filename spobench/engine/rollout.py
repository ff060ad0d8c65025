"""The rollout engine: plain DDIM trajectories (DDPO, D3PO, generation) and SPO's candidate pools.

Every random draw comes from explicit per-row ``torch.Generator``s (one per prompt/image), so a
prompt with a seed gives the same rollout whatever batch it is in.

Candidate pools (paper Sec. 4.1-4.3, Fig. 3c). Sampling runs plain DDIM while x_{t-1} is too
noisy to judge (t_prev > kappa). From then on, at each step:

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
from typing import Callable, Literal, Sequence

import torch

from spobench.models.backbones.base import Backbone, Conditioning
from spobench.engine.ddim import NoiseSchedule, Reduction, predict_x0, step_distribution

Generators = Sequence[torch.Generator]


def make_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def randn(shape: tuple[int, ...], generators: Generators, device=None, dtype=torch.float32) -> torch.Tensor:
    """One standard-normal draw of ``shape`` per row, each row from its own generator."""
    rows = [torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(rows).to(device)


def randint(high: int, generators: Generators) -> torch.Tensor:
    return torch.cat([torch.randint(high, (1,), generator=g, device=g.device) for g in generators]).cpu()


@dataclass
class SamplerConfig:
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    reduction: Reduction = "mean"
    resolution: int | None = None  # None: the backbone's default


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


@dataclass
class Trajectory:
    """A plain DDIM rollout: x_T ... x_0 with the log-prob of each transition."""

    latents: torch.Tensor  # (B, S+1, C, H, W) when kept, else (B, 1, C, H, W) = x_0 only
    log_probs: torch.Tensor  # (B, S)
    timesteps: torch.Tensor  # (S,)
    cond: Conditioning

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[:, -1]


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

    def pair_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(winner, loser) segments, each (B, j, C, H, W)."""
        b = torch.arange(self.segments.shape[0])
        return self.segments[b, self.win], self.segments[b, self.lose]


# scorer(x0_hat latents (N, C, H, W), timestep of the scored sample (>= 0), row -> prompt index (N,))
Scorer = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass
class PoolRollout:
    x0: torch.Tensor  # (B, C, H, W) the final samples
    steps: list[PoolStep] = field(default_factory=list)


class RolloutEngine:
    """Samples from a backbone. Holds no state between rollouts but the conditioning cache."""

    def __init__(self, backbone: Backbone, sampler: SamplerConfig | None = None):
        self.backbone = backbone
        self.sampler = sampler or SamplerConfig()
        self.sched = NoiseSchedule.from_backbone(backbone, self.sampler.num_steps)

    # -- pieces ----------------------------------------------------------------------------------
    def timesteps(self) -> torch.Tensor:
        return self.backbone.timesteps(self.sampler.num_steps)

    def initial_noise(self, generators: Generators) -> torch.Tensor:
        shape = self.backbone.latent_shape(self.sampler.resolution)
        return randn(shape, generators, device=self.backbone.device)

    def encode(self, prompts: Sequence[str]) -> tuple[Conditioning, Conditioning]:
        with torch.no_grad():
            cond = self.backbone.encode_prompts(list(prompts), self.sampler.resolution)
            uncond = self.backbone.encode_unconditional(len(prompts), self.sampler.resolution)
        return cond, uncond

    def predict(self, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning) -> torch.Tensor:
        return self.backbone.predict(x, t, cond, self.sampler.guidance_scale, uncond)

    def log_prob(self, x_t: torch.Tensor, t, x_prev: torch.Tensor, cond: Conditioning,
                 uncond: Conditioning | None = None, reduction: Reduction | None = None) -> torch.Tensor:
        """log p(x_prev | x_t, c) under the backbone as it is now (LoRA on or off), with grad if enabled.

        ``x_prev`` may be (B, C, H, W) or (B, m, C, H, W): m samples sharing one x_t cost ONE UNet call
        (the 1-forward-per-pair trick: SPO's winner and loser share x_t).
        """
        self.check_log_probs()
        if uncond is None:
            uncond = self.backbone.encode_unconditional(x_t.shape[0], self.sampler.resolution)
        out = self.predict(x_t, t, cond, uncond)
        dist = step_distribution(out, x_t, t, self.sched, self.sampler.eta)
        return dist.log_prob(x_prev, reduction or self.sampler.reduction)

    # -- plain trajectories -----------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], generators: Generators, keep_latents: bool = True,
               x_T: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
               log_probs: bool = True) -> Trajectory:
        """DDIM (eta from the sampler config) from x_T to x_0 with per-step log-probs (zeros when eta
        = 0 or ``log_probs`` is False: generation needs none, and may use any scheduler)."""
        log_probs = log_probs and self.sampler.eta > 0
        if log_probs:
            self.check_log_probs()
        cond, uncond = self.encode(prompts)
        x = self.initial_noise(generators) if x_T is None else x_T
        ts = self.timesteps()
        kept, lps = [x], []
        for i, t in enumerate(ts):
            out = self.predict(x, t, cond, uncond)
            dist = step_distribution(out, x, t, self.sched, self.sampler.eta)
            if self.sampler.eta > 0:
                x_prev = dist.sample(randn(x.shape[1:], generators, device=x.device))
            else:
                x_prev = dist.mean
            lps.append(dist.log_prob(x_prev, self.sampler.reduction) if log_probs
                       else torch.zeros(x.shape[0], device=x.device))
            x = x_prev
            if keep_latents:
                kept.append(x)
            if progress:
                progress(i + 1)
        latents = torch.stack(kept if keep_latents else [x], dim=1)
        return Trajectory(latents=latents, log_probs=torch.stack(lps, dim=1), timesteps=ts, cond=cond)

    # -- candidate pools (SPO / MSPO) -------------------------------------------------------------
    def check_log_probs(self) -> None:
        self.sched.check_log_probs(self.backbone.source or self.backbone.name)

    def is_pooled(self, t: int, pool: PoolConfig) -> bool:
        t_prev = t - self.sched.step_ratio
        return max(t_prev, 0) <= pool.kappa and max(t_prev, 0) >= pool.t_min

    def segment_length(self, i: int, n: int, t: int, pool: PoolConfig) -> int:
        """Transitions in the segment that starts at step ``i`` (timestep ``t``) of ``n``."""
        length = min(pool.inner_steps, n - i)
        if pool.tail == "merge" and i + length == n - 1 and self.is_pooled(t - length * self.sched.step_ratio, pool):
            length += 1  # a lone last transition joins this segment (official SDXL pipeline)
        return length

    @torch.no_grad()
    def pool_rollout(self, prompts: Sequence[str], generators: Generators, pool: PoolConfig, scorer: Scorer,
                     x_T: torch.Tensor | None = None) -> PoolRollout:
        """Sample with candidate pools; returns every pool (the training pairs) and the final x_0."""
        self.check_log_probs()
        B, k, j = len(prompts), pool.k, pool.inner_steps
        cond, uncond = self.encode(prompts)
        cond_k, uncond_k = cond.repeat_interleave(k), uncond.repeat_interleave(k)
        prompt_idx = torch.arange(B).repeat_interleave(k)
        x = self.initial_noise(generators) if x_T is None else x_T
        ts = [int(t) for t in self.timesteps()]
        ratio = self.sched.step_ratio
        rollout = PoolRollout(x0=x)
        out = None  # the model output at (x, t) when already known
        i = 0
        while i < len(ts):
            t = ts[i]
            if out is None:
                out = self.predict(x, t, cond, uncond)
            if not self.is_pooled(t, pool):
                dist = step_distribution(out, x, t, self.sched, self.sampler.eta)
                x = dist.sample(randn(x.shape[1:], generators, device=x.device))
                out, i = None, i + 1
                continue
            # 1. k candidates around ONE mean
            dist = step_distribution(out, x, t, self.sched, self.sampler.eta)
            z = randn((k, *x.shape[1:]), generators, device=x.device)  # (B, k, C, H, W)
            cand = dist.mean.unsqueeze(1) + dist.std.unsqueeze(1) * z
            seg, lps = [cand], [dist.log_prob(cand, self.sampler.reduction)]
            flat = cand.flatten(0, 1)
            seg_ts = [t]
            t_cur = t - ratio
            steps_left = self.segment_length(i, len(ts), t, pool)
            # 2. MSPO: j-1 more steps per candidate, then each candidate's own prediction for x0_hat
            cand_out = None
            for s in range(steps_left):
                seg_ts.append(t_cur)
                if t_cur < 0:
                    break
                cand_out = self.predict(flat, t_cur, cond_k, uncond_k)
                if s == steps_left - 1:
                    break
                d = step_distribution(cand_out, flat, t_cur, self.sched, self.sampler.eta)
                zz = randn((k, *x.shape[1:]), generators, device=x.device).flatten(0, 1)
                flat = d.sample(zz)
                seg.append(flat.unflatten(0, (B, k)))
                lps.append(d.log_prob(flat, self.sampler.reduction).unflatten(0, (B, k)))
                t_cur -= ratio
                cand_out = None
            t_end = seg_ts[-1]
            x0_hat = flat if t_end < 0 else predict_x0(cand_out, flat, t_end, self.sched)
            # 3. score and pick the pair
            scores = scorer(x0_hat, max(t_end, 0), prompt_idx).reshape(B, k).float().cpu()
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
