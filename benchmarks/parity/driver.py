"""Run every metric's parity script and write results/metric_parity.md + results/metric_parity.json.

    GENEVAL_SRC=<checkout of djghosh13/geneval> .venv/bin/python benchmarks/parity/driver.py \
        [--only hpsv2,pickscore] [--venv DIR] [--out results]

Each script (benchmarks/parity/<metric>.py) builds tiny random weights in the metric's official layout,
runs the official package or code on them in a separate venv (built on first use, default
/tmp/spobench-parity-venv) and spobench's plugin on the same files, and returns one row. A reference
that cannot run here is recorded as "not run: <reason>", never as a number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
METRICS = ("hpsv2", "pickscore", "imagereward", "aesthetic", "geneval", "hpsv3")
COMMAND = ".venv/bin/python benchmarks/parity/driver.py"


def run_script(metric: str, venv: str) -> dict:
    r = subprocess.run([sys.executable, str(HERE / f"{metric}.py"), "--venv", venv], capture_output=True,
                       text=True, cwd=ROOT)
    if r.returncode == 0:
        try:
            return json.loads(r.stdout[r.stdout.index("{"):])
        except ValueError:
            pass
    lines = [ln for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
    return {"metric": metric, "status": "failed", "reference": None, "reference_version": None, "checks": {},
            "max_abs_diff": None, "notes": [], "reason": lines[-1] if lines else f"exit {r.returncode}",
            "log_tail": lines[-20:]}


def _num(x: float | None) -> str:
    return "-" if x is None else ("0" if x == 0 else f"{x:.2e}")


def render_markdown(results: list[dict], command: str, meta: dict) -> str:
    """The table: one row per metric (max abs difference over all its checks), then each check."""
    out = ["# Metric parity with the official implementations", "",
           "Tiny random weights in each metric's official file layout; the official package or code runs "
           "in a separate virtual environment, spobench's plugin on the same files and images. "
           "Regenerate with:", "", f"    {command}", "",
           " ".join(f"{k}: {v}." for k, v in meta.items()), "",
           "| metric | reference | reference version | max abs diff | status |",
           "| --- | --- | --- | --- | --- |"]
    for r in results:
        status = r["status"] if r["status"] == "ran" else f"{r['status']}: {r.get('reason', '')}"
        out.append(f"| {r['metric']} | {r.get('reference') or '-'} | {r.get('reference_version') or '-'} | "
                   f"{_num(r.get('max_abs_diff'))} | {status.replace('|', '/')} |")
    for r in results:
        if not r.get("checks") and not r.get("notes"):
            continue
        out += ["", f"## {r['metric']}", ""]
        out += [f"- {what}: max abs diff {_num(diff)}" for what, diff in r.get("checks", {}).items()]
        out += [f"- note: {n}" for n in r.get("notes", [])]
    return "\n".join(out) + "\n"


def write_results(results: list[dict], out_dir: Path, command: str, meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "metric_parity.md", out_dir / "metric_parity.json"
    md.write_text(render_markdown(results, command, meta))
    js.write_text(json.dumps({"command": command, **meta, "metrics": results}, indent=1) + "\n")
    return md, js


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated metrics (default: all)")
    ap.add_argument("--venv", default="/tmp/spobench-parity-venv")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args()
    import torch

    metrics = args.only.split(",") if args.only else list(METRICS)
    results = []
    for m in metrics:
        t0 = time.perf_counter()
        results.append(run_script(m, args.venv))
        r = results[-1]
        print(f"{m:<12s} {r['status']:<8s} max|diff| {_num(r.get('max_abs_diff'))}  "
              f"({time.perf_counter() - t0:.0f} s) {r.get('reason', '')}", flush=True)
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "spobench torch": torch.__version__,
            "spobench transformers": transformers.__version__, "reference torch": "2.14.1",
            "python": platform.python_version(), "machine": platform.machine()}
    command = COMMAND + (f" --only {args.only}" if args.only else "")
    if os.environ.get("GENEVAL_SRC"):  # GenEval's rule code comes from a checkout (not on PyPI)
        command = "GENEVAL_SRC=<checkout of djghosh13/geneval> " + command
    md, js = write_results(results, Path(args.out), command, meta)
    print(f"wrote {md} and {js}")
    return 0 if all(r["status"] != "failed" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
