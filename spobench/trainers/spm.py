"""Training the step-aware preference model (paper Sec. 4.2) on Pick-a-Pic-format pairs.

For every pair (caption, jpg_0, jpg_1, label_0, label_1):

1. draw ONE timestep t ~ U[0, T) and ONE noise shared by both images;
2. encode both images with the backbone's VAE (``encode_images``, at the backbone resolution) and
   noise them with the scheduler (``add_noise``): x_t^0, x_t^1 from the same noise;
3. predict with the frozen backbone (CFG 5, no grad), estimate x0_hat (DDIM, ``predict_x0``) and
   decode it to images - the "estimate x0 from the noisy sample" of Sec. 4.2;
4. score both with the SPM at timestep t and minimise PickScore's cross-entropy between
   softmax(s_0, s_1) and the label probabilities (label_0, label_1); ties are 0.5 / 0.5.

Evaluation: pair accuracy on a held-out split (ties excluded) at t in {0, 250, 500, 750, 950},
each pair noised with a fixed per-evaluation noise so that every variant sees the same x0_hat.
Table 5's variants: ``no_step=True`` trains the same model without time input; ``steps=0`` with
``no_step=True`` evaluates the plain CLIP/PickScore with no step training.

Runs are resumable: the data order, t, the noise and the VAE sample of step ``s`` depend only on
``(seed, s)``; the steps run in the shared loop (``spobench.trainers.loop``, one step a round) and
checkpoint in its format (model, optimizer, step, the losses so far).
"""

from __future__ import annotations

from spobench import ASSETS
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from spobench.core.checkpoint import latest_checkpoint, read_checkpoint
from spobench.core.config import Config, setting
from spobench.core.errors import InputError
from spobench.data.pairs import BatchOrder, PairTable, say, split_rows
from spobench.trainers.loop import Loop, Round, Schedule, Task, _OneProcess, refuse_old_checkpoint

# SPO's SPM trainer (as PickScore's) trains on ties with the soft label 0.5 / 0.5 (spobench.data.pairs)
KEEP_TIES = True

EVAL_TIMESTEPS = (0, 250, 500, 750, 950)
FINAL = "spm"
METRICS = "metrics.json"
LOG = "log.jsonl"


@dataclass
class SPMTrainConfig(Config):
    what: ClassVar[str] = "SPM training"

    steps: int = setting(1000, "optimizer steps (0: evaluate the init only)", min=0)
    batch_size: int = setting(8, "pairs per step", min=1)
    lr: Optional[float] = setting(None, "learning rate (backbone default: 3e-6 SD-1.5, 1e-6 SDXL, 1e-4 tiny)",
                                  gt=0, backbone="spm_lr")
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm (0: off)", min=0)
    seed: int = setting(0, "data order, timesteps, noise", min=0)
    no_step: bool = setting(False, "Table 5 'SPM w/o step': same training, no time conditioning")
    time_lr_mult: float = setting(1.0, "lr multiplier for the time conditioning (zero-initialised, starts far "
                                       "from useful)", min=0)
    guidance_scale: float = setting(5.0, "CFG of the frozen backbone when estimating x0_hat", min=0)
    resolution: Optional[int] = setting(None, "images are resized to this before encode_images (backbone default)",
                                        min=8)
    eval_timesteps: tuple[int, ...] = setting(EVAL_TIMESTEPS, "held-out accuracy at these timesteps")
    val_pairs: Optional[str] = setting(None, "a separate held-out parquet; else a caption-hash split of the pairs")
    val_fraction: float = setting(0.05, "captions hashing below this are held out", min=0, lt=1)
    val_max: int = setting(500, "held-out pairs at most", min=1)
    eval_batch_size: int = setting(8, "pairs per evaluation batch", min=1)
    eval_seed: int = setting(1234, "the evaluation's fixed noise", min=0)
    eval_init: bool = setting(False, "also evaluate the model before training")
    backbone_chunk: int = setting(8, "rows per UNet/VAE call when estimating x0_hat", min=1)
    train_text_encoder: bool = setting(True, "train the text tower too")
    gradient_checkpointing: bool = setting(False, "trade compute for memory")
    amp: bool = setting(True, "bf16 autocast for the SPM on CUDA")
    save_every: int = setting(500, "steps between checkpoints (0: off)", min=0)
    log_every: int = setting(10, "steps between log lines (0: off)", min=0)
    processor: Optional[str] = setting(None, "tokenizer/preprocessor folder when --init lacks them (PickScore: "
                                             "laion ViT-H)")

    def lr_for(self, backbone) -> float:
        """``lr``, else the backbone's SPM rate; ``backbone``: its ``BackboneDefaults`` or a registered name."""
        if self.lr is not None:
            return self.lr
        if isinstance(backbone, str):
            from spobench.core import catalog

            backbone = catalog.BACKBONES.get(backbone).defaults
        return backbone.spm_lr


# -- x0_hat of a noised pair -----------------------------------------------------------------------
@torch.no_grad()
def estimate_x0_images(backbone, images: torch.Tensor, captions: Sequence[str], t: torch.Tensor,
                       noise_gen: torch.Generator, *, guidance_scale: float = 5.0, chunk: int = 8,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images (2B, 3, H, W) ordered [first images; second images] with B captions and timesteps
    t (B,) -> decoded x0_hat images in [0, 1]. Pair i's two images share t[i] and one noise."""
    latents, noise, cond = encode_pairs(backbone, images, captions, noise_gen, noise=noise)
    return x0_from_encoded(backbone, latents, noise, cond, t, guidance_scale=guidance_scale, chunk=chunk)


@torch.no_grad()
def encode_pairs(backbone, images: torch.Tensor, captions: Sequence[str], noise_gen: torch.Generator, *,
                 noise: torch.Tensor | None = None):
    """The t-independent half of ``estimate_x0_images``: (latents (2B, ...), noise (B, ...), conditioning
    (2B)); evaluation reuses it for every timestep bucket instead of re-running the VAE and text encoders."""
    from spobench.models.backbones.base import Conditioning

    device = backbone.device
    latents = backbone.encode_images(images.to(device), generator=noise_gen).float()
    if noise is None:
        noise = torch.randn((len(captions), *latents.shape[1:]), generator=noise_gen, dtype=torch.float32).to(device)
    cond = backbone.encode_prompts(list(captions))
    return latents, noise, Conditioning.cat([cond, cond])


@torch.no_grad()
def x0_from_encoded(backbone, latents: torch.Tensor, noise: torch.Tensor, cond, t: torch.Tensor, *,
                    guidance_scale: float = 5.0, chunk: int = 8) -> torch.Tensor:
    """Noise both images of pair i to t[i] with the pair's one noise, predict (CFG), estimate x0_hat
    (DDIM) and decode it -> images in [0, 1]."""
    from spobench.engine.ddim import NoiseSchedule, predict_x0

    device = backbone.device
    n_rows = latents.shape[0]
    t2 = torch.cat([t, t]).to(device).long()
    x_t = backbone.scheduler.add_noise(latents, torch.cat([noise, noise]), t2)
    sched = NoiseSchedule.from_backbone(backbone, backbone.defaults.num_steps)
    outs = []
    for s in range(0, n_rows, chunk):
        sl = slice(s, s + chunk)
        n = x_t[sl].shape[0]
        pred = backbone.predict(x_t[sl], t2[sl], cond.index(sl), guidance_scale=guidance_scale,
                                uncond=backbone.encode_unconditional(n) if guidance_scale != 1.0 else None)
        x0 = predict_x0(pred.float(), x_t[sl], t2[sl], sched)
        outs.append(backbone.decode(x0).float())
    return torch.cat(outs)


def pair_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PickScore's loss: cross-entropy of softmax over the pair's two scores against the label
    probabilities. ``scores`` (B, 2), ``labels`` (B, 2) summing to 1 per row."""
    return -(labels * F.log_softmax(scores.float(), dim=-1)).sum(-1).mean()


# -- evaluation -----------------------------------------------------------------------------------
def evaluate_spm(backbone, model, pairs: PairTable, rows: Sequence[int], config: SPMTrainConfig,
                 resolution: int, *, per_pair: bool = False) -> dict:
    """Pair accuracy (ties excluded) per timestep bucket on ``rows``; every pair gets noise from
    ``eval_seed`` and its position, identical for every model evaluated with the same config.
    ``per_pair`` adds each pair's row and outcome per bucket (1 right, 0 wrong, 0.5 equal scores),
    for paired comparisons of models evaluated on the same rows (``spobench.eval.spm_eval``)."""
    return evaluate_spms(backbone, [model], pairs, rows, config, resolution, per_pair=per_pair)[0]


def evaluate_spms(backbone, models: Sequence, pairs: PairTable, rows: Sequence[int], config: SPMTrainConfig,
                  resolution: int, *, per_pair: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """``evaluate_spm`` for several models at once: each batch's x0_hat (the backbone's UNet and
    decoder, the costly part) is computed once and scored by every model. ``progress(done, total)``
    follows the pairs."""
    # the first val_max labelled non-tie rows, read in file order (images come a row group at a time)
    rows = sorted([r for r in rows if pairs.labelled[r] and not pairs.is_tie(r)][: config.val_max])
    buckets = [int(t) for t in config.eval_timesteps]
    outcomes = [{t: [] for t in buckets} for _ in models]
    losses = [{t: 0.0 for t in buckets} for _ in models]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    bs = config.eval_batch_size
    try:
        for start in range(0, len(rows), bs):
            batch = rows[start:start + bs]
            a, b = pairs.images(batch, resolution)
            images = torch.cat([a, b])
            caps = [pairs.captions[r] for r in batch]
            labels = torch.as_tensor(pairs.labels[batch], dtype=torch.float32)
            winner_first = labels[:, 0] > labels[:, 1]
            g = torch.Generator().manual_seed(config.eval_seed * 1_000_003 + start)
            encoded = encode_pairs(backbone, images, caps, g)  # one VAE sample and noise, shared by every t
            for t in buckets:
                tt = torch.full((len(batch),), t, dtype=torch.long)
                x0 = x0_from_encoded(backbone, *encoded, tt, guidance_scale=config.guidance_scale,
                                     chunk=config.backbone_chunk)
                for i, model in enumerate(models):
                    with torch.no_grad():
                        s = model(x0, torch.cat([tt, tt]), caps + caps).float().cpu()
                    scores = torch.stack([s[: len(batch)], s[len(batch):]], dim=1)
                    pred_first = scores[:, 0] > scores[:, 1]
                    equal = scores[:, 0] == scores[:, 1]
                    outcome = ((pred_first == winner_first) & ~equal).float() + 0.5 * equal.float()
                    outcomes[i][t] += outcome.tolist()
                    losses[i][t] += float(pair_loss(scores, labels)) * len(batch)
            if progress:
                progress(start + len(batch), len(rows))
    finally:
        for m, mode in zip(models, was_training):
            m.train(mode)
    n = len(rows)
    results = []
    for out_i, loss_i in zip(outcomes, losses):
        acc = {str(t): (float(np.sum(out_i[t])) / n if n else float("nan")) for t in buckets}
        result = {
            "n_pairs": n,
            "accuracy": acc,
            "mean_accuracy": float(np.mean(list(acc.values()))) if n else float("nan"),
            "loss": {str(t): (loss_i[t] / n if n else float("nan")) for t in buckets},
        }
        if per_pair:
            result["per_pair"] = {"rows": [int(r) for r in rows], "outcome": {str(t): out_i[t] for t in buckets}}
        results.append(result)
    return results


# -- training ---------------------------------------------------------------------------------------
def _variant(config: SPMTrainConfig) -> str:
    if config.no_step:
        return "pickscore" if config.steps == 0 else "spm-no-step"
    return "spm"


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def load_init(init, config: SPMTrainConfig, device, default_folder: Path | None = None):
    """The model to start from: an SPM instance, an SPM folder (``spm_config.json``) or a CLIP
    folder / cached hub id (PickScore; a tiny CLIP in the tiny world)."""
    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.models.spm_files import CONFIG_NAME

    time_conditioned = not config.no_step
    if isinstance(init, StepAwarePreferenceModel):
        model = init
    else:
        if init is None:
            if default_folder is None:
                raise InputError("give --init PATH: a CLIP/PickScore folder or an SPM folder")
            init = default_folder
        p = Path(init)
        if p.is_dir() and (p / CONFIG_NAME).exists():
            model = StepAwarePreferenceModel.load(p)
        else:
            model = StepAwarePreferenceModel.from_clip(init, processor=config.processor,
                                                       time_conditioned=time_conditioned)
    if model.time_conditioned != time_conditioned:
        raise InputError(f"--init {init}: the SPM there is {'' if model.time_conditioned else 'not '}time-conditioned "
                         f"but {'--no-step was' if config.no_step else 'time conditioning was'} asked for")
    return model.to(device)


def train_spm(backbone, pairs_path, init, out, config: SPMTrainConfig | dict | None = None, *,
              resume: bool = False, overwrite: bool = False,
              progress: Callable[[dict], None] | None = None) -> dict:
    """Train (or, with ``steps=0``, only evaluate) an SPM; returns and writes ``metrics.json``.

    ``out`` receives ``spm/`` (the final model, loadable with ``StepAwarePreferenceModel.load``),
    ``checkpoints/`` (``spobench.core.checkpoint``'s format, for ``resume``), ``log.jsonl`` and ``metrics.json``.
    ``out`` is claimed (``spobench.core.outdir``) for the whole run.
    """
    from spobench.core import outdir
    from spobench.core.checkpoint import latest_checkpoint

    with outdir.claim(out, command="train-spm", resume=resume, overwrite=overwrite,
                      keep=lambda: latest_checkpoint(out) is not None):
        return _train_spm(backbone, pairs_path, init, out, config, resume=resume, progress=progress)


class _SPMSteps(Task):
    """The SPM's training as the loop's task: one round = one optimizer step on ``batch_size`` pairs."""

    def __init__(self, backbone, model, pairs: PairTable, order, config: SPMTrainConfig, resolution: int,
                 t_start: float, progress):
        self.bb, self.model, self.pairs, self.order, self.cfg = backbone, model, pairs, order, config
        self.resolution, self.t_start, self.on_log = resolution, t_start, progress
        self.losses: list[float] = []

    def rounds_per_epoch(self) -> int:
        return self.cfg.steps

    def round(self, epoch: int, rnd: int) -> Round:
        return Round(epoch, rnd, list(self.order.batch(rnd)))

    def loss(self, rows: list, total: int):
        # the data order, t, the noise and the VAE sample of step s depend only on (seed, s)
        cfg, device = self.cfg, self.bb.device
        g = _step_generator(cfg.seed, self.loop.progress.rounds_done)
        t = torch.randint(0, self.bb.num_train_timesteps, (len(rows),), generator=g)
        a, b = self.pairs.images(rows, self.resolution)
        caps = [self.pairs.captions[r] for r in rows]
        x0 = estimate_x0_images(self.bb, torch.cat([a, b]), caps, t, g, guidance_scale=cfg.guidance_scale,
                                chunk=cfg.backbone_chunk)
        labels = torch.as_tensor(self.pairs.labels[rows], dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"):
            s = self.model(x0, torch.cat([t, t]).to(device), caps + caps)
        loss = pair_loss(torch.stack([s[: len(rows)], s[len(rows):]], dim=1), labels)
        self._last = (loss.detach(), float(t.float().mean()))
        return loss if len(rows) == total else loss * (len(rows) / total), {}

    def after_step(self, log: dict) -> None:
        self.losses.append(float(self._last[0]))
        self._grad_norm = log["grad_norm"]

    def report(self, rnd: Round, steps: list[dict]) -> tuple[list[dict], str]:
        cfg, done = self.cfg, self.loop.progress.rounds_done
        if not cfg.log_every or not (done % cfg.log_every == 0 or done == cfg.steps):
            return [], ""
        rec = {"step": done, "loss": float(np.mean(self.losses[-cfg.log_every:])),
               "grad_norm": self._grad_norm if cfg.max_grad_norm else None, "t_mean": self._last[1],
               "elapsed_s": round(time.perf_counter() - self.t_start, 2)}
        if self.on_log:
            self.on_log(rec)
        return [rec], ""

    def state_dict(self) -> dict:
        return {"losses": self.losses}

    def load_state_dict(self, state: dict) -> None:
        self.losses = [float(v) for v in state.get("losses", [])]


def _train_spm(backbone, pairs_path, init, out, config: SPMTrainConfig | dict | None = None, *,
               resume: bool = False, progress: Callable[[dict], None] | None = None) -> dict:
    from spobench.core.checkpoint import ModuleWeights
    from spobench.core.io import atomic_write_json, provenance

    config = SPMTrainConfig.coerce(config)
    if not config.time_lr_mult > 0:
        raise InputError(f"time_lr_mult must be > 0 (got {config.time_lr_mult})")
    out = Path(out)
    if resume:
        refuse_old_checkpoint(out / "checkpoint", "state.json", "train-spm")
    t_start = time.perf_counter()
    pairs = PairTable(pairs_path)
    usable, counts = pairs.usable(KEEP_TIES)
    say(pairs.describe(counts, KEEP_TIES))
    if not usable:
        raise InputError(f"{pairs.path}: no labelled pairs to train on ({pairs.describe(counts, KEEP_TIES)[7:]})")
    if config.val_pairs:
        val_pairs = PairTable(config.val_pairs)
        train_rows, val_rows = usable, val_pairs.usable(KEEP_TIES)[0]
    else:
        val_pairs = pairs
        train_rows, val_rows = split_rows(pairs, config.val_fraction, usable)
    resolution = config.resolution or backbone.defaults.resolution
    device = backbone.device
    lr = config.lr_for(backbone.defaults)

    model = load_init(init, config, device)
    counters_before = model.counters
    model.counters = backbone.counters  # SPM image/text passes count as the run's reward passes
    for p in model.clip.text_model.parameters():
        p.requires_grad_(config.train_text_encoder)
    model.clip.text_projection.requires_grad_(config.train_text_encoder)
    if config.gradient_checkpointing:
        model.enable_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    time_ids = {id(p) for p in model.time_parameters()}
    groups = [{"params": [p for p in params if id(p) not in time_ids], "lr": lr},
              {"params": [p for p in params if id(p) in time_ids], "lr": lr * config.time_lr_mult}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)

    result: dict = {"variant": _variant(config), "backbone": backbone.name, "lr": lr,
                    "n_train_pairs": len(train_rows), "n_val_pairs": len(val_rows), "pairs": counts,
                    "config": asdict(config) | {"eval_timesteps": list(config.eval_timesteps)}}
    order = BatchOrder(pairs, train_rows, config.batch_size, config.seed) if config.steps else None
    task = _SPMSteps(backbone, model, pairs, order, config, resolution, t_start, progress)
    # 0 turns the SPM's clipping and checkpoints off; one checkpoint is kept, as the run's only resume point
    schedule = Schedule(max_grad_norm=config.max_grad_norm or None, checkpoint_every=config.save_every or config.steps or None,
                        keep_checkpoints=1)
    weights = ModuleWeights({"spm": model}, {"model": "spm", "time_conditioned": model.time_conditioned})
    task.loop = Loop(task, out=out, name="train-spm", weights=weights, params=params, optimizer=opt,
                     schedule=schedule, config=result["config"], accelerator=_OneProcess(device))
    if resume and (ckpt := latest_checkpoint(out)) is not None:
        saved = read_checkpoint(ckpt)
        if saved.manifest.get("weights", {}).get("time_conditioned") == config.no_step:
            raise InputError(f"{ckpt}: checkpoint time conditioning does not match --no-step={config.no_step}")
        if saved.progress["rounds_done"] > config.steps:
            raise InputError(f"{ckpt}: checkpoint is at step {saved.progress['rounds_done']}, past --steps {config.steps}")
        task.loop.restore(ckpt)
    start_step = task.loop.progress.rounds_done
    if start_step == 0:
        (out / LOG).unlink(missing_ok=True)
    if config.eval_init and start_step == 0 and config.steps > 0:
        result["eval_init"] = evaluate_spm(backbone, model, val_pairs, val_rows, config, resolution)

    model.train()
    task.loop.run()
    model.save(out / FINAL)
    result["eval"] = evaluate_spm(backbone, model, val_pairs, val_rows, config, resolution)
    model.counters = counters_before
    losses = task.losses
    k = max(1, min(10, len(losses) // 4)) if losses else 0
    result.update({
        "steps": config.steps,
        "train_loss_first": float(np.mean(losses[:k])) if losses else None,
        "train_loss_last": float(np.mean(losses[-k:])) if losses else None,
        "losses": losses,
        "model": str(out / FINAL),
        "wall_s": round(time.perf_counter() - t_start, 2),
        "counters": backbone.counters.as_dict(),
        "provenance": provenance(),
    })
    atomic_write_json(out / METRICS, result)
    return result


# -- CLI --------------------------------------------------------------------------------------------
def default_init(backbone) -> Path:
    """Where ``--init`` points when omitted (``backbone``: a registered name or its
    ``BackboneDefaults``): the weights folder of ``spm_init`` (PickScore; the tiny world's toy
    PickScore, ``$SPOBENCH_WEIGHTS/toy_pickscore``), else the ``spm_init_shipped`` folder of the package."""
    from spobench.metrics.base import weights_root

    if isinstance(backbone, str):
        from spobench.core import catalog

        backbone = catalog.BACKBONES.get(backbone).defaults
    local = weights_root() / backbone.spm_init
    if backbone.spm_init_shipped and not local.exists():
        return ASSETS / backbone.spm_init_shipped
    return local