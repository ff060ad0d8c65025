"""The stochastic step of each backbone family, behind one protocol, so that a trainer that walks a
sampler step by step (SPO's and MSPO's candidate pools, ``trainers/spo_pools.py``; SPO's loss) is written
once for both families: :func:`step_sampler` picks the strategy by ``backbone.family``.

A step is named by its **position** ``p``, an int:

* ``"diffusion"`` (:class:`DDIMSteps`): p is the DDIM timestep t (951, 901, ..., 1 at 20 steps), the
  next position is t - T/S, and a negative one is the final sample x_0 (``ddim.py``'s convention, kept so
  the DDIM path runs the very same calls, in the same order, as before this module existed);
* ``"flow"`` (:class:`FlowSteps`): p is the index i of the flow grid t_0 = 1 > ... > t_N = 0
  (``flow_sde.FlowSchedule``), the next is i + 1, and i = N is x_0. The step is Flow-GRPO's SDE step
  (``flow_sde.step_distribution``, noise level a).

Both give the step's Gaussian as ``ddim.StepDistribution`` (mean, std, x0_hat), the model's clean estimate
x0_hat for the step scorer, and :meth:`scorer_timestep`: the integer timestep the step scorer (the SPM)
and SPO's ``kappa`` / ``t_min`` see for a position.
"""

from __future__ import annotations

from typing import Protocol

import torch

from spobench.engine import ddim, flow_sde
from spobench.engine.ddim import Reduction, StepDistribution
from spobench.engine.rollout import RolloutEngine


class StepSampler(Protocol):
    """One family's stochastic sampler, step by step (see the module docstring for positions)."""

    engine: RolloutEngine

    def positions(self) -> list[int]:
        """The positions of the sampler's steps, first to last (x_0 not included)."""
        ...

    def next(self, p: int) -> int:
        """The position one step after ``p``."""
        ...

    def is_final(self, p: int) -> bool:
        """Whether ``p`` is past the last step: the sample there is x_0 itself."""
        ...

    def scorer_timestep(self, p: int) -> int:
        """The step scorer's integer timestep of the sample at ``p`` (0 = clean)."""
        ...

    def predict(self, x: torch.Tensor, p, cond, uncond) -> torch.Tensor:
        """The (CFG-combined) model output at position(s) ``p`` (an int or a per-row tensor)."""
        ...

    def distribution(self, out: torch.Tensor, x: torch.Tensor, p) -> StepDistribution:
        """The step's Gaussian p(x_next | x) from the model output at ``p``."""
        ...

    def x0_hat(self, out: torch.Tensor, x: torch.Tensor, p) -> torch.Tensor:
        ...

    def check_log_probs(self) -> None:
        ...


class DDIMSteps:
    """DDIM with eta (``ddim.py``) through the rollout engine: positions are DDIM timesteps."""

    family = "diffusion"

    def __init__(self, engine: RolloutEngine):
        self.engine = engine
        self.sched = engine.sched
        self.eta = engine.sampler.eta

    def positions(self) -> list[int]:
        return [int(t) for t in self.engine.timesteps()]

    def next(self, p: int) -> int:
        return p - self.sched.step_ratio

    def is_final(self, p: int) -> bool:
        return p < 0

    def scorer_timestep(self, p: int) -> int:
        return max(p, 0)

    def predict(self, x, p, cond, uncond):
        return self.engine.predict(x, p, cond, uncond)

    def distribution(self, out, x, p) -> StepDistribution:
        return ddim.step_distribution(out, x, p, self.sched, self.eta)

    def x0_hat(self, out, x, p):
        return ddim.predict_x0(out, x, p, self.sched)

    def check_log_probs(self) -> None:
        self.engine.check_log_probs()


class FlowSteps:
    """Flow-GRPO's SDE (``flow_sde.py``) on a flow backbone's own (shifted) grid: positions are grid indices."""

    family = "flow"

    def __init__(self, engine: RolloutEngine, noise_level: float = flow_sde.NOISE_LEVEL):
        self.engine = engine
        s = engine.sampler
        self.sched = flow_sde.FlowSchedule.from_backbone(engine.backbone, s.num_steps, noise_level, s.resolution)

    def positions(self) -> list[int]:
        return list(range(self.sched.num_steps))

    def next(self, p: int) -> int:
        return p + 1

    def is_final(self, p: int) -> bool:
        return p >= self.sched.num_steps

    def scorer_timestep(self, p: int) -> int:
        """min(round(1000 t), 999): linear in t, because the flow transformer itself sees t * 1000 (SD3's
        scheduler.timesteps), so SPO's kappa = 750 pools the same last 3/4 of the time axis (16 of 20 steps
        on an unshifted grid) as on DDIM; it does not match noise levels (an equal-SNR map would need the
        scorer's training schedule, which an SPM folder does not record)."""
        return min(round(1000 * float(self.sched.sigmas[p])), 999)

    def time(self, p, device=None) -> torch.Tensor:
        return self.sched.sigmas[torch.as_tensor(p).long().cpu()].to(device)

    def predict(self, x, p, cond, uncond):
        s = self.engine.sampler
        return self.engine.backbone.predict(x, self.time(p, x.device), cond, uncond=uncond,
                                            guidance_scale=s.guidance_scale)

    def distribution(self, out, x, p) -> StepDistribution:
        return flow_sde.step_distribution(out, x, p, self.sched)

    def x0_hat(self, out, x, p):
        return flow_sde.predict_x0(out, x, p, self.sched)

    def check_log_probs(self) -> None:
        self.sched.check_log_probs(self.engine.backbone.source or self.engine.backbone.name)


FAMILIES = {"diffusion": DDIMSteps, "flow": FlowSteps}


def step_sampler(engine: RolloutEngine, noise_level: float = flow_sde.NOISE_LEVEL) -> StepSampler:
    """The step sampler of the engine's backbone family (``noise_level``: the flow SDE's a; DDIM uses the
    engine's eta)."""
    family = getattr(engine.backbone, "family", "diffusion")
    if family not in FAMILIES:
        raise ValueError(f"no step sampler for backbone family {family!r} (known: {', '.join(FAMILIES)})")
    cls = FAMILIES[family]
    return cls(engine, noise_level) if cls is FlowSteps else cls(engine)


def as_step_sampler(sampler) -> StepSampler:
    """A ``StepSampler`` as given, or a ``RolloutEngine``'s (its family's default noise level)."""
    return step_sampler(sampler) if isinstance(sampler, RolloutEngine) else sampler


def log_prob(steps: StepSampler, x_t: torch.Tensor, p, x_next: torch.Tensor, cond, uncond,
             reduction: Reduction) -> torch.Tensor:
    """log p(x_next | x_t, c) of the family's step at per-row positions ``p``, with grad if enabled;
    ``x_next`` (B, C, H, W) or (B, m, C, H, W): m samples sharing x_t from ONE model call."""
    steps.check_log_probs()
    return steps.distribution(steps.predict(x_t, p, cond, uncond), x_t, p).log_prob(x_next, reduction)

