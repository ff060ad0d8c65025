"""Resumable training checkpoints: the one format of every trainer (``spobench.trainers.loop``).

A checkpoint is one folder ``<run>/checkpoints/checkpoint-<NNNNNN>`` (NNNNNN = rounds done), written
to a temp folder and renamed into place (``io.atomic_dir``), so a killed run never leaves half a
checkpoint. It holds::

    manifest.json          what the folder holds; the trained weights' identity, trainer, progress
    lora/pytorch_lora_weights.safetensors   a LoRA in diffusers' format (loadable by a pipeline), or
    weights/<name>.safetensors              whole modules (the SPM, the tiny world's UNet), by name
    optimizer.pt           optimizer state            (torch.load(weights_only=True))
    scheduler.pt           LR-scheduler state         (torch.load(weights_only=True))
    progress.json          epoch, round, rounds done, optimizer steps, cumulative counters
    config.json            the trainer config the run uses
    rng_rank<R>.pt         torch CPU/CUDA, numpy and python RNG states of process R

Nothing is unpickled: tensors load with safetensors or ``torch.load(weights_only=True)``.
What is trained is a *weights* object (:class:`LoraWeights`, :class:`ModuleWeights`): it writes and reads
its files and refuses a checkpoint of other weights (another backbone, base model, LoRA rank or model)
with an error naming both.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spobench.core.errors import InputError, ModelLoadError
from spobench.core.io import atomic_dir, atomic_write_json, provenance, save_torch

FORMAT = "spobench-checkpoint"
VERSION = 1
CHECKPOINTS = "checkpoints"
PREFIX = "checkpoint-"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")


# -- RNG states ---------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# -- finding checkpoints ------------------------------------------------------------------------------
def checkpoint_dir(run_dir: str | Path, index: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"{PREFIX}{index:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a manifest) of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / "manifest.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (None keeps all); returns the deleted ones."""
    if keep is None:
        return []
    found = list_checkpoints(run_dir)
    old = found[: max(len(found) - keep, 0)]
    for p in old:
        # renamed first: a kill in the middle of rmtree would leave a checkpoint that still has its
        # manifest but lacks files; a kill now leaves a stale ``.NAME.old`` that the next run removes
        gone = p.with_name(f".{p.name}.old")
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(p, gone)
        shutil.rmtree(gone, ignore_errors=True)
    return old


# -- what is trained ----------------------------------------------------------------------------------
class LoraWeights:
    """A backbone's LoRA: ``lora/`` in diffusers' format; the manifest names the backbone and the rank."""

    def __init__(self, backbone):
        self.backbone = backbone

    def manifest(self) -> dict:
        return {"backbone": self.backbone.identity(), "lora_rank": self.backbone.lora_rank}

    def check(self, manifest: dict, where) -> None:
        saved = manifest.get("backbone", {})
        here = self.backbone.identity()
        for key, what in (("backbone", "backbone"), ("source", "base model"), ("prediction_type", "prediction type")):
            if saved.get(key) != here.get(key):
                raise ModelLoadError(
                    f"{where}: checkpoint was trained on {what} {saved.get(key)!r}, but this run uses "
                    f"{here.get(key)!r}; resume with the same --backbone/--model or start a new --out"
                )
        if manifest.get("lora_rank") != self.backbone.lora_rank:
            raise ModelLoadError(f"{where}: checkpoint has LoRA rank {manifest.get('lora_rank')}, this run uses "
                                 f"rank {self.backbone.lora_rank}")

    def save(self, folder: Path) -> None:
        self.backbone.save_lora(folder / "lora")

    def load(self, folder: Path) -> None:
        self.backbone.load_lora(folder / "lora", rank=self.backbone.lora_rank)


class ModuleWeights:
    """Whole modules trained from their first to their last parameter: ``weights/<name>.safetensors`` each
    (state dicts, buffers included); ``identity`` (JSON) says what they are and must match on resume."""

    def __init__(self, modules: dict, identity: dict):
        self.modules, self.identity = modules, identity

    def manifest(self) -> dict:
        return {"weights": {"modules": sorted(self.modules), **self.identity}}

    def check(self, manifest: dict, where) -> None:
        saved, here = manifest.get("weights"), self.manifest()["weights"]
        if not isinstance(saved, dict):
            raise ModelLoadError(f"{where}: checkpoint holds no whole-model weights (a LoRA run's?); start a new --out")
        for key in sorted(set(saved) | set(here)):
            if saved.get(key) != here.get(key):
                raise ModelLoadError(f"{where}: checkpoint weights have {key} {saved.get(key)!r}, this run has "
                                     f"{here.get(key)!r}; start a new --out")

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        (folder / "weights").mkdir()
        for name, module in self.modules.items():
            # clones: safetensors refuses tensors that share storage (tied weights load back through the module)
            state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(folder / "weights" / f"{name}.safetensors"))

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        for name, module in self.modules.items():
            file = folder / "weights" / f"{name}.safetensors"
            if not file.is_file():
                raise InputError(f"{file}: missing from the checkpoint; resume from another one or start a new --out")
            try:
                module.load_state_dict(load_file(str(file)))
            except Exception as e:  # noqa: BLE001 - a truncated file (safetensors) or other keys/shapes (torch)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise InputError(f"{file}: does not fit this run ({first[:200]})") from None


# -- saving -------------------------------------------------------------------------------------------
KILL_ENV = "SPOBENCH_TEST_KILL_AT"


def _test_kill_point(where: str) -> None:
    """Test hook (tests/robustness/test_kill_resume.py): ``SPOBENCH_TEST_KILL_AT=checkpoint-000003:files``
    SIGKILLs this process after checkpoint 3's files are written into its temp folder but before its
    manifest (``...:manifest``: after the manifest, before the rename), i.e. in the middle of an
    atomic checkpoint write. Unset (always, outside tests) it does nothing."""
    if os.environ.get(KILL_ENV) == where:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temps(run_dir: str | Path) -> list[Path]:
    """Delete the temp folders of checkpoint writes that a killed process left behind
    (``.checkpoint-NNNNNN.*.tmp``, ``.checkpoint-NNNNNN.old``); never a complete checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    stale = [p for p in root.glob(f".{PREFIX}*") if p.is_dir() and p.name.endswith((".tmp", ".old"))] \
        if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


@dataclass
class Checkpoint:
    path: Path
    manifest: dict
    progress: dict
    config: dict


def save_checkpoint(run_dir: str | Path, index: int, *, weights, optimizer, scheduler, progress: dict,
                    config: dict, trainer: str, rng_states: list[dict] | None = None,
                    keep: int | None = None) -> Path:
    """Write checkpoint ``index`` atomically (call on the main process only) and prune old ones.

    ``rng_states``: one :func:`capture_rng` dict per process (gathered by the caller); this
    process's alone when None.
    """
    path = checkpoint_dir(run_dir, index)
    rng_states = rng_states if rng_states is not None else [capture_rng()]
    remove_stale_temps(run_dir)
    with atomic_dir(path) as tmp:
        weights.save(tmp)
        save_torch(tmp / "optimizer.pt", optimizer.state_dict())  # a full disk: one line, not torch's C++ error
        save_torch(tmp / "scheduler.pt", scheduler.state_dict() if scheduler is not None else {})
        for rank, state in enumerate(rng_states):
            save_torch(tmp / f"rng_rank{rank}.pt", state)
        atomic_write_json(tmp / "progress.json", progress)
        atomic_write_json(tmp / "config.json", config)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT, "version": VERSION, "trainer": trainer, "created": time.time(), **weights.manifest(),
            "progress": progress, "num_processes": len(rng_states), "files": files, **provenance(),
        }
        _test_kill_point(f"{path.name}:files")
        atomic_write_json(tmp / "manifest.json", manifest)  # last: its presence marks a full checkpoint
        _test_kill_point(f"{path.name}:manifest")
    prune_checkpoints(run_dir, keep)
    return path


# -- loading ------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise InputError(f"{path}: not a checkpoint (no manifest.json)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file}: corrupt manifest ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{file}: not a spobench checkpoint manifest")
    if manifest.get("version", 0) > VERSION:
        raise InputError(f"{file}: checkpoint format v{manifest['version']} is newer than this spobench (v{VERSION})")
    return manifest


def check_compatible(manifest: dict, weights, trainer: str | None = None, where: str | Path = "checkpoint") -> None:
    """Refuse a checkpoint written for other weights (backbone, base model, LoRA rank, model) or another trainer."""
    weights.check(manifest, where)
    if trainer is not None and manifest.get("trainer") != trainer:
        raise ModelLoadError(f"{where}: checkpoint was written by trainer {manifest.get('trainer')!r}, not {trainer!r}")


PROGRESS_KEYS = ("epoch", "round", "rounds_done", "step")


def _read_json_object(file: Path) -> dict:
    """A checkpoint's JSON sidecar as a dict, or one InputError naming the file."""
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise InputError(f"{file}: missing from the checkpoint; resume from another one or start a new --out") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: corrupt checkpoint file ({getattr(e, 'msg', None) or e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{file}: corrupt checkpoint file (expected a JSON object)")
    return value


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The manifest, progress and config of a checkpoint (no tensors loaded); a malformed sidecar
    is one InputError naming its file."""
    path = Path(path)
    manifest = read_manifest(path)
    progress = _read_json_object(path / "progress.json")
    bad = [k for k in PROGRESS_KEYS if not (isinstance(progress.get(k), int) and progress[k] >= 0)]
    if bad:
        raise InputError(f"{path / 'progress.json'}: corrupt checkpoint file ({bad[0]!r} must be a count >= 0)")
    if not isinstance(progress.get("counters", {}), dict) or not isinstance(progress.get("trainer_state", {}), dict):
        raise InputError(f"{path / 'progress.json'}: corrupt checkpoint file (counters/trainer_state must be objects)")
    config = _read_json_object(path / "config.json")
    return Checkpoint(path, manifest, progress, config)


def _load_tensors(file: Path):
    """``torch.load(weights_only=True)`` of a checkpoint file; a truncated or foreign file is one
    InputError naming it (torch says 'PytorchStreamReader failed ...' or an unpickling error)."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"{file}: missing from the checkpoint; resume from another one or start a new --out") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{file}: corrupt checkpoint file ({first[:200]})") from None


def load_checkpoint(path: str | Path, *, weights, optimizer, scheduler, trainer: str | None = None,
                    rank: int = 0) -> Checkpoint:
    """Restore the weights (in place: the optimizer keeps its parameters), optimizer, scheduler and
    this process's RNG states. A LoRA backbone must already carry a LoRA of the saved rank."""
    ckpt = read_checkpoint(path)
    path = ckpt.path
    check_compatible(ckpt.manifest, weights, trainer, where=path)
    weights.load(path)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", scheduler)):
        if target is None:
            continue
        try:
            target.load_state_dict(_load_tensors(path / name))
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:  # loads, but not for this run
            raise InputError(f"{path / name}: does not fit this run ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    rng = path / f"rng_rank{rank}.pt"
    if rng.is_file():
        try:
            restore_rng(_load_tensors(rng))
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise InputError(f"{rng}: corrupt checkpoint file ({type(e).__name__}: {e})"[:300]) from None
    return ckpt
