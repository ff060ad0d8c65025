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
    path = out / MANIFEST
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{path}:{n}: corrupt manifest line") from None
    return rows


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
