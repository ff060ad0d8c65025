"""One SPO round: spobench's trainer vs the official loop's cost structure, same components, one process.

Run (about 2-4 minutes on 2 busy cores)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_spo_round.py --prompts 20 --b 10 --k 4

or, as a quick correctness check without timings (counts and identical math on a small round)::

    OMP_NUM_THREADS=1 .venv/bin/pytest benchmarks/bench_spo_round.py

Both sides use the same tiny backbone (the shipped ``tiny-base``, or ``TinyBackbone.build(0)`` with
``--random-base``, or with ``--components sd15`` tiny random SD-1.5-shaped components with a VAE:
``make_sd15_folder``'s UNet, AutoencoderKL and CLIP text encoder, 16 px images / 8x8x4 latents), the same LoRA (rank 4, B perturbed so that policy != reference), the same tiny
random-init step-aware preference model (``spobench toy clip`` sizes: hidden 64, 3 layers, patch 4)
and the same prompts (``tiny-train``). Settings: 20 DDIM steps, eta 1, CFG 5, k candidates,
kappa 750, threshold -1 (every pair is kept), train batch 10, AdamW, gradients clipped at 1.

**spobench** (``SPOTrainer``, with ``merge_lora=true`` unless ``--no-merge-lora``): ``collect`` (``spo_pools.pool_rollout`` + ``make_pool_scorer`` + the
SPM with its text cache), ``share`` and ``train_items`` (one policy + one reference forward per
pair, LoRA switched off for the reference), exactly what ``Trainer.train`` runs per round minus
logging and checkpoints.

**official** (re-implemented here, following RockeyCoss/SPO ``multi_sample_pipeline.py``,
``train_spo.py`` and ``step_aware_preference_model.get_preference_score``):

* rollout: every step one CFG UNet call over all current latents (B rows until the first pooled
  step, then the B*k candidates, each with its own prediction; the k new candidates are drawn around
  the chosen candidate's mean, as ``ddim_step_fetch_x_t_1`` does) -> 2*(5 + 15k) rows per prompt;
* scoring: every pooled step decodes all B*k x0_hat and runs the SPM on B*k images AND B*k texts
  (``get_preference_score`` recomputes ``get_text_features`` on every call, on ids padded to 77);
* training: per micro-batch FOUR CFG forwards (policy and reference for winner and loser, on the
  same x_t), reference = a deep copy of the UNet taken before the LoRA was added; loss in the
  official exp-clamp-log form. Gradient clipping is applied for real (the official code's is a
  no-op: it passes an exhausted ``filter`` iterator) so that both sides compute the same update.

``--official-split per-candidate`` additionally splits the rollout's UNet, decode and SPM calls
into k calls of B rows (one per candidate): the same rows in k times more calls, a pessimistic
variant of the official structure (the official code batches the k candidates in one call).

Both rollouts draw their noise from the same per-prompt generators in the same order, so they give
the same pools and pairs (checked), and both trainings visit the pairs in the same order, so they end
with the same LoRA up to float noise (checked, reported). Before the rounds the same micro-batch of
pairs is fed to both loss paths; loss and gradients must agree (asserted).

Results: ``benchmarks/results/spo_round.json``. Only ratios measured within one run mean anything
(the machine is shared); nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spobench.core.counters import Counters
from spobench.engine.ddim import predict_x0, step_distribution
from spobench.engine.rollout import randn
from spobench.trainers.spo import PairItem, SPOTrainer
from spobench.trainers.spo_pools import randint

RESULTS = Path(__file__).resolve().parent / "results" / "spo_round.json"


# =================================================================================================
# setup: the shared components
# =================================================================================================
@dataclass
class Setup:
    tr: SPOTrainer
    spm: object
    ref_unet: torch.nn.Module  # the official reference: a deep copy taken before the LoRA
    tmp: tempfile.TemporaryDirectory
    info: dict = field(default_factory=dict)

    @property
    def bb(self):
        return self.tr.bb


COMPONENTS = ("tiny-base", "sd15")


def build(n_prompts: int, b: int, k: int, *, num_steps: int = 20, kappa: int = 750, train_batch: int = 10,
          compile: bool = False, components: str = "tiny-base", resolution: int = 16, merge_lora: bool = True,
          random_base: bool = False, lora_perturb: float = 0.1, seed: int = 0) -> Setup:
    """``components``: "tiny-base" (the pixel-space tiny backbone, no VAE) or "sd15" (tiny random
    SD-1.5-shaped components with a VAE: ``make_sd15_folder``'s UNet2DConditionModel (16/32 wide, 4
    latent channels), 2-block AutoencoderKL (x2 down) and CLIP text encoder, loaded by ``SD15Backbone.load``;
    ``resolution`` px images -> resolution/2 latents)."""
    from spobench.models.backbones.tiny import PRETRAINED_DIR, TinyBackbone, tiny_tokenizer
    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder
    from spobench.data.prompts import load_prompts

    torch.manual_seed(seed)
    tmp = tempfile.TemporaryDirectory(prefix="bench_spo_round_")
    use_shipped = not random_base and PRETRAINED_DIR.is_dir()
    if components == "sd15":
        from spobench.models.backbones.sd import SD15Backbone
        from spobench.models.backbones.testing import make_sd15_folder

        bb = SD15Backbone.load(make_sd15_folder(Path(tmp.name) / "sd15", seed=seed))
        name = f"make_sd15_folder(seed={seed}), {resolution} px, latents {bb.latent_shape(resolution)}"
    else:
        bb = TinyBackbone.load() if use_shipped else TinyBackbone.build(0)
        name = "tiny-base (shipped)" if use_shipped else "TinyBackbone.build(0)"
    ref_unet = copy.deepcopy(bb.unet).eval().requires_grad_(False)  # official: copy.deepcopy(unet) before LoRA

    clip_dir = make_tiny_clip_folder(Path(tmp.name) / "clip", seed=seed, image_size=32, patch_size=4, hidden=64,
                                     layers=3, heads=4, projection_dim=32,
                                     tokenizer=tiny_tokenizer(model_max_length=77))  # = `spobench toy clip`
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # a "trained" SPM: time conditioning that actually changes the score
        for p in spm.time_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    spm.counters = bb.counters  # the SPM charges its image/text passes to the backbone's counters

    prompts = load_prompts("tiny-train", n_prompts)
    cfg = SPOTrainer.Config.load(None, [
        "prompts=unused", f"k={k}", f"kappa={kappa}", f"num_steps={num_steps}", "eta=1.0", "guidance_scale=5.0",
        f"rollout_batch={b}", f"train_batch_size={train_batch}", "epochs=1", "threshold=0.0", f"seed={seed}",
        f"compile={str(compile).lower()}", f"merge_lora={str(merge_lora).lower()}", *([f"resolution={resolution}"] if components == "sd15" else []),
    ]).resolve(bb.defaults)
    cfg.threshold = -1.0  # keep every pair (the config's range check stops at 0; p_w - p_l >= 0 anyway)
    tr = SPOTrainer(cfg, bb, Path(tmp.name) / "run", prompts=prompts, step_scorer=spm)
    with torch.no_grad():  # LoRA B starts at 0 (policy == reference): give it weight
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * lora_perturb)
    info = {"backbone": name, "components": components,
            "vae_params": 0 if bb.pixel_space else sum(p.numel() for p in bb.vae.parameters()),
            "unet_params": sum(p.numel() for p in ref_unet.parameters()),
            "spm_params": sum(p.numel() for p in spm.parameters()),
            "lora_params": sum(p.numel() for p in tr.params)}
    if compile:  # which forwards compile=true compiled (trainers/base.py: compile_grad_forwards)
        from spobench.trainers.base import compile_grad_forwards

        info["compiled_forwards"] = "all" if compile_grad_forwards(bb.name, tr.acc.device) else "no-grad only"
    return Setup(tr=tr, spm=spm, ref_unet=ref_unet, tmp=tmp, info=info)


# -- state snapshots (both sides start every round from the same LoRA and optimizer state) ---------
def snapshot(tr) -> dict:
    return {"params": [p.detach().clone() for p in tr.params],
            "opt": copy.deepcopy(tr.optimizer.state_dict())}


def restore(tr, snap: dict) -> None:
    with torch.no_grad():
        for p, v in zip(tr.params, snap["params"]):
            p.copy_(v)
    tr.optimizer.load_state_dict(copy.deepcopy(snap["opt"]))
    tr.optimizer.zero_grad(set_to_none=True)


def lora_diff(a: dict, b: dict, start: dict) -> dict:
    diff = math.sqrt(sum(float((x - y).double().pow(2).sum()) for x, y in zip(a["params"], b["params"])))
    upd = math.sqrt(sum(float((x - s).double().pow(2).sum()) for x, s in zip(a["params"], start["params"])))
    mx = max(float((x - y).abs().max()) for x, y in zip(a["params"], b["params"]))
    return {"l2_diff": diff, "l2_update": upd, "rel_diff": diff / max(upd, 1e-30), "max_abs_diff": mx}


# =================================================================================================
# (a) spobench's round, through the trainer
# =================================================================================================
def spobench_round(S: Setup, epoch: int, rnd: int) -> tuple[dict, list]:
    tr = S.tr
    c = tr.bb.counters
    c.reset()
    S.spm.clear_text_cache()  # charge each round its prompts' text passes (later epochs would hit the cache)
    idx = tr.round_prompts(epoch, rnd)
    t0 = time.perf_counter()
    items, _ = tr.collect(epoch, rnd, idx)
    t1 = time.perf_counter()
    sampling = c.as_dict()
    c.reset()
    t2 = time.perf_counter()
    mine, _ = tr.share(items, epoch, rnd)
    steps = tr.train_items(mine)
    t3 = time.perf_counter()
    training = c.as_dict()
    return _figures(sampling, training, t1 - t0, t3 - t2, len(items), len(idx),
                    mean_loss=sum(s["loss"] for s in steps) / max(len(steps), 1)), items


def _figures(sampling: dict, training: dict, sample_s: float, train_s: float, pairs: int, prompts: int,
             **extra) -> dict:
    keys = ("unet_rows_grad", "unet_rows_nograd", "unet_calls", "vae_decodes", "reward_image_passes",
            "reward_text_passes")
    return {"prompts": prompts, "pairs": pairs,
            "sampling": {k: int(sampling[k]) for k in keys}, "training": {k: int(training[k]) for k in keys},
            "sample_s": round(sample_s, 3), "train_s": round(train_s, 3), "round_s": round(sample_s + train_s, 3),
            **extra}


# =================================================================================================
# (b) the official loop's cost structure, same components, counted by wrapping
# =================================================================================================
class CountedUNet(torch.nn.Module):
    """``unet(x, t, encoder_hidden_states)`` as the official code calls it, counting rows/calls; a row
    counts as 'with grad' when the output carries a graph (the official reference runs with grad
    enabled but builds none: its weights are frozen)."""

    def __init__(self, unet, counters: Counters):
        super().__init__()
        self.unet, self.counters = unet, counters

    def forward(self, x, t, encoder_hidden_states):
        # _call_impl: the module's eager call, also when spobench's --compile compiled the shared UNet in
        # place (the official loop does not compile)
        out = self.unet._call_impl(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        self.counters.add_unet(x.shape[0], out.requires_grad)
        return out


class Official:
    """SPO's official sampling + training loop structure on spobench's components."""

    def __init__(self, S: Setup, split: str = "official"):
        self.S, self.tr, self.bb, self.spm = S, S.tr, S.bb, S.spm
        self.cfg = S.tr.cfg
        self.counters = Counters()
        self.policy = CountedUNet(self.bb.unet, self.counters)  # the LoRA UNet, adapters on
        self.ref = CountedUNet(S.ref_unet, self.counters)
        self.sched = S.tr.engine.sched
        self.split = split  # "official": one call per step over B*k rows; "per-candidate": k calls of B rows
        with torch.no_grad():
            self.neg = self.bb.encode_unconditional(1).hidden  # the "" prompt embedding, computed once

    # -- pieces -------------------------------------------------------------------------------------
    def cfg_pred(self, model, x, t, emb):
        n = x.shape[0]
        tt = torch.as_tensor(t).expand(n) if torch.as_tensor(t).ndim == 0 else torch.as_tensor(t)
        e = torch.cat([self.neg.expand(n, -1, -1), emb])
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), e)
        u, c = out.chunk(2)
        return u + self.cfg.guidance_scale * (c - u)

    def decode(self, latents):
        self.counters.vae_decodes += latents.shape[0]
        if self.bb.pixel_space:
            return (latents.float() / 2 + 0.5).clamp(0, 1)  # the tiny backbone is pixel space (bb.decode's math)
        vae = self.bb.vae  # the official pipeline: vae.decode(latents / scaling_factor), then (x / 2 + 0.5).clamp
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def preference_score(self, images, input_ids, t):
        """``get_preference_score``: image features at t AND text features, recomputed every call."""
        n = images.shape[0]
        img = self.spm.image_embeddings(images, t)
        self.counters.reward_image_passes += n
        out = self.spm.clip.get_text_features(input_ids=input_ids)
        txt = out if isinstance(out, torch.Tensor) else out.pooler_output
        self.counters.reward_text_passes += n
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.spm.clip.logit_scale.exp() * (img * txt).sum(-1)

    def _chunks(self, B: int, k: int):
        """Row ranges of the B*k (B-major) candidate rows per call."""
        if self.split == "per-candidate":
            return [torch.arange(B) * k + j for j in range(k)]
        return [torch.arange(B * k)]

    def cand_pred(self, flat, t, emb_k, B, k):
        outs = torch.empty_like(flat)
        for rows in self._chunks(B, k):
            outs[rows] = self.cfg_pred(self.policy, flat[rows], t, emb_k[rows])
        return outs

    def score(self, x0, t, ids_k, B, k):
        scores = torch.empty(x0.shape[0])
        for rows in self._chunks(B, k):
            images = self.decode(x0[rows])
            scores[rows] = self.preference_score(images, ids_k[rows], t).float()
        return scores

    @staticmethod
    def compare(scores, threshold):
        """``preference_score_compare``: scores (k, b) -> (2, b) indices, valid mask."""
        s, idx = torch.sort(scores, dim=0, descending=True)
        idx, s = idx[[0, -1], :], s[[0, -1], :].softmax(dim=0)
        return idx, s[0] - s[1] > threshold

    # -- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompt_indices: list[int], generators) -> list[PairItem]:
        tr, bb, k = self.tr, self.bb, self.cfg.k
        prompts = [tr.prompts[i] for i in prompt_indices]
        B = len(prompts)
        emb = bb.encode_prompts(prompts).hidden
        emb_k = emb.repeat_interleave(k, 0)
        ids = self.spm.tokenizer(prompts, padding="max_length", max_length=self.spm.max_length, truncation=True,
                                 return_tensors="pt").input_ids  # tokenised once (the dataset's collate_fn)
        ids_k = ids.repeat_interleave(k, 0)
        pool = tr.pool_config()
        ts = [int(t) for t in tr.engine.timesteps()]
        eta = self.cfg.eta
        x = randn(bb.latent_shape(self.cfg.resolution), generators)
        rows = torch.arange(B)
        items: list[PairItem] = []
        cand = current = None
        last_t, n_pool = None, 0

        def record(scores, cand, current, t_x):
            nonlocal n_pool
            idx, valid = self.compare(scores.reshape(B, k).T, self.cfg.threshold)
            for b in valid.nonzero().flatten().tolist():
                w, l_ = int(idx[0, b]), int(idx[1, b])
                items.append(PairItem(key=(prompt_indices[b], n_pool, 0), prompt=prompt_indices[b], t=t_x,
                                      x_t=current[b].clone(), x_w=cand[b, w].clone(), x_l=cand[b, l_].clone()))
            n_pool += 1

        for t in ts:
            if cand is None and not pool.is_pooled(t, tr.engine.sched.step_ratio):  # plain DDIM while t > kappa
                out = self.cfg_pred(self.policy, x, t, emb)
                x = step_distribution(out, x, t, self.sched, eta).sample(randn(x.shape[1:], generators))
                continue
            if cand is None:  # the first pooled step: one prediction on the shared x_t
                current = x
                dist = step_distribution(self.cfg_pred(self.policy, x, t, emb), x, t, self.sched, eta)
            else:  # every candidate's own prediction: its x0_hat to score, the chosen one's step to take
                flat = cand.flatten(0, 1)
                out = self.cand_pred(flat, t, emb_k, B, k)
                scores = self.score(predict_x0(out, flat, t, self.sched), t, ids_k, B, k)
                record(scores, cand, current, last_t)
                chosen = randint(k, generators)
                current = cand[rows, chosen]
                dist = step_distribution(out.unflatten(0, (B, k))[rows, chosen], current, t, self.sched, eta)
            z = randn((k, *x.shape[1:]), generators)
            cand = dist.mean.unsqueeze(1) + dist.std.unsqueeze(1) * z  # ddim_step_fetch_x_t_1
            last_t = t
        scores = self.score(cand.flatten(0, 1), 0, ids_k, B, k)  # the last candidates are x_0: score at t=0
        record(scores, cand, current, last_t)
        return items

    # -- training -----------------------------------------------------------------------------------
    def loss(self, items: list[PairItem]) -> torch.Tensor:
        """The official micro-batch loss: four CFG forwards on the same x_t (winner/loser x policy/ref)."""
        x_t = torch.stack([it.x_t for it in items])
        x_w = torch.stack([it.x_w for it in items])
        x_l = torch.stack([it.x_l for it in items])
        t = torch.tensor([it.t for it in items])
        with torch.no_grad():
            emb = self.bb.encode_prompts([self.tr.prompts[it.prompt] for it in items]).hidden
        eta, red = self.cfg.eta, self.cfg.reduction
        sample_0 = {"latents": x_t, "next": x_w}
        sample_1 = {"latents": x_t, "next": x_l}  # value.shape[1] == 1 -> the same x_t for both
        noise_pred_0 = self.cfg_pred(self.policy, sample_0["latents"], t, emb)
        noise_ref_pred_0 = self.cfg_pred(self.ref, sample_0["latents"], t, emb)
        noise_pred_1 = self.cfg_pred(self.policy, sample_1["latents"], t, emb)
        noise_ref_pred_1 = self.cfg_pred(self.ref, sample_1["latents"], t, emb)
        lp0 = step_distribution(noise_pred_0, x_t, t, self.sched, eta).log_prob(x_w, red)
        rp0 = step_distribution(noise_ref_pred_0, x_t, t, self.sched, eta).log_prob(x_w, red)
        lp1 = step_distribution(noise_pred_1, x_t, t, self.sched, eta).log_prob(x_l, red)
        rp1 = step_distribution(noise_ref_pred_1, x_t, t, self.sched, eta).log_prob(x_l, red)
        eps, beta = self.cfg.clamp_eps, self.cfg.beta
        ratio_0 = torch.clamp(torch.exp(lp0 - rp0), 1 - eps, 1 + eps)
        ratio_1 = torch.clamp(torch.exp(lp1 - rp1), 1 - eps, 1 + eps)
        return -torch.log(torch.sigmoid(beta * torch.log(ratio_0) - beta * torch.log(ratio_1))).mean()

    def train(self, items: list[PairItem]) -> list[float]:
        bs, opt, params = self.cfg.train_batch_size, self.tr.optimizer, self.tr.params
        losses = []
        for s in range(0, len(items), bs):
            loss = self.loss(items[s:s + bs])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)  # a real clip (see docstring)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    def round(self, epoch: int, rnd: int) -> tuple[dict, list]:
        tr, c = self.tr, self.counters
        c.reset()
        idx = tr.round_prompts(epoch, rnd)
        t0 = time.perf_counter()
        items = self.rollout(idx, tr.generators(epoch, rnd, idx))
        t1 = time.perf_counter()
        sampling = c.as_dict()
        c.reset()
        t2 = time.perf_counter()
        mine, _ = tr.share(items, epoch, rnd)  # the same shuffle (the official code: a randperm)
        losses = self.train(mine)
        t3 = time.perf_counter()
        training = c.as_dict()
        return _figures(sampling, training, t1 - t0, t3 - t2, len(items), len(idx),
                        mean_loss=sum(losses) / max(len(losses), 1)), items


# =================================================================================================
# checks
# =================================================================================================
def same_pairs(a: list[PairItem], b: list[PairItem]) -> dict:
    """Do both rollouts give the same pairs? (same noise draws -> same pools, up to float noise)."""
    ka, kb = {it.key: it for it in a}, {it.key: it for it in b}
    common = sorted(set(ka) & set(kb))
    diff = 0.0
    same = 0
    for key in common:
        x, y = ka[key], kb[key]
        d = max(float((x.x_t - y.x_t).abs().max()), float((x.x_w - y.x_w).abs().max()),
                float((x.x_l - y.x_l).abs().max()))
        diff = max(diff, d)
        same += int(d < 1e-4 and x.t == y.t)
    return {"pairs_a": len(a), "pairs_b": len(b), "same_pairs": same, "max_abs_diff": diff}


def loss_check(S: Setup, official: Official, items: list[PairItem]) -> dict:
    """The same pairs through both loss paths: loss and LoRA gradient must agree."""
    tr = S.tr
    tr.optimizer.zero_grad(set_to_none=True)
    ours, _ = tr.loss(items, len(items))
    g_ours = torch.autograd.grad(ours, tr.params)
    off = official.loss(items)
    g_off = torch.autograd.grad(off, tr.params)
    gdiff = max(float((a - b).abs().max()) for a, b in zip(g_ours, g_off))
    gnorm = math.sqrt(sum(float(a.double().pow(2).sum()) for a in g_ours))
    grel = math.sqrt(sum(float((a - b).double().pow(2).sum()) for a, b in zip(g_ours, g_off))) / max(gnorm, 1e-30)
    ok_grad = all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_ours, g_off))
    ours, off = ours.detach(), off.detach()
    res = {"pairs": len(items), "loss_spobench": float(ours), "loss_official": float(off),
           "loss_abs_diff": abs(float(ours) - float(off)), "grad_max_abs_diff": gdiff, "grad_rel_l2_diff": grel,
           "grad_norm": gnorm, "ok": bool(abs(float(ours) - float(off)) < 1e-6 and ok_grad)}
    return res


def expected_counts(b: int, k: int, pairs: int, n_pooled: int, n_plain: int) -> dict:
    """The official loop's counts per round (issue 4: per prompt 2*(5+15k) rollout rows, 16k decodes,
    16k SPM image and 16k text passes; 4 training forwards per pair) and spobench's."""
    rows = 2 * (n_plain + 1 + (n_pooled - 1) * k)
    return {"rollout_unet_rows": b * rows, "decodes": b * n_pooled * k, "spm_image": b * n_pooled * k,
            "spm_text_official": b * n_pooled * k, "spm_text_spobench_max": b,
            "train_rows_grad_official": 4 * pairs, "train_rows_nograd_official": 4 * pairs,
            "train_rows_grad_spobench": 2 * pairs, "train_rows_nograd_spobench": 2 * pairs}


# =================================================================================================
# the benchmark
# =================================================================================================
def run(args) -> dict:
    up0 = _uptime()
    print(f"uptime at the start: {up0}")
    S = build(args.prompts, args.b, args.k, num_steps=args.steps, train_batch=args.train_batch,
              random_base=args.random_base, compile=args.compile, components=args.components,
              resolution=args.resolution, merge_lora=args.merge_lora)
    S.info["uptime_start"] = up0
    tr = S.tr
    official = Official(S, args.official_split)
    pool = tr.pool_config()
    ts = [int(t) for t in tr.engine.timesteps()]
    n_pooled = sum(pool.is_pooled(t, tr.engine.sched.step_ratio) for t in ts)
    n_plain = len(ts) - n_pooled
    R = tr.rounds_per_epoch()
    start = snapshot(tr)

    # warm-up (timed apart from the rounds; with --compile it holds the compilation): one prompt through
    # both rollouts and both losses, then round 0's rollout shapes and loss path once more
    t_warm = time.perf_counter()
    w_items, _ = tr.collect(99, 0, [0])
    official.rollout([0], tr.generators(99, 0, [0]))
    check = loss_check(S, official, w_items[:args.train_batch])
    restore(tr, start)

    # identical math on the same pairs (round 0's first micro-batch of shuffled pairs, from the start state)
    items0, _ = tr.collect(0, 0, tr.round_prompts(0, 0))
    mine0, _ = tr.share(items0, 0, 0)
    check = loss_check(S, official, mine0[:tr.cfg.train_batch_size])
    restore(tr, start)
    warmup_s = round(time.perf_counter() - t_warm, 2)
    print(f"warm-up (untimed in the rounds{'; includes torch.compile' if args.compile else ''}): {warmup_s:.1f} s")
    print(f"same pairs, both loss paths: loss {check['loss_spobench']:.9f} (spobench) vs "
          f"{check['loss_official']:.9f} (official), |diff| {check['loss_abs_diff']:.2e}; "
          f"LoRA grad max |diff| {check['grad_max_abs_diff']:.2e} (relative L2 {check['grad_rel_l2_diff']:.2e})")
    assert check["ok"], f"the two loss paths disagree: {check}"

    rounds = []
    for r in range(args.rounds if args.rounds else R):
        epoch, rnd = divmod(r, R)
        s0 = snapshot(tr)
        runs: dict[str, list] = {"spobench": [], "official": []}
        orders = []
        for rep in range(args.repeats):  # every repeat starts from the same state; the order alternates
            order = ("spobench", "official") if (r + rep) % 2 == 0 else ("official", "spobench")
            orders.append(list(order))
            items, ends = {}, {}
            for side in order:
                restore(tr, s0)
                fig, items[side] = spobench_round(S, epoch, rnd) if side == "spobench" else official.round(epoch, rnd)
                runs[side].append(fig)
                ends[side] = snapshot(tr)
        restore(tr, ends["spobench"])  # continue from spobench's result
        res = {side: _summarise(runs[side]) for side in runs}
        pairs = same_pairs(items["spobench"], items["official"])
        lora = lora_diff(ends["spobench"], ends["official"], s0)
        ratio = {f"{k}_{stat}": round(res["official"][k][stat] / max(res["spobench"][k][stat], 1e-9), 3)
                 for k in ("sample_s", "train_s", "round_s") for stat in ("median", "min")}
        rounds.append({"epoch": epoch, "round": rnd, "orders": orders, **res, "same_pairs": pairs,
                       "final_lora": lora, "ratio_official_over_spobench": ratio,
                       "expected": expected_counts(res["spobench"]["prompts"], args.k, res["spobench"]["pairs"],
                                                   n_pooled, n_plain)})
        _print_round(rounds[-1])

    def tot(side, key, stat):
        return sum(r[side][key][stat] for r in rounds)

    total = {side: {f"{k}_{stat}": round(tot(side, k, stat), 3) for k in ("sample_s", "train_s", "round_s")
                    for stat in ("median", "min")} for side in ("spobench", "official")}
    total["ratio_official_over_spobench"] = {
        key: round(total["official"][key] / total["spobench"][key], 3) for key in total["spobench"]}
    q = total["ratio_official_over_spobench"]
    print(f"\nall {len(rounds)} rounds x {args.repeats} repeats (median of repeats): spobench "
          f"{total['spobench']['round_s_median']:.1f} s, official {total['official']['round_s_median']:.1f} s -> "
          f"official/spobench = {q['round_s_median']:.2f}x (sampling {q['sample_s_median']:.2f}x, training "
          f"{q['train_s_median']:.2f}x); fastest repeats: {q['round_s_min']:.2f}x (sampling {q['sample_s_min']:.2f}x, "
          f"training {q['train_s_min']:.2f}x)")
    if args.profile:
        profile_round(S, args.profile)
    S.tmp.cleanup()
    return {
        "command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " .venv/bin/python "
                   + " ".join(["benchmarks/bench_spo_round.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
        "cpu": _cpu(), "cores": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
        "uptime_start": up0, "uptime_end": _uptime(),
        "setup": {"prompts": args.prompts, "rollout_batch": args.b, "k": args.k, "num_steps": args.steps,
                  "kappa": tr.cfg.kappa, "guidance_scale": tr.cfg.guidance_scale, "eta": tr.cfg.eta,
                  "threshold": tr.cfg.threshold, "train_batch_size": tr.cfg.train_batch_size,
                  "pooled_steps": n_pooled, "plain_steps": n_plain, "repeats": args.repeats, "official_split": args.official_split,
                  "compile": args.compile, "merge_lora": args.merge_lora, "warmup_s": warmup_s,
                  **S.info},
        "loss_check_same_pairs": check, "rounds": rounds, "total": total,
        **({"dynamo": _dynamo_stats()} if args.compile else {}),
    }


def _dynamo_stats() -> dict:
    """How many graphs torch.compile captured and how often it recompiled: a compiled path that fell back
    to eager (cache limit, graph breaks) shows here, not in the timings alone."""
    from torch._dynamo.utils import counters

    return {group: dict(counters[group]) for group in ("stats", "frames", "recompiles", "graph_break")
            if group in counters}


def profile_round(S: Setup, out: Path) -> None:
    """cProfile of one more (untimed) spobench round: where its Python time goes."""
    import cProfile
    import io
    import pstats

    tr = S.tr
    prof = cProfile.Profile()
    idx = tr.round_prompts(0, 0)
    prof.enable()
    items, _ = tr.collect(0, 0, idx)
    prof.disable()
    mine, _ = tr.share(items, 0, 0)
    prof.enable()
    tr.train_items(mine)
    prof.disable()
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(str(out))
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(f"\ncProfile of one spobench round (by own time; full profile in {out}):\n{buf.getvalue()}")


def _summarise(figs: list[dict]) -> dict:
    """Counts of the first repeat (every repeat does the same work: checked) and time statistics."""
    import statistics

    out = dict(figs[0])
    for f in figs[1:]:
        assert f["sampling"] == figs[0]["sampling"] and f["training"] == figs[0]["training"], "counts differ"
    for k in ("sample_s", "train_s", "round_s"):
        v = [f[k] for f in figs]
        out[k] = {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "all": v}
    out["mean_loss"] = [f["mean_loss"] for f in figs]
    return out


def _uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu() -> str:
    from spobench.core.io import cpu_name

    return cpu_name()


def _print_round(r: dict) -> None:
    sp = r["spobench"]
    print(f"\nround {r['round']} (epoch {r['epoch']}), {sp['prompts']} prompts, {sp['pairs']} pairs, "
          f"{len(sp['round_s']['all'])} repeat(s); same pairs {r['same_pairs']['same_pairs']}/"
          f"{r['same_pairs']['pairs_a']}, final LoRA relative diff {r['final_lora']['rel_diff']:.1e}")
    print(f"{'':>10} {'rows grad':>10} {'rows nograd':>12} {'calls':>6} {'decodes':>8} {'SPM img':>8} "
          f"{'SPM txt':>8} {'sample s':>9} {'train s':>8} {'round s':>8}   (median of repeats)")
    for side in ("spobench", "official"):
        x = r[side]
        s, t = x["sampling"], x["training"]
        print(f"{side:>10} {s['unet_rows_grad'] + t['unet_rows_grad']:>10} "
              f"{s['unet_rows_nograd'] + t['unet_rows_nograd']:>12} {s['unet_calls'] + t['unet_calls']:>6} "
              f"{s['vae_decodes']:>8} {s['reward_image_passes']:>8} {s['reward_text_passes']:>8} "
              f"{x['sample_s']['median']:>9.2f} {x['train_s']['median']:>8.2f} {x['round_s']['median']:>8.2f}")
    q = r["ratio_official_over_spobench"]
    print(f"{'ratio':>10} official/spobench: sampling {q['sample_s_median']:.2f}x, training {q['train_s_median']:.2f}x, "
          f"round {q['round_s_median']:.2f}x (fastest repeats: {q['round_s_min']:.2f}x)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=20, help="prompts (tiny-train); rounds = prompts / b")
    p.add_argument("--b", type=int, default=10, help="rollout batch (prompts per round)")
    p.add_argument("--k", type=int, default=4, help="candidates per pool")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--rounds", type=int, default=None, help="rounds to run (default: one epoch)")
    p.add_argument("--repeats", type=int, default=1, help="run each round this many times per side "
                   "(alternating which side goes first; times: median and min)")
    p.add_argument("--train-batch", type=int, default=10)
    p.add_argument("--official-split", choices=("official", "per-candidate"), default="official",
                   help="official: one UNet/decode/SPM call per step over B*k rows (as the official code); "
                        "per-candidate: k calls of B rows")
    p.add_argument("--components", choices=COMPONENTS, default="tiny-base",
                   help="tiny-base: the pixel-space tiny backbone; sd15: tiny random SD-1.5-shaped UNet + VAE + CLIP")
    p.add_argument("--resolution", type=int, default=16, help="sd15 components: image size (latents: half)")
    p.add_argument("--merge-lora", action=argparse.BooleanOptionalAction, default=True,
                   help="spobench side with merge_lora=true (rollout with the LoRA folded into the weights)")
    p.add_argument("--random-base", action="store_true", help="TinyBackbone.build(0) instead of tiny-base")
    p.add_argument("--compile", action="store_true", help="spobench side with compile=true (torch.compile of the "
                   "UNet; the official side stays eager); compilation happens in the warm-up, reported apart")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--profile", type=Path, default=None, help="after the rounds, profile one more spobench round (cProfile) into this file")
    args = p.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") is None:
        print("note: OMP_NUM_THREADS is not set; the README figures use OMP_NUM_THREADS=1", file=sys.stderr)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


# =================================================================================================
# pytest: counts and identical math on a small round (no timing)
# =================================================================================================
def test_counts_and_identical_math():
    b, k, steps = 2, 2, 6
    S = build(b, b, k, num_steps=steps, kappa=750, train_batch=4)
    tr = S.tr
    off = Official(S)
    pool = tr.pool_config()
    ts = [int(t) for t in tr.engine.timesteps()]
    n_pooled = sum(pool.is_pooled(t, tr.engine.sched.step_ratio) for t in ts)
    start = snapshot(tr)
    ours, ours_items = spobench_round(S, 0, 0)
    end_ours = snapshot(tr)
    restore(tr, start)
    theirs, their_items = off.round(0, 0)
    end_off = snapshot(tr)
    exp = expected_counts(b, k, ours["pairs"], n_pooled, len(ts) - n_pooled)
    assert ours["pairs"] == theirs["pairs"] == b * n_pooled  # threshold -1: every pool gives a pair
    for side in (ours, theirs):
        assert side["sampling"]["unet_rows_nograd"] == exp["rollout_unet_rows"]
        assert side["sampling"]["vae_decodes"] == side["sampling"]["reward_image_passes"] == exp["decodes"]
    assert theirs["sampling"]["reward_text_passes"] == exp["spm_text_official"]
    assert ours["sampling"]["reward_text_passes"] <= exp["spm_text_spobench_max"]
    assert ours["training"]["unet_rows_grad"] == exp["train_rows_grad_spobench"]
    assert ours["training"]["unet_rows_nograd"] == exp["train_rows_nograd_spobench"]
    assert theirs["training"]["unet_rows_grad"] == exp["train_rows_grad_official"]
    assert theirs["training"]["unet_rows_nograd"] == exp["train_rows_nograd_official"]
    pairs = same_pairs(ours_items, their_items)
    assert pairs["same_pairs"] == len(ours_items)
    assert lora_diff(end_ours, end_off, start)["rel_diff"] < 1e-3
    restore(tr, start)
    check = loss_check(S, off, ours_items[:4])
    assert check["ok"], check
    S.tmp.cleanup()


if __name__ == "__main__":
    main()
