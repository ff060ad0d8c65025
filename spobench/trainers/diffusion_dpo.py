"""Diffusion-DPO (Wallace et al., CVPR 2024, "Diffusion Model Alignment Using Direct Preference
Optimization"): DPO on offline preference pairs (Pick-a-Pic format), the baseline of the SPO
paper's Tables 1-3 (the paper evaluates the released checkpoints; this trains the same objective).

Code <-> paper (Diffusion-DPO Sec. 4: DPO through the diffusion ELBO, whose final objective
compares the policy's and the reference's denoising errors on the winner and the loser) and
reference code (SalesforceAIResearch/DiffusionDPO, ``train.py``):

* **Data.** Pick-a-Pic-format parquet (a file or a folder of shards) read by
  :class:`spobench.data.pairs.PairTable` (images streamed by row group; its checks and error
  messages). Rows with ``has_label`` false are skipped; ties (0.5 / 0.5) are dropped as in the
  reference (``keep_ties = true`` keeps them, see below). The winner is put first, as the reference stacks (y_w, y_l).
* **Noising** (the objective's expectation). Winner and loser share ONE t and ONE noise eps, both from
  the backbone family (``Backbone.training_timestep`` / ``training_target``): DDPM t ~ U{0, ..., T-1},
  x^w_t and x^l_t from the scheduler's ``add_noise``; flow (``family = "flow"``, SD3 / tiny-flow) t drawn
  as SD3 is trained (logit-normal, the scheduler's shift; sd3.py) and x_t = (1 - t) x_0 + t eps.
  Images are resized (short side) and centre-cropped to the resolution by ``PairTable``, optionally flipped (``hflip``: each image
  independently with p = 0.5, the reference's ``RandomHorizontalFlip``), then encoded with the
  backbone's own ``encode_images`` (a VAE posterior sample, as the reference; the identity map to
  [-1, 1] on the pixel-space tiny backbones, both families); the caption is replaced by "" with
  probability ``caption_dropout`` (the reference's ``proportion_empty_prompts``, default 0.2), the
  same for both images.
* **The loss** (as the reference computes it; beta absorbs the paper's T * omega(lambda_t))::

      e_m^s = mean_{C,H,W} || target^s - model(x^s_t, t, c) ||^2       s in {w, l}, m in {theta, ref}
      z     = -0.5 * beta * [ (e_theta^w - e_ref^w) - (e_theta^l - e_ref^l) ]
      L     = -log sigmoid(z),          beta = 5000

  The reference model is the same UNet with its LoRA off (``backbone.lora_disabled()``), no grad.
  diffusers' port (``examples/research_projects/diffusion_dpo``) writes -log sigmoid(beta' (ref_diff
  - model_diff)) with beta' = 2500: the same loss (beta' = 0.5 beta). :func:`diffusion_dpo_loss`.
  The implicit accuracy is the fraction of pairs with z > 0, a pair with z = 0 counting 1/2 (the
  reference counts it 0), so that at step 0, where the policy IS the reference (LoRA B = 0), the
  loss is ln 2 and the accuracy 0.5 exactly.
* **Prediction type.** The target is what the backbone predicts: eps (SD), v = sqrt(a_t) eps -
  sqrt(1 - a_t) x_0 (the tiny backbone; ``scheduler.get_velocity``), or x_0 (``sample``). The
  reference asserts eps-prediction. On a flow backbone it is the velocity eps - x_0, so e_m^s =
  mean || (eps - x^s_0) - v_m(x^s_t, t, c) ||^2 and the same z and beta (the flow form of the paper's
  Eq. 14, eps-prediction replaced by the velocity target; cf. Flow-DPO, Liu et al. 2025,
  arXiv:2501.13918). beta is not rescaled: the velocity target's variance is 1 + Var(x_0) (x_0 in
  [-1, 1]) against eps's 1, so the MSE differences, and beta's meaning, stay of the same order.
* **One UNet call per model.** The winner and loser rows of a micro-batch go through the policy in
  ONE call (with grad) and through the reference in ONE call, as the reference concatenates them.
  No classifier-free guidance in training (the reference neither).
* **SDXL micro-conditioning.** ``add_time_ids`` = (original height, width, crop top, left, target
  height, width) from each image's real size and its centre crop (diffusers' SDXL DPO script; the
  Salesforce code uses (res, res, 0, 0, res, res) for every image).

Deviations from the reference, and why:

* **LoRA** instead of full fine-tuning: the shared trainer machinery (``spobench/trainers/base.py``) trains a
  LoRA (rank: the backbone default, 4 SD-1.5 / 64 SDXL), with AdamW for SDXL too (the reference uses
  Adafactor for SDXL).
* **Learning rate.** The reference uses lr 1e-8 with ``--scale_lr`` (x per-GPU batch 1 x
  accumulation 128 x 16 GPUs = 2048 pairs), i.e. 2.048e-5 at an effective batch of 2048, warm-up
  500 steps then constant, AdamW weight decay 1e-2, grad clip 1.0, 2000 steps. Defaults here: lr
  2.048e-5 (fixed, NOT rescaled with the batch), warm-up 500, weight decay 1e-2, 2048 pairs an
  optimizer step on one process (``train_batch_size`` 4 x ``grad_accum`` 512; effective batch =
  that x processes, so lower ``grad_accum`` on more processes). That lr was tuned for full
  fine-tuning; LoRA usually wants more, so treat it as the faithful starting point, not a tuned one.
  The tiny backbone defaults to lr 1e-4 and no warm-up.
* **Data order.** The base loop's round = ``rollout_batch`` pairs per process (the loop's round
  size, named for the online trainers; this offline trainer's round reads pairs, nothing is rolled
  out) in an epoch order that shuffles parquet row groups, then rows within them
  (``spobench.data.pairs.BatchOrder``: locality for lazily decoded shards); t, eps, flips and
  caption dropout come from generators derived from (seed, epoch, round, pair), so a resumed run
  is identical to an uninterrupted one. Processes read disjoint pairs and do not exchange them (no
  gather of latents); each deals its own shuffled share.
* **Ties** (``keep_ties = true``): a tie trains with the soft-label DPO loss -(p log sigmoid(z) +
  (1 - p) log sigmoid(-z)) with p = 0.5, which pulls z towards 0 (and is exactly -log sigmoid(z) for
  p = 1). The reference drops ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from spobench.core.catalog import register_trainer
from spobench.core.errors import InputError
from spobench.trainers import salts
from spobench.core.config import setting
from spobench.trainers.base import Trainer, TrainerConfig, derive_seed


@dataclass
class DiffusionDPOConfig(TrainerConfig):
    pairs: str | None = setting(None, "Pick-a-Pic-format pairs: a parquet file or a folder of *.parquet")
    max_pairs: int | None = setting(None, "use only the first N usable pairs", min=1)
    epochs: int = setting(5, "passes over the pairs (reference: 2000 steps x 2048 pairs ~ 5 passes over "
                             "Pick-a-Pic v2)", min=1, resumable=True)
    rollout_batch: int = setting(2048, "pairs per round per process (the loop's round size; nothing is "
                                       "rolled out: a round reads pairs)", min=1)
    train_batch_size: int = setting(4, "pairs per micro-batch per process", min=1)
    grad_accum: int = setting(512, "micro-batches per optimizer step (4 x 512 = the reference's 2048)", min=1)
    lr: float | None = setting(None, "AdamW learning rate (default: 2.048e-5 SD/SDXL = the reference's 1e-8 "
                                     "x 2048; tiny 1e-4)", gt=0, backbone=("dpo_lr", "lr"))
    lr_warmup_steps: int | None = setting(None, "linear LR warm-up (default: 500 SD/SDXL, 0 tiny)", min=0,
                                          backbone="dpo_warmup")
    weight_decay: float = setting(1e-2, "AdamW weight decay (reference: 1e-2)", min=0)
    beta: float = setting(5000.0, "DPO beta (reference: 5000; the loss scales it by 0.5)", gt=0)
    keep_ties: bool = setting(False, "train on tied pairs with the soft-label loss (reference: drop them)")
    caption_dropout: float = setting(0.2, "replace the caption by '' with this probability (reference: 0.2)",
                                     min=0, max=1)
    hflip: bool | None = setting(None, "random horizontal flips (default: on for SD/SDXL as the reference, "
                                       "off for tiny)", backbone="dpo_hflip")
    vae_batch: int = setting(16, "images decoded and VAE-encoded at a time (pairs x 2)", min=2)


def diffusion_dpo_loss(model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                       beta: float = 5000.0, p: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-pair loss and stats from per-sample MSEs (N,). ``p``: probability that the first image
    wins (1 for a decided pair, 0.5 for a tie); None means 1."""
    z = -0.5 * beta * ((model_w - ref_w.detach()) - (model_l - ref_l.detach()))
    if p is None:
        loss = -F.logsigmoid(z)
    else:
        p = p.to(z)
        loss = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    with torch.no_grad():
        stats = {"loss": loss.detach(), "margin": z.detach(),
                 "accuracy": torch.where(z > 0, 1.0, torch.where(z < 0, 0.0, 0.5)),
                 "model_mse": (model_w.detach() + model_l.detach()) / 2, "ref_mse": (ref_w + ref_l) / 2,
                 "mse_gain_w": model_w.detach() - ref_w, "mse_gain_l": model_l.detach() - ref_l}
    return loss, stats


def crop_geometry(width: int, height: int, resolution: int, flipped: bool = False) -> tuple[int, int, int, int]:
    """(original height, original width, crop top, crop left) of ``PairTable.image``'s short-side
    resize + centre crop, as SDXL's micro-conditioning wants them (diffusers' SDXL training scripts:
    a flip mirrors the left crop coordinate)."""
    from spobench.data.pairs import crop_box

    nw, _, left, top = crop_box(width, height, resolution)
    if flipped:
        left = nw - left - resolution
    return height, width, top, left


@dataclass
class DPOItem:
    """One preference pair, ready for the loss: both latents, the shared t and noise."""

    key: tuple  # (pair index,)
    caption: str  # "" when dropped
    x0: torch.Tensor  # (2, C, H, W) winner, loser latents; CPU
    noise: torch.Tensor  # (C, H, W)
    t: int | float  # a DDPM timestep index, or t in (0, 1) on a flow backbone
    p: float  # probability that x0[0] wins: 1, or 0.5 for a kept tie
    time_ids: torch.Tensor | None = None  # (2, 6) SDXL micro-conditioning of winner, loser


@register_trainer("diffusion-dpo")
class DiffusionDPOTrainer(Trainer):
    """Diffusion-DPO on offline Pick-a-Pic-format pairs."""

    name: ClassVar[str] = "diffusion-dpo"
    Config: ClassVar[type[TrainerConfig]] = DiffusionDPOConfig

    cfg: DiffusionDPOConfig

    def __init__(self, config, backbone, out, *, pairs=None, **kwargs):
        from spobench.data.pairs import PairTable

        if pairs is None and config.pairs is None:
            raise InputError("setting 'pairs' is required: a Pick-a-Pic-format parquet file or folder "
                             "(e.g. --set pairs=data/pickapic_v2)")
        self.pairs = pairs if pairs is not None else PairTable(config.pairs)
        self.rows, self.data_counts = self.pairs.usable(config.keep_ties, config.max_pairs)
        if not self.rows:
            c = self.data_counts
            raise InputError(f"{self.pairs.path}: no pairs to train on ({c['rows']} rows: {c['unlabeled']} "
                             f"unlabeled, {c['ties']} ties{'' if config.keep_ties else ' dropped'})")
        kwargs.pop("prompts", None)
        super().__init__(config, backbone, out, prompts=[self.pairs.captions[r] for r in self.rows], **kwargs)

    @classmethod
    def prepare_config(cls, cfg, backbone, defaults):
        if cfg.pairs is None:
            raise InputError("setting 'pairs' is required: a Pick-a-Pic-format parquet file or folder "
                             "(e.g. --set pairs=data/pickapic_v2; tiny: `spobench toy data`)")
        if cfg.prompts is not None or cfg.prompt_limit is not None:
            raise InputError("diffusion-dpo trains on the captions of 'pairs'; 'prompts' and 'prompt_limit' "
                             "are not used (use max_pairs to train on fewer pairs)")
        return cfg.resolve(defaults)

    def setup(self) -> None:
        from spobench.data.pairs import BatchOrder

        self._order = BatchOrder(self.pairs, self.rows, len(self.rows),
                                 derive_seed(self.cfg.seed, salts.EPOCH_ORDER))
        self._index = {r: i for i, r in enumerate(self.rows)}
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        if self.is_main and self.console is not None:
            self.console.print(self.pairs.describe(self.data_counts, self.cfg.keep_ties))

    # -- data --------------------------------------------------------------------------------------
    def round_prompts(self, epoch: int, rnd: int) -> list[int]:
        """This process's pairs of a round: contiguous slices of an epoch order that keeps row groups
        together (``BatchOrder``), indices into ``self.rows``."""
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, [self._index[r] for r in self._order.batch(epoch)])
        order = self._epoch_order[1]
        per, P = self.cfg.rollout_batch, self.acc.num_processes
        glob = order[rnd * per * P:(rnd + 1) * per * P]
        return glob[self.acc.process_index * per:(self.acc.process_index + 1) * per]

    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list[DPOItem], dict]:
        """Decode, orient (winner first), augment and VAE-encode this process's pairs, ``vae_batch``
        images at a time (only latents are kept); draw each pair's t and noise. Everything random
        comes from (seed, epoch, round, pair); the VAE posterior samples from (seed, epoch, round)."""
        c = self.cfg
        g_vae = torch.Generator(device=self.acc.device).manual_seed(
            derive_seed(c.seed, epoch, rnd, prompt_indices[0], salts.DPO_VAE))
        chunk = max(1, c.vae_batch // 2)
        items: list[DPOItem] = []
        for s in range(0, len(prompt_indices), chunk):
            items += self.prepare_pairs(epoch, rnd, prompt_indices[s:s + chunk], g_vae)
        stats = {"pairs": float(len(items)), "ties": float(sum(it.p < 1 for it in items)),
                 "dropped_captions": float(sum(it.caption == "" for it in items))}
        return items, stats

    def prepare_pairs(self, epoch: int, rnd: int, indices: list[int], g_vae: torch.Generator) -> list[DPOItem]:
        c, bb = self.cfg, self.bb
        res = c.resolution
        rows = [self.rows[i] for i in indices]
        first, second = self.pairs.images(rows, res)
        sdxl = callable(getattr(bb, "time_ids", None))
        shape = bb.latent_shape(res)
        imgs, meta = [], []
        for n, (i, row) in enumerate(zip(indices, rows)):
            g = torch.Generator().manual_seed(derive_seed(c.seed, epoch, rnd, i, salts.DPO_PAIR))
            flips = (torch.rand(2, generator=g) < 0.5).tolist() if c.hflip else [False, False]
            drop = bool(torch.rand(1, generator=g) < c.caption_dropout)
            t = bb.training_timestep(g)
            noise = torch.randn(shape, generator=g)
            l0, l1 = (float(v) for v in self.pairs.labels[row])
            order = (0, 1) if l0 >= l1 else (1, 0)  # winner first; a kept tie keeps the file's order
            pair, cols = (first[n], second[n]), ("jpg_0", "jpg_1")
            tids = []
            for side, src in enumerate(order):
                imgs.append(pair[src].flip(-1) if flips[side] else pair[src])
                if sdxl:
                    w, h = self.pairs.image_size(row, cols[src])
                    tids.append([*crop_geometry(w, h, res, flips[side]), res, res])
            meta.append((i, "" if drop else self.pairs.captions[row], noise, t, max(l0, l1),
                         torch.tensor(tids, dtype=torch.float32) if sdxl else None))
        with torch.no_grad():
            lat = bb.encode_images(torch.stack(imgs).to(self.acc.device), generator=g_vae).float().cpu()
        return [DPOItem(key=(i,), caption=cap, x0=lat[2 * n:2 * n + 2], noise=noise, t=t, p=p, time_ids=tid)
                for n, (i, cap, noise, t, p, tid) in enumerate(meta)]

    def share(self, items: list, epoch: int, rnd: int) -> tuple[list, int]:
        """Each process trains on the pairs it read (no exchange of latents): its items shuffled,
        cut to the smallest count of any process (equal numbers of steps everywhere)."""
        P = self.acc.num_processes
        n, total = len(items), len(items)
        if P > 1:
            from accelerate.utils import gather

            counts = gather(torch.tensor([n], device=self.acc.device)).cpu()
            n, total = int(counts.min()), int(counts.sum())
        items = sorted(items, key=self.item_key)
        seed = derive_seed(self.cfg.seed, epoch, rnd, salts.SHARE, self.acc.process_index)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(items), generator=g)[:n].tolist()
        return [items[i] for i in perm], total

    # -- the loss ------------------------------------------------------------------------------------
    def targets(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, the model's regression target): the backbone family's own (``Backbone.training_target``)."""
        return self.bb.training_target(x0, noise, t)

    def conditioning(self, items: list[DPOItem]):
        """Text conditioning of the 2N rows (winners, then losers)."""
        from spobench.models.backbones.base import Conditioning

        with torch.no_grad():
            cond = self.bb.encode_prompts([it.caption for it in items], self.cfg.resolution)
        cond = Conditioning.cat([cond, cond])
        if items[0].time_ids is not None:
            tid = torch.cat([torch.stack([it.time_ids[s] for it in items]) for s in (0, 1)])
            cond = Conditioning(cond.hidden, cond.pooled, tid.to(cond.hidden.device, cond.hidden.dtype))
        return cond

    def mse(self, items: list[DPOItem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample MSE (2N,) [winners; losers] of the policy (with grad) and the reference."""
        dev = self.acc.device
        x0 = torch.cat([torch.stack([it.x0[s] for it in items]) for s in (0, 1)]).to(dev)
        noise = torch.stack([it.noise for it in items]).to(dev).repeat(2, 1, 1, 1)
        t = torch.tensor([it.t for it in items], device=dev).repeat(2)
        x_t, target = self.targets(x0, noise, t)
        cond = self.conditioning(items)
        with torch.no_grad(), self.bb.lora_disabled():
            ref = self.bb.predict(x_t, t, cond)  # ONE reference call, winners and losers
        with self.policy():
            pred = self.bb.predict(x_t, t, cond)  # ONE policy call, with grad
        dims = tuple(range(1, x0.ndim))
        return ((pred.float() - target.float()) ** 2).mean(dim=dims), ((ref.float() - target.float()) ** 2).mean(dim=dims)

    def loss(self, items: list[DPOItem], total: int):
        n = len(items)
        model, ref = self.mse(items)
        p = torch.tensor([it.p for it in items], device=model.device)
        per, stats = diffusion_dpo_loss(model[:n], model[n:], ref[:n], ref[n:], self.cfg.beta, p)
        sums = {k: float(v.sum()) for k, v in stats.items()}
        sums["timestep"] = float(sum(it.t for it in items))
        return per.sum() / total, sums

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        out = {k: rstats.get(k, 0.0) for k in ("pairs", "ties", "dropped_captions")}
        return super().round_summary({}, n_items, steps) | out

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        s = f"pairs {int(info['pairs'])}"
        if "mean_loss" in info:
            s += f" loss {info['mean_loss']:.4f} acc {info['mean_accuracy']:.2f}"
        return s
