"""The report of a ``spobench reproduce`` run: ``report.json`` (everything), ``report.md``,
``grid.png`` (the same prompts and seeds across cells, like the paper's Fig. 2), ``metrics.png``
(each cell's paired difference to the reference cell with its 95% CI; each metric per cell, or against
the ablated parameter, with 95% CIs; the paper's numbers),
``training.png`` (training curves from the trainers' ``log.jsonl``) and ``report.html`` with all
of it. Every file is written atomically. Input: the dict :func:`spobench.reproduce.runner.report_data`
builds; this module reads the run folder only for images and training logs.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from spobench.core.io import atomic_write_json, atomic_write_text
from spobench.eval.report_figures import grid_png, metrics_png, paired_differences, training_png
from spobench.eval.report_tables import (
    compare_table,
    compute_table,
    inputs_table,
    paper_comparison_table,
    per_tag_tables,
    results_table,
)


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
                 f"{g['seed']}, {g.get('sampler', 'ddim').upper()} {g['steps']} steps, eta {g['eta']}, CFG {g['cfg']}.")
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
            if name == "metrics.png" and paired_differences(data, list(data["metrics"])):
                ref = next(c["label"] for c in data["cells"] if c["id"] == data["compare_to"])
                s.append(("", "text", [f"Top row: each cell's paired difference to {ref} (same prompts and seeds) "
                                       "with its 95% bootstrap CI; green or red where the CI excludes 0 in the "
                                       "metric's better or worse direction. Below: the means per cell, whose CIs "
                                       "can overlap while the paired difference is clear."]))
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
