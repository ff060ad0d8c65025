"""Score a folder of generated images with metric plugins and write a versioned results JSON.

Results hold per-image scores, the mean with a bootstrap 95% CI (resampling prompts, so several
images of one prompt move together), per-tag means for GenEval-style metrics, each metric's id,
version and checkpoint hash, package versions and the git hash. Scores are cached by
(image sha256, metric id) in ``<images>/.score_cache.jsonl``, so re-running after adding a metric
or images only scores what is new.

What is scored is exactly what the manifest lists: an image file in the folder that it does not list,
a listed path outside the folder, a broken image, a malformed manifest or cache line, and weights
given for a metric that is not being scored are refused before anything is written.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from spobench.core.errors import InputError, OutputError
from spobench.data.images import SUFFIXES, open_image, probe_image
from spobench.data.manifest import MANIFEST, read_manifest
from spobench.core.io import atomic_write_json, atomic_write_text, provenance
from spobench.metrics.base import sha256_of

CACHE = ".score_cache.jsonl"
_SHA = re.compile(r"[0-9a-f]{64}")


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


def parse_weights(items: Sequence[str]) -> dict[str, str]:
    """``["metric=DIR", ...]`` (the CLI's repeated ``--weights``) as a dict; each metric at most once."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, where = item.partition("=")
        name, where = name.strip(), where.strip()
        if not eq or not name or not where:
            raise InputError(f"--weights {item!r}: expected metric=DIR")
        if name in out:
            raise InputError(f"--weights {name}: given twice ({out[name]!r} and {where!r})")
        out[name] = where
    return out


def check_weights(weights: Mapping[str, str], names: Sequence[str]) -> None:
    """Refuse weights for a metric that is not being scored: a typo would otherwise score the default
    weights while the user believes their own were used."""
    names = list(names)
    for name, where in weights.items():
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; add it to --metrics, or drop its --weights"
            raise InputError(f"--weights {name}={where}: {name!r} is not one of the metrics being scored "
                             f"({', '.join(names) or 'none'}){hint}")


def check_out_file(path: Path, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before any work, a results file that cannot be written: a folder, a path under a file,
    an unwritable folder, or one of the command's own inputs."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name for the results (e.g. {path / 'results.json'})")
    real = path.resolve()
    for p in inputs:
        if real == Path(p).resolve():
            raise OutputError(f"{path}: is one of this command's inputs; give another file for the results")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        if parent.is_symlink():  # a dangling link: mkdir would fail
            break
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot write it: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write it: {parent} is not writable")


def write_output(path: Path, write) -> None:
    """``write(path)`` with an OSError (read-only file system, a folder in the way...) as one line."""
    try:
        write(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write it: {e.strerror or e}") from e


def _check_folder(folder: Path) -> Path:
    if not folder.exists():
        raise InputError(f"{folder}: images folder not found")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder (--images takes the folder `spobench generate` wrote)")
    manifest = folder / MANIFEST
    if not manifest.exists() and not manifest.is_symlink():
        raise InputError(f"{folder}: no {manifest} (write images with `spobench generate`)")
    return manifest


def _check_listed(folder: Path, rows: Sequence[dict], manifest: Path) -> None:
    """Every image file in ``folder`` must be in the manifest: eval scores what the manifest lists,
    so an image it does not list would be left out of the means without a word."""
    listed = {os.path.normpath(r["file"]) for r in rows}
    unlisted = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(here, folder)
        for n in sorted(names):
            if n.startswith(".") or Path(n).suffix.lower() not in SUFFIXES:
                continue
            if os.path.normpath(os.path.join(rel, n)) not in listed:
                unlisted.append(Path(here) / n)
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise InputError(f"{unlisted[0]}: image not listed in {manifest}{more}; an image folder and its manifest "
                         "must agree: add it to the manifest or move it out (a killed `spobench generate` is finished "
                         "with --resume)")


def _load_cache(folder: Path) -> tuple[str, dict[tuple[str, str], tuple[float, str | None]]]:
    """The cache's text and entries. spobench writes it atomically, so a bad line is not a torn write:
    refuse it rather than trust any of its scores."""
    path = folder / CACHE
    if not path.exists() and not path.is_symlink():
        return "", {}
    fix = f"delete {path} to rescore every image"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not valid UTF-8; {fix}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the score cache: {e.strerror}; {fix}") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            raise InputError(f"{path}:{n}: corrupt score cache line ({getattr(e, 'msg', 'nested too deeply')}); "
                             f"{fix}") from None
        ok = (isinstance(r, dict) and isinstance(r.get("image"), str) and _SHA.fullmatch(r["image"])
              and isinstance(r.get("metric"), str) and isinstance(r.get("score"), (int, float))
              and not isinstance(r["score"], bool) and math.isfinite(r["score"])
              and isinstance(r.get("tag"), (str, type(None))))
        if not ok:
            raise InputError(f"{path}:{n}: not a score cache entry (needs image sha256, metric, finite score, "
                             f"tag); {fix}")
        out[(r["image"], r["metric"])] = (float(r["score"]), r["tag"])
    return text, out


def check_options(options: Mapping[str, Mapping[str, str]], metric_classes: Mapping[str, type]) -> dict[str, dict]:
    """``--option`` texts per metric -> each metric's typed keyword arguments; an option for a metric not
    being scored is refused, as a ``--weights`` one is."""
    names = list(metric_classes)
    for name in options:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; add it to --metrics, or drop its --option"
            raise InputError(f"--option {name}.{next(iter(options[name]))}: {name!r} is not one of the metrics "
                             f"being scored ({', '.join(names) or 'none'}){hint}")
    return {name: metric_classes[name].parse_options(dict(texts)) for name, texts in options.items()}


def evaluate_folder(folder: str | Path, metric_classes: Mapping[str, type], out: str | Path | None = None,
                    weights: Mapping[str, str] | None = None, device: str = "cpu",
                    metadata: Sequence[dict] | None = None,
                    options: Mapping[str, Mapping[str, str]] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Score the images ``folder``'s manifest lists with every metric; writes ``out`` (default
    ``<folder>/results.json``) and the score cache, and only once everything is scored, so a refused
    input leaves both as they were. ``options``: ``{metric: {key: text}}`` from ``--option``; ``progress(done,
    total)``: called after each batch, counting (image, metric) scores, cached ones included."""
    folder = Path(folder)
    weights = dict(weights or {})
    check_weights(weights, list(metric_classes))
    kwargs = check_options(options or {}, metric_classes)
    manifest = _check_folder(folder)
    out_path = Path(out) if out else folder / "results.json"
    rows = read_manifest(folder)
    if not rows:
        raise InputError(f"{manifest}: lists no images")
    files = [folder / r["file"] for r in rows]
    check_out_file(out_path, [manifest, folder / CACHE, *files])
    old_cache, cache = _load_cache(folder)
    if not os.access(folder, os.W_OK | os.X_OK):  # found now, not after the scoring it would throw away
        raise OutputError(f"{folder / CACHE}: cannot write it: {folder} is not writable (eval keeps its score "
                          "cache beside the images)")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise InputError(f"{missing[0]}: listed in the manifest but missing ({len(missing)} missing)")
    _check_listed(folder, rows, manifest)
    for f in files:  # header checks for all before any decoding: a bad file fails in seconds
        probe_image(f)
    if metadata is not None and len(metadata) != len(rows):
        raise InputError(f"{manifest}: lists {len(rows)} images but {len(metadata)} prompt metadata rows were given")
    prompts = [r["prompt"] for r in rows]
    groups = np.array([r.get("prompt_index", i) for i, r in enumerate(rows)])
    hashes = [sha256_of(f) for f in files]
    result: dict = {"images": str(folder), "n_images": len(rows), "metrics": {}, "per_image": [], **provenance()}
    per_image = [{"file": r["file"], "prompt": r["prompt"], "seed": r.get("seed")} for r in rows]
    new_cache_lines = []
    done, total = 0, len(rows) * len(metric_classes)
    for name, cls in metric_classes.items():
        metric = cls(weights=weights.get(name), device=device, **kwargs.get(name, {}))
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
        done += len(rows) - len(todo)
        if progress is not None:
            progress(done, total)
        for start in range(0, len(todo), metric.batch_size):
            idx = todo[start:start + metric.batch_size]
            imgs = [open_image(files[i]) for i in idx]
            meta = [metadata[i] for i in idx] if metadata is not None else None
            res = metric.score(imgs, [prompts[i] for i in idx], meta)
            for j, i in enumerate(idx):
                scores[i] = float(res.scores[j])
                if not math.isfinite(scores[i]):
                    raise InputError(f"{files[i]}: metric {name!r} gave a non-finite score ({scores[i]}); "
                                     "nothing was written")
                tags[i] = None if res.tags is None else res.tags[j]
                new_cache_lines.append(json.dumps({"image": hashes[i], "metric": key, "score": scores[i],
                                                   "tag": tags[i]}))
            done += len(idx)
            if progress is not None:
                progress(done, total)
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
        text = old_cache + ("\n" if old_cache and not old_cache.endswith("\n") else "")
        text += "".join(line + "\n" for line in new_cache_lines)
        write_output(folder / CACHE, lambda p: atomic_write_text(p, text))
    write_output(out_path, lambda p: atomic_write_json(p, result))
    return result
