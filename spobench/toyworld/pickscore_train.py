"""The tiny world's PickScore: a tiny CLIP trained on the tiny world's generic preference pairs.

This is PickScore's recipe at toy scale, on CLEAN images (the pair images as they are in the
parquet, not noised or denoised ones): for each pair (caption, jpg_0, jpg_1, label_0, label_1)

    s_k  = logit_scale.exp() * cos(image_emb(jpg_k), text_emb(caption))
    loss = cross-entropy(softmax(s_0, s_1), (label_0, label_1))           (ties are 0.5 / 0.5)

Everything but the loop is shared with the step-aware preference model's trainer
(:mod:`spobench.trainers.spm`) and model (:mod:`spobench.models.spm`): the pairs reader (:class:`PairTable`),
the caption-hash held-out split (:func:`split_rows`), the data order (:class:`BatchOrder`), the loss
(:func:`pair_loss`), and the scorer itself, a :class:`StepAwarePreferenceModel` without time
conditioning (tokenizer, torch CLIP preprocessing, ``logit_scale.exp() * cos``). The result is a
plain transformers ``CLIPModel`` folder (weights, tokenizer, ``preprocessor_config.json``) that the
``toy_pickscore`` metric loads, and that ``spobench train-spm --backbone tiny --init`` accepts.

Held-out evaluation (ties excluded) reports pair accuracy against the parquet's generic label and,
when the tiny world's analysis columns are there, against three oracle labels: aesthetic-only
(``aesth_0`` vs ``aesth_1``), alignment-only (``align_0`` vs ``align_1``) and the annotator's
noise-free utility ``0.6 A + 0.4 Q / 10`` (:class:`spobench.toyworld.pairs.LabelModel`).

Deterministic on CPU for a given seed and thread count: the initial tiny CLIP is drawn from the
seed, the data order of step ``s`` depends only on ``(seed, s)`` and nothing else is random. The steps
run in the shared loop (``spobench.trainers.loop``), one optimizer step a round, without checkpoints.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch

from spobench.core.config import Config, SettingError, setting
from spobench.trainers.loop import Round, Task

MODEL = "model"  # the CLIPModel folder inside a run folder
METRICS = "metrics.json"
LOG = "log.jsonl"
INFO = "toy_pickscore.json"  # written beside the weights: how they were made, held-out accuracy
RESOLUTION = 32
ORACLE_COLUMNS = ("align_0", "align_1", "aesth_0", "aesth_1")


@dataclass
class ToyPickScoreConfig(Config):
    what: ClassVar[str] = "toy_pickscore training"

    steps: int = setting(3000, "optimizer steps", min=0)
    batch_size: int = setting(32, "pairs per step", min=1)
    lr: float = setting(1e-3, "AdamW peak; linear warm-up, then cosine decay to 10 %", gt=0)
    warmup: int = setting(100, "warm-up steps", min=0)
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0)
    max_grad_norm: float = setting(1.0, "clip the gradient norm (0: off)", min=0)
    seed: int = setting(0, "the random initial CLIP (without --init) and the data order", min=0)
    val_fraction: float = setting(0.1, "captions hashing below this are held out", min=0, lt=1)
    val_max: int = setting(2000, "held-out pairs at most", min=1)
    eval_batch_size: int = setting(128, "pairs per evaluation batch", min=1)
    log_every: int = setting(50, "steps between log lines (0: off)", min=0)
    # the random tiny CLIP used without --init: `spobench toy clip`'s defaults
    hidden: int = setting(64, "width of the random tiny CLIP", min=8)
    layers: int = setting(3, "layers of the random tiny CLIP", min=1)
    patch: int = setting(4, "patch size of the random tiny CLIP", min=1)

    def check(self) -> None:
        from spobench.core.checks import tiny_clip_problem

        for name, problem in tiny_clip_problem(hidden=self.hidden, patch=self.patch):
            raise SettingError(name, problem)


# -- model ----------------------------------------------------------------------------------------
def random_tiny_clip(folder: str | Path, config: ToyPickScoreConfig) -> Path:
    """A random tiny CLIP as `spobench toy clip` writes it (the tiny backbone's tokenizer)."""
    from spobench.models.backbones.tiny import tiny_tokenizer
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder

    return make_tiny_clip_folder(folder, seed=config.seed, image_size=RESOLUTION, patch_size=config.patch,
                                 hidden=config.hidden, layers=config.layers, heads=4, projection_dim=32,
                                 tokenizer=tiny_tokenizer(model_max_length=77))


def load_scorer(init: str | Path | None, config: ToyPickScoreConfig):
    """The scorer to train: a time-free :class:`StepAwarePreferenceModel` around the CLIP of ``init``
    (a CLIP folder, or an SPM folder trained with --no-step), or around a random tiny CLIP."""
    from spobench.trainers.spm import SPMTrainConfig, load_init

    spm_cfg = SPMTrainConfig(no_step=True)
    if init is not None:
        return load_init(init, spm_cfg, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="toy-clip-") as tmp:
        return load_init(random_tiny_clip(Path(tmp) / "clip", config), spm_cfg, torch.device("cpu"))


def save_clip_folder(model, folder: str | Path, info: dict | None = None) -> Path:
    """Write the scorer's CLIP as a standard CLIPModel folder (safetensors, tokenizer,
    preprocessor_config.json, and ``info`` as toy_pickscore.json) - atomically."""
    from spobench.core.io import atomic_dir
    from spobench.models.spm_preprocess import write_preprocessor_config

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        model.clip.save_pretrained(str(tmp), safe_serialization=True)
        model.tokenizer.save_pretrained(str(tmp))
        write_preprocessor_config(tmp, model.preprocess_cfg)
        if info is not None:
            (tmp / INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def pair_scores(model, first: torch.Tensor, second: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
    """(B, 2) scores of B pairs of clean images (each (B, 3, H, W) in [0, 1]) against their captions."""
    s = model(torch.cat([first, second]), None, list(captions) * 2)
    return torch.stack([s[: len(captions)], s[len(captions):]], dim=1)


# -- data -----------------------------------------------------------------------------------------
class PairImages:
    """Decoded pair images kept in memory as uint8 (a 5000-pair file is 30 MB), decoded once."""

    def __init__(self, pairs, resolution: int = RESOLUTION):
        self.pairs, self.resolution = pairs, resolution
        self._cache: dict[int, torch.Tensor] = {}

    def _get(self, i: int) -> torch.Tensor:
        if i not in self._cache:
            a = self.pairs.image(i, "jpg_0", self.resolution)
            b = self.pairs.image(i, "jpg_1", self.resolution)
            self._cache[i] = torch.stack([a, b]).mul(255).round().to(torch.uint8)
        return self._cache[i]

    def batch(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.stack([self._get(int(r)) for r in rows]).float() / 255
        return x[:, 0], x[:, 1]


def read_columns(pairs, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Extra columns of a :class:`PairTable`'s files, row-aligned with it (only those every file has)."""
    import pyarrow.parquet as pq

    have = [n for n in names if all(n in pq.ParquetFile(f).schema_arrow.names for f in pairs.files)]
    out: dict[str, list] = {n: [] for n in have}
    for f in pairs.files:
        if have:
            t = pq.ParquetFile(f).read(columns=have)
            for n in have:
                out[n] += t.column(n).to_pylist()
    return {n: np.asarray(v) for n, v in out.items()}


def labeled_rows(pairs, rows: Sequence[int], columns: dict[str, np.ndarray]) -> list[int]:
    """Drop rows with ``has_label == False`` (some Pick-a-Pic rows carry no preference)."""
    if "has_label" not in columns:
        return list(rows)
    lab = columns["has_label"].astype(bool)
    return [r for r in rows if lab[r]]


# -- evaluation -----------------------------------------------------------------------------------
def _accuracy(margin: np.ndarray, target: np.ndarray) -> dict:
    """Pair accuracy of score margins (s_0 - s_1) against target margins; target ties excluded,
    score ties count half."""
    keep = target != 0
    n = int(keep.sum())
    if not n:
        return {"n_pairs": 0, "accuracy": float("nan")}
    m, t = margin[keep], target[keep]
    acc = (np.sign(m) == np.sign(t)).sum() + 0.5 * (m == 0).sum()
    return {"n_pairs": n, "accuracy": float(acc / n)}


@torch.no_grad()
def evaluate(model, pairs, rows: Sequence[int], images: PairImages, columns: dict[str, np.ndarray],
             batch_size: int = 128) -> dict:
    """Held-out pair accuracy of ``model`` on ``rows`` against the generic label (ties excluded,
    as ``accuracy``) and the oracle labels the parquet has; plus the mean PickScore loss (ties in)."""
    from spobench.trainers.spm import pair_loss
    from spobench.toyworld.pairs import LabelModel

    rows = list(rows)
    was_training = model.training
    model.eval()
    margins, losses = [], []
    try:
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            a, b = images.batch(batch)
            scores = pair_scores(model, a, b, [pairs.captions[r] for r in batch]).float()
            labels = torch.as_tensor(pairs.labels[batch], dtype=torch.float32)
            losses.append(float(pair_loss(scores, labels)) * len(batch))
            margins.append((scores[:, 0] - scores[:, 1]).numpy())
    finally:
        model.train(was_training)
    margin = np.concatenate(margins) if margins else np.zeros(0)
    lab = pairs.labels[rows] if rows else np.zeros((0, 2))
    out = {"n_rows": len(rows), "loss": float(sum(losses) / len(rows)) if rows else float("nan")}
    generic = _accuracy(margin, np.where(np.abs(lab[:, 0] - lab[:, 1]) < 1e-6, 0.0, lab[:, 0] - lab[:, 1]))
    out.update(n_pairs=generic["n_pairs"], accuracy=generic["accuracy"])
    if all(c in columns for c in ORACLE_COLUMNS):
        a0, a1, q0, q1 = (columns[c][rows].astype(float) for c in ORACLE_COLUMNS)
        lm = LabelModel()
        out["oracle"] = {
            "aesthetic": _accuracy(margin, q0 - q1),
            "alignment": _accuracy(margin, a0 - a1),
            "utility": _accuracy(margin, lm.utility(a0, q0) - lm.utility(a1, q1)),
        }
    return out


# -- training -------------------------------------------------------------------------------------
def _lr_factor(step: int, config: ToyPickScoreConfig) -> float:
    if config.warmup and step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, (step - config.warmup) / span)))


class _Steps(Task):
    """The toy PickScore's training as the loop's task: one round = one optimizer step on ``batch_size``
    pairs of clean images, in the order of ``BatchOrder`` (a function of (seed, step))."""

    def __init__(self, model, pairs, images: "PairImages", order, config: ToyPickScoreConfig, sched, t0: float,
                 on_log: Callable[[dict], None] | None):
        self.model, self.pairs, self.images, self.order, self.cfg = model, pairs, images, order, config
        self.sched, self.t0, self.on_log = sched, t0, on_log
        self.losses: list[float] = []

    def rounds_per_epoch(self) -> int:
        return self.cfg.steps

    def round(self, epoch: int, rnd: int) -> Round:
        return Round(epoch, rnd, list(self.order.batch(rnd)))

    def loss(self, rows: list, total: int):
        from spobench.trainers.spm import pair_loss

        a, b = self.images.batch(rows)
        labels = torch.as_tensor(self.pairs.labels[rows], dtype=torch.float32)
        loss = pair_loss(pair_scores(self.model, a, b, [self.pairs.captions[r] for r in rows]), labels)
        self._loss = loss.detach()
        return loss if len(rows) == total else loss * (len(rows) / total), {}

    def after_step(self, log: dict) -> None:
        self.losses.append(float(self._loss))
        self._grad_norm = log["grad_norm"]

    def report(self, rnd: Round, steps: list[dict]) -> tuple[list[dict], str]:
        cfg, done = self.cfg, len(self.losses)
        if not cfg.log_every or not (done % cfg.log_every == 0 or done == cfg.steps):
            return [], ""
        rec = {"step": done, "loss": float(np.mean(self.losses[-cfg.log_every:])),
               "grad_norm": self._grad_norm if cfg.max_grad_norm else None, "lr": self.sched.get_last_lr()[0],
               "logit_scale": float(self.model.clip.logit_scale.detach().exp()),
               "elapsed_s": round(time.perf_counter() - self.t0, 2)}
        if self.on_log:
            self.on_log(rec)
        return [rec], ""



def train_toy_pickscore(pairs_path: str | Path, out: str | Path, config: ToyPickScoreConfig | dict | None = None,
                        *, init: str | Path | None = None, overwrite: bool = False, command: str | None = None,
                        progress: Callable[[dict], None] | None = None) -> dict:
    """Train the tiny world's PickScore; writes ``out/model/`` (a CLIPModel folder), ``log.jsonl`` and
    ``metrics.json`` (held-out accuracy before and after training) and returns the metrics.
    ``command``: the command line that ran this, recorded with the results. ``out`` is claimed
    (``spobench.core.outdir``) for the whole run; a run that fails leaves nothing."""
    from spobench.core import outdir

    with outdir.claim(out, command="toy pickscore", overwrite=overwrite, resumable=False):
        return _train_toy_pickscore(pairs_path, out, config, init=init, command=command, progress=progress)


def _train_toy_pickscore(pairs_path: str | Path, out: str | Path, config: ToyPickScoreConfig | dict | None = None,
                         *, init: str | Path | None = None, command: str | None = None,
                         progress: Callable[[dict], None] | None = None) -> dict:
    from spobench.core.io import atomic_write_json, provenance
    from spobench.core.checkpoint import ModuleWeights
    from spobench.data.pairs import BatchOrder, PairTable, split_rows
    from spobench.trainers.loop import Loop, Schedule

    config = ToyPickScoreConfig.coerce(config)
    out = Path(out)
    t0 = time.perf_counter()
    pairs = PairTable(pairs_path)
    columns = read_columns(pairs, ORACLE_COLUMNS + ("has_label",))
    train_rows, val_rows = split_rows(pairs, config.val_fraction)
    train_rows = labeled_rows(pairs, train_rows, columns)
    val_rows = labeled_rows(pairs, val_rows, columns)[: config.val_max]
    images = PairImages(pairs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = load_scorer(init, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
        result: dict = {
            "what": "toy_pickscore: a tiny CLIP trained with PickScore's loss on clean tiny-world pairs",
            "command": command,
            "pairs": str(pairs_path), "init": str(init) if init is not None else "random tiny CLIP (seed)",
            "n_train_pairs": len(train_rows), "n_val_pairs": len(val_rows), "config": asdict(config),
            "eval_init": evaluate(model, pairs, val_rows, images, columns, config.eval_batch_size),
        }
        order = BatchOrder(pairs, train_rows, config.batch_size, config.seed) if config.steps else None
        task = _Steps(model, pairs, images, order, config, sched, t0, progress)
        # not resumable (a failed run leaves nothing): the loop takes no checkpoints
        task.loop = Loop(task, out=out, name="toy-pickscore", weights=ModuleWeights({"clip": model}, {}),
                         params=params, optimizer=opt, scheduler=sched,
                         schedule=Schedule(max_grad_norm=config.max_grad_norm or None), config=asdict(config))
        t_train = time.perf_counter()
        (out / LOG).write_text("")
        task.loop.run()
        losses = task.losses
        train_s = time.perf_counter() - t_train
        model.eval()
        result["eval"] = evaluate(model, pairs, val_rows, images, columns, config.eval_batch_size)
    k = max(1, min(50, len(losses) // 4)) if losses else 0
    result.update({
        "steps": config.steps,
        "train_loss_first": float(np.mean(losses[:k])) if losses else None,
        "train_loss_last": float(np.mean(losses[-k:])) if losses else None,
        "train_s": round(train_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
        "model": str(out / MODEL),
        "provenance": provenance(),
    })
    info = {k: result[k] for k in ("what", "command", "pairs", "init", "n_train_pairs", "n_val_pairs", "config", "steps",
                                   "eval_init", "eval", "train_s", "torch_threads", "provenance")}
    save_clip_folder(model, out / MODEL, info)
    atomic_write_json(out / METRICS, result)
    return result


def summary_lines(result: dict) -> list[str]:
    """Human-readable held-out accuracy lines (used by the CLI)."""
    ev, ev0 = result["eval"], result.get("eval_init", {})
    lines = [f"held-out pair accuracy ({ev['n_pairs']} non-tie pairs, generic label): {ev['accuracy']:.4f}"
             + (f" (init {ev0['accuracy']:.4f})" if "accuracy" in ev0 else "")]
    for name, r in ev.get("oracle", {}).items():
        init = ev0.get("oracle", {}).get(name, {}).get("accuracy")
        lines.append(f"  vs oracle {name:<9} label ({r['n_pairs']} pairs): {r['accuracy']:.4f}"
                     + (f" (init {init:.4f})" if init is not None else ""))
    return lines

