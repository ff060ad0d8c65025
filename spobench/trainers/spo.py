"""SPO: Step-aware Preference Optimization (paper Sec. 4): the loss and the trainer here, the
candidate-pool sampling in ``spo_pools.py``.

Code <-> paper:

* **Rollout with candidate pools** (Sec. 4.1-4.3, Fig. 3c): :meth:`SPOTrainer.collect` runs
  :func:`~spobench.trainers.spo_pools.pool_rollout` (SPO's sampling, ``spo_pools.py`` beside this
  file) with the LoRA ON (the current policy p_theta), without grad. From each
  x_t with t_prev <= kappa (Sec. 4.3, "only when t <= kappa") it draws k candidates
  x_{t-1}^1..k ~ p_theta(x_{t-1} | x_t, c), the step scorer (the SPM, Sec. 4.2; or a metric via
  ``metric:<name>``) scores each candidate's x0_hat at t-1, the best and the worst form the pair
  (x^w_{t-1}, x^l_{t-1}), and a random candidate continues the chain (Sec. 4.3, ``init``).
* **Which pairs train** (official code, ``preference_score_compare``): with p = softmax(s_w, s_l)
  (the Bradley-Terry probabilities of Eq. 3), a pair is kept only if p_w - p_l > ``threshold``
  (0.3 for SD-1.5, 0.4 for SDXL); near-ties are dropped. The kept fraction is logged.
* **The loss** (Eq. 4, summed over t by Eq. 5 through the mixed-timestep batches)::

      L = -log sigmoid( beta * [ logratio(x^w) - logratio(x^l) ] ),
      logratio(x) = log p_theta(x | x_t, c) - log p_ref(x | x_t, c)

  where p is the DDIM step's Gaussian (eta = 1; ``spobench.engine.ddim``) and p_ref is the same
  UNet with its LoRA switched off (``backbone.lora_disabled()``), under no_grad.
* **Flow backbones** (``family = "flow"``: sd3, tiny-flow; the paper's Sec. 4.6 limitation): the step is
  Flow-GRPO's SDE step (``engine/flow_sde.py``, noise level a = ``noise_level``), x0_hat = x_t - t v, and
  everything above (pools, scorer, threshold, loss) is unchanged: the step and its log-prob come from the
  family's step sampler (``engine/samplers.py``), whose ``scorer_timestep`` maps flow t to the SPM's
  integer timesteps (and to ``kappa`` / ``t_min``).
  :func:`spo_loss` is the formula; :meth:`SPOTrainer.loss` feeds it.
* **One forward per pair, not four.** Winner and loser share x_t, so their Gaussians are the same:
  ``engine.log_prob(x_t, t, stack([x_w, x_l], 1), ...)`` scores both from ONE policy forward and
  ONE reference forward (2 + 2 CFG rows per pair). The official loop runs four forwards (w, l x
  policy, ref) on identical inputs; the loss and gradients are the same (tests check both).
* **Official ratio clamp** (``train.eps`` = 0.1): ratio = clamp(exp(logratio), 1 - eps, 1 + eps)
  before its log, i.e. logratio clamped to [log(1 - eps), log(1 + eps)]; a clamped side gives no
  gradient. Computed as a clamp of the log-ratio (same value and gradient, no exp overflow).
  ``clamp_eps = None`` disables it.
* **Reduction.** ``reduction = "mean"`` (default, as the official code, DDPO and D3PO) averages the
  Gaussian log-density over the C*H*W dimensions instead of summing it: log-ratios are then about
  1/(C*H*W) of the true ones, the margins beta * (lr_w - lr_l) are tiny and the loss sits near
  ln 2 = 0.693 for the whole run (users of the official code report exactly this). ``"sum"`` gives
  the true log-density of the step (then beta and the clamp act on real log-ratios and the clamp
  binds far more often).

* **Speed-to-result options** (issue 16; off by default, i.e. the official loop): ``inner_epochs`` E
  trains a round's kept pairs E times, each pass in its own order (:meth:`SPOTrainer.round`);
  ``keep_top`` replaces the fixed threshold by the round's largest p_w - p_l (:func:`keep_mask`).
  Presets of settings (``--preset``): ``spobench/trainers/presets.py``.

Training follows the base trainer and its loop (``spobench/trainers/base.py``, ``loop.py``): each round's pairs (from all its timesteps,
so a batch mixes timesteps; the engine takes a per-row t) are shuffled and trained on in
micro-batches; AdamW on the LoRA, gradients clipped for real. MSPO (``mspo.py``) reuses all of this
with multi-step segments.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from spobench.core.catalog import register_trainer
from spobench.core.errors import InputError
from spobench.core.config import SettingError, setting
from spobench.trainers import salts
from spobench.trainers.base import Trainer, TrainerConfig, derive_seed
from spobench.engine.samplers import log_prob as step_log_prob
from spobench.trainers.spo_pools import PoolConfig, PoolStep, pool_rollout


# -------------------------------------------------------------------------------------------------
# config
# -------------------------------------------------------------------------------------------------
@dataclass
class SPOConfig(TrainerConfig):
    k: int | None = setting(None, "candidates per pool (Table 6; backbone default: 4 SD-1.5 as the paper and the "
                            "official SD-1.5 config, 2 SDXL as the official SDXL config)", min=2, backbone="spo_k")
    kappa: int = setting(750, "pools only where t_prev <= kappa (Sec. 4.3, Table 8)", min=0, lt=1000)
    t_min: int = setting(0, "pools only where t_prev >= t_min (timestep-range ablations)", min=0, lt=1000)
    num_steps: int = setting(20, "DDIM steps of a rollout", min=2)
    eta: float = setting(1.0, "DDIM eta: stochasticity of each step (SPO needs > 0)", gt=0, max=1)
    noise_level: float = setting(0.7, "flow backbones: a of the SDE step, sigma_t = a sqrt(t / (1 - t)) "
                                      "(Flow-GRPO: 0.7; engine/flow_sde.py)", gt=0)
    guidance_scale: float = setting(5.0, "classifier-free guidance in rollout AND training", min=0)
    beta: float = setting(10.0, "DPO regularisation strength (paper: 10)", gt=0)
    threshold: float | None = setting(None, "keep a pair only if p_w - p_l > threshold (backbone default: "
                                      "0.3 SD-1.5, 0.4 SDXL)", min=0, lt=1, backbone="spo_threshold")
    init: Literal["random", "win", "lose"] = setting("random", "which candidate continues the chain (Table 4)")
    pair: Literal["best-worst", "random"] = setting("best-worst", "how the pair is chosen (Table 9)")
    reduction: Literal["mean", "sum"] = setting("mean", "log-prob over C,H,W: mean (official) or sum (true)")
    clamp_eps: float | None = setting(0.1, "clamp ratios to [1-eps, 1+eps] as the official code (None: off)",
                                      gt=0, lt=1)
    scorer: str | None = setting(None, "an SPM folder, or metric:<name> (tiny default: the shipped SPM, spobench/assets/tiny-spm)")
    scorer_batch: int | None = setting(None, "decode/score this many x0_hat at a time (None: a whole pool)", min=1)
    merge_lora: bool = setting(False, "roll out with the LoRA folded into the fp32 frozen weights (Backbone.lora_merged): "
                               "the same policy up to float rounding, 1.1-1.2x faster rollout UNet calls on CPU")
    # speed-to-result options (issue 16; off by default: the official loop)
    inner_epochs: int = setting(1, "optimizer passes over each round's kept pairs, each pass in a new order "
                                "(1: one pass, as the official code)", min=1)
    keep_top: float | None = setting(None, "keep the pairs of this fraction of a round's pools with the largest "
                                     "p_w - p_l, a threshold that follows the scorer's spread (None: the fixed "
                                     "threshold)", gt=0, max=1)

    def check(self) -> None:
        if self.t_min > self.kappa:
            raise SettingError("t_min", f"must be <= kappa ({self.kappa}) (got {self.t_min})")


# -------------------------------------------------------------------------------------------------
# the loss (Eq. 4) on given log-probs
# -------------------------------------------------------------------------------------------------
def spo_loss(lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float,
             clamp_eps: float | None = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair SPO loss ``-log sigmoid(beta (lr_w - lr_l))`` and per-pair stats (not reduced).

    ``lp_*``: log p_theta of winner/loser (with grad); ``ref_*``: log p_ref (no grad). With
    ``clamp_eps`` the log-ratios are clamped to [log(1-eps), log(1+eps)] (the official
    clamp(exp(lr), 1-eps, 1+eps) followed by log).
    """
    lr_w, lr_l = lp_w - ref_w.detach(), lp_l - ref_l.detach()
    cw, cl = lr_w, lr_l
    if clamp_eps is not None:
        lo, hi = math.log1p(-clamp_eps), math.log1p(clamp_eps)
        cw, cl = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
    loss = -F.logsigmoid(beta * (cw - cl))
    with torch.no_grad():
        stats = {
            "loss": loss.detach(),
            "accuracy": (lr_w > lr_l).float(),  # implicit reward accuracy
            "margin": beta * (cw - cl).detach(),
            "abs_logratio": (lr_w.abs() + lr_l.abs()) / 2,
            "logratio_w": lr_w.detach(),
            "logratio_l": lr_l.detach(),
            "clamp_frac": ((cw != lr_w).float() + (cl != lr_l).float()) / 2,
        }
    return loss, stats


def preference_gap(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """p_w - p_l with p = softmax([s_w, s_l]) (the official threshold test)."""
    p = torch.softmax(torch.stack([s_w.float(), s_l.float()]), dim=0)
    return p[0] - p[1]


def keep_mask(gaps: list[torch.Tensor], threshold: float, keep_top: float | None) -> list[torch.Tensor]:
    """Which pools of a round train, one bool mask per pool step. Fixed: p_w - p_l > threshold (official).
    ``keep_top``: the ceil(keep_top * pools) largest gaps of the round (over all its pool steps; ties by
    position, earlier first), never a gap of 0 (a pool whose best and worst scores are equal says nothing)."""
    if keep_top is None:
        return [g > threshold for g in gaps]
    flat = torch.cat([g.flatten() for g in gaps]) if gaps else torch.zeros(0)
    n = min(math.ceil(keep_top * flat.numel()), flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:n]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    keep &= flat > 0
    return list(keep.split([g.numel() for g in gaps]))


# -------------------------------------------------------------------------------------------------
# training items: one preference-labelled transition
# -------------------------------------------------------------------------------------------------
@dataclass
class PairItem:
    """A labelled transition at timestep t: winner x_t -> x_w and loser x_t(_lose) -> x_l.

    In SPO both sides start from the same x_t (``x_t_lose is None``). In MSPO the transitions after a
    segment's first start from different states, so each side has its own start."""

    key: tuple  # (prompt index, pool number, transition): a process-independent order
    prompt: int  # index into the trainer's prompt list
    t: int  # the step sampler's position: the DDIM timestep, or the flow grid index (engine/samplers.py)
    x_t: torch.Tensor  # (C, H, W), CPU
    x_w: torch.Tensor
    x_l: torch.Tensor
    x_t_lose: torch.Tensor | None = None
    score_gap: float = 0.0  # s_w - s_l of the pool
    prob_gap: float = 0.0  # p_w - p_l

    @property
    def shared(self) -> bool:
        return self.x_t_lose is None


@register_trainer("spo")
class SPOTrainer(Trainer):
    """Step-aware Preference Optimization (paper Sec. 4)."""

    name: ClassVar[str] = "spo"
    Config: ClassVar[type[TrainerConfig]] = SPOConfig

    cfg: SPOConfig

    def __init__(self, config, backbone, out, *, step_scorer=None, **kwargs):
        self.step_scorer = step_scorer  # None: built from config.scorer in setup()
        super().__init__(config, backbone, out, **kwargs)

    # -- setup -------------------------------------------------------------------------------------
    @classmethod
    def prepare_config(cls, cfg, backbone, defaults):
        if cfg.scorer is None:
            cfg.scorer = defaults.scorer
            if cfg.scorer is None:
                raise InputError("setting 'scorer' is required: an SPM folder or metric:<name> "
                                 "(e.g. --set scorer=runs/spm-sd15)")
        return super().prepare_config(cfg, backbone, defaults)

    def setup(self) -> None:
        from spobench.engine.rollout import RolloutEngine, SamplerConfig
        from spobench.engine.samplers import step_sampler
        from spobench.engine.scoring import load_step_scorer

        c = self.cfg
        self.engine = RolloutEngine(self.bb, SamplerConfig(num_steps=c.num_steps, guidance_scale=c.guidance_scale,
                                                           eta=c.eta, reduction=c.reduction, resolution=c.resolution))
        self.steps = step_sampler(self.engine, c.noise_level)  # the family's step: DDIM or the flow SDE
        if self.step_scorer is None:
            self.step_scorer = load_step_scorer(c.scorer, self.acc.device, self.bb.counters, self.bb.dtype)

    def pool_config(self) -> PoolConfig:
        c = self.cfg
        return PoolConfig(k=c.k, kappa=c.kappa, inner_steps=self.pool_inner_steps(), init=c.init, pair=c.pair,
                          t_min=c.t_min, tail=self.pool_tail())

    def pool_inner_steps(self) -> int:
        return 1

    def pool_tail(self) -> str:
        """The last transition is its own pool, as in the official SD-1.5 SPO pipeline."""
        return "own"

    # -- rollout: pools -> kept pairs ----------------------------------------------------------------
    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list[PairItem], dict]:
        from spobench.engine.scoring import make_pool_scorer

        prompts = [self.prompts[i] for i in prompt_indices]
        scorer = make_pool_scorer(self.bb, self.step_scorer, prompts, self.cfg.scorer_batch)
        merged = self.bb.lora_merged() if self.cfg.merge_lora else contextlib.nullcontext()
        with merged, torch.no_grad():  # the current policy, no grad
            rollout = pool_rollout(self.steps, prompts, self.generators(epoch, rnd, prompt_indices),
                                   self.pool_config(), scorer)
        items: list[PairItem] = []
        pools = kept = 0
        gap_all = gap_kept = 0.0
        sides = []
        for step in rollout.steps:
            rows = torch.arange(step.scores.shape[0])
            sides.append((step.scores[rows, step.win], step.scores[rows, step.lose]))
        pgaps = [preference_gap(s_w, s_l) for s_w, s_l in sides]
        keeps = keep_mask(pgaps, self.cfg.threshold, self.cfg.keep_top)
        for n, (step, (s_w, s_l), pgap, keep) in enumerate(zip(rollout.steps, sides, pgaps, keeps)):
            rows = torch.arange(step.scores.shape[0])
            pools += len(rows)
            kept += int(keep.sum())
            gap_all += float((s_w - s_l).sum())
            for b in keep.nonzero().flatten().tolist():
                gap_kept += float(s_w[b] - s_l[b])
                items.extend(self.pair_items(step, b, prompt_indices[b], n, float(s_w[b] - s_l[b]), float(pgap[b])))
        stats = {"pools": pools, "kept_pairs": kept, "score_gap_sum": gap_all, "kept_score_gap_sum": gap_kept,
                 "score_sum": float(sum(s.scores.sum() for s in rollout.steps)),
                 "scored": float(sum(s.scores.numel() for s in rollout.steps))}
        return items, stats

    def round(self, epoch: int, rnd: int):
        """The round's items; with ``inner_epochs`` E > 1 followed by E - 1 more passes over them, each
        in its own order, so the loop takes E times the optimizer steps on the pairs of one rollout.
        Pass p's order is the deal's stream (seed, epoch, round, SHARE) with p as one more part."""
        work = super().round(epoch, rnd)
        first = list(work.items)
        for p in range(1, self.cfg.inner_epochs if first else 1):
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, rnd, salts.SHARE, p))
            work.items += [first[i] for i in torch.randperm(len(first), generator=g).tolist()]
        return work

    def pair_items(self, step: PoolStep, b: int, prompt: int, n: int, score_gap: float, prob_gap: float) -> list[PairItem]:
        """SPO trains the pool's first (and only) transition x_t -> x_{t-1}^{w,l}."""
        w, l = int(step.win[b]), int(step.lose[b])
        return [PairItem(key=(prompt, n, 0), prompt=prompt, t=int(step.timesteps[0]), x_t=step.x_t[b].cpu(),
                         x_w=step.segments[b, w, 0].cpu(), x_l=step.segments[b, l, 0].cpu(),
                         score_gap=score_gap, prob_gap=prob_gap)]

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        pools = max(rstats.get("pools", 0.0), 1.0)
        kept = rstats.get("kept_pairs", 0.0)
        out = {"pools": rstats.get("pools", 0.0), "kept_pairs": kept, "kept_fraction": kept / pools,
               "score_gap": rstats.get("score_gap_sum", 0.0) / pools,
               "kept_score_gap": rstats.get("kept_score_gap_sum", 0.0) / max(kept, 1.0),
               "mean_score": rstats.get("score_sum", 0.0) / max(rstats.get("scored", 0.0), 1.0)}
        return super().round_summary({}, n_items, steps) | out

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        s = f"kept {info['kept_fraction']:.0%} score {info['mean_score']:.3f}"
        if "mean_loss" in info:
            s += f" loss {info['mean_loss']:.4f} acc {info['mean_accuracy']:.2f}"
        return s

    # -- the loss ------------------------------------------------------------------------------------
    def log_probs(self, items: list[PairItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lp_w, lp_l, ref_w, ref_l), each (N,): ONE policy and ONE reference UNet call for the batch.

        A shared-x_t item is one row scoring (x_w, x_l) together; an item whose sides start from
        different states (MSPO) is two rows, each scoring its own sample (padded to m=2).
        """
        dev = self.acc.device
        x_in, t, x_prev, prompt_rows, pick = [], [], [], [], []
        for it in items:
            if it.shared:
                pick.append(((len(x_in), 0), (len(x_in), 1)))
                x_in.append(it.x_t), t.append(it.t), prompt_rows.append(it.prompt)
                x_prev.append(torch.stack([it.x_w, it.x_l]))
            else:
                r = len(x_in)
                pick.append(((r, 0), (r + 1, 0)))
                x_in += [it.x_t, it.x_t_lose]
                t += [it.t, it.t]
                prompt_rows += [it.prompt, it.prompt]
                x_prev += [torch.stack([it.x_w, it.x_w]), torch.stack([it.x_l, it.x_l])]
        x_in = torch.stack(x_in).to(dev)
        x_prev = torch.stack(x_prev).to(dev)
        t = torch.tensor(t, device=dev)
        cond, uncond = self.engine.encode([self.prompts[i] for i in prompt_rows])
        red = self.cfg.reduction
        with torch.no_grad(), self.bb.lora_disabled():
            ref = step_log_prob(self.steps, x_in, t, x_prev, cond, uncond, red)  # (R, 2) reference
        with self.policy():
            lp = step_log_prob(self.steps, x_in, t, x_prev, cond, uncond, red)  # (R, 2) current policy, with grad
        w_idx = torch.tensor([p[0] for p in pick], device=dev)
        l_idx = torch.tensor([p[1] for p in pick], device=dev)
        return (lp[w_idx[:, 0], w_idx[:, 1]], lp[l_idx[:, 0], l_idx[:, 1]],
                ref[w_idx[:, 0], w_idx[:, 1]], ref[l_idx[:, 0], l_idx[:, 1]])

    def loss(self, items: list[PairItem], total: int):
        lp_w, lp_l, ref_w, ref_l = self.log_probs(items)
        per_pair, stats = spo_loss(lp_w, lp_l, ref_w, ref_l, self.cfg.beta, self.cfg.clamp_eps)
        sums = {k: float(v.sum()) for k, v in stats.items() if k not in ("logratio_w", "logratio_l")}
        sums["score_gap"] = sum(it.score_gap for it in items)
        sums["timestep"] = float(sum(self.steps.scorer_timestep(it.t) for it in items))
        return per_pair.sum() / total, sums
