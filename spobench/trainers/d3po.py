"""D3PO: direct preference optimisation of the denoising steps, without a reward model in the loss
(Yang et al., 2024, "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model"),
as the SPO paper uses it for Table 2 (SD-1.5, PickScore labelling the pairs, Sec. 5.1).

Code <-> papers (SPO paper Sec. 3, Eq. 2 = D3PO's step-wise DPO objective) and reference code
(yk7333/d3po @ 40d31758048f62ff49814eaa0403d820493ad374, ``scripts/rm/train_d3po.py``: the reward-model
variant, whose ``compare`` labels the pairs and whose loss is at its lines 596-599):

* **Two trajectories from one x_T** (D3PO; the SPO paper's Fig. 3). :meth:`D3POTrainer.collect`
  draws x_T per prompt, then samples it twice with eta = 1 (``RolloutEngine.sample`` with the same
  ``x_T`` and a different generator per side after that; both sides in ONE batched rollout), LoRA on,
  no grad.
* **Labels.** A reward judges each x_0: any metric plugin (``reward = "metric:<name>"``; the paper
  used PickScore) or an SPM at t = 0 (``reward = <SPM folder>``), via ``MetricScorer``. The better
  sample gets h = +1, the worse h = -1 (the reference's ``compare``); equal rewards give h = (0, 0).
* **The loss** (Eq. 2, one term per denoising step, the final image's label propagated to every
  step of both trajectories)::

      L_t = -log sigmoid( beta * sum_i h_i * log clip(p_theta(x^i_{t-1} | x^i_t, c)
                                                      / p_ref(x^i_{t-1} | x^i_t, c), 1 - eps, 1 + eps) )

  with beta = 0.1 and eps = 0.1 (reference ``train.beta``, ``train.eps``); p is the DDIM step's
  Gaussian (eta = 1), p_ref the same UNet with its LoRA off (the reference deep-copies the initial
  UNet: the same function). A tie (h = 0) makes the argument 0: loss ln 2 and exactly zero gradient.
  The clip is applied to the log-ratio (same value and gradient as clamp(exp(.)) then log, without
  exp overflow). :func:`d3po_loss` is the formula.

Where this deviates from the reference code, and why:

* **Batching.** An item is one (pair, step): both sides' transitions at one timestep. All rows of a
  micro-batch (2 per item, x2 for CFG) go through ONE policy and ONE reference UNet call; the
  reference runs four calls (policy/ref x two sides) per step. Same loss and gradients (tested).
  The base loop shuffles a round's items, so a micro-batch mixes pairs and timesteps; the reference
  accumulates one pair's 20 timesteps per optimizer step. Defaults keep that step size: 4 items per
  micro-batch x 5 accumulated = 20 (pair, step) items per optimizer step.
* **Timesteps** (``timestep_fraction``, reference default 1.0): each pair trains on the first
  int(S * fraction) steps of a random permutation, shared by its two sides (as the reference).
* **Defaults** follow the reference ``config/base.py``: 20 DDIM steps, eta 1, CFG 5 in sampling and
  training, lr 3e-5 (LoRA), AdamW (0.9, 0.999, wd 1e-4, eps 1e-8), grad clip 1.0, 20 prompts a round
  per process (10 x 2 batches), log-probs averaged over C, H, W (``reduction = "mean"``). The tiny
  backbone uses lr 1e-4 (its backbone default; the tiny LoRA is rank 4 on a 1M-parameter UNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from spobench.core.catalog import register_trainer
from spobench.trainers import salts
from spobench.core.config import setting
from spobench.trainers.base import TrainerConfig
from spobench.trainers.online import OnlineConfig, OnlineTrainer


@dataclass
class D3POConfig(OnlineConfig):
    rollout_batch: int = setting(20, "prompts (pairs) per round per process (reference: 10 x 2 batches)", min=1)
    train_batch_size: int = setting(4, "(pair, step) items per micro-batch per process", min=1)
    grad_accum: int = setting(5, "micro-batches per optimizer step (4 x 5 = one pair's 20 steps)", min=1)
    lr: float | None = setting(None, "AdamW learning rate (default: 3e-5, the reference's; tiny 1e-4)", gt=0,
                               backbone=("d3po_lr", "lr"))
    beta: float = setting(0.1, "DPO regularisation strength (reference: 0.1)", gt=0)
    clamp_eps: float | None = setting(0.1, "clip ratios to [1-eps, 1+eps] (reference: 0.1; None: off)", gt=0, lt=1)


def d3po_loss(lp: torch.Tensor, ref: torch.Tensor, h: torch.Tensor, beta: float = 0.1,
              clamp_eps: float | None = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-item loss ``-log sigmoid(beta * sum_i h_i * clip(lr_i))`` and per-item stats.

    ``lp``, ``ref``: (N, 2) log p_theta (with grad) and log p_ref of both sides' transitions; ``h``:
    (N, 2) preference signs (+1 winner, -1 loser, 0 tie)."""
    lr = lp - ref.detach()
    clipped = lr
    if clamp_eps is not None:
        clipped = lr.clamp(math.log1p(-clamp_eps), math.log1p(clamp_eps))
    margin = beta * (h * clipped).sum(1)
    loss = -F.logsigmoid(margin)
    with torch.no_grad():
        decided = (h != 0).any(1)
        lr_w = (lr * (h > 0)).sum(1)
        lr_l = (lr * (h < 0)).sum(1)
        right = torch.where(lr_w > lr_l, 1.0, torch.where(lr_w < lr_l, 0.0, 0.5))
        stats = {"loss": loss.detach(), "margin": margin.detach(), "ties": (~decided).float(),
                 "accuracy": torch.where(decided, right, 0.5),  # implicit reward accuracy; a tie counts 1/2
                 "abs_logratio": lr.abs().mean(1), "clamp_frac": (clipped != lr).float().mean(1)}
    return loss, stats


@dataclass
class PairStepItem:
    """Both sides of a labelled pair at one denoising step."""

    key: tuple  # (prompt index, step index): a process-independent order
    prompt: int
    t: int
    x_t: torch.Tensor  # (2, C, H, W) side 0, side 1; CPU
    x_prev: torch.Tensor  # (2, C, H, W)
    h: tuple[float, float]
    reward_gap: float  # |r_0 - r_1|


@register_trainer("d3po")
class D3POTrainer(OnlineTrainer):
    """D3PO: step-wise DPO on two trajectories from one x_T, labelled by a reward on x_0."""

    name: ClassVar[str] = "d3po"
    Config: ClassVar[type[TrainerConfig]] = D3POConfig

    cfg: D3POConfig

    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list[PairStepItem], dict]:
        B = len(prompt_indices)
        prompts = [self.prompts[i] for i in prompt_indices]
        x_T = self.engine.initial_noise([self.seeded(epoch, rnd, i, salts.D3PO_PAIR, 0) for i in prompt_indices])
        gens = [self.seeded(epoch, rnd, i, salts.D3PO_PAIR, 1 + side) for side in (0, 1) for i in prompt_indices]
        traj = self.engine.sample(prompts + prompts, gens, x_T=torch.cat([x_T, x_T]))  # rows: side 0, side 1
        r = self.rewards(traj.x0, prompts, list(range(B)) * 2).reshape(2, B).T  # (B, 2)
        h = torch.sign(r[:, 0] - r[:, 1])  # +1: side 0 wins
        items: list[PairStepItem] = []
        ts = traj.timesteps.tolist()
        for b, i in enumerate(prompt_indices):
            rows = [b, B + b]
            hb = (float(h[b]), float(-h[b]))
            for j in self.trained_steps(epoch, rnd, i, salts.D3PO_PAIR, salts.TRAINED_STEPS):
                items.append(PairStepItem(key=(i, j), prompt=i, t=int(ts[j]), x_t=traj.latents[rows, j].cpu(),
                                          x_prev=traj.latents[rows, j + 1].cpu(), h=hb,
                                          reward_gap=float((r[b, 0] - r[b, 1]).abs())))
        stats = {"pairs": float(B), "tied_pairs": float((h == 0).sum()), "reward_sum": float(r.sum()),
                 "reward_gap_sum": float((r[:, 0] - r[:, 1]).abs().sum())}
        return items, stats

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        pairs = max(rstats.get("pairs", 0.0), 1.0)
        out = {"pairs": rstats.get("pairs", 0.0), "tie_fraction": rstats.get("tied_pairs", 0.0) / pairs,
               "reward_mean": rstats.get("reward_sum", 0.0) / (2 * pairs),
               "reward_gap": rstats.get("reward_gap_sum", 0.0) / pairs}
        return super().round_summary({}, n_items, steps) | out

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        s = f"reward {info['reward_mean']:.3f} ties {info['tie_fraction']:.0%}"
        if "mean_loss" in info:
            s += f" loss {info['mean_loss']:.4f} acc {info['mean_accuracy']:.2f}"
        return s

    def log_probs(self, items: list[PairStepItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """(lp, ref), each (N, 2): both sides of every item in ONE policy and ONE reference UNet call."""
        dev = self.acc.device
        N = len(items)
        x_t = torch.cat([torch.stack([it.x_t[s] for it in items]) for s in (0, 1)]).to(dev)  # (2N, ...) side-major
        x_prev = torch.cat([torch.stack([it.x_prev[s] for it in items]) for s in (0, 1)]).to(dev)
        t = torch.tensor([it.t for it in items] * 2, device=dev)
        cond, uncond = self.engine.encode([self.prompts[it.prompt] for it in items] * 2)
        with torch.no_grad(), self.bb.lora_disabled():
            ref = self.engine.log_prob(x_t, t, x_prev, cond, uncond)
        with self.policy():
            lp = self.engine.log_prob(x_t, t, x_prev, cond, uncond)
        return lp.reshape(2, N).T, ref.reshape(2, N).T

    def loss(self, items: list[PairStepItem], total: int):
        lp, ref = self.log_probs(items)
        h = torch.tensor([it.h for it in items], device=lp.device, dtype=lp.dtype)
        per, stats = d3po_loss(lp, ref, h, self.cfg.beta, self.cfg.clamp_eps)
        sums = {k: float(v.sum()) for k, v in stats.items()}
        sums["reward_gap"] = sum(it.reward_gap for it in items)
        sums["timestep"] = float(sum(it.t for it in items))
        return per.sum() / total, sums
