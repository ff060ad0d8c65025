"""Speed to result (issue 16 part 2): how much compute each SPO variant needs to reach the gain of the
official-settings run, in the tiny world, with the truth known.

Each arm trains SPO from the shipped tiny base model with the shipped tiny SPM (the default scorer) on the
first 400 ``tiny-train`` prompts, then generates ``--limit`` ``tiny-val`` prompts (seed 0, 20 DDIM steps,
the ``generate`` defaults) and pairs them by seed against the base model's images (``spobench eval
--compare``): toy_aesthetic and toy_alignment differences with bootstrap 95% CIs. Per arm it records the
training's wall time, its CPU time (user + system of the training process: on a shared machine the load
changes wall time, not the work), the UNet rows of rollout and training (the run's counters) and the
machine load (``uptime``) before and after. Arms run one after another through the installed CLI, exactly
as a user types them, so the figures include start-up.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/speed_to_result.py --out runs/speed \
        --arms paper,fast [--limit 500] [--json results/fast_preset/speed_to_result.json]

``--arms`` picks from ARMS below (``--list`` shows them); a finished arm's folder is reused (delete it to
rerun). The official-settings arm (``paper``, 40 rounds) takes ~680 s CPU; each 500-image evaluation ~230 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = shutil.which("spobench", path=str(Path(sys.executable).parent)) or "spobench"
BASE = ["--backbone", "tiny", "--set", "prompts=tiny-train", "--set", "threshold=0.1"]

# name -> (extra arguments, rounds). paper: the README's official-settings run. The rest: the candidates of
# issue 16 part 2 at a third of its rounds (or fewer, where a round costs more).
ARMS: dict[str, tuple[list[str], int]] = {
    "paper": ([], 40),
    "fast": (["--preset", "fast"], 10),  # = lr 5e-4 on tiny
    "lr3e-4": (["--set", "lr=3e-4"], 13),
    "lr3e-4_10": (["--set", "lr=3e-4"], 10),
    "inner3": (["--set", "inner_epochs=3"], 13),
    "keep_top0.25": (["--set", "keep_top=0.25"], 13),
    "sum_beta10_noclamp": (["--set", "reduction=sum", "--set", "clamp_eps=none"], 13),
    "paper13": ([], 13),
}


def load() -> str:
    """The 1/5/15-minute load averages (``uptime``)."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def run_timed(args: list[str], log: Path) -> dict:
    """Run the CLI; wall time and the child's CPU time (os.wait4's rusage)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([EXE, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): spobench {' '.join(args)}; see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}


def evaluate(folder: Path, lora: Path | None, limit: int, out: Path) -> dict:
    gen = ["generate", "--backbone", "tiny", "--prompt-set", "tiny-val", "--limit", str(limit), "--seed", "0",
           "--out", str(folder), "--batch-size", "25", "--overwrite"] + (["--lora", str(lora)] if lora else [])
    info = {}
    if not (folder / "results.json").exists():
        info["generate"] = run_timed(gen, out / f"{folder.name}.generate.log")
        info["eval"] = run_timed(["eval", "--metrics", "toy_alignment,toy_aesthetic", "--images", str(folder)],
                                 out / f"{folder.name}.eval.log")
    return info


def arm(name: str, out: Path, limit: int, rounds_override: int | None = None) -> dict:
    extra, rounds = ARMS[name]
    rounds = rounds_override or rounds
    run_dir = out / name
    args = ["train", "spo", *BASE, "--set", f"max_rounds={rounds}", *extra, "--out", str(run_dir)]
    row: dict = {"arm": name, "command": "spobench " + " ".join(args), "rounds": rounds, "load_before": load()}
    if not (run_dir / "summary.json").exists():
        row |= run_timed(args + ["--overwrite"], out / f"{name}.train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    row["load_after"] = load()
    row["counters"] = summary["counters"]
    row["steps"] = summary["progress"]["step"]
    rounds_log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    rr = [x for x in rounds_log if x.get("kind") == "round"]
    row["kept_pairs"] = sum(x["kept_pairs"] for x in rr)
    row["pools"] = sum(x["pools"] for x in rr)
    row["config"] = json.loads((run_dir / "config.json").read_text())
    evaluate(out / f"gen-{name}", run_dir / "lora", limit, out)
    cmp = out / f"compare-{name}.json"
    subprocess.run([EXE, "eval", "--compare", str(out / f"gen-{name}"), str(out / "gen-base"), "--out", str(cmp)],
                   check=True, capture_output=True, cwd=ROOT)
    row["compare"] = json.loads(cmp.read_text())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "speed_to_result")
    ap.add_argument("--arms", default="paper,fast")
    ap.add_argument("--limit", type=int, default=500, help="validation prompts per evaluation")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    ap.add_argument("--rounds", type=int, default=None, help="every arm this many rounds (a quick check of the script)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for k, (extra, rounds) in ARMS.items():
            print(f"{k}: {rounds} rounds {' '.join(extra)}")
        return
    a.out.mkdir(parents=True, exist_ok=True)
    evaluate(a.out / "gen-base", None, a.limit, a.out)
    rows = [arm(n.strip(), a.out, a.limit, a.rounds) for n in a.arms.split(",") if n.strip()]
    if any(r["arm"] == "paper" for r in rows):  # each arm paired by seed against the official-settings run too
        for r in rows:
            if r["arm"] != "paper":
                cmp = a.out / f"compare-{r['arm']}-vs-paper.json"
                subprocess.run([EXE, "eval", "--compare", str(a.out / f"gen-{r['arm']}"), str(a.out / "gen-paper"),
                                "--out", str(cmp)], check=True, capture_output=True, cwd=ROOT)
                r["compare_vs_paper"] = json.loads(cmp.read_text())
    text = json.dumps({"limit": a.limit, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "arms": rows},
                      indent=1)
    (a.out / "speed_to_result.json").write_text(text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text)
    for r in rows:
        m = r["compare"]
        print(r["arm"], r["rounds"], "rounds", f"wall {r.get('wall_s', float('nan')):.0f} s",
              f"cpu {r.get('cpu_s', float('nan')):.0f} s", json.dumps(m)[:300])


if __name__ == "__main__":
    main()
