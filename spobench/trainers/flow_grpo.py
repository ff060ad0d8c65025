"""Flow-GRPO: group relative policy optimisation of a flow-matching model's SDE steps (Liu et al., 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL", arXiv:2505.05470), the field's standard online
method for SD3-class models, as a baseline beside SPO on the flow backbones (``family = "flow"``).

Code <-> paper (Sec. 4: "GRPO on flow matching", "From ODE to SDE", "Denoising reduction"; equations cited
by name, see ``spobench/engine/flow_sde.py``) and reference code (yifan123/flow_grpo @
ac4c86e8cae021841f1fde853d340e0db67690dd: ``scripts/train_sd3.py``, ``config/grpo.py``, ``config/base.py``,
``flow_grpo/stat_tracking.py``):

* **The policy** is the SDE step's Gaussian N(mean, sigma_t^2 |dt| I) (``engine/flow_sde.py``: the
  marginal-preserving SDE of the flow ODE, noise level a = ``noise_level``), the same Gaussian in
  sampling and in the loss. :meth:`FlowGRPOTrainer.collect` samples a **group of G images per prompt**
  (``group_size``; each from its own seeded noise), LoRA on and no grad, on the backbone's own (shifted)
  grid ``sigmas(num_steps)``, recording every step's log-prob, and scores x_0 with the reward (any
  metric plugin or an SPM at t = 0: the same plumbing as DDPO, ``online.py``).
* **Advantages** (the GRPO advantage; reference ``PerPromptStatTracker.update``): within each group,
  A = (r - mean_group) / (std_group + 1e-4) (population std); ``global_std = true`` divides by the std of
  all the round's rewards instead (the reference's SD3 configs set ``sample.global_std = True``; the
  paper's equation is the group's). The reference clears its tracker every epoch, so nothing persists
  between rounds. A is clipped to [-adv_clip_max, adv_clip_max] in the loss (reference: 5).
* **The loss** (the Flow-GRPO objective, negated; :func:`flow_grpo_loss`), per trained transition::

      ratio = exp(log p_theta(x_next | x_t, c) - log p_old(x_next | x_t, c))
      L     = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta KL

  the clipped surrogate being DDPO's (:func:`~spobench.trainers.ddpo.ddpo_loss`, the same formula), and
  the KL **in the reference code's form** on the step means::

      KL = mean over C, H, W of (mean_theta - mean_ref)^2 / (2 sigma_t^2)

  with sigma_t the SDE's coefficient a sqrt(t / (1 - t)), not the step's std sigma_t sqrt(|dt|): this is
  the per-dimension KL of the two step Gaussians (the paper's closed form, ||mean_theta - mean_ref||^2 /
  (2 sigma_t^2 |dt|)) times |dt|. The reference policy is the same transformer with its LoRA off
  (``lora_disabled()``), with CFG, without grad; beta = 0 skips its forward, as the reference does.
* **CFG in training** (reference ``compute_log_prob``): v = u + w (c - u) with the unconditional branch
  detached, so only the conditional branch carries gradient (:func:`guided_velocity`; both branches in
  one transformer call). Its value equals the sampler's, so the ratio starts at 1.
* **Timesteps trained** (reference ``train.timestep_fraction`` 0.99): the FIRST int(S * fraction) steps of
  every trajectory, in order (not a random subset as DDPO): with the reference's 0.99 that is all but the
  last step, the step to t = 0.

Where this deviates from the reference code, and why:

* **Batching.** An item is one transition; the base loop (``base.py``) shuffles a round's transitions
  and cuts micro-batches mixing images and steps (one CFG-batched transformer call each, another for the
  reference). The reference walks one micro-batch of images through its timesteps one call each; both
  average the same per-transition losses over an optimizer step, only the grouping differs. Defaults
  keep its step size: 9 transitions a micro-batch x 576 = half of a 48 x 24-image round's 9 trained steps
  (the reference: two optimizer steps a round, ``gradient_accumulation_steps = num_batches // 2``).
* **Groups and processes.** A group's G images are sampled by the process that holds its prompt (the
  reference spreads a group over GPUs); advantages are computed once every process's items are gathered
  (:meth:`round_items`), so they are the same. Prompts are visited in epochs (each once), the reference
  draws them at random; groups are keyed by the prompt text, as the reference's tracker.
* **Zero-advantage samples** (a group whose rewards are all equal) stay in: their surrogate term is
  exactly zero and they add only the KL term. The reference drops them (then pads the batch back).
* **No EMA** of the LoRA (the reference's SD3 configs keep one for evaluation).

Defaults are the reference's SD3.5-Medium configs (``config/grpo.py`` ``geneval_sd3`` / ``pickscore_sd3``
on ``config/base.py``): G = 24, 48 groups a round, a = 0.7, 10 sampling steps (the backbone's
``num_steps``; its evaluation samples with 40), CFG 4.5, clip range 1e-4, advantage clip 5, beta = 0.04
(GenEval, OCR; PickScore 0.01), timestep fraction 0.99, lr 3e-4 with LoRA rank 32 / alpha 64 (the
``sd3`` backbone's defaults), AdamW (0.9, 0.999, wd 1e-4, eps 1e-8), grad clip 1.0, log-probs averaged
over C, H, W (``reduction = "mean"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import torch

from spobench.core.catalog import register_trainer
from spobench.core.config import setting
from spobench.core.errors import InputError
from spobench.trainers import salts
from spobench.trainers.base import TrainerConfig
from spobench.trainers.ddpo import ddpo_loss
from spobench.trainers.online import OnlineTrainer

ADV_EPS = 1e-4  # the reference tracker's std + 1e-4


@dataclass
class FlowGRPOConfig(TrainerConfig):
    num_steps: int | None = setting(None, "SDE steps of a rollout (backbone default; sd3: 10, Flow-GRPO's)", min=2,
                                    backbone="num_steps")
    noise_level: float = setting(0.7, "a in sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO: 0.7)", gt=0)
    guidance_scale: float | None = setting(None, "CFG weight in rollout AND training (backbone default; sd3: 4.5, "
                                                 "Flow-GRPO's)", min=0, backbone="guidance_scale")
    group_size: int = setting(24, "G: images per prompt per round (Flow-GRPO: 24)", min=2)
    rollout_batch: int = setting(48, "groups (prompts) per round per process (Flow-GRPO: 48 groups a round)", min=1)
    sample_batch: int | None = setting(None, "images per sampler forward (None: the whole round at once)", min=1)
    train_batch_size: int = setting(9, "transitions per micro-batch per process (Flow-GRPO: 9)", min=1)
    grad_accum: int = setting(576, "micro-batches per optimizer step (48 x 24 images x 9 steps / 2 / 9: the "
                                   "reference's two steps a round)", min=1)
    clip_range: float = setting(1e-4, "PPO ratio clip range (Flow-GRPO: 1e-4)", gt=0, lt=1)
    adv_clip_max: float = setting(5.0, "clip advantages to [-x, x] (Flow-GRPO: 5)", gt=0)
    beta: float = setting(0.04, "KL coefficient to the LoRA-off model (Flow-GRPO: 0.04 GenEval/OCR, 0.01 "
                                "PickScore; 0 skips the reference forward)", min=0)
    timestep_fraction: float = setting(0.99, "train the first int(S * fraction) steps (Flow-GRPO: 0.99, all but "
                                             "the last)", gt=0, max=1)
    global_std: bool = setting(False, "divide advantages by the round's reward std, not the group's (Flow-GRPO's "
                                      "SD3 configs: true)")
    reduction: Literal["mean", "sum"] = setting("mean", "log-prob over C,H,W: mean (reference code) or sum (true)")
    reward: str | None = setting(None, "metric:<name> or an SPM folder, judging x_0 "
                                       "(tiny-flow default: metric:toy_aesthetic)")
    reward_batch: int | None = setting(None, "decode/score this many images at a time (None: all)", min=1)


def group_advantages(groups: Sequence, rewards: Sequence[float], global_std: bool = False,
                     eps: float = ADV_EPS) -> torch.Tensor:
    """GRPO advantages (float64, in the order given): (r - mean of r's group) / (std + eps), the std being
    the group's (population) or, with ``global_std``, that of all ``rewards``."""
    r = torch.as_tensor(list(rewards), dtype=torch.float64)
    adv = torch.empty_like(r)
    keys = list(groups)
    everyone = r.std(unbiased=False) if r.numel() else r.new_zeros(())
    for g in dict.fromkeys(keys):
        rows = torch.tensor([k == g for k in keys])
        mine = r[rows]
        std = everyone if global_std else mine.std(unbiased=False)
        adv[rows] = (mine - mine.mean()) / (std + eps)
    return adv


def flow_grpo_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """The reference code's KL term per row: mean over non-batch dims of (mean - ref)^2 / (2 sigma_t^2),
    sigma_t the SDE coefficient (per row); see the module docstring for its relation to the exact KL."""
    sq = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return sq / (2 * sigma_t.reshape(-1) ** 2)


def flow_grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                   kl: torch.Tensor | None = None, beta: float = 0.0, clip_range: float = 1e-4,
                   adv_clip_max: float = 5.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition Flow-GRPO loss: DDPO's clipped surrogate + beta * KL; plus per-transition stats."""
    surrogate, stats = ddpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    loss = surrogate if kl is None else surrogate + beta * kl
    stats = stats | {"policy_loss": stats["loss"], "loss": loss.detach()}
    if kl is not None:
        stats["kl"] = kl.detach()
    return loss, stats


def guided_velocity(backbone, x: torch.Tensor, t: torch.Tensor, cond, uncond, guidance_scale: float) -> torch.Tensor:
    """u + w (c - u) with u detached (the reference's training CFG), both branches in one call; w = 1: c."""
    if guidance_scale == 1.0:
        return backbone.velocity(x, t, cond)
    from spobench.models.backbones.base import Conditioning

    u, c = backbone.velocity(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond])).chunk(2)
    u = u.detach()
    return u + guidance_scale * (c - u)


@dataclass
class Transition:
    """One SDE step x_t -> x_next of a group's image, with its sampling log-prob."""

    key: tuple  # (prompt index, image in its group, step): a process-independent order
    prompt: int
    step: int  # index into the grid: t = sigmas[step], t_next = sigmas[step + 1]
    x_t: torch.Tensor  # (C, H, W), CPU
    x_next: torch.Tensor
    old_log_prob: float
    reward: float
    advantage: float = float("nan")


@register_trainer("flow-grpo")
class FlowGRPOTrainer(OnlineTrainer):
    """Flow-GRPO: GRPO on the SDE steps of a flow-matching backbone, KL to the LoRA-off model."""

    name: ClassVar[str] = "flow-grpo"
    Config: ClassVar[type[TrainerConfig]] = FlowGRPOConfig

    cfg: FlowGRPOConfig

    def setup(self) -> None:
        from spobench.engine.flow_sde import FlowSchedule
        from spobench.engine.scoring import load_step_scorer

        c = self.cfg
        if getattr(self.bb, "family", "diffusion") != "flow":
            raise InputError(f"flow-grpo trains flow-matching backbones (sd3, tiny-flow); {self.bb.name!r} is a "
                             f"{getattr(self.bb, 'family', 'diffusion')} model (use ddpo there)")
        if c.guidance_scale is None:
            raise InputError(f"setting 'guidance_scale' is required: the {self.bb.name} backbone has no default")
        self.sched = FlowSchedule.from_backbone(self.bb, c.num_steps, c.noise_level, c.resolution)
        if self.reward_fn is None:
            self.reward_fn = load_step_scorer(c.reward, self.acc.device, self.bb.counters, self.bb.dtype)

    # -- sampling ----------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]):
        with torch.no_grad():
            return (self.bb.encode_prompts(list(prompts), self.cfg.resolution),
                    self.bb.encode_unconditional(len(prompts), self.cfg.resolution))

    def velocity_fn(self, cond, uncond):
        return lambda x, t: guided_velocity(self.bb, x, t, cond, uncond, self.cfg.guidance_scale)

    def rollout(self, prompts: Sequence[str], generators: Sequence[torch.Generator]):
        """SDE trajectories (``engine.flow_sde.sample_sde``), ``sample_batch`` images a forward; each row's
        x_1 and step noise come from its own generator, so a row's numbers do not depend on the batching."""
        from spobench.engine.flow_sde import FlowTrajectory, sample_sde
        from spobench.engine.rollout import randn

        shape = self.bb.latent_shape(self.cfg.resolution)
        step = self.cfg.sample_batch or len(prompts)
        parts = []
        for s in range(0, len(prompts), step):
            gens = generators[s:s + step]
            cond, uncond = self.encode(prompts[s:s + step])
            x = randn(shape, gens, device=self.acc.device)
            parts.append(sample_sde(self.velocity_fn(cond, uncond), x, self.sched,
                                    lambda i, g=gens: randn(shape, g, device=self.acc.device),
                                    reduction=self.cfg.reduction))
        return FlowTrajectory(latents=torch.cat([p.latents for p in parts]),
                              log_probs=torch.cat([p.log_probs for p in parts]), sigmas=self.sched.sigmas)

    def trained_steps(self) -> list[int]:
        """The first int(S * fraction) steps (at least one), as the reference's ``train_timesteps``."""
        return list(range(max(1, int(self.sched.num_steps * self.cfg.timestep_fraction))))

    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list[Transition], dict]:
        G = self.cfg.group_size
        jobs = [(i, c) for i in prompt_indices for c in range(G)]
        prompts = [self.prompts[i] for i, _ in jobs]
        traj = self.rollout(prompts, [self.seeded(epoch, rnd, i, salts.FLOW_GRPO_SAMPLE, c) for i, c in jobs])
        rewards = self.rewards(traj.x0, prompts, range(len(jobs))).tolist()
        steps = self.trained_steps()
        items = [Transition(key=(i, c, j), prompt=i, step=j, x_t=traj.latents[n, j].cpu(),
                            x_next=traj.latents[n, j + 1].cpu(), old_log_prob=float(traj.log_probs[n, j]),
                            reward=float(rewards[n]))
                 for n, (i, c) in enumerate(jobs) for j in steps]
        r = torch.tensor(rewards, dtype=torch.float64)
        return items, {"samples": float(len(jobs)), "groups": float(len(prompt_indices)),
                       "rollout_steps": float(len(jobs) * self.sched.num_steps),
                       "reward_sum": float(r.sum()), "reward_sq_sum": float((r**2).sum())}

    def round_items(self, items: list[Transition], epoch: int, rnd: int) -> list[Transition]:
        """Group advantages over the whole round (every process holds all items here, in key order)."""
        samples: dict[tuple, Transition] = {}
        for it in items:
            samples.setdefault(it.key[:2], it)
        keys = sorted(samples)
        groups = [self.prompts[samples[k].prompt] for k in keys]
        adv = group_advantages(groups, [samples[k].reward for k in keys], self.cfg.global_std)
        by_key = dict(zip(keys, adv.tolist()))
        for it in items:
            it.advantage = by_key[it.key[:2]]
        distinct: dict[str, set] = {}
        for k, g in zip(keys, groups):
            distinct.setdefault(g, set()).add(samples[k].reward)
        n = max(len(keys), 1)
        self._round_adv = {"mean_abs_advantage": float(adv.abs().sum()) / n,
                           "zero_std_groups": float(sum(len(v) == 1 for v in distinct.values())),
                           "trained_transitions": float(len(items))}
        return items

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        n = max(rstats.get("samples", 0.0), 1.0)
        mean = rstats.get("reward_sum", 0.0) / n
        var = max(rstats.get("reward_sq_sum", 0.0) / n - mean**2, 0.0)
        keep = {k: rstats[k] for k in ("samples", "groups", "rollout_steps") if k in rstats}
        out = keep | {"reward_mean": mean, "reward_std": math.sqrt(var)}
        return super().round_summary({}, n_items, steps) | out | getattr(self, "_round_adv", {})

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        s = f"reward {info['reward_mean']:.3f}"
        if "mean_loss" in info:
            s += f" loss {info['mean_loss']:.2e} clipfrac {info['mean_clipfrac']:.2f}"
            if "mean_kl" in info:
                s += f" kl {info['mean_kl']:.2e}"
        return s

    # -- the loss ----------------------------------------------------------------------------------
    def loss(self, items: list[Transition], total: int):
        from spobench.engine.flow_sde import step_distribution

        dev = self.acc.device
        x_t = torch.stack([it.x_t for it in items]).to(dev)
        x_next = torch.stack([it.x_next for it in items]).to(dev)
        step = torch.tensor([it.step for it in items])
        t = self.sched.sigmas[step].to(dev)
        old = torch.tensor([it.old_log_prob for it in items], device=dev)
        adv = torch.tensor([it.advantage for it in items], device=dev)
        cond, uncond = self.encode([self.prompts[it.prompt] for it in items])
        with self.policy():  # the grad forward through the prepared (DDP) model
            dist = step_distribution(guided_velocity(self.bb, x_t, t, cond, uncond, self.cfg.guidance_scale),
                                     x_t, step, self.sched)
        lp = dist.log_prob(x_next, self.cfg.reduction)
        kl = None
        if self.cfg.beta > 0:
            with torch.no_grad(), self.bb.lora_disabled():
                ref = step_distribution(guided_velocity(self.bb, x_t, t, cond, uncond, self.cfg.guidance_scale),
                                        x_t, step, self.sched)
            kl = flow_grpo_kl(dist.mean, ref.mean, self.sched.noise_std(t.cpu()).to(dev))
        per, stats = flow_grpo_loss(lp, old, adv, kl, self.cfg.beta, self.cfg.clip_range, self.cfg.adv_clip_max)
        sums = {k: float(v.sum()) for k, v in stats.items()}
        sums["t"] = float(t.sum())
        return per.sum() / total, sums
