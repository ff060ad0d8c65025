"""Score a folder of generated images with metric plugins and write a versioned results JSON.

Results hold per-image scores, the mean with a bootstrap 95% CI (resampling prompts, so several
images of one prompt move together), per-tag means for GenEval-style metrics, each metric's id,
version and checkpoint hash, package versions and the git hash. Scores are cached by
(image sha256, metric id) in ``<images>/.score_cache.jsonl``, so re-running after adding a metric
or images only scores what is new.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from spobench.errors import InputError
from spobench.generate import read_manifest
from spobench.io import atomic_write_json, atomic_write_text, provenance

CACHE = ".score_cache.jsonl"


def bootstrap_ci(scores: np.ndarray, groups: np.ndarray | None = None, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, resampling whole groups (prompts) when given."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    if groups is None:
        groups = np.arange(len(scores))
    uniq, inv = np.unique(groups, return_inverse=True)
    sums = np.bincount(inv, weights=scores, minlength=len(uniq))
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    draws = rng.integers(0, len(uniq), size=(n, len(uniq)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_cache(folder: Path) -> dict[tuple[str, str], tuple[float, str | None]]:
    path = folder / CACHE
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                out[(r["image"], r["metric"])] = (r["score"], r.get("tag"))
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from a crash: those images are simply rescored
    return out


def evaluate_folder(folder: str | Path, metric_classes: Mapping[str, type], out: str | Path | None = None,
                    weights: Mapping[str, str] | None = None, device: str = "cpu",
                    metadata: Sequence[dict] | None = None) -> dict:
    from PIL import Image

    folder = Path(folder)
    rows = read_manifest(folder)
    if not rows:
        raise InputError(f"{folder}: no {folder / 'manifest.jsonl'} (write images with `spobench generate`)")
    files = [folder / r["file"] for r in rows]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InputError(f"{missing[0]}: listed in the manifest but missing ({len(missing)} missing)")
    prompts = [r["prompt"] for r in rows]
    groups = np.array([r.get("prompt_index", i) for i, r in enumerate(rows)])
    hashes = [_sha(f) for f in files]
    cache = _load_cache(folder)
    weights = weights or {}
    result: dict = {"images": str(folder), "n_images": len(rows), "metrics": {}, "per_image": [], **provenance()}
    per_image = [{"file": r["file"], "prompt": r["prompt"], "seed": r.get("seed")} for r in rows]
    new_cache_lines = []
    for name, cls in metric_classes.items():
        metric = cls(weights=weights.get(name), device=device)
        mid = metric.identity()
        key = mid.key()
        scores = np.full(len(rows), np.nan)
        tags: list = [None] * len(rows)
        todo = []
        for i in range(len(rows)):
            if (hashes[i], key) in cache:
                scores[i], tags[i] = cache[(hashes[i], key)]
            else:
                todo.append(i)
        for start in range(0, len(todo), metric.batch_size):
            idx = todo[start:start + metric.batch_size]
            imgs = [Image.open(files[i]).convert("RGB") for i in idx]
            meta = [metadata[i] for i in idx] if metadata is not None else None
            res = metric.score(imgs, [prompts[i] for i in idx], meta)
            for j, i in enumerate(idx):
                scores[i] = float(res.scores[j])
                tags[i] = None if res.tags is None else res.tags[j]
                new_cache_lines.append(json.dumps({"image": hashes[i], "metric": key, "score": scores[i],
                                                   "tag": tags[i]}))
        agg = {"mean": float(np.mean(scores)), "std": float(np.std(scores)),
               "ci95": list(bootstrap_ci(scores, groups)), "id": vars(mid)}
        if any(t is not None for t in tags):
            by_tag = {t: float(np.mean([s for s, tt in zip(scores, tags) if tt == t])) for t in sorted(set(tags))}
            agg["per_tag"] = by_tag
            agg["overall"] = float(np.mean(list(by_tag.values())))  # GenEval: unweighted mean over tags
        result["metrics"][name] = agg
        for i in range(len(rows)):
            per_image[i][name] = scores[i]
    result["per_image"] = per_image
    if new_cache_lines:
        old = (folder / CACHE).read_text() if (folder / CACHE).exists() else ""
        atomic_write_text(folder / CACHE, old + "".join(line + "\n" for line in new_cache_lines))
    atomic_write_json(Path(out) if out else folder / "results.json", result)
    return result
