"""The one training loop: every trainer (SPO, MSPO, DDPO, D3PO, Diffusion-DPO, the SPM, the tiny world's base
model and PickScore) runs its optimisation through :class:`Loop` and checkpoints in ``core.checkpoint``'s format.

What the loop owns. A run is ``epochs`` epochs of ``task.rounds_per_epoch()`` rounds. A round asks the task for
this process's training items (:meth:`Task.round`: a rollout, a batch of pairs, one pretraining batch), cuts
them into micro-batches of ``micro_batch`` items, and ``grad_accum`` micro-batches make one optimizer step:
backward through accelerate (gradients synchronised on the last micro-batch only), the gradient norm clipped to
``max_grad_norm`` (None: measured, not clipped), the optimizer and LR-scheduler step. A non-finite loss or
gradient norm stops the run with :class:`TrainingError` naming the last good checkpoint. Checkpoints are taken
between rounds (every ``checkpoint_every`` rounds, at each epoch end and where the run stops; None: never),
log rows go to ``log.jsonl`` (and TensorBoard), and :meth:`Loop.restore` puts weights, optimizer, scheduler,
RNG states, progress and the task's own state back, so a resumed run is bit-identical (on CPU) to one that was
never interrupted: every random draw of a round must come from generators seeded by the round.

What a task gives (:class:`Task`): ``rounds_per_epoch``, ``round`` and ``loss``; optionally its own
resumable state, a hook after each optimizer step (an EMA) and the log rows of a round. The trainable set is
whatever ``params`` and ``weights`` say: a LoRA (``core.checkpoint.LoraWeights``) or whole modules
(``ModuleWeights``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from spobench.core.errors import SpobenchError


class TrainingError(SpobenchError):
    """Training cannot go on (non-finite loss, gradients or rollout statistics); the last good
    checkpoint is kept."""


LOG = "log.jsonl"


@dataclass
class Progress:
    epoch: int = 0  # epoch of the next round
    round: int = 0  # round (within the epoch) of the next round
    rounds_done: int = 0
    step: int = 0  # optimizer steps taken
    counters: dict = field(default_factory=dict)  # cumulative over earlier sessions, summed over processes


@dataclass
class Schedule:
    """How the loop walks a run; ``micro_batch=None`` trains each round's items as one micro-batch."""

    epochs: int = 1
    micro_batch: int | None = None
    grad_accum: int = 1
    max_grad_norm: float | None = None
    checkpoint_every: int | None = None  # rounds between checkpoints (None: no checkpoints at all)
    keep_checkpoints: int | None = None
    max_rounds: int | None = None


@dataclass
class Round:
    """A round's training items on this process, its statistics (reduced over processes) and its item
    count over all processes."""

    epoch: int
    index: int
    items: list
    stats: dict = field(default_factory=dict)
    n_items: int = 0
    seconds: float = 0.0


class Task:
    """What an algorithm plugs into the loop: three required methods, the rest optional."""

    def rounds_per_epoch(self) -> int:
        raise NotImplementedError

    def round(self, epoch: int, rnd: int) -> Round:
        """This process's training items of round ``rnd`` of ``epoch``."""
        raise NotImplementedError

    def loss(self, items: list, total: int) -> tuple[Any, dict]:
        """Loss of a micro-batch, scaled so that the micro-batches of one step sum to the step's mean
        over its ``total`` items; stats are sums over the micro-batch's items."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Algorithm state a resume needs beyond weights, optimizer and progress (JSON, the same on every
        process; e.g. DDPO's per-prompt reward buffers, a list of losses)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (``{}`` for checkpoints without any)."""

    def after_step(self, log: dict) -> None:
        """Called after each optimizer step with its stats (e.g. an EMA update)."""

    def report(self, rnd: Round, steps: list[dict]) -> tuple[list[dict], str]:
        """The log rows of a finished round and a progress-bar text."""
        return [], ""


class _OneProcess:
    """Accelerate's Accelerator, as far as the loop uses it, for a plain single-process run."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device or "cpu")

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        import torch

        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def wait_for_everyone(self) -> None:
        pass


class Loop:
    def __init__(self, task: Task, *, out: str | Path, name: str, weights, params: Sequence, optimizer,
                 scheduler=None, schedule: Schedule, config: dict, accelerator=None, model=None, counters=None,
                 console=None, tensorboard: bool = False, hint: str = "Try a lower lr."):
        self.task, self.out, self.name = task, Path(out), name
        self.weights, self.optimizer, self.scheduler = weights, optimizer, scheduler
        # a LIST, not a generator: clip_grad_norm_ on an exhausted iterator silently clips nothing
        self.params = list(params)
        self.schedule, self.config = schedule, config
        self.acc = accelerator or _OneProcess()
        self.model = model  # the accelerate-prepared module (no_sync between micro-batches)
        self.counters_now = counters
        self.console, self.tensorboard, self.hint = console, tensorboard, hint
        self.progress = Progress()
        self._writer = None

    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    # -- the run -------------------------------------------------------------------------------------
    def total_rounds(self) -> int:
        return self.schedule.epochs * self.task.rounds_per_epoch()

    def run(self) -> bool:
        """Train (or continue) to the end or to ``max_rounds``; True when every round is done."""
        from spobench.core.progress import Progress as Bar

        s, R = self.schedule, self.task.rounds_per_epoch()
        total = self.total_rounds()
        stop_at = total if s.max_rounds is None else min(total, s.max_rounds)
        since_ckpt = 0
        # counted to where this session stops (max_rounds), so that the ETA is this session's
        with Bar(f"{self.name} rounds", total=stop_at, completed=self.progress.rounds_done, unit="round",
                 console=self.console, enabled=self.is_main) as bar:
            while self.progress.rounds_done < stop_at:
                text = self.run_round()
                since_ckpt += 1
                bar.update(completed=self.progress.rounds_done, info=text)
                end_of_epoch = self.progress.rounds_done % R == 0
                if s.checkpoint_every is not None and (since_ckpt >= s.checkpoint_every or end_of_epoch
                                                       or self.progress.rounds_done >= stop_at):
                    self.save()
                    since_ckpt = 0
        return self.progress.rounds_done >= total

    def run_round(self) -> str:
        """One round: the task's items, their optimizer steps, the round's log rows; returns the bar text."""
        R = self.task.rounds_per_epoch()
        epoch, rnd = divmod(self.progress.rounds_done, R)
        self.progress.epoch, self.progress.round = epoch, rnd
        t0 = time.perf_counter()
        work = self.task.round(epoch, rnd)
        steps = self.train_items(work.items)
        self.progress.rounds_done += 1
        self.progress.epoch, self.progress.round = divmod(self.progress.rounds_done, R)
        work.seconds = time.perf_counter() - t0
        rows, text = self.task.report(work, steps)
        for row in rows:
            self.log(row)
        return text

    # -- one round's optimizer steps -----------------------------------------------------------------
    def train_items(self, items: list) -> list[dict]:
        """Optimizer steps over this process's share of a round; returns one stats dict per step."""
        import torch

        bs, ga = self.schedule.micro_batch or max(len(items), 1), self.schedule.grad_accum
        micro = [items[i:i + bs] for i in range(0, len(items), bs)]
        logs = []
        for g0 in range(0, len(micro), ga):
            group = micro[g0:g0 + ga]
            total = sum(len(m) for m in group)
            sums: dict[str, float] = {}
            for j, mb in enumerate(group):
                sync = j == len(group) - 1 or self.model is None
                ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
                with ctx:
                    loss, stats = self.task.loss(mb, total)
                    if not self.all_finite(loss):
                        self.diverged("loss", loss)
                    self.acc.backward(loss)
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(v)
            norm = self.clip_gradients()
            if not torch.isfinite(torch.as_tensor(norm)).all():
                self.diverged("gradient norm", norm)
            lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.step += 1
            stats = self.reduce_stats(sums | {"items": float(total)})
            n = max(stats.pop("items"), 1.0)
            log = {k: v / n for k, v in stats.items()} | {"grad_norm": float(norm), "items": n, "lr": lr,
                                                          "step": float(self.progress.step)}
            self.task.after_step(log)
            logs.append(log)
        return logs

    def clip_gradients(self):
        """Clip the gradient norm of ``params`` (accelerate-aware); returns the norm before clipping."""
        import torch

        if self.schedule.max_grad_norm is None:
            grads = [p.grad.detach().norm() for p in self.params if p.grad is not None]
            return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.tensor(0.0)
        return self.acc.clip_grad_norm_(self.params, self.schedule.max_grad_norm)

    def all_finite(self, value) -> bool:
        """Finite on every process (so that all processes stop together, none hangs in a collective)."""
        import torch

        bad = torch.tensor([0.0 if torch.isfinite(value.detach()).all() else 1.0], device=self.acc.device)
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def reduce_stats(self, sums: dict[str, float], any_keys: bool = False) -> dict[str, float]:
        """Sum per-process stats over processes. Every process must pass the same keys, unless
        ``any_keys`` (one more collective): then a key missing on a process counts 0 there (a
        process whose share of a round's prompts is empty has no round stats at all)."""
        import torch

        if self.acc.num_processes == 1:
            return dict(sums)
        if any_keys:
            from accelerate.utils import gather_object

            keys = sorted({k for ks in gather_object([sorted(sums)]) for k in ks})
        else:
            keys = sorted(sums)
        if not keys:
            return {}
        t = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))

    def diverged(self, what: str, value) -> None:
        from spobench.core.checkpoint import latest_checkpoint

        last = latest_checkpoint(self.out)
        keep = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"
        raise TrainingError(
            f"non-finite {what} ({_float(value)}) at epoch {self.progress.epoch}, round {self.progress.round}, "
            f"step {self.progress.step}{keep}. {self.hint}")

    # -- counters, logs ------------------------------------------------------------------------------
    def counters(self) -> dict[str, float]:
        """Cumulative counters of the whole run (earlier sessions included), summed over processes."""
        if self.counters_now is None:
            return dict(self.progress.counters)
        now = {k: float(v) for k, v in self.counters_now.as_dict().items() if k != "wall_s"}
        now = self.reduce_stats(now)
        now["wall_s"] = float(self.counters_now.wall_s)
        base = self.progress.counters
        return {k: base.get(k, 0.0) + v for k, v in now.items()}

    def log(self, row: dict) -> None:
        """Append a row to log.jsonl (main process); with ``tensorboard`` its numbers also go to tb/ as
        ``<kind>/<name>`` at its ``step``. ``rounds_done_before`` marks the round it belongs to, so that a
        resume drops the rows of rounds after its checkpoint."""
        if not self.is_main:
            return
        row = row if "rounds_done_before" in row else row | {"rounds_done_before": self.progress.rounds_done - 1}
        if self.tensorboard:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.out / "tb"))
            for k, v in row.items():
                if k not in ("kind", "step", "epoch", "round") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
        with open(self.out / LOG, "a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """A checkpoint of the state between rounds (every process must call it)."""
        from spobench.core.checkpoint import capture_rng, save_checkpoint

        progress = asdict(self.progress) | {"counters": self.counters(), "trainer_state": self.task.state_dict()}
        rngs = [capture_rng()]
        if self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            rngs = gather_object(rngs)
            self.check_in_sync()
        path = None
        if self.is_main:
            path = save_checkpoint(self.out, self.progress.rounds_done, weights=self.weights, optimizer=self.optimizer,
                                   scheduler=self.scheduler, progress=progress, config=self.config, trainer=self.name,
                                   rng_states=rngs, keep=self.schedule.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def check_in_sync(self) -> None:
        """Every process must hold the same weights (DDP keeps them equal); a cheap checksum proves it."""
        import torch
        from accelerate.utils import gather

        local = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()])
                             for p in self.params]).sum(0).to(self.acc.device)
        sums = gather(local[None]).cpu()
        if not torch.equal(sums, sums[:1].expand_as(sums)):
            raise TrainingError(f"the {self.acc.num_processes} processes hold different weights "
                                f"(checksums {sums[:, 0].tolist()}); gradients were not synchronised")

    def resume(self) -> Path | None:
        """Restore the run's latest checkpoint, if any; returns it."""
        from spobench.core.checkpoint import latest_checkpoint

        path = latest_checkpoint(self.out)
        if path is not None:
            self.restore(path)
        return path

    def restore(self, path: Path) -> None:
        from spobench.core.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path, weights=self.weights, optimizer=self.optimizer, scheduler=self.scheduler,
                               trainer=self.name, rank=self.acc.process_index)
        saved_p = ckpt.manifest.get("num_processes", 1)
        if saved_p != self.acc.num_processes and self.is_main:
            import warnings

            warnings.warn(f"{path} was written by {saved_p} processes, this run has {self.acc.num_processes}: "
                          "rounds hold a different number of items from here on, so the run will not be "
                          "identical to an uninterrupted one", stacklevel=2)
        p = ckpt.progress
        self.progress = Progress(epoch=p["epoch"], round=p["round"], rounds_done=p["rounds_done"], step=p["step"],
                                 counters=dict(p.get("counters", {})))
        self.task.load_state_dict(p.get("trainer_state", {}))
        if self.counters_now is not None:
            self.counters_now.reset()
        if self.is_main:  # drop log lines written after the checkpoint
            log = self.out / LOG
            if log.exists():
                from spobench.core.io import atomic_write_text

                keep = [line for line in log.read_text().splitlines()
                        if (row := _log_row(line)) and row.get("rounds_done_before", -1) < p["rounds_done"]]
                atomic_write_text(log, "".join(line + "\n" for line in keep))


def _log_row(line: str) -> dict:
    """A log.jsonl row; {} for a blank line or the truncated last line of a killed run."""
    try:
        row = json.loads(line) if line.strip() else {}
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


def _float(value) -> float:
    try:
        return float(value.detach()) if hasattr(value, "detach") else float(value)
    except (TypeError, ValueError):
        return float("nan")


def refuse_old_checkpoint(folder: Path, marker: str, what: str) -> None:
    """A run folder of ``what`` from before the shared checkpoint format (``folder/marker``) cannot be
    resumed: say so in one line instead of silently starting over."""
    if (Path(folder) / marker).exists():
        from spobench.core.errors import InputError

        raise InputError(f"{folder}: a {what} checkpoint in the format before spobench's shared one; it cannot "
                         "be resumed: start again with --overwrite or choose another --out")


