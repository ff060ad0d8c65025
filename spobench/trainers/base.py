"""What the rollout and pairs trainers (SPO, MSPO, DDPO, D3PO, Diffusion-DPO) share: a typed config, the run
folder, accelerate, the LoRA and its optimizer, and the round structure that they feed to the one training
loop (``loop.py``: micro-batches, optimizer steps, checkpoints, logs, exact resume). An algorithm
(``spo.py``) only says how a round collects training items and what the loss of a micro-batch is.

Rounds. An epoch visits every prompt once, in an order drawn from (seed, epoch). A round takes
``rollout_batch`` prompts per process, calls :meth:`Trainer.collect` (e.g. SPO's pool rollout with
the current LoRA), gathers the items of all processes, shuffles them with a generator seeded by
(seed, epoch, round), deals each process an equal share (the remainder is dropped, as the official
code does) and trains on micro-batches of ``train_batch_size``; ``grad_accum`` micro-batches make
one optimizer step (AdamW on the LoRA parameters, gradients clipped to ``max_grad_norm``).

Determinism. Every random draw of a round comes from generators derived from (seed, epoch, round,
prompt index), so the state of a run is its weights, optimizer and progress counters alone:
checkpoints are taken between rounds and ``--resume`` continues bit-identically (on CPU) to a run
that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator, Literal, Sequence

from spobench.core.config import Config, Source, setting
from spobench.core.errors import InputError
from spobench.core.io import read_json_object
from spobench.trainers import salts
from spobench.trainers.loop import Loop, Progress, Round, Schedule, Task


# =====================================================================================================
# Config: the trainers' settings (the mechanism is spobench.core.config)
# =====================================================================================================


@dataclass
class TrainerConfig(Config):
    """Settings every trainer has. Subclasses add their own fields (all need defaults)."""

    empty_strings: ClassVar[bool] = False  # `--set prompts=` would mean the folder "."

    seed: int = setting(0, "base seed: LoRA init, prompt order, every rollout's noise")
    prompts: str | None = setting(None, "a prompt file (.txt/.json/.jsonl) or a registered prompt set name")
    prompt_limit: int | None = setting(None, "use only the first N prompts", min=1)
    epochs: int = setting(10, "passes over the prompts (paper: 10)", min=1, resumable=True)
    rollout_batch: int = setting(10, "prompts per round per process (official SD-1.5: 10)", min=1)
    train_batch_size: int = setting(10, "items per micro-batch per process (official SD-1.5: 10)", min=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", min=1)
    lora_rank: int | None = setting(None, "LoRA rank (backbone default: 4 SD-1.5, 64 SDXL)", min=1,
                                    backbone="lora_rank")
    lr: float | None = setting(None, "AdamW learning rate (backbone default: 6e-5 SD-1.5, 1e-5 SDXL)", gt=0,
                               backbone="lr")
    weight_decay: float = setting(1e-4, "AdamW weight decay (official: 1e-4)", min=0)
    adam_beta1: float = setting(0.9, "AdamW beta1", min=0, lt=1)
    adam_beta2: float = setting(0.999, "AdamW beta2", min=0, lt=1)
    adam_eps: float = setting(1e-8, "AdamW epsilon", gt=0)
    lr_warmup_steps: int = setting(0, "linear LR warm-up (optimizer steps); constant after", min=0)
    max_grad_norm: float | None = setting(1.0, "clip the LoRA gradient norm to this (None: no clipping)", gt=0)
    dtype: Literal["fp32", "bf16", "fp16"] = setting("fp32", "dtype of the frozen weights (LoRA stays fp32)")
    compile: bool = setting(False, "torch.compile the UNet: the same math up to float rounding, 1.6-2x faster "
                                   "UNet calls on the tiny CPU model; the first calls of each kind compile "
                                   "(minutes on CPU, then cached on disk); on the CPU only the no-grad "
                                   "forwards for backbones other than tiny", resumable=True)
    resolution: int | None = setting(None, "image resolution (backbone default)", min=8, backbone="resolution")
    checkpoint_every: int = setting(10, "rounds between checkpoints (and one at each epoch end)", min=1,
                                    resumable=True)
    keep_checkpoints: int | None = setting(3, "keep the newest N checkpoints (None: all)", min=1, resumable=True)
    max_rounds: int | None = setting(None, "stop (with a checkpoint) after this many rounds in total", min=1,
                                     resumable=True)


# =====================================================================================================
# Run folder, seeds, prompts
# =====================================================================================================
def check_compile_toolchain(device) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: without a compiler it fails deep inside the
    first UNet call; say so up front instead."""
    import os
    import shutil

    if str(device).startswith("cpu"):
        candidates = [os.environ.get("CXX") or "", "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in candidates):
            raise InputError("setting 'compile': torch.compile on a CPU needs a C++ compiler on PATH (g++, c++ or "
                             "clang++; e.g. `apt-get install g++`); install one or leave compile=false")


# Backbones whose compiled LoRA gradients were checked against eager on the CPU (tests/trainers/test_spo.py:
# test_compiled_unet_gives_the_same_round, within 1e-3). On a tiny SD-1.5-shaped UNet (make_sd15_folder)
# torch 2.13's inductor gave the same forward (1.4e-6) and loss but LoRA gradients 11.7% (relative L2) away
# from eager, while eager float32 was within 4.5e-7 of float64, and aot_eager (the same graphs without
# inductor's code) was exact (benchmarks/README.md, "compiled gradients"): there only the no-grad forwards
# (rollout, reference), whose compiled outputs match eager, are compiled.
COMPILE_CHECKED_ON_CPU = ("tiny",)


def compile_grad_forwards(backbone: str, device) -> bool:
    """Whether ``compile`` may also compile the forwards that carry a gradient (their backward with them):
    not on the CPU for backbones other than tiny, where inductor's backward was found wrong or is unchecked."""
    return not (str(device).startswith("cpu") and backbone not in COMPILE_CHECKED_ON_CPU)


def compile_unet(unet, grad: bool, **options) -> None:
    """torch.compile ``unet`` in place, through nn.Module.compile's own hook (``_compiled_call_impl``), so
    state-dict keys, peft's adapter switch and accelerate's wrapping see the same module. ``grad=False``:
    calls made with grad enabled run the eager module (and its eager backward); calls under no_grad run the
    compiled graphs. ``options`` go to torch.compile (tests pass a recording ``backend``)."""
    import torch

    if grad:
        unet.compile(**options)
        return
    compiled = torch.compile(unet._call_impl, **options)

    def call(*args, **kwargs):
        return unet._call_impl(*args, **kwargs) if torch.is_grad_enabled() else compiled(*args, **kwargs)

    unet._compiled_call_impl = call


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, round, prompt index, ...), well mixed."""
    import numpy as np

    words = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class _RoutedUNet:
    """Stands in for ``backbone.unet`` while the policy runs with grad: calls go through the
    accelerate-prepared (DDP) module so gradients are synchronised; attributes come from the UNet."""

    def __init__(self, raw, wrapped):
        self._raw, self._wrapped = raw, wrapped

    def __call__(self, *args, **kwargs):
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._raw, name)


# =====================================================================================================
# The trainer
# =====================================================================================================
class Trainer(Task):
    """The rollout/pairs trainers' base: the backbone with its LoRA, AdamW and the round structure, trained
    by :class:`~spobench.trainers.loop.Loop`. Subclasses set ``name``/``Config`` and implement
    :meth:`collect` and :meth:`loss`; optional hooks: :meth:`setup`, :meth:`round_items`,
    :meth:`round_summary`, :meth:`bar_info`, :meth:`state_dict`/:meth:`load_state_dict`."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type[TrainerConfig]] = TrainerConfig

    def __init__(self, config: TrainerConfig, backbone, out: str | Path, *, accelerator=None, console=None,
                 prompts: Sequence[str] | None = None):
        import torch
        from accelerate import Accelerator

        from spobench.core.checkpoint import LoraWeights
        from spobench.core.dtypes import torch_dtype
        from spobench.data.prompts import load_prompts

        self.cfg = config
        self.bb = backbone
        self.out = Path(out)
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.console = console
        self.prompts = list(prompts) if prompts is not None else load_prompts(config.prompts, config.prompt_limit)

        self.bb.to(self.acc.device, torch_dtype(config.dtype, "setting 'dtype'"))
        if not self.bb.has_lora:
            self.bb.add_lora(config.lora_rank, seed=derive_seed(config.seed, salts.LORA_INIT))
        self.params: list = self.bb.trainable_parameters()
        self.bb.unet.eval()  # no dropout; the same forward in rollout and training
        if config.compile:
            check_compile_toolchain(self.acc.device)
            # rollout, reference and (where checked) grad forwards each get their graphs
            compile_unet(self.bb.unet, grad=compile_grad_forwards(self.bb.name, self.acc.device))
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                      eps=config.adam_eps, weight_decay=config.weight_decay)
        warm = config.lr_warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
        self.model, self.optimizer = self.acc.prepare(self.bb.unet, optimizer)
        schedule = Schedule(epochs=config.epochs, micro_batch=config.train_batch_size, grad_accum=config.grad_accum,
                            max_grad_norm=config.max_grad_norm, checkpoint_every=config.checkpoint_every,
                            keep_checkpoints=config.keep_checkpoints, max_rounds=config.max_rounds)
        self.loop = Loop(self, out=self.out, name=self.name, weights=LoraWeights(self.bb), params=self.params,
                         optimizer=self.optimizer, scheduler=self.scheduler, schedule=schedule,
                         config=config.to_dict(), accelerator=self.acc, model=self.model, counters=self.bb.counters,
                         console=console, tensorboard=True, hint="Try a lower lr or a smaller beta.")
        self.setup()
        self.bb.counters.reset()  # count the training's work only

    # -- hooks for algorithms ------------------------------------------------------------------------
    def setup(self) -> None:
        """Build what the algorithm needs (engine, scorer) once the backbone is on its device."""

    def collect(self, epoch: int, rnd: int, prompt_indices: list[int]) -> tuple[list, dict]:
        """Training items for this process's prompts of a round, plus stats to log (local sums)."""
        raise NotImplementedError

    def item_key(self, item) -> tuple:
        """Sort key making the gathered item order independent of the number of processes."""
        return item.key

    def round_items(self, items: list, epoch: int, rnd: int) -> list:
        """All processes' items of a round, sorted (the same list on every process), before they are
        dealt: the place for statistics over the whole round (DDPO's reward normalisation)."""
        return items

    def round_summary(self, rstats: dict, n_items: int, steps: list[dict]) -> dict:
        out = dict(rstats) | {"items": float(n_items)}
        if steps:
            for k in (k for k in steps[0] if k != "step"):
                out[f"mean_{k}"] = sum(s[k] for s in steps) / len(steps)
        return out

    def bar_info(self, info: dict, steps: list[dict]) -> str:
        loss = info.get("mean_loss")
        return f"items {int(info['items'])}" + (f" loss {loss:.4f}" if loss is not None else "")

    # -- the loop's task -----------------------------------------------------------------------------
    def rounds_per_epoch(self) -> int:
        return math.ceil(len(self.prompts) / (self.cfg.rollout_batch * self.acc.num_processes))

    def round(self, epoch: int, rnd: int) -> Round:
        """Collect this process's prompts of the round, then gather and deal the items (:meth:`share`)."""
        idx = self.round_prompts(epoch, rnd)
        local, rstats = self.collect(epoch, rnd, idx) if idx else ([], {})
        rstats = self.loop.reduce_stats({k: float(v) for k, v in sorted(rstats.items())}, any_keys=True)
        bad = [k for k, v in rstats.items() if not math.isfinite(v)]
        if bad:  # the same on every process (reduced): all stop together
            self.loop.diverged(f"rollout statistic {bad[0]!r}", rstats[bad[0]])
        mine, n_items = self.share(local, epoch, rnd)
        return Round(epoch, rnd, mine, rstats, n_items)

    def report(self, rnd: Round, steps: list[dict]) -> tuple[list[dict], str]:
        """One ``train`` row per optimizer step, then the ``round`` row."""
        before = self.progress.rounds_done - 1
        head = {"epoch": rnd.epoch, "round": rnd.index}
        rows = [{"kind": "train", "step": int(s["step"]), **head}
                | {k: v for k, v in s.items() if k != "step"} | {"rounds_done_before": before} for s in steps]
        info = self.round_summary(rnd.stats, rnd.n_items, steps)
        info |= {"round_s": rnd.seconds, "steps": float(len(steps))}
        info |= {f"counters/{k}": v for k, v in self.counters().items()}
        rows.append({"kind": "round", "step": self.progress.rounds_done, **head}
                    | {k: v for k, v in info.items() if k != "step"} | {"rounds_done_before": before})
        return rows, self.bar_info(info, steps)

    # -- pieces --------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def progress(self) -> Progress:
        return self.loop.progress

    @contextlib.contextmanager
    def policy(self) -> Iterator[None]:
        """Run the backbone's UNet through the prepared (DDP) module: use around grad forwards."""
        raw = self.bb.unet
        if self.model is raw:
            yield
            return
        self.bb.unet = _RoutedUNet(raw, self.model)
        try:
            yield
        finally:
            self.bb.unet = raw

    def round_prompts(self, epoch: int, rnd: int) -> list[int]:
        """This process's prompt indices for a round: the epoch's shuffled order, contiguous slices."""
        import torch

        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, salts.EPOCH_ORDER))
        order = torch.randperm(len(self.prompts), generator=g).tolist()
        per, P = self.cfg.rollout_batch, self.acc.num_processes
        glob = order[rnd * per * P:(rnd + 1) * per * P]
        return glob[self.acc.process_index * per:(self.acc.process_index + 1) * per]

    def generators(self, epoch: int, rnd: int, prompt_indices: Sequence[int]) -> list:
        """One generator per prompt, seeded by (seed, epoch, round, prompt index)."""
        from spobench.engine.rollout import make_generators

        return make_generators([derive_seed(self.cfg.seed, epoch, rnd, i) for i in prompt_indices],
                               device=self.acc.device)

    def share(self, items: list, epoch: int, rnd: int) -> tuple[list, int]:
        """Gather all processes' items, shuffle them reproducibly, deal an equal share to each."""
        import torch
        from accelerate.utils import gather_object

        P = self.acc.num_processes
        if P > 1:
            items = gather_object(items)
        items = self.round_items(sorted(items, key=self.item_key), epoch, rnd)
        g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, rnd, salts.SHARE))
        perm = torch.randperm(len(items), generator=g).tolist()
        per = len(items) // P
        mine = perm[self.acc.process_index * per:(self.acc.process_index + 1) * per]
        return [items[i] for i in mine], len(items)

    def train_items(self, items: list) -> list[dict]:
        return self.loop.train_items(items)

    def clip_gradients(self):
        return self.loop.clip_gradients()

    def counters(self) -> dict[str, float]:
        return self.loop.counters()

    def save(self) -> Path | None:
        return self.loop.save()

    def restore(self, path: Path) -> None:
        self.loop.restore(path)

    def train(self) -> dict:
        """Run (or continue) training to the end; returns the summary written to summary.json."""
        return self.finish(complete=self.loop.run())

    def finish(self, complete: bool) -> dict:
        """Write the final LoRA (diffusers format) and summary.json (main process)."""
        summary = {"trainer": self.name, "complete": complete, "progress": dataclasses.asdict(self.progress),
                   "counters": self.counters(), "config": self.cfg.to_dict(), "backbone": self.bb.identity(),
                   "num_processes": self.acc.num_processes}
        if self.is_main:
            from spobench.core.io import atomic_write_json, provenance

            # also when stopped by max_rounds (a budgeted run): summary["complete"] says which
            self.bb.save_lora(self.out / "lora")
            summary["lora"] = str(self.out / "lora")
            atomic_write_json(self.out / "summary.json", summary | provenance())
            self.loop.close()
        self.acc.wait_for_everyone()
        return summary

    # -- the command line ----------------------------------------------------------------------------
    @classmethod
    def cli(cls, *, backbone: str, model: str | None, out: Path, config: Path | None, overrides: Sequence[str],
            resume: bool, overwrite: bool, console=None, preset: str | None = None) -> dict:
        """``spobench train <name>``: the settings from --preset, --config and --set in that order (on a
        resume, over the run's own), then :meth:`run`."""
        from spobench.core import catalog, outdir
        from spobench.trainers.presets import apply_preset

        out = Path(out)
        bb_cls = catalog.BACKBONES.get(backbone)
        cfg = cls.Config.load(config, overrides, base=apply_preset(cls.Config, cls.name, preset, backbone=backbone))
        outdir.check(out, resume=resume, overwrite=overwrite, results=("summary.json", "lora"))  # what _finish writes
        stored = cls.stored_config(out) if resume else None
        if stored is not None:
            cfg = cls.Config.load(config, overrides, base=apply_preset(cls.Config, cls.name, preset, stored, backbone))
            cfg.check_resume(stored)
        cfg = cls.prepare_config(cfg, backbone, bb_cls.defaults)
        return cls.run(cfg, backbone=backbone, model=model, out=out, resume=resume, overwrite=overwrite,
                       console=console)

    @classmethod
    def stored_config(cls, out: Path) -> TrainerConfig | None:
        """The run's own config: its latest checkpoint's, or (killed before its first checkpoint) the
        one it started with; None for a folder with neither. A bad value names the file it is in."""
        from spobench.core.checkpoint import latest_checkpoint, read_checkpoint

        ckpt = latest_checkpoint(out)
        where = ckpt / "config.json" if ckpt is not None else out / "config.json"
        if not where.is_file():
            return None
        try:
            values = read_checkpoint(ckpt).config if ckpt is not None else read_json_object(where, "run config")
            return cls.Config.from_dict(values, Source(str(where)))
        except InputError as e:  # a bad value there names the file it is in
            raise (e if str(where) in str(e) else InputError(f"{where}: {e}")) from None

    @classmethod
    def run(cls, cfg: TrainerConfig, *, backbone: str, model: str | None, out: Path, resume: bool,
            overwrite: bool, console=None) -> dict:
        """Train with a ready config (validated, per-backbone defaults filled by
        :meth:`prepare_config`): run folder, backbone, resume, train. ``spobench reproduce`` passes
        its cells' typed configs here; on a resume only ``resumable`` settings may differ from the
        run's own."""
        import torch
        from accelerate import Accelerator

        from spobench.core import outdir
        from spobench.core.checkpoint import latest_checkpoint

        out = Path(out)
        outdir.check(out, resume=resume, overwrite=overwrite, results=("summary.json", "lora"))  # what _finish writes
        ckpt = latest_checkpoint(out) if resume else None
        if resume:
            stored = cls.stored_config(out)
            if stored is not None:
                cfg.check_resume(stored)

        acc = Accelerator(cpu=not torch.cuda.is_available())
        from spobench.models.backbones import load_backbone
        from spobench.core.io import atomic_write_json

        # --out is claimed (spobench.core.outdir: locked for the run, --overwrite's old run set aside) once the
        # backbone and the prompts/pairs have loaded; a fresh run that fails later (undecodable image,
        # non-finite loss, full disk) before its first checkpoint is removed again (an overwritten one
        # comes back), and a resume that fails (a corrupt checkpoint) leaves the folder as it was.
        bb = load_backbone(backbone, model)
        trainer = cls(cfg, bb, out, accelerator=acc, console=console)
        acc.wait_for_everyone()  # every process has checked --out before the main one touches it
        with outdir.claim(out, command=f"train {cls.name}", resume=resume, overwrite=overwrite,
                          enabled=acc.is_main_process, keep=lambda: latest_checkpoint(out) is not None):
            if resume and latest_checkpoint(out) != ckpt:  # another run changed it while this one loaded
                raise InputError(f"{out}: its checkpoints changed while this run was loading; run again")
            if ckpt is not None:
                trainer.restore(ckpt)  # under the lock: it also trims log.jsonl to the checkpoint
            if acc.is_main_process:
                if ckpt is None:
                    for stale in ("log.jsonl", "summary.json"):
                        (out / stale).unlink(missing_ok=True)
                    shutil.rmtree(out / "tb", ignore_errors=True)
                atomic_write_json(out / "config.json", cfg.to_dict())
            acc.wait_for_everyone()
            if ckpt is not None and console is not None and acc.is_main_process:
                console.print(f"resuming from {ckpt} (round {trainer.progress.rounds_done}, "
                              f"step {trainer.progress.step})")
            summary = trainer.train()
        if console is not None and acc.is_main_process:
            c = summary["counters"]
            done = "finished" if summary["complete"] else "stopped"
            console.print(f"{done} after {summary['progress']['rounds_done']} rounds, {summary['progress']['step']} "
                          f"steps; UNet rows {int(c.get('unet_rows_grad', 0))} grad / "
                          f"{int(c.get('unet_rows_nograd', 0))} no-grad; "
                          + (f"LoRA in {out / 'lora'}" if summary["complete"] else f"checkpoints in {out}"))
        return summary

    @classmethod
    def prepare_config(cls, cfg: TrainerConfig, backbone: str, defaults) -> TrainerConfig:
        """Per-backbone defaults; subclasses fill algorithm-specific ones (e.g. the scorer)."""
        if cfg.prompts is None:
            cfg.prompts = defaults.prompts
            if cfg.prompts is None:
                raise InputError("setting 'prompts' is required: a prompt file or a prompt set name "
                                 "(e.g. --set prompts=pickapic_4k.json)")
        return cfg.resolve(defaults)
