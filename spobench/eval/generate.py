"""Generate images with fixed seeds: PNGs plus a JSONL manifest that says how each was made
(:mod:`spobench.data.manifest`).

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
from spobench.core.io import atomic_file, provenance
from spobench.data.manifest import MANIFEST, read_manifest, write_manifest


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

    from spobench.engine.rollout import RolloutEngine, SamplerConfig, make_generators, sampler_name

    out = Path(out)
    sampler = sampler or SamplerConfig(eta=0.0)
    jobs = plan(prompts, seed, images_per_prompt)
    common = {"sampler": asdict(sampler) | {"name": sampler_name(backbone.family, sampler.eta)},
              "backbone": backbone.identity(), "lora": lora}
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
            write_manifest(out, rows.values())
            done += len(batch)
            if progress:
                progress(done, len(jobs))
    return [rows[i] for i in sorted(rows)]
