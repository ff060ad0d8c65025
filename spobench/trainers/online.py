"""What the online trainers DDPO (``ddpo.py``) and D3PO (``d3po.py``) share: sampling trajectories
with the current LoRA (``RolloutEngine.sample``), a reward on x_0 (any metric plugin or an SPM at
t = 0, through :func:`~spobench.engine.scoring.load_step_scorer`) and the per-trajectory subset of
steps that trains (``timestep_fraction``, as the reference codes' per-sample shuffle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from spobench.core.errors import InputError
from spobench.core.config import setting
from spobench.trainers.base import Trainer, TrainerConfig, derive_seed


@dataclass
class OnlineConfig(TrainerConfig):
    num_steps: int = setting(20, "DDIM steps of a rollout", min=2)
    eta: float = setting(1.0, "DDIM eta (the policy is the step's Gaussian: needs > 0)", gt=0, max=1)
    guidance_scale: float = setting(5.0, "classifier-free guidance in rollout AND training", min=0)
    reduction: Literal["mean", "sum"] = setting("mean", "log-prob over C,H,W: mean (reference code) or sum (true)")
    timestep_fraction: float = setting(1.0, "train on this fraction of each trajectory's steps", gt=0, max=1)
    reward: str | None = setting(None, "metric:<name> or an SPM folder, judging x_0 "
                                       "(tiny default: metric:toy_aesthetic)")
    reward_batch: int | None = setting(None, "decode/score this many images at a time (None: all)", min=1)


class OnlineTrainer(Trainer):
    """Sampling with the current LoRA, a reward on x_0, and per-trajectory timestep subsets."""

    cfg: OnlineConfig

    def __init__(self, config, backbone, out, *, reward_fn=None, **kwargs):
        self.reward_fn = reward_fn  # a StepScorer; None: built from config.reward in setup()
        super().__init__(config, backbone, out, **kwargs)

    @classmethod
    def prepare_config(cls, cfg, backbone, defaults):
        if cfg.reward is None:
            cfg.reward = defaults.reward
            if cfg.reward is None:
                raise InputError("setting 'reward' is required: metric:<name> or an SPM folder "
                                 "(e.g. --set reward=metric:pickscore)")
        return super().prepare_config(cfg, backbone, defaults)

    def setup(self) -> None:
        from spobench.engine.rollout import RolloutEngine, SamplerConfig
        from spobench.engine.scoring import load_step_scorer

        c = self.cfg
        self.engine = RolloutEngine(self.bb, SamplerConfig(num_steps=c.num_steps, guidance_scale=c.guidance_scale,
                                                           eta=c.eta, reduction=c.reduction, resolution=c.resolution))
        if self.reward_fn is None:
            self.reward_fn = load_step_scorer(c.reward, self.acc.device, self.bb.counters, self.bb.dtype)

    def rewards(self, x0: torch.Tensor, prompts: Sequence[str], rows: Sequence[int]) -> torch.Tensor:
        """Reward of each final sample (N,), float32 on CPU; row n belongs to ``prompts[rows[n]]``.
        Decodes with the VAE and counts reward passes (``make_pool_scorer``)."""
        from spobench.engine.scoring import make_pool_scorer

        score = make_pool_scorer(self.bb, self.reward_fn, prompts, self.cfg.reward_batch)
        return score(x0, 0, torch.as_tensor(list(rows)))

    def trained_steps(self, *seed_parts: int) -> list[int]:
        """Indices of the steps a trajectory trains on: the first int(S * fraction) (at least one) of a
        permutation drawn from (seed, epoch, round, prompt, ...), as the reference's per-sample shuffle."""
        S = self.cfg.num_steps
        n = max(1, int(S * self.cfg.timestep_fraction))
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, *seed_parts))
        return sorted(torch.randperm(S, generator=g)[:n].tolist())

    def seeded(self, *parts: int) -> torch.Generator:
        from spobench.engine.rollout import make_generators

        return make_generators([derive_seed(self.cfg.seed, *parts)], device=self.acc.device)[0]
