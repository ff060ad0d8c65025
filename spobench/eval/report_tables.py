"""The report's numbers as tables (header + rows of strings, which report.py renders to markdown and
HTML): results per cell with 95% CIs, ours beside the paper, per-tag means, win rates, compute, inputs."""

from __future__ import annotations

import math
from typing import Any

COUNTERS = (("unet_rows_grad", "UNet rows (grad)"), ("unet_rows_nograd", "UNet rows (no grad)"),
            ("vae_decodes", "VAE decodes"), ("reward_image_passes", "reward/SPM images"))
ROUND_SCORES = ("mean_score", "reward_mean", "mean_reward", "kept_fraction")


# =====================================================================================================
# numbers
# =====================================================================================================
def fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, (int, float)):
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def fmt_ci(m: dict | None, digits: int = 4) -> str:
    if not m or m.get("mean") is None:
        return "—"
    lo, hi = (m.get("ci95") or [None, None])[:2]
    return f"{fmt(m['mean'], digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def fmt_int(v: Any) -> str:
    return "—" if v is None else f"{int(round(v)):,}"


def fmt_s(v: Any) -> str:
    return "—" if v is None else f"{v:.1f}"


# =====================================================================================================
# tables (as header + rows of strings; rendered to markdown and HTML)
# =====================================================================================================
def _paper_rows(data: dict) -> dict[str, dict]:
    p = data.get("paper")
    return {r["row"]: r for r in p["rows"]} if p else {}


def results_table(data: dict) -> tuple[list[str], list[list[str]]]:
    """Rows = cells (+ the paper's rows no cell reproduces); columns = our metrics (mean [95% CI]),
    then the paper's columns."""
    paper = data.get("paper")
    prow = _paper_rows(data)
    chosen = (data.get("ablation") or {}).get("chosen")
    head = ["cell", "method"] + [f"{m} (mean [95% CI])" for m in data["metrics"]]
    if paper:
        head += [f"paper: {c}" for c in paper["columns"]]
    rows, used = [], set()
    for c in data["cells"]:
        label = c["label"] + (" *" if chosen is not None and c.get("ablation_value") == chosen else "")
        row = [label, c["method"]] + [fmt_ci(c["metrics"].get(m)) for m in data["metrics"]]
        if paper:
            pr = prow.get(c.get("paper_row"))
            if pr is not None:
                used.add(pr["row"])
            row += [_paper_value(paper, i, pr) for i in range(len(paper["columns"]))]
        rows.append(row)
    if paper:
        for r in paper["rows"]:
            if r["row"] not in used:
                rows.append([r["row"], "(paper only)"] + ["—"] * len(data["metrics"])
                            + [_paper_value(paper, i, r) for i in range(len(paper["columns"]))])
    return head, rows


def _paper_value(paper: dict, i: int, row: dict | None) -> str:
    if row is None:
        return "—"
    v = row["values"][i]
    return "—" if v is None else f"{v:.{paper['digits'][i]}f}"


def _measured(c: dict, metric: str) -> tuple[float | None, list | None]:
    """A cell's mean and 95% CI of ``metric``; ``name:tag`` is a per-tag mean (``overall``: the
    unweighted mean of the tags), which has no CI."""
    name, _, tag = metric.partition(":")
    m = c["metrics"].get(name) or {}
    if not tag:
        return m.get("mean"), m.get("ci95")
    return (m.get("overall") if tag == "overall" else (m.get("per_tag") or {}).get(tag)), None


def paper_comparison(data: dict) -> list[dict]:
    """Every (cell, paper column) with a paper number: ours on the paper's scale, the paper's value,
    ours - paper and its 95% CI. The CI is our bootstrap CI shifted by the paper's number: the paper
    prints no uncertainty, so only ours is in it."""
    paper = data.get("paper")
    if not paper or not paper.get("metrics"):
        return []
    prow = _paper_rows(data)
    scale = paper.get("scale") or [1.0] * len(paper["columns"])
    out = []
    for c in data["cells"]:
        pr = prow.get(c.get("paper_row"))
        if pr is None:
            continue
        for j, (col, metric) in enumerate(zip(paper["columns"], paper["metrics"])):
            pv = pr["values"][j]
            if not metric or pv is None:
                continue
            mean, ci = _measured(c, metric)
            ours = None if mean is None else mean * scale[j]
            ci = None if not ci or ci[0] is None else [ci[0] * scale[j], ci[1] * scale[j]]
            out.append({"cell": c["label"], "paper_row": pr["row"], "column": col, "metric": metric,
                        "ours": ours, "ours_ci95": ci, "paper": pv, "digits": paper["digits"][j],
                        "diff": None if ours is None else ours - pv,
                        "diff_ci95": None if ci is None else [ci[0] - pv, ci[1] - pv]})
    return out


def paper_comparison_table(data: dict) -> tuple[list[str], list[list[str]]] | None:
    rows = paper_comparison(data)
    if not rows:
        return None
    head = ["cell", "paper row", "column", "ours [95% CI]", "paper", "ours - paper [95% CI]"]
    body = []
    for r in rows:
        d = r["digits"]
        body.append([r["cell"], r["paper_row"], r["column"], _ci_text(r["ours"], r["ours_ci95"], d),
                     f"{r['paper']:.{d}f}", _ci_text(r["diff"], r["diff_ci95"], d)])
    return head, body


def per_tag_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    out = []
    for m in data["metrics"]:
        tags: list[str] = []
        for c in data["cells"]:
            for t in (c["metrics"].get(m) or {}).get("per_tag") or {}:
                if t not in tags:
                    tags.append(t)
        if not tags:
            continue
        head = ["cell"] + tags + ["overall (mean of tags)"]
        rows = []
        for c in data["cells"]:
            agg = c["metrics"].get(m) or {}
            pt = agg.get("per_tag") or {}
            rows.append([c["label"]] + [fmt(pt.get(t)) for t in tags] + [fmt(agg.get("overall"))])
        out.append((m, head, rows))
    return out


def lower_is_better(data: dict, metric: str) -> bool:
    """Whether ``metric`` counts lower scores as better, as its comparisons (or its id) recorded it."""
    for c in data["cells"]:
        for entry in ((c.get("compare") or {}).get(metric), ((c.get("metrics") or {}).get(metric) or {}).get("id")):
            if isinstance(entry, dict) and entry.get("higher_is_better") is False:
                return True
    return False


def metric_label(data: dict, metric: str) -> str:
    return f"{metric} (lower is better)" if lower_is_better(data, metric) else metric


def compare_table(data: dict) -> tuple[list[str], list[list[str]]] | None:
    """Win rates count a pair as won when the cell's score is better in the metric's direction (compare
    decides it); the mean difference is the raw cell - reference."""
    ref = data.get("compare_to")
    if not ref or not any(c.get("compare") for c in data["cells"]):
        return None
    ref_label = next(c["label"] for c in data["cells"] if c["id"] == ref)
    head = ["cell"]
    for m in data["metrics"]:
        head += [f"{metric_label(data, m)}: win rate vs {ref_label} [95% CI]", f"{m}: mean diff [95% CI]"]
    rows = []
    for c in data["cells"]:
        cmp = c.get("compare")
        if not cmp:
            continue
        row = [c["label"]]
        for m in data["metrics"]:
            x = cmp.get(m) or {}
            row += [_ci_text(x.get("win_rate"), x.get("win_rate_ci95"), 3),
                    _ci_text(x.get("mean_diff"), x.get("mean_diff_ci95"), 4)]
        rows.append(row)
    return head, rows


def _ci_text(v, ci, digits: int) -> str:
    if v is None:
        return "—"
    lo, hi = (ci or [None, None])[:2]
    return f"{fmt(v, digits)} [{fmt(lo, digits)}, {fmt(hi, digits)}]"


def compute_table(data: dict) -> tuple[list[str], list[list[str]]]:
    head = ["cell", "rounds", "optimizer steps"] + [name for _, name in COUNTERS] + \
           ["train wall (s)", "generate wall (s)", "evaluate wall (s)", "reused"]
    rows = []
    for c in data["cells"]:
        t = c.get("train") or {}
        counters = t.get("counters") or {}
        reused = [s for s in ("train", "generate", "evaluate") if (c.get(s) or {}).get("reused")]
        rows.append([c["label"], fmt_int(t.get("rounds")), fmt_int(t.get("steps"))]
                    + [fmt_int(counters.get(k)) if t else "—" for k, _ in COUNTERS]
                    + [fmt_s(t.get("wall_s")), fmt_s(c["generate"].get("wall_s")), fmt_s(c["evaluate"].get("wall_s")),
                       ", ".join(reused) or "no"])
    return head, rows


def inputs_table(data: dict) -> tuple[list[str], list[list[str]]] | None:
    if not data.get("inputs"):
        return None
    rows = []
    for name, info in data["inputs"].items():
        ev = info.get("eval") or {}
        acc = ev.get("mean_accuracy")
        rows.append([name, info.get("kind", ""), fmt_s(info.get("wall_s")),
                     "—" if acc is None or not math.isfinite(acc) else f"{acc:.3f} ({ev.get('n_pairs', '?')} pairs)",
                     "yes" if info.get("reused") else "no"])
    return ["input", "kind", "wall (s)", "held-out pair accuracy", "reused"], rows
