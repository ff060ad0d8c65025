"""DDIM with eta and the Gaussian log-probability of a step: the only place this math lives.

Notation follows DDIM (Song et al., 2021, Eq. 12) as diffusers' ``DDIMScheduler.step`` writes it.
With a_t = alphas_cumprod[t] and a_prev = alphas_cumprod[t - T/S] (or the final alpha at the end):

    x0_hat  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)                    (epsilon prediction)
            = sqrt(a_t) x_t - sqrt(1 - a_t) v                          (v prediction)
    sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean    = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps
    x_prev  = mean + sigma_t z,   z ~ N(0, I)

With eta = 1 every step is a Gaussian policy p_theta(x_prev | x_t, c) = N(mean, sigma_t^2 I), whose
log-density is what SPO's Eq. 4, D3PO and DDPO put into their ratios. The log-prob is reduced over
C, H, W either by ``mean`` (what DDPO, D3PO and the official SPO code use: a per-dimension average,
so log-ratios are ~1/(C*H*W) of the true ones) or by ``sum`` (the true log-density of the step).

Every function here accepts a per-row timestep tensor, so a batch may mix steps (SPO trains on
pairs from different timesteps in one batch). No x0 clipping: Stable Diffusion's schedulers run
with ``clip_sample=False``, and clipping x0 without re-deriving epsilon broke the tiny model.

A scheduler with ``set_alpha_to_one = True`` takes a_prev = 1 after the last step, so that step's
sigma is 0: x_0 is the mean itself, and the step has no density (its log-prob is -inf or NaN). It
samples fine, but nothing that puts step log-probs into a loss (SPO, MSPO, D3PO, DDPO) can use it:
:meth:`NoiseSchedule.check_log_probs` refuses it with one line (SD-1.5 and SDXL ship with False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class NoiseSchedule:
    """What a DDIM step needs from a scheduler: cumulative alphas and the step spacing."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,)
    final_alpha_cumprod: float  # a_prev used after the last step (SD: alphas_cumprod[0])
    num_train_timesteps: int
    num_steps: int
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"

    @classmethod
    def from_backbone(cls, backbone, num_steps: int) -> "NoiseSchedule":
        return cls(
            alphas_cumprod=backbone.alphas_cumprod.float(),
            final_alpha_cumprod=float(backbone.final_alpha_cumprod),
            num_train_timesteps=backbone.num_train_timesteps,
            num_steps=num_steps,
            prediction_type=backbone.prediction_type,
        )

    @property
    def step_ratio(self) -> int:
        return self.num_train_timesteps // self.num_steps

    def prev_timestep(self, t: torch.Tensor | int) -> torch.Tensor | int:
        """t - T/S; a negative value means x_prev is the final sample x_0."""
        return t - self.step_ratio

    @property
    def last_step_deterministic(self) -> bool:
        """a_prev = 1 after the last step (``set_alpha_to_one``): sigma_t = 0 there for every eta."""
        return self.final_alpha_cumprod >= 1.0

    def check_log_probs(self, where: str = "the model") -> None:
        """Refuse a schedule whose last step has no log-probability (see the module docstring)."""
        if self.last_step_deterministic:
            from spobench.core.errors import ModelLoadError

            raise ModelLoadError(
                f"{where}: scheduler set_alpha_to_one = true makes the last DDIM step deterministic "
                f"(sigma = 0, no log-probability); SPO, MSPO, D3PO and DDPO need step log-probs: set "
                f"\"set_alpha_to_one\": false in scheduler/scheduler_config.json (as SD-1.5 and SDXL ship)")

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """a_t per row; a negative t maps to the final alpha."""
        t = torch.as_tensor(t)
        ac = self.alphas_cumprod.to(t.device)
        safe = t.clamp(min=0).long()
        return torch.where(t >= 0, ac[safe], torch.full_like(ac[safe], self.final_alpha_cumprod))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def split_prediction(model_output: torch.Tensor, x_t: torch.Tensor, t, sched: NoiseSchedule):
    """(x0_hat, eps_hat) from the model output (DDIM Eq. 9 / the v-parameterisation)."""
    a_t = _bcast(sched.alpha(torch.as_tensor(t, device=x_t.device)), x_t)
    if sched.prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif sched.prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - (1 - a_t).sqrt() * model_output
        eps = a_t.sqrt() * model_output + (1 - a_t).sqrt() * x_t
    elif sched.prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {sched.prediction_type!r}")
    return x0, eps


def predict_x0(model_output: torch.Tensor, x_t: torch.Tensor, t, sched: NoiseSchedule) -> torch.Tensor:
    """x0_hat: what the SPM scores at a noisy step (paper Sec. 4.2, 'estimate x0 following DDIM')."""
    return split_prediction(model_output, x_t, t, sched)[0]


@dataclass
class StepDistribution:
    """p(x_prev | x_t) = N(mean, std^2 I) for one DDIM step (DDIM Eq. 12)."""

    mean: torch.Tensor
    std: torch.Tensor  # broadcastable to mean, (B, 1, 1, 1)
    x0_hat: torch.Tensor

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        return self.mean + self.std * noise

    def log_prob(self, x_prev: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
        """Gaussian log-density of ``x_prev`` reduced over all non-batch dims.

        ``x_prev`` may carry extra candidate dims after the batch dim, e.g. (B, k, C, H, W) for
        k candidates drawn around one mean: the mean/std broadcast over them.
        """
        mean, std = self.mean, self.std
        extra = x_prev.ndim - mean.ndim
        for _ in range(extra):
            mean, std = mean.unsqueeze(1), std.unsqueeze(1)
        lp = -((x_prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
        dims = tuple(range(1 + extra, lp.ndim))
        return lp.mean(dim=dims) if reduction == "mean" else lp.sum(dim=dims)


def step_distribution(model_output: torch.Tensor, x_t: torch.Tensor, t, sched: NoiseSchedule,
                      eta: float = 1.0) -> StepDistribution:
    """The DDIM step's mean and std from the (CFG-combined) model output."""
    t = torch.as_tensor(t, device=x_t.device)
    x0, eps = split_prediction(model_output, x_t, t, sched)
    a_t = _bcast(sched.alpha(t), x_t)
    a_prev = _bcast(sched.alpha(sched.prev_timestep(t)), x_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # DDIM Eq. 16
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return StepDistribution(mean=mean, std=std, x0_hat=x0)


def ddim_step(model_output: torch.Tensor, x_t: torch.Tensor, t, sched: NoiseSchedule, eta: float = 1.0,
              noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
              reduction: Reduction = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """One DDIM step: (x_prev, log p(x_prev | x_t)).

    Pass ``noise`` to draw x_prev (same ``variance_noise`` -> same x_prev as diffusers'
    ``DDIMScheduler.step``), or ``prev_sample`` to score a given x_prev. With eta = 0 the step is
    deterministic and the log-prob is None.
    """
    dist = step_distribution(model_output, x_t, t, sched, eta)
    if prev_sample is None:
        prev_sample = dist.mean if (noise is None or eta == 0) else dist.sample(noise)
    log_prob = None if eta == 0 else dist.log_prob(prev_sample, reduction)
    return prev_sample, log_prob
