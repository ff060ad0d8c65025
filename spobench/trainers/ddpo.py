"""DDPO: denoising diffusion policy optimisation (Black et al., 2024, "Training Diffusion Models with
Reinforcement Learning"), the DDPO-IS (PPO) variant the SPO paper compares with (Table 2, SD-1.5,
PickScore as the reward, Sec. 5.1).

Code <-> paper (DDPO Sec. 4: the denoising MDP and the importance-sampling estimator DDPO_IS with
PPO's clipping) and reference code (kvablack/ddpo-pytorch, ``scripts/train.py``):

* **The MDP.** A state is (c, t, x_t), an action is x_{t-1}, the policy is the DDIM
  step's Gaussian p_theta(x_{t-1} | x_t, c) with eta = 1 (``spobench.engine.ddim``); the reward
  r(x_0, c) comes only at the end. :meth:`DDPOTrainer.collect` samples trajectories with the LoRA ON
  and no grad (``RolloutEngine.sample``: x_T ... x_0 and the log-prob of every step), decodes x_0 and
  scores it with any metric plugin (``reward = "metric:<name>"``, the paper's DDPO used PickScore) or
  an SPM at t = 0 (``reward = <SPM folder>``) through :class:`~spobench.engine.scoring.MetricScorer`.
* **Advantages** (reference ``stat_tracking.PerPromptStatTracker``: :class:`PerPromptStatTracker`).
  Per prompt, a buffer of the last ``stat_buffer`` (16) rewards persists across rounds; A = (r -
  mean) / (std + 1e-6) over the prompt's buffer once it holds ``stat_min_count`` (16) rewards, else
  over the whole round's batch. ``per_prompt_stat_tracking = false``: batch statistics (std + 1e-8)
  always. Computed in :meth:`DDPOTrainer.round_items` from the samples of ALL processes (as the
  reference gathers rewards first). Advantages are clipped to [-adv_clip_max, adv_clip_max] (5).
* **The loss** (DDPO_IS with PPO's clipped surrogate)::

      ratio = exp(log p_theta(x_{t-1} | x_t, c) - log p_old(x_{t-1} | x_t, c))
      L     = mean over transitions of max(-A * ratio, -A * clip(ratio, 1 - 1e-4, 1 + 1e-4))

  p_old is the log-prob recorded while sampling (the policy before this round's updates). A
  transition with A = 0 gives exactly zero gradient. :func:`ddpo_loss` is the formula.
* **Timesteps trained** (``timestep_fraction``): each trajectory trains on the first
  int(S * fraction) steps of its own random permutation of the S steps (reference: the same).

Where this deviates from the reference code, and why:

* **Batching.** An item is one transition; the base trainer (``spobench/trainers/base.py``) shuffles all of a
  round's transitions and trains on micro-batches that mix trajectories and timesteps (one CFG-batched
  UNet call per micro-batch). The reference iterates a trajectory's timesteps one UNet call each and
  accumulates. Both average the same per-transition losses over an optimizer step; only which
  transitions share a step differs.
* **Prompts.** The base loop visits every prompt once per epoch (``images_per_prompt`` trajectories
  each); the reference draws prompts i.i.d. So with 4k prompts and one image per prompt, the
  per-prompt buffers rarely reach 16 and advantages use the batch statistics, as the reference does
  on a large prompt set (``images_per_prompt`` > 1 fills them faster). Buffers are keyed by the
  prompt string, as in the reference, and saved in checkpoints (exact resume).
* **Inner epochs.** One pass over each round's samples (the reference default ``num_inner_epochs = 1``).
* **Defaults** follow the reference (LoRA config ``config/base.py``): 50 DDIM steps, eta 1, CFG 5 in
  sampling AND training, lr 3e-4 (LoRA), AdamW (0.9, 0.999, wd 1e-4, eps 1e-8), grad clip 1.0,
  advantage clip 5, PPO clip 1e-4, timestep fraction 1.0, buffers 16/16, log-probs averaged over
  C, H, W (``reduction = "mean"``). Batch sizes follow ``config/dgx.py`` per process: 32 trajectories
  a round (8 x 4 batches) and 8 trajectories x 50 steps = 400 transitions an optimizer step
  (``train_batch_size`` 8 x ``grad_accum`` 50). The tiny backbone uses lr 3e-4 too, with its own
  LoRA rank (4).

What DDPO shares with D3PO (the sampler, the reward on x_0, the timestep subsets) is
:class:`~spobench.trainers.online.OnlineTrainer` (``online.py``).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from spobench.core.catalog import register_trainer
from spobench.trainers import salts
from spobench.core.config import setting
from spobench.trainers.base import TrainerConfig
from spobench.trainers.online import OnlineConfig, OnlineTrainer


@dataclass
class DDPOConfig(OnlineConfig):
    num_steps: int = setting(50, "DDIM steps of a rollout (reference: 50)", min=2)
    rollout_batch: int = setting(32, "prompts per round per process (reference dgx: 8 x 4 batches)", min=1)
    train_batch_size: int = setting(8, "transitions per micro-batch per process", min=1)
    grad_accum: int = setting(50, "micro-batches per optimizer step (8 x 50 = 8 trajectories x 50 steps)", min=1)
    lr: float | None = setting(None, "AdamW learning rate (default: 3e-4, the reference's LoRA setting)", gt=0,
                               backbone=("ddpo_lr", "lr"))
    images_per_prompt: int = setting(1, "trajectories per prompt per round", min=1)
    adv_clip_max: float = setting(5.0, "clip advantages to [-x, x] (reference: 5)", gt=0)
    clip_range: float = setting(1e-4, "PPO ratio clip range (reference: 1e-4)", gt=0, lt=1)
    per_prompt_stat_tracking: bool = setting(True, "normalise rewards per prompt (else per batch)")
    stat_buffer: int = setting(16, "rewards kept per prompt (reference: 16)", min=1)
    stat_min_count: int = setting(16, "per-prompt statistics once a buffer holds this many (reference: 16)",
                                  min=1)


def ddpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              clip_range: float = 1e-4, adv_clip_max: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition PPO loss ``max(-A r, -A clip(r, 1-c, 1+c))`` with r = exp(lp - old) and A clipped
    to [-adv_clip_max, adv_clip_max]; plus per-transition stats (not reduced)."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"loss": loss.detach(), "approx_kl": 0.5 * diff.detach() ** 2,
                 "clipfrac": ((ratio - 1.0).abs() > clip_range).float(), "ratio": ratio.detach(),
                 "advantage": adv.detach()}
    return loss, stats


class PerPromptStatTracker:
    """The reference's per-prompt reward normaliser: a bounded buffer per prompt that persists across
    rounds; batch statistics until a prompt's buffer holds ``min_count`` rewards."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: Sequence[float]) -> tuple[list[float], list[bool]]:
        """Advantages in the order given, and whether each used its prompt's statistics. Prompts
        are processed in sorted order (the reference: ``np.unique``), each prompt's rewards in order."""
        import numpy as np

        r = np.asarray(rewards, dtype=np.float64)
        p = np.asarray(list(prompts), dtype=object)
        adv = np.empty_like(r)
        own = np.zeros(len(r), dtype=bool)
        for prompt in sorted(set(prompts)):
            mask = p == prompt
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[mask].tolist())
            if len(buf) < self.min_count:
                mean, std = r.mean(), r.std() + 1e-6
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
                own[mask] = True
            adv[mask] = (r[mask] - mean) / std
        return adv.tolist(), own.tolist()

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {k: deque((float(x) for x in v), maxlen=self.buffer_size) for k, v in state.items()}


@dataclass
class TransitionItem:
    """One transition x_t -> x_{t-1} of a sampled trajectory, with its sampling log-prob."""

    key: tuple  # (prompt index, image number, step index): a process-independent order
    prompt: int
    t: int
    x_t: torch.Tensor  # (C, H, W), CPU
    x_prev: torch.Tensor
    old_log_prob: float
    advantage: float
    reward: float


@register_trainer("ddpo")
class DDPOTrainer(OnlineTrainer):
    """DDPO-IS: PPO on denoising trajectories with a reward on x_0."""

    name: ClassVar[str] = "ddpo"
    Config: ClassVar[type[TrainerConfig]] = DDPOConfig

    cfg: DDPOConfig

    def setup(self) -> None:
        super().setup()
        self.tracker = PerPromptStatTracker(self.cfg.stat_buffer, self.cfg.stat_min_count)

    def state_dict(self) -> dict:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state.get("stat_tracker", {}))

    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list[TransitionItem], dict]:
        """Sample ``images_per_prompt`` trajectories per prompt (LoRA on, no grad: the acting policy),
        score x_0 and cut the trained steps into items; advantages come in :meth:`round_items`."""
        m = self.cfg.images_per_prompt
        jobs = [(i, c) for i in prompt_indices for c in range(m)]
        prompts = [self.prompts[i] for i, _ in jobs]
        gens = [self.seeded(epoch, rnd, i, salts.DDPO_SAMPLE, c) for i, c in jobs]
        traj = self.engine.sample(prompts, gens)
        rewards = self.rewards(traj.x0, prompts, range(len(jobs))).tolist()
        items: list[TransitionItem] = []
        ts = traj.timesteps.tolist()
        for n, (i, c) in enumerate(jobs):
            for j in self.trained_steps(epoch, rnd, i, salts.DDPO_SAMPLE, c, salts.TRAINED_STEPS):
                items.append(TransitionItem(
                    key=(i, c, j), prompt=i, t=int(ts[j]), x_t=traj.latents[n, j].cpu(),
                    x_prev=traj.latents[n, j + 1].cpu(), old_log_prob=float(traj.log_probs[n, j]),
                    advantage=float("nan"), reward=float(rewards[n])))
        r = torch.tensor(rewards, dtype=torch.float64)
        return items, {"samples": float(len(jobs)), "reward_sum": float(r.sum()), "reward_sq_sum": float((r**2).sum())}

    def round_items(self, items: list[TransitionItem], epoch: int, rnd: int) -> list[TransitionItem]:
        """Advantages from the rewards of the whole round (every process holds all items here and
        updates its stat tracker identically, samples in key order)."""
        import numpy as np

        samples: dict[tuple, tuple[str, float]] = {}
        for it in items:
            samples.setdefault(it.key[:2], (self.prompts[it.prompt], it.reward))
        keys = sorted(samples)
        rewards = [samples[k][1] for k in keys]
        if not keys:
            adv, own = [], []
        elif self.cfg.per_prompt_stat_tracking:
            adv, own = self.tracker.update([samples[k][0] for k in keys], rewards)
        else:
            arr = np.asarray(rewards, dtype=np.float64)
            adv, own = ((arr - arr.mean()) / (arr.std() + 1e-8)).tolist(), [False] * len(keys)
        by_key = dict(zip(keys, adv))
        for it in items:
            it.advantage = float(by_key[it.key[:2]])
        n = max(len(keys), 1)
        self._round_adv = {"mean_abs_advantage": float(np.abs(adv).sum()) / n if adv else 0.0,
                           "per_prompt_fraction": sum(own) / n}
        return items

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        n = max(rstats.get("samples", 0.0), 1.0)
        mean = rstats.get("reward_sum", 0.0) / n
        var = max(rstats.get("reward_sq_sum", 0.0) / n - mean**2, 0.0)
        out = {"samples": rstats.get("samples", 0.0), "reward_mean": mean, "reward_std": math.sqrt(var)}
        return super().round_summary({}, n_items, steps) | out | getattr(self, "_round_adv", {})

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        s = f"reward {info['reward_mean']:.3f}"
        if "mean_loss" in info:
            s += f" loss {info['mean_loss']:.2e} clipfrac {info['mean_clipfrac']:.2f}"
        return s

    def loss(self, items: list[TransitionItem], total: int):
        dev = self.acc.device
        x_t = torch.stack([it.x_t for it in items]).to(dev)
        x_prev = torch.stack([it.x_prev for it in items]).to(dev)
        t = torch.tensor([it.t for it in items], device=dev)
        old = torch.tensor([it.old_log_prob for it in items], device=dev)
        adv = torch.tensor([it.advantage for it in items], device=dev)
        cond, uncond = self.engine.encode([self.prompts[it.prompt] for it in items])
        with self.policy():
            lp = self.engine.log_prob(x_t, t, x_prev, cond, uncond)  # one CFG-batched UNet call, with grad
        per, stats = ddpo_loss(lp, old, adv, self.cfg.clip_range, self.cfg.adv_clip_max)
        sums = {k: float(v.sum()) for k, v in stats.items()}
        sums["timestep"] = float(sum(it.t for it in items))
        return per.sum() / total, sums
