"""Generate images with fixed seeds: PNGs plus a JSONL manifest that says how each was made.

Image ``i`` of prompt ``p`` uses seed ``seed + p * images_per_prompt + i`` and its own generator,
so an image does not depend on the batch it was drawn in. Every PNG and the manifest are written
atomically, and ``resume`` skips images the manifest already holds: a killed run loses at most
one batch and never leaves a half-written file. ``resume`` refuses a manifest whose images were
made with other prompts, seeds, sampler, backbone or LoRA (:func:`check_resume`): their images
would otherwise be kept and reported as this run's. The folder is claimed with ``spobench.core.outdir``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from spobench.core import outdir
from spobench.core.errors import InputError
from spobench.core.io import atomic_file, atomic_write_text, provenance

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


def _first_difference(a, b, name: str) -> tuple[str, object, object] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{name}.{k}")
            if d:
                return d
        return None
    if isinstance(a, str) and isinstance(b, str) and a != b and _same_path(a, b):
        return None  # one folder spelled two ways (runs/x/lora, /abs/runs/x/lora)
    return None if a == b else (name, a, b)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).exists() and Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):
        return False


def check_resume(out: Path, jobs: Sequence[ImageJob], common: dict | None = None) -> None:
    """``--resume`` continues the SAME run: every image the manifest holds must be the one this run
    plans at its index (prompt, seed) and, given ``common``, made with the same sampler, backbone and
    LoRA. Otherwise the old images would be kept and reported as the new run's."""
    path = Path(out) / MANIFEST
    planned = {j.index: j for j in jobs}
    again = "resume with the same prompts, --limit, --seed, --images-per-prompt and model, or choose another --out"
    wanted = json.loads(json.dumps(common, default=str)) if common is not None else None
    for row in read_manifest(out):
        job = planned.get(row["index"])
        if job is None:
            raise InputError(f"{path}: {row['file']} is not one of the {len(jobs)} images this run plans; {again}")
        for key, mine in (("file", job.file), ("prompt", job.prompt), ("seed", job.seed)):
            if row.get(key) != mine:
                raise InputError(f"{path}: {row['file']} was made with {key} {row.get(key)!r}, this run gives "
                                 f"{mine!r} there; {again}")
        for key in (wanted or {}):
            diff = _first_difference(row.get(key), wanted[key], key)
            if diff:
                raise InputError(f"{path}: {row['file']} was made with {diff[0]} {diff[1]!r}, this run uses "
                                 f"{diff[2]!r}; {again}")


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
    sampler = sampler or SamplerConfig(eta=0.0)
    jobs = plan(prompts, seed, images_per_prompt)
    common = {"sampler": asdict(sampler) | {"name": "ddim"}, "backbone": backbone.identity(), "lora": lora}
    with outdir.claim(out, command="generate", resume=resume, overwrite=overwrite,
                      keep=lambda: (out / MANIFEST).exists()):  # whole images are kept for --resume
        if resume:
            check_resume(out, jobs, common)
        engine = RolloutEngine(backbone, sampler)
        rows = {r["index"]: r for r in read_manifest(out) if (out / r["file"]).exists()}
        todo = [j for j in jobs if j.index not in rows]
        common |= provenance()
        done = len(jobs) - len(todo)
        if progress:
            progress(done, len(jobs))
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            with torch.no_grad():
                traj = engine.sample([j.prompt for j in batch], make_generators([j.seed for j in batch]),
                                     keep_latents=False, log_probs=False)
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
