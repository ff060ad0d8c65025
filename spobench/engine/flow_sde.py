"""The rectified-flow SDE step with its Gaussian log-probability: the flow family's counterpart of
``ddim.py``, and the only place this math lives.

Notation follows Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv:2505.05470, Sec. 4, "From ODE to SDE"). Its equations are cited by name, [SDE], [EM] and [KL] below,
not by number: the numbering moves between the arXiv versions and could not be checked offline against
one. A rectified flow is trained on
x_t = (1 - t) x_0 + t eps (t = 1 noise, t = 0 data) and predicts the velocity v = eps - x_0; its sampler
integrates the ODE dx = v dt from t = 1 to t = 0 (diffusers' ``FlowMatchEulerDiscreteScheduler``, Euler).
Flow-GRPO replaces the ODE by the SDE with the same marginals p_t at every t:

    score   = grad log p_t(x) = -(x + (1 - t) v) / t                      (the rectified-flow score)
    dx      = [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt + sigma_t dw       [SDE]
    sigma_t = a sqrt(t / (1 - t))                                         (its noise schedule, a = noise level)

and its Euler-Maruyama step from t to t + dt (dt = t_next - t < 0) is a Gaussian policy [EM]:

    mean    = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt
    std     = sigma_t sqrt(-dt)
    x_next  = mean + std z,   z ~ N(0, I)
    x0_hat  = x_t - t v                                                   (the flow's clean estimate)

Two policies on the same x_t share the std, so their KL is a distance of means [KL]:
KL = ||mean_theta - mean_ref||^2 / (2 std^2) (Flow-GRPO's trainer uses a scaled form of it: ``trainers/flow_grpo.py``).

``step_distribution`` returns exactly this as a :class:`~spobench.engine.ddim.StepDistribution` (the same
class as a DDIM step: ``sample(noise)``, ``log_prob(x_next, reduction)`` with ``"mean"`` over C, H, W as
Flow-GRPO's code reduces, or ``"sum"``, the true log-density). With a = 0 the step is the Euler ODE step
x_t + v dt, bit for bit as ``FlowMatchEulerDiscreteScheduler.step`` computes it on the same sigmas.

Where the formula has no value, as Flow-GRPO's code handles it (yifan123/flow_grpo @
ac4c86e8cae021841f1fde853d340e0db67690dd, ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``):

* **t = 1** (the first step of SD3's schedule, whose shift maps 1 to 1): sigma_t = a sqrt(1 / 0) is
  infinite. The reference puts t_1 (the schedule's second value, ``sigmas[1]``) in place of t in the
  denominator only: sigma_1 = a sqrt(1 / (1 - t_1)). Then std^2 = a^2 (-dt) / (1 - t_1) = a^2 exactly
  (dt = t_1 - 1): the first step draws noise of variance a^2 whatever the step count. That step is not
  marginal-exact (its drift also scales by 1 - a^2 / 2; tests/engine/test_flow_sde.py measures the
  variance it adds, a^4 / 4 for a unit-variance x_1, damped by the later steps).
* **t = 0** is only ever a step's end: the last step (t_{N-1} -> 0) has dt = -t_{N-1} and a finite
  std, so it is sampled like the others (the reference does the same). Flow-GRPO does not train on it:
  its trainer's ``timestep_fraction = 0.99`` keeps the first int(0.99 N) steps, all but the last
  (``spobench/trainers/flow_grpo.py``).
* **The timestep shift** (SD3: t' = s t / (1 + (s - 1) t), s = 3) lives in the grid itself: the
  schedule is the backbone's ``sigmas(num_steps)``, t_0 = 1 > ... > t_N = 0, the scheduler's own values.

Every function takes a per-row step index (a batch may mix steps, as a trainer's shuffled transitions
do). The step runs in float32 at least (the reference upcasts: bf16 overflows in the mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from spobench.engine.ddim import Reduction, StepDistribution

NOISE_LEVEL = 0.7  # a: Flow-GRPO's default (config/base.py sample.noise_level), every flow sampler's default

# velocity(x_t, t) -> v: t a per-row tensor of times in [0, 1] (a backbone's CFG-combined velocity, or a
# known field in a test)
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# noise(step) -> z ~ N(0, I) of x's shape: one draw per row from that row's generator (rollout.randn)
Noise = Callable[[int], torch.Tensor]


@dataclass(frozen=True)
class FlowSchedule:
    """What a flow SDE step needs: the time grid and Flow-GRPO's noise level a."""

    sigmas: torch.Tensor  # (N + 1,) t_0 > t_1 > ... > t_N = 0: the backbone's (shifted) sampler grid
    noise_level: float = NOISE_LEVEL

    def __post_init__(self):
        s = torch.as_tensor(self.sigmas).detach().cpu()
        s = s if s.dtype == torch.float64 else s.float()  # a backbone's grid is float32, as diffusers keeps it
        if s.ndim != 1 or s.numel() < 2 or float(s[-1]) != 0.0 or not bool((s[1:] < s[:-1]).all()) \
                or float(s[0]) > 1.0:
            raise ValueError(f"a flow schedule needs 1 >= t_0 > ... > t_N = 0, got {s.tolist()}")
        if self.noise_level < 0:
            raise ValueError(f"noise level a must be >= 0, got {self.noise_level}")
        object.__setattr__(self, "sigmas", s)

    @classmethod
    def from_backbone(cls, backbone, num_steps: int, noise_level: float = NOISE_LEVEL,
                      resolution: int | None = None) -> "FlowSchedule":
        return cls(sigmas=backbone.sigmas(num_steps, resolution), noise_level=noise_level)

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def t_cap(self) -> float:
        """What stands in for t in sigma_t's 1 - t at t = 1: the grid's second time (the reference's
        ``sigma_max = sigmas[1]``)."""
        return float(self.sigmas[1])

    def times(self, step, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, t_next) of step index ``step`` (an int or a per-row tensor)."""
        idx = torch.as_tensor(step).long().cpu()
        return self.sigmas[idx].to(device), self.sigmas[idx + 1].to(device)

    def noise_std(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = a sqrt(t / (1 - t)) ([SDE]'s schedule), with t_1 for t in 1 - t where t = 1."""
        t = torch.as_tensor(t)
        denom = 1 - torch.where(t >= 1, torch.full_like(t, self.t_cap), t)
        return self.noise_level * (t / denom).sqrt()

    def check_log_probs(self, where: str = "the sampler") -> None:
        """a = 0 is the ODE: a deterministic step has no log-probability for a policy-gradient loss."""
        if self.noise_level <= 0:
            from spobench.core.errors import InputError

            raise InputError(f"{where}: noise level a = 0 makes every flow step deterministic (the Euler ODE); "
                             "a trainer that needs step log-probs needs a > 0 (Flow-GRPO: 0.7)")


def _per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor as (B, 1, ..., 1) against ``like``."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def step_distribution(velocity: torch.Tensor, x_t: torch.Tensor, step, sched: FlowSchedule) -> StepDistribution:
    """p(x_next | x_t) of the SDE step ``step`` (t_step -> t_step+1) from the (CFG-combined) velocity [EM]."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x, v = x_t.to(dtype), velocity.to(dtype)
    t_row, t_next_row = (r.to(dtype) for r in sched.times(step, x.device))
    sigma_row = sched.noise_std(t_row)
    t, dt, sigma = _per_row(t_row, x), _per_row(t_next_row - t_row, x), _per_row(sigma_row, x)
    # [EM]; at a = 0 the bracket is v + 0 exactly, so the mean is the Euler step x_t + v dt bit for bit
    mean = x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return StepDistribution(mean=mean, std=sigma * (-dt).sqrt(), x0_hat=x - t * v)


def predict_x0(velocity: torch.Tensor, x_t: torch.Tensor, step, sched: FlowSchedule) -> torch.Tensor:
    """x0_hat = x_t - t v at grid index ``step`` (what SPO's step scorer judges), without the step's mean;
    the same value as ``step_distribution(...).x0_hat``."""
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    x = x_t.to(dtype)
    t = _per_row(sched.sigmas[torch.as_tensor(step).long().cpu()].to(x.device, dtype), x)
    return x - t * velocity.to(dtype)


def sde_step(velocity: torch.Tensor, x_t: torch.Tensor, step, sched: FlowSchedule,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             reduction: Reduction = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SDE step: (x_next, log p(x_next | x_t)), as ``ddim.ddim_step``.

    ``noise`` draws x_next, ``prev_sample`` scores a given one; without either (or with a = 0) x_next is
    the mean. With a = 0 the log-prob is None (no density)."""
    dist = step_distribution(velocity, x_t, step, sched)
    if prev_sample is None:
        prev_sample = dist.mean if (noise is None or sched.noise_level == 0) else dist.sample(noise.to(dist.mean))
    log_prob = None if sched.noise_level == 0 else dist.log_prob(prev_sample, reduction)
    return prev_sample, log_prob


@dataclass
class FlowTrajectory:
    """An SDE rollout t_0 -> t_N with the log-prob of each step (zeros when a = 0)."""

    latents: torch.Tensor  # (B, N + 1, ...) x at t_0 ... t_N (or (B, 1, ...) = x at t_N only)
    log_probs: torch.Tensor  # (B, N)
    sigmas: torch.Tensor  # (N + 1,) the grid

    @property
    def x0(self) -> torch.Tensor:
        return self.latents[:, -1]


@torch.no_grad()
def sample_sde(velocity: Velocity, x: torch.Tensor, sched: FlowSchedule, noise: Noise,
               keep_latents: bool = True, reduction: Reduction = "mean",
               progress: Callable[[int], None] | None = None) -> FlowTrajectory:
    """Run the SDE ([EM] at every step of ``sched``) from ``x`` at t_0 to t_N = 0."""
    kept, lps = [x], []
    for i in range(sched.num_steps):
        t = sched.sigmas[i].to(x.device).expand(x.shape[0])
        dist = step_distribution(velocity(x, t), x, i, sched)
        x_next = dist.mean if sched.noise_level == 0 else dist.sample(noise(i).to(dist.mean))
        lps.append(torch.zeros(x.shape[0], device=x.device) if sched.noise_level == 0
                   else dist.log_prob(x_next, reduction))
        x = x_next
        if keep_latents:
            kept.append(x)
        if progress:
            progress(i + 1)
    latents = torch.stack(kept if keep_latents else [x], dim=1)
    return FlowTrajectory(latents=latents, log_probs=torch.stack(lps, dim=1), sigmas=sched.sigmas)

