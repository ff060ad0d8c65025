"""Paired held-out comparison of preference models on x0_hat, per timestep.

Table 5 of the paper asks whether the SPM's step conditioning matters through the SPO runs it drives;
this module asks it of the preference models themselves. Every model scores the same held-out pairs
(ties excluded; captions seen in the given training parquets left out) at the same t and the same noise,
so their outcomes are paired: pair i at timestep t is 1 when a model ranks it as the label does, 0 when
not, 0.5 when the two scores are equal. For every model after the first (the reference):

* the accuracy difference model - reference per t and averaged over t, with a percentile bootstrap 95% CI
  that resamples captions (pairs of one caption move together);
* an exact two-sided sign test over the discordant pairs (McNemar's exact test), per t and over t (on
  each pair's mean outcome over t, so that a pair counts once).

A folder with ``spm_config.json`` is loaded as an SPM (with or without time conditioning); any other
folder is taken as a plain CLIP/PickScore scored without time input: Table 5's "PickScore" row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from spobench.core.errors import InputError


def load_scorer(path: str | Path, processor: Optional[str] = None):
    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.models.spm_files import CONFIG_NAME

    p = Path(path)
    if p.is_file():
        from spobench.models.spm_official import import_hint

        raise InputError(import_hint(p))
    if not p.is_dir():
        raise InputError(f"{p}: not a folder (give an SPM folder, e.g. RUN/spm, or a CLIP/PickScore folder)")
    if (p / CONFIG_NAME).exists():
        return StepAwarePreferenceModel.load(p)
    return StepAwarePreferenceModel.from_clip(p, processor=processor, time_conditioned=False)


def held_out_rows(pairs, exclude: Sequence[str | Path] = ()) -> list[int]:
    """Rows of ``pairs`` whose caption appears in none of the ``exclude`` parquets."""
    from spobench.data.pairs import PairTable

    seen = {c for p in exclude for c in PairTable(p).captions}
    return [i for i, c in enumerate(pairs.captions) if c not in seen]


def paired_difference(a: np.ndarray, b: np.ndarray, groups: np.ndarray, *, n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Mean of a - b (per-pair outcomes) with a bootstrap CI over ``groups`` and McNemar's exact test."""
    from spobench.eval.compare import sign_test
    from spobench.eval.evaluate import bootstrap_ci

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(diff, groups, n=n_boot, seed=seed)
    a_only, b_only = int((diff > 0).sum()), int((diff < 0).sum())
    return {"diff": float(diff.mean()), "ci95": [lo, hi], "a_only": a_only, "b_only": b_only,
            "mcnemar_p": sign_test(a_only, b_only)}


def compare_spms(backbone, models: Sequence[str | Path], pairs_path: str | Path, *,
                 exclude: Sequence[str | Path] = (), max_pairs: int = 1000, eval_seed: int = 1234,
                 eval_timesteps: Sequence[int] | None = None, n_boot: int = 2000, processor: Optional[str] = None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Evaluate ``models`` on the same held-out pairs and x0_hat; differences are each model minus
    ``models[0]``. ``progress(done, total)`` is called after every batch of pairs."""
    from spobench.core.io import provenance
    from spobench.trainers.spm import EVAL_TIMESTEPS, SPMTrainConfig, evaluate_spms
    from spobench.data.pairs import PairTable

    if not models:
        raise InputError("give at least one model folder")
    repeated = sorted({str(m) for m in models if sum(str(x) == str(m) for x in models) > 1})
    if repeated:
        raise InputError(f"model folder given twice: {', '.join(repeated)}")
    if max_pairs < 1:
        raise InputError(f"max_pairs must be >= 1 (got {max_pairs})")
    scorers = [load_scorer(m, processor) for m in models]  # every folder is checked before the long part
    pairs = PairTable(pairs_path)
    rows = held_out_rows(pairs, exclude)
    if not any(not pairs.is_tie(r) for r in rows):
        raise InputError(f"{pairs_path}: no non-tie pair left after leaving out captions of "
                         f"{', '.join(map(str, exclude)) or 'nothing'}")
    cfg = SPMTrainConfig(val_max=max_pairs, eval_seed=eval_seed,
                         eval_timesteps=tuple(eval_timesteps or EVAL_TIMESTEPS))
    for scorer in scorers:
        scorer.to(backbone.device)
    results = evaluate_spms(backbone, scorers, pairs, rows, cfg, backbone.defaults.resolution, per_pair=True,
                            progress=progress)
    evals = {str(path): ev for path, ev in zip(models, results)}
    ref_key = str(models[0])
    ref = evals[ref_key]["per_pair"]
    groups = np.asarray([pairs.captions[r] for r in ref["rows"]], dtype=object)
    buckets = list(ref["outcome"])
    out_models = {}
    for (key, ev), scorer in zip(evals.items(), scorers):
        pp = ev.pop("per_pair")
        entry = dict(ev, time_conditioned=bool(scorer.time_conditioned))
        if key != ref_key:
            per_t = {t: paired_difference(pp["outcome"][t], ref["outcome"][t], groups, n_boot=n_boot)
                     for t in buckets}
            # over t: each pair's mean outcome, so a pair counts once in the sign test, not once per t
            pooled = paired_difference(np.mean([pp["outcome"][t] for t in buckets], axis=0),
                                       np.mean([ref["outcome"][t] for t in buckets], axis=0), groups, n_boot=n_boot)
            entry["vs_reference"] = {"per_t": per_t, "mean": pooled}
        entry["outcome"] = pp["outcome"]
        out_models[key] = entry
    return {
        "pairs": str(pairs_path),
        "exclude": [str(p) for p in exclude],
        "n_pairs": evals[ref_key]["n_pairs"],
        "n_captions": int(len(set(groups.tolist()))),
        "reference": ref_key,
        "eval_seed": eval_seed,
        "eval_timesteps": [int(t) for t in cfg.eval_timesteps],
        "bootstrap": {"n": n_boot, "unit": "caption", "level": 0.95},
        "rows": ref["rows"],
        "models": out_models,
        "provenance": provenance(),
    }
