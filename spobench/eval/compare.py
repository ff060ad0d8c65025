"""Compare two scored runs the way the paper's user study compares two methods: image pairs.

Images of run A and run B are paired when they were made for the same prompt with the same seed
(``pair_by="seed"``), or, when the runs used different seeds, the k-th image of a prompt in A with the
k-th image of that prompt in B (``pair_by="prompt"``); ``"auto"`` takes whichever pairs more images.
For every metric:

* **win rate of A over B**: each pair scores 1 (A better), 0.5 (tie) or 0 (B better); the outcomes are
  averaged per prompt and then over prompts, so every prompt weighs the same (the paper's "winning
  percentage", here judged by the metric instead of people). "Better" is the metric's own direction
  (``Metric.higher_is_better``, recorded in the results' metric id; results written before it was
  recorded are higher-is-better, as every spobench metric is);
* **mean difference** A - B (raw, whatever the direction), also averaged per prompt and then over prompts;
* percentile bootstrap 95% CIs of both, resampling prompts (images of one prompt move together);
* an exact two-sided sign test over prompts that are not ties, and the pair counts.

Scores are comparable only when both runs were scored by the same metric (name, version, checkpoint
sha256 and options); anything else is refused, as is a pair of runs with no prompt in common. The result
is written atomically to ``compare.json``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spobench.core.errors import InputError
from spobench.eval.evaluate import bootstrap_ci, check_out_file, write_output
from spobench.core.io import atomic_write_json, provenance

RESULTS = "results.json"
COMPARE = "compare.json"
PAIRINGS = ("auto", "seed", "prompt")


class CompareResult(dict):
    """The comparison as a plain dict (what ``compare.json`` holds) that rich prints as a table."""

    def __rich__(self):
        return summary_table(self)


def load_results(path: str | Path) -> tuple[Path, dict]:
    """``(file, results)`` for a results JSON written by ``spobench eval`` (or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS
    if not p.is_file():
        raise InputError(f"{p}: results file not found (write it with `spobench eval`)")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{p}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise InputError(f"{p}: invalid JSON (nested too deeply)") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read it: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("per_image"), list) \
            or not isinstance(data.get("metrics"), dict):
        raise InputError(f"{p}: not a spobench results file (needs 'metrics' and 'per_image')")
    for name, agg in data["metrics"].items():
        if not isinstance(agg, dict):
            raise InputError(f"{p}: metrics[{name!r}] must be an object, got {type(agg).__name__}")
    for i, row in enumerate(data["per_image"]):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{p}: per_image[{i}] has no prompt")
        seed = row.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, (int, type(None))):  # pairs are keyed by it
            raise InputError(f"{p}: per_image[{i}].seed must be an integer or null, got {json.dumps(seed)[:40]}")
    return p, data


def _keys(rows: Sequence[dict], by: str) -> list[tuple]:
    """One key per row; the occurrence count keeps repeated (prompt[, seed]) rows apart."""
    seen: Counter = Counter()
    keys = []
    for r in rows:
        base = (r["prompt"], r.get("seed")) if by == "seed" else (r["prompt"],)
        keys.append(base + (seen[base],))
        seen[base] += 1
    return keys


def pair_rows(rows_a: Sequence[dict], rows_b: Sequence[dict], pair_by: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """``(mode, [(i_a, i_b), ...])`` in A's order."""
    if pair_by not in PAIRINGS:
        raise InputError(f"pair_by must be one of {', '.join(PAIRINGS)} (got {pair_by!r})")
    options = {}
    for mode in ("seed", "prompt") if pair_by == "auto" else (pair_by,):
        kb = {k: j for j, k in enumerate(_keys(rows_b, mode))}
        options[mode] = [(i, kb[k]) for i, k in enumerate(_keys(rows_a, mode)) if k in kb]
    mode = max(options, key=lambda m: len(options[m]))  # ties keep "seed" (inserted first)
    return mode, options[mode]


def is_higher_better(mid: dict | None) -> bool:
    """A results file's metric direction; ids written before it was recorded are higher-is-better."""
    return True if not isinstance(mid, dict) else mid.get("higher_is_better", True) is not False


def _id_text(mid: dict) -> str:
    sha = (mid.get("checkpoint_sha256") or "")[:12] or "none"
    return f"{mid.get('name')}@{mid.get('version')} checkpoint {sha} options {json.dumps(mid.get('options', {}), sort_keys=True)}"


def _check_ids(metric: str, pa: Path, ida, pb: Path, idb) -> None:
    for p, mid in ((pa, ida), (pb, idb)):
        if not isinstance(mid, dict):
            raise InputError(f"{p}: metric {metric!r} has no id (name/version/checkpoint); re-score with `spobench eval`")
    ida, idb = ({**mid, "higher_is_better": is_higher_better(mid)} for mid in (ida, idb))
    fields = sorted(k for k in set(ida) | set(idb) if ida.get(k) != idb.get(k))
    if fields:
        raise InputError(
            f"metric {metric!r} differs between the runs ({', '.join(fields)}): {pa} was scored with {_id_text(ida)}, "
            f"{pb} with {_id_text(idb)}. Scores from different metric versions or checkpoints are not comparable; "
            f"re-score both with the same weights, or leave {metric!r} out.")


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided binomial sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return float(min(1.0, 2 * tail / 2 ** n))


def _scores(rows: Sequence[dict], idx: Sequence[int], metric: str, path: Path) -> np.ndarray:
    out = np.empty(len(idx))
    for n, i in enumerate(idx):
        v = rows[i].get(metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InputError(f"{path}: {rows[i].get('file', f'per_image[{i}]')} has no valid {metric!r} score ({v!r})")
        out[n] = v
    return out


def compare_metric(sa: np.ndarray, sb: np.ndarray, prompts: Sequence[str], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95, tie_tol: float = 0.0, higher_is_better: bool = True) -> dict:
    """Win rate of A over B and mean difference A - B, per prompt then over prompts, with bootstrap CIs.
    A pair is A's win when A's score is better by more than ``tie_tol`` in the metric's direction."""
    diff = sa - sb
    gain = diff if higher_is_better else -diff
    outcome = np.where(gain > tie_tol, 1.0, np.where(gain < -tie_tol, 0.0, 0.5))
    uniq, inv = np.unique(np.asarray(prompts, dtype=object), return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    p_out = np.bincount(inv, weights=outcome, minlength=len(uniq)) / counts
    p_diff = np.bincount(inv, weights=diff, minlength=len(uniq)) / counts
    p_wins, p_losses = int((p_out > 0.5).sum()), int((p_out < 0.5).sum())
    return {
        "win_rate": float(p_out.mean()),
        "win_rate_ci95": list(bootstrap_ci(p_out, n=n_boot, seed=seed, level=level)),
        "mean_diff": float(p_diff.mean()),
        "mean_diff_ci95": list(bootstrap_ci(p_diff, n=n_boot, seed=seed, level=level)),
        "mean_a": float(sa.mean()),
        "mean_b": float(sb.mean()),
        "pairs": {"n": len(diff), "a_wins": int((outcome == 1).sum()), "ties": int((outcome == 0.5).sum()),
                  "b_wins": int((outcome == 0).sum())},
        "prompts": {"n": len(uniq), "a_wins": p_wins, "ties": int(len(uniq) - p_wins - p_losses),
                    "b_wins": p_losses},
        "sign_test_p": sign_test(p_wins, p_losses),
        "higher_is_better": bool(higher_is_better),
    }


def compare_results(a: str | Path, b: str | Path, metrics: Sequence[str] | None = None, out: str | Path | None = None,
                    pair_by: str = "auto", n_boot: int = 1000, seed: int = 0, tie_tol: float = 0.0) -> CompareResult:
    """Compare run A with run B (``results.json`` files, or the folders holding them) metric by metric.

    ``metrics``: the metrics to compare (default: every metric both runs have; the others are listed
    under ``skipped_metrics``). Writes ``out`` (default ``compare.json`` beside A's results file) and
    returns the same content; ``rich`` prints it as a table.
    """
    pa, ra = load_results(a)
    pb, rb = load_results(b)
    out_path = Path(out) if out else pa.parent / COMPARE
    check_out_file(out_path, [pa, pb])
    rows_a, rows_b = ra["per_image"], rb["per_image"]
    shared = {r["prompt"] for r in rows_a} & {r["prompt"] for r in rows_b}
    if not shared:
        raise InputError(f"{pa} and {pb} share no prompt: nothing to compare (were they generated from the same prompt set?)")
    mode, pairs = pair_rows(rows_a, rows_b, pair_by)
    if not pairs:
        raise InputError(f"{pa} and {pb}: no image pairs with pair_by={pair_by!r} (the runs used different seeds; "
                         "try pair_by='prompt')")

    ma, mb = ra["metrics"], rb["metrics"]
    skipped: dict[str, str] = {}
    if metrics is None:
        names = [m for m in ma if m in mb]
        skipped.update({m: f"only in {pa}" for m in ma if m not in mb})
        skipped.update({m: f"only in {pb}" for m in mb if m not in ma})
        if not names:
            raise InputError(f"{pa} and {pb} have no metric in common ({', '.join(ma) or 'none'} vs {', '.join(mb) or 'none'})")
    else:
        names = list(dict.fromkeys(metrics))
        if not names:
            raise InputError("no metric given to compare")
        for m in names:
            for p, mm in ((pa, ma), (pb, mb)):
                if m not in mm:
                    raise InputError(f"{p}: has no scores for metric {m!r} (it has: {', '.join(mm) or 'none'})")
    for m in names:
        _check_ids(m, pa, ma[m].get("id"), pb, mb[m].get("id"))

    ia = [i for i, _ in pairs]
    ib = [j for _, j in pairs]
    prompts = [rows_a[i]["prompt"] for i in ia]
    result = CompareResult({
        "a": str(pa), "b": str(pb),
        "a_images": ra.get("images"), "b_images": rb.get("images"),
        "pairing": mode,
        "n_pairs": len(pairs),
        "n_prompts": len(set(prompts)),
        "unpaired": {"a": len(rows_a) - len(pairs), "b": len(rows_b) - len(pairs)},
        "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "unit": "prompt"},
        "tie_tol": tie_tol,
        "metrics": {},
        "skipped_metrics": skipped,
        **provenance(),
    })
    for m in names:
        sa = _scores(rows_a, ia, m, pa)
        sb = _scores(rows_b, ib, m, pb)
        result["metrics"][m] = {**compare_metric(sa, sb, prompts, n_boot=n_boot, seed=seed, tie_tol=tie_tol,
                                                 higher_is_better=is_higher_better(ma[m]["id"])),
                                "id": ma[m]["id"]}
    write_output(out_path, lambda p: atomic_write_json(p, result))
    return result


def summary_table(result: dict):
    """A rich Table: per metric, A and B means, A - B with its CI, A's win rate with its CI, pairs. The win
    rate is green when A is better beyond its CI, red when B is (each metric's own direction)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(f"A = {result['a']}\nB = {result['b']}"), title_justify="left", show_edge=False)
    for col, just in (("metric", "left"), ("A", "right"), ("B", "right"), ("A - B [95% CI]", "right"),
                      ("A win rate [95% CI]", "right"), ("pairs (prompts)", "right"), ("sign p", "right")):
        table.add_column(col, justify=just)
    for name, m in result["metrics"].items():
        lo, hi = m["mean_diff_ci95"]
        wlo, whi = m["win_rate_ci95"]
        style = "green" if wlo > 0.5 else "red" if whi < 0.5 else ""
        label = name if m.get("higher_is_better", True) else f"{name} (lower is better)"
        table.add_row(
            escape(label), f"{m['mean_a']:.4f}", f"{m['mean_b']:.4f}", f"{m['mean_diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]",
            f"[{style}]{100 * m['win_rate']:.1f}%[/] [{100 * wlo:.1f}, {100 * whi:.1f}]" if style
            else f"{100 * m['win_rate']:.1f}% [{100 * wlo:.1f}, {100 * whi:.1f}]",
            f"{m['pairs']['n']} ({m['prompts']['n']})", f"{m['sign_test_p']:.3g}")
    caption = f"paired by {result['pairing']}; {result['n_pairs']} pairs"
    if result["unpaired"]["a"] or result["unpaired"]["b"]:
        caption += f"; unpaired images: A {result['unpaired']['a']}, B {result['unpaired']['b']}"
    if result.get("skipped_metrics"):
        caption += "; skipped: " + ", ".join(f"{k} ({v})" for k, v in result["skipped_metrics"].items())
    table.caption = escape(caption)
    return table
