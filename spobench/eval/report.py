"""The report of a ``spobench reproduce`` run: ``report.json`` (everything), ``report.md``,
``grid.png`` (the same prompts and seeds across cells, like the paper's Fig. 2), ``metrics.png``
(each metric per cell, or against the ablated parameter, with 95% CIs, and the paper's numbers),
``training.png`` (training curves from the trainers' ``log.jsonl``) and ``report.html`` with all
of it. Every file is written atomically. Input: the dict :func:`spobench.reproduce.runner.report_data`
builds; this module reads the run folder only for images and training logs.
"""

from __future__ import annotations

import html
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from spobench.core.io import atomic_file, atomic_write_json, atomic_write_text
from spobench.data.manifest import read_manifest

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


def compare_table(data: dict) -> tuple[list[str], list[list[str]]] | None:
    ref = data.get("compare_to")
    if not ref or not any(c.get("compare") for c in data["cells"]):
        return None
    ref_label = next(c["label"] for c in data["cells"] if c["id"] == ref)
    head = ["cell"]
    for m in data["metrics"]:
        head += [f"{m}: win rate vs {ref_label} [95% CI]", f"{m}: mean diff [95% CI]"]
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


def metrics_png(out: Path, data: dict) -> Path | None:
    """One panel per metric: mean and 95% CI per cell (or against the ablated parameter); a second row
    with the paper's columns for the cells that have a paper row."""
    metrics = data["report"].get("plot_metrics") or data["metrics"]
    cells = data["cells"]
    if not cells or not metrics:
        return None
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
    n_rows = 2 if paper_cells else 1
    n = max(len(metrics), len(paper["columns"]) if paper_cells else 0)
    plt = _plt()
    fig, axes = plt.subplots(n_rows, n, squeeze=False, figsize=(max(3.2 * n, 4), 3.0 * n_rows + 0.4))
    labels = [c["label"] for c in xs]
    chosen = (abl or {}).get("chosen")
    for j in range(n):
        ax = axes[0][j]
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
        ax.set_title(f"{m} (ours, {data['backbone']['name']})", fontsize=9)
        if abl and j == 0:
            ax.legend(fontsize=7)
    if paper_cells:
        plabels = [c["label"] for c in paper_cells]
        for j in range(n):
            ax = axes[1][j]
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


# =====================================================================================================
# markdown and HTML
# =====================================================================================================
def _md_table(head: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    e = html.escape
    out = [f'<table class="{e(cls)}">', "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead>",
           "<tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows]
    out.append("</tbody></table>")
    return "\n".join(out)


def _sections(data: dict) -> list[tuple[str, str, Any]]:
    """(title, kind, payload): kind 'text' | 'table' | 'image'."""
    r = data["recipe"]
    g = data["generate"]
    s: list[tuple[str, str, Any]] = []
    about = [f"Backbone **{data['backbone']['name']}** (model: {data['backbone']['model']})."]
    if r.get("paper_table"):
        about.append(f"Paper: Table {r['paper_table']}" + (f" ({data['paper']['backbone']})" if data.get("paper") else "")
                     + ".")
    if r.get("description"):
        about.append(r["description"])
    if r.get("budget"):
        about.append(f"Budget: {r['budget'].rstrip('.')}.")
    about.append(f"Generation: {g['prompts'].get('n')} prompts of `{g['prompts'].get('name')}` "
                 f"(version {g['prompts'].get('version')}), {g['images_per_prompt']} image(s) per prompt, seeds from "
                 f"{g['seed']}, DDIM {g['steps']} steps, eta {g['eta']}, CFG {g['cfg']}.")
    s.append(("About", "text", about))
    s.append(("Results", "table", results_table(data)))
    notes = ["Ours: mean over images with a 95% bootstrap CI (resampling prompts)."]
    if data.get("ablation") and data["ablation"].get("chosen") is not None:
        notes.append("* marks the paper's choice.")
    if data.get("paper"):
        notes.append(f"Paper columns are the paper's numbers ({data['paper']['backbone']}), copied as printed.")
        if data["paper"].get("note"):
            notes.append(data["paper"]["note"])
    s.append(("", "text", notes))
    points = [c for c in data["cells"] if c.get("checkpoint")]
    if points:  # released checkpoints: which files each row is
        keys = [k for k in ("model", "unet", "vae", "lora") if any(k in c["checkpoint"] for c in points)]
        s.append(("Released checkpoints", "table", (["cell"] + keys, [[c["label"]] + [
            c["checkpoint"].get(k, "(the recipe's model)" if k == "model" else "—") for k in keys] for c in points])))
    versus = paper_comparison_table(data)
    if versus:
        scaled = [f"{c} x{k:g}" for c, k in zip(data["paper"]["columns"], data["paper"].get("scale") or [])
                  if k != 1]
        s.append((f"Ours beside the paper (Table {r.get('paper_table')})", "table", versus))
        s.append(("", "text", ["Ours on the paper's scale" + (f" ({', '.join(scaled)})" if scaled else "")
                               + "; the CI of the difference is our bootstrap CI (the paper prints none). "
                               "Per-tag numbers have no CI."]))
    for m, head, rows in per_tag_tables(data):
        s.append((f"{m} per tag", "table", (head, rows)))
    cmp = compare_table(data)
    if cmp:
        s.append(("Win rates (per-prompt, paired by seed)", "table", cmp))
    s.append(("Compute", "table", compute_table(data)))
    inp = inputs_table(data)
    if inp:
        s.append(("Prepared inputs", "table", inp))
    for name, title in (("grid.png", "Samples (same prompts and seeds)"), ("metrics.png", "Metrics"),
                        ("training.png", "Training curves")):
        if name in data.get("files", []):
            s.append((title, "image", name))
    return s


def markdown(data: dict) -> str:
    r = data["recipe"]
    out = [f"# {r['name']}: {r['title']}", ""]
    for title, kind, payload in _sections(data):
        if title:
            out += [f"## {title}", ""]
        if kind == "text":
            out += [" ".join(payload), ""]
        elif kind == "table":
            out += [_md_table(*payload), ""]
        else:
            out += [f"![{title}]({payload})", ""]
    out += [f"Written {data.get('written')} by spobench (git {data.get('git')}); run wall time {data.get('wall_s')} s. "
            "All numbers: report.json.", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; white-space: nowrap; }
thead { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 13px; }
"""


def html_page(data: dict) -> str:
    e = html.escape
    r = data["recipe"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(r['name'])}: {e(r['title'])}</title>", f"<style>{CSS}</style></head><body>",
           f"<h1>{e(r['name'])}: {e(r['title'])}</h1>"]
    for title, kind, payload in _sections(data):
        if title:
            out.append(f"<h2>{e(title)}</h2>")
        if kind == "text":
            text = e(" ".join(payload)).replace("**", "").replace("`", "")
            out.append(f'<p class="note">{text}</p>')
        elif kind == "table":
            out.append(_html_table(*payload, cls=title.lower().split()[0] if title else ""))
        else:
            out.append(f'<p><img src="{e(payload)}" alt="{e(title)}"></p>')
    out.append(f'<p class="note">Written {e(str(data.get("written")))} by spobench (git {e(str(data.get("git")))}). '
               '<a href="report.json">report.json</a> · <a href="report.md">report.md</a></p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(out: str | Path, data: dict) -> list[str]:
    """Write every report file into ``out``; returns their names."""
    out = Path(out)
    files = []
    for fn in (grid_png, metrics_png, training_png):
        p = fn(out, data)
        if p is not None:
            files.append(p.name)
    data["files"] = files + ["report.md", "report.html", "report.json"]
    atomic_write_json(out / "report.json", data)
    atomic_write_text(out / "report.md", markdown(data))
    atomic_write_text(out / "report.html", html_page(data))
    return data["files"]
