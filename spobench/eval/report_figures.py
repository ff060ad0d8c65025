"""The report's figures: ``grid.png`` (the same prompts and seeds across cells), ``metrics.png`` (per
metric: each cell's paired difference to the reference cell with its 95% CI, what the comparison is
about; beside it the absolute means per cell or against the ablated parameter, and the paper's numbers)
and ``training.png``
(the trainers' ``log.jsonl`` curves). Each is written atomically; matplotlib is imported only here."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from spobench.core.io import atomic_file
from spobench.data.manifest import read_manifest
from spobench.eval.report_tables import ROUND_SCORES, _paper_rows, lower_is_better, metric_label


# =====================================================================================================
# images
# =====================================================================================================
def _save(fig, path: Path) -> None:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=100)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def grid_png(out: Path, data: dict) -> Path | None:
    """Rows = cells, columns = the first prompts; the first image of each prompt (same seed in every row)."""
    from PIL import Image

    n_cols = data["report"]["grid_prompts"]
    tile = data["report"]["grid_tile"]
    rows = []
    for c in data["cells"]:
        by_prompt: dict[int, dict] = {}
        for r in read_manifest(out / c["images"]):
            by_prompt.setdefault(r.get("prompt_index", r["index"]), r)
        rows.append((c, by_prompt))
    prompt_ids = sorted(set().union(*(set(b) for _, b in rows)))[:n_cols] if rows else []
    if not prompt_ids:
        return None
    plt = _plt()
    w = max(tile / 100, 1.3)  # wide enough for the prompt above each column
    h = w  # square tiles
    wrap = max(12, int(w * 12))
    fig, axes = plt.subplots(len(rows), len(prompt_ids), squeeze=False,
                             figsize=(1.9 + w * len(prompt_ids), 1.0 + (h + 0.1) * len(rows)))
    for i, (c, by_prompt) in enumerate(rows):
        for j, p in enumerate(prompt_ids):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = by_prompt.get(p)
            if r is not None:
                img = Image.open(out / c["images"] / r["file"]).convert("RGB")
                small = img.width < tile
                ax.imshow(img, interpolation="nearest" if small else "antialiased")
                if i == 0:
                    ax.set_title("\n".join(textwrap.wrap(r["prompt"], wrap)[:4]) + f"\nseed {r['seed']}", fontsize=7)
            if j == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(c["label"], 16)), fontsize=8, rotation=0, ha="right",
                              va="center")
    fig.suptitle(f"{data['recipe']['name']} on {data['backbone']['name']}: same prompts and seeds across cells",
                 fontsize=9)
    fig.tight_layout()
    path = out / "grid.png"
    _save(fig, path)
    plt.close(fig)
    return path


# =====================================================================================================
# metrics
# =====================================================================================================
def paired_differences(data: dict, metrics: list[str]) -> dict[str, list[dict]]:
    """Per metric, each compared cell's mean paired difference to ``compare_to`` (cell - reference, pairs
    by prompt and seed) with its 95% bootstrap CI and a verdict in the metric's direction: ``better`` /
    ``worse`` when the CI excludes 0, else ``unclear``. {} without a reference or comparisons."""
    if not data.get("compare_to") or not any(c.get("compare") for c in data["cells"]):
        return {}
    out: dict[str, list[dict]] = {}
    for m in metrics:
        sign = -1.0 if lower_is_better(data, m) else 1.0
        rows = []
        for c in data["cells"]:
            x = (c.get("compare") or {}).get(m)
            if not x or x.get("mean_diff") is None:
                continue
            lo, hi = (x.get("mean_diff_ci95") or [None, None])[:2]
            verdict = "unclear"
            if lo is not None and hi is not None and (lo > 0 or hi < 0):
                verdict = "better" if sign * (lo if lo > 0 else hi) > 0 else "worse"
            rows.append({"label": c["label"], "diff": x["mean_diff"], "ci95": [lo, hi], "verdict": verdict,
                         "x": c.get("ablation_value")})
        out[m] = rows
    return out


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "unclear": "tab:gray"}


def _paired_panel(ax, data: dict, m: str, rows: list[dict]) -> None:
    ref = next((c["label"] for c in data["cells"] if c["id"] == data["compare_to"]), data["compare_to"])
    ax.axhline(0.0, color="black", linewidth=0.8)
    pos = list(range(len(rows)))
    for k, r in enumerate(rows):
        lo, hi = r["ci95"]
        err = [[r["diff"] - lo], [hi - r["diff"]]] if None not in (lo, hi) else None
        ax.errorbar([k], [r["diff"]], yerr=err, marker="o", capsize=4, color=VERDICT_COLOURS[r["verdict"]],
                    linestyle="none")
    if data.get("ablation") and len(rows) > 1:
        ax.plot(pos, [r["diff"] for r in rows], color="tab:gray", linewidth=0.8, alpha=0.6)
        ax.set_xlabel(data["ablation"]["param"])
    ax.set_xticks(pos)
    ax.set_xticklabels([r["label"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_xlim(-0.6, max(len(rows) - 0.4, 0.6))
    ax.set_title(f"{metric_label(data, m)}\ncell - {ref} (paired by prompt and seed), 95% CI", fontsize=8)


def metrics_png(out: Path, data: dict) -> Path | None:
    """One column per metric. First row (when cells were compared to a reference): each cell's paired
    difference to it with its 95% CI, green/red where the CI excludes 0 in the metric's better/worse
    direction. Then the mean and 95% CI per cell (or against the ablated parameter); then the paper's
    columns for the cells that have a paper row."""
    metrics = data["report"].get("plot_metrics") or data["metrics"]
    cells = data["cells"]
    if not cells or not metrics:
        return None
    paired = paired_differences(data, list(metrics))
    abl = data.get("ablation")
    ref = data.get("compare_to")
    if abl:
        xs = [c for c in cells if c.get("ablation_value") is not None or c["id"] != ref]
        refc = next((c for c in cells if c["id"] == ref and c.get("ablation_value") is None), None)
        xs = [c for c in xs if c is not refc]
    else:
        xs, refc = cells, None
    paper = data.get("paper")
    prow = _paper_rows(data)
    paper_cells = xs if paper and any(c.get("paper_row") in prow for c in xs) else []
    top = 1 if any(paired.values()) else 0  # the paired row comes first: it is what the comparison is about
    n_rows = top + (2 if paper_cells else 1)
    n = max(len(metrics), len(paper["columns"]) if paper_cells else 0)
    plt = _plt()
    fig, axes = plt.subplots(n_rows, n, squeeze=False, figsize=(max(3.2 * n, 4), 3.0 * n_rows + 0.4))
    if top:
        for j in range(n):
            if j < len(metrics) and paired.get(metrics[j]):
                _paired_panel(axes[0][j], data, metrics[j], paired[metrics[j]])
            else:
                axes[0][j].axis("off")
    labels = [c["label"] for c in xs]
    chosen = (abl or {}).get("chosen")
    for j in range(n):
        ax = axes[top][j]
        if j >= len(metrics):
            ax.axis("off")
            continue
        m = metrics[j]
        means = [((c["metrics"].get(m) or {}).get("mean")) for c in xs]
        cis = [((c["metrics"].get(m) or {}).get("ci95") or [None, None]) for c in xs]
        yerr = [[(mu - lo) if None not in (mu, lo) else 0 for mu, (lo, _) in zip(means, cis)],
                [(hi - mu) if None not in (mu, hi) else 0 for mu, (_, hi) in zip(means, cis)]]
        pos = list(range(len(xs)))
        vals = [v if v is not None else float("nan") for v in means]
        if abl:
            ax.errorbar(pos, vals, yerr=yerr, marker="o", capsize=3, label="ours")
            for k, c in enumerate(xs):
                if chosen is not None and c.get("ablation_value") == chosen:
                    ax.plot([k], [vals[k]], marker="*", markersize=14, color="tab:red", label="paper's choice")
            if refc is not None and (refc["metrics"].get(m) or {}).get("mean") is not None:
                rm = refc["metrics"][m]
                ax.axhline(rm["mean"], color="gray", linestyle="--", label=refc["label"])
                if rm.get("ci95"):
                    ax.axhspan(rm["ci95"][0], rm["ci95"][1], color="gray", alpha=0.15)
            ax.set_xlabel(abl["param"])
        else:
            ax.bar(pos, vals, yerr=yerr, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{metric_label(data, m)} (ours, {data['backbone']['name']})", fontsize=9)
        if abl and j == 0:
            ax.legend(fontsize=7)
    if paper_cells:
        plabels = [c["label"] for c in paper_cells]
        for j in range(n):
            ax = axes[top + 1][j]
            if j >= len(paper["columns"]):
                ax.axis("off")
                continue
            vals = [prow[c["paper_row"]]["values"][j] if c.get("paper_row") in prow else float("nan")
                    for c in paper_cells]
            pos = list(range(len(vals)))
            if abl:
                ax.plot(pos, vals, marker="o", color="tab:green")
                ax.set_xlabel(abl["param"])
            else:
                ax.bar(pos, vals, color="tab:green", alpha=0.8)
            ax.set_xticks(pos)
            ax.set_xticklabels(plabels, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"paper: {paper['columns'][j]} ({paper['backbone']})", fontsize=9)
    fig.tight_layout()
    path = out / "metrics.png"
    _save(fig, path)
    plt.close(fig)
    return path


def _log(out: Path, rel: str) -> list[dict]:
    path = out / rel
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def training_png(out: Path, data: dict) -> Path | None:
    """Loss per optimizer step and a per-round score (the trainer's mean pool score or reward) per cell."""
    curves = []
    for c in data["cells"]:
        t = c.get("train")
        if not t or not t.get("log"):
            continue
        rows = _log(out, t["log"])
        steps = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and "loss" in r]
        rounds = [r for r in rows if r.get("kind") == "round"]
        key = next((k for k in ROUND_SCORES if rounds and all(k in r for r in rounds)), None)
        score = [(r["step"], r[key]) for r in rounds] if key else []
        if steps or score:
            curves.append((c["label"], steps, score, key))
    if not curves:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for label, steps, score, key in curves:
        if steps:
            axes[0].plot([s for s, _ in steps], [v for _, v in steps], label=label, linewidth=1)
        if score:
            axes[1].plot([s for s, _ in score], [v for _, v in score], label=f"{label} ({key})", linewidth=1,
                         marker="." if len(score) < 30 else None)
    axes[0].set_title("training loss", fontsize=9)
    axes[0].set_xlabel("optimizer step")
    axes[1].set_title("per-round score of the rollouts", fontsize=9)
    axes[1].set_xlabel("round")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "training.png"
    _save(fig, path)
    plt.close(fig)
    return path
