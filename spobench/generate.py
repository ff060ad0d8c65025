"""Generate images with fixed seeds: PNGs plus a JSONL manifest that says how each was made.

Image ``i`` of prompt ``p`` uses seed ``seed + p * images_per_prompt + i`` and its own generator,
so an image does not depend on the batch it was drawn in. Every PNG and the manifest are written
atomically, and ``resume`` skips images the manifest already holds: a killed run loses at most
one batch and never leaves a half-written file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spobench.errors import InputError
from spobench.io import atomic_file, atomic_write_text, provenance

MANIFEST = "manifest.jsonl"


@dataclass
class ImageJob:
    index: int
    prompt_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return f"{self.index:05d}.png"


def plan(prompts: Sequence[str], seed: int, images_per_prompt: int = 1) -> list[ImageJob]:
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            n = p * images_per_prompt + i
            jobs.append(ImageJob(n, p, prompt, seed + n))
    return jobs


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless asked to resume or overwrite it (changes nothing)."""
    out = Path(out)
    if resume and overwrite:
        raise InputError("give only one of --resume and --overwrite")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise InputError(f"{out}: output folder exists and is not empty; pass --resume or --overwrite")


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """``check_out_dir``, then empty the folder for ``overwrite`` and create it."""
    out = Path(out)
    check_out_dir(out, resume, overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def read_manifest(out: Path) -> list[dict]:
    """The rows of ``out/manifest.jsonl`` ([] when there is none), each checked: one JSON object per
    line with an int ``index``, a str ``file`` and ``prompt`` (int ``prompt_index`` and int/null ``seed``
    when present), no index or file twice, and every file inside ``out`` once symlinks are resolved (a
    manifest cannot make eval score, or generate skip, a file elsewhere). Errors name the line."""
    import posixpath

    out = Path(out)
    path = out / MANIFEST
    if not path.exists() and not path.is_symlink():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a manifest file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8 (a manifest is JSON lines)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read it: {e.strerror}") from None
    root = out.resolve()
    rows, where = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: corrupt manifest line ({e.msg})") from None
        except RecursionError:
            raise InputError(f"{path}:{n}: corrupt manifest line (nested too deeply)") from None
        _check_manifest_row(row, f"{path}:{n}", root)
        for key, value in (("index", row["index"]), ("file", posixpath.normpath(row["file"]))):  # ./a.png is a.png
            if (key, value) in where:
                raise InputError(f"{path}:{n}: {key} {row[key]!r} is already on line {where[key, value]}")
            where[key, value] = n
        rows.append(row)
    return rows


def _check_manifest_row(row, at: str, root: Path) -> None:
    if not isinstance(row, dict):
        raise InputError(f"{at}: a manifest line must be a JSON object, got {type(row).__name__}")
    for key, kinds, need in (("index", int, True), ("file", str, True), ("prompt", str, True),
                             ("prompt_index", int, False), ("seed", (int, type(None)), False)):
        if key not in row:
            if need:
                raise InputError(f"{at}: missing field {key!r}")
            continue
        if isinstance(row[key], bool) or not isinstance(row[key], kinds):
            want = {int: "an integer", str: "a string"}.get(kinds, "an integer or null")
            raise InputError(f"{at}: field {key!r} must be {want}, got {json.dumps(row[key])[:60]}")
    if row["index"] < 0 or row.get("prompt_index", 0) < 0:
        raise InputError(f"{at}: index and prompt_index must be >= 0")
    file = row["file"]
    try:
        target = (root / file).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise InputError(f"{at}: file {file!r} is not a usable path ({e})") from None
    if not file.strip() or target == root:
        raise InputError(f"{at}: file {file!r} does not name a file in {root}")
    if not target.is_relative_to(root):
        raise InputError(f"{at}: file {file!r} resolves to {target}, outside {root} (manifest paths must stay "
                         "inside the folder)")


def to_uint8(images) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return arr


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_file(path) as f:
        Image.fromarray(array).save(f, format="PNG")


def generate(backbone, prompts: Sequence[str], out: str | Path, *, seed: int = 0, images_per_prompt: int = 1,
             sampler=None, batch_size: int = 8, lora: str | None = None, resume: bool = False,
             overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Write PNGs and ``manifest.jsonl`` to ``out``; returns the manifest rows (all images)."""
    import torch

    from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators

    out = Path(out)
    prepare_out_dir(out, resume, overwrite)
    sampler = sampler or SamplerConfig(eta=0.0)
    engine = RolloutEngine(backbone, sampler)
    jobs = plan(prompts, seed, images_per_prompt)
    rows = {r["index"]: r for r in read_manifest(out) if (out / r["file"]).exists()}
    todo = [j for j in jobs if j.index not in rows]
    common = {"sampler": asdict(sampler) | {"name": "ddim"}, "backbone": backbone.identity(), "lora": lora,
              **provenance()}
    done = len(jobs) - len(todo)
    if progress:
        progress(done, len(jobs))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        with torch.no_grad():
            traj = engine.sample([j.prompt for j in batch], make_generators([j.seed for j in batch]),
                                 keep_latents=False)
            pixels = to_uint8(backbone.decode(traj.x0))
        for job, arr in zip(batch, pixels):
            save_png(out / job.file, arr)
            rows[job.index] = {"index": job.index, "file": job.file, "prompt": job.prompt,
                               "prompt_index": job.prompt_index, "seed": job.seed, **common}
        atomic_write_text(out / MANIFEST, "".join(json.dumps(rows[i]) + "\n" for i in sorted(rows)))
        done += len(batch)
        if progress:
            progress(done, len(jobs))
    return [rows[i] for i in sorted(rows)]
