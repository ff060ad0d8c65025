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
        --arms paper,fast [--limit 500] [--seed 1] [--concurrent] [--base-results FILE] \
        [--json results/fast_preset/speed_to_result.json]

``--arms`` picks from ARMS below (``--list`` shows them); a finished arm's folder is reused (delete it to
rerun). ``--seed`` is the training seed (the validation prompts and their seed stay fixed, so arms of every
training seed pair by image); a seed other than 0 gets its own folders (``fast-s1``). ``--concurrent`` runs
the arms' pipelines at the same time, so every arm's wall time is measured under the same load (the ratio
of wall times then includes the arms competing with each other; CPU seconds do not). ``--base-results``
pairs against an already evaluated base (a results.json) instead of generating it. A background sampler
reads the load every 20 s; each phase records the samples seen while it ran. The JSON is rewritten after
every phase, so a run cut short keeps what finished. The official-settings arm (``paper``, 40 rounds) takes
~680 s CPU; each 500-image evaluation ~230 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


LOAD_SAMPLES: list[tuple[float, float]] = []  # (time.time(), 1-minute load), appended by sample_load


def sample_load(stop: threading.Event, every_s: float = 20.0) -> None:
    while True:
        one = load().split()[0]
        if one != "?":
            LOAD_SAMPLES.append((time.time(), float(one)))
        if stop.wait(every_s):
            return


def load_during(t0: float, t1: float) -> dict:
    seen = [x for t, x in LOAD_SAMPLES if t0 <= t <= t1]
    if not seen:
        return {"samples": 0}
    return {"samples": len(seen), "min": min(seen), "mean": round(sum(seen) / len(seen), 2), "max": max(seen)}


def run_timed(args: list[str], log: Path) -> dict:
    """Run the CLI; wall time, the child's CPU time (os.wait4's rusage) and the load before, during, after."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    before, t0, start = load(), time.perf_counter(), time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([EXE, *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed ({code}): spobench {' '.join(args)}; see {log}")
    return {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "started": time.strftime("%H:%M:%S", time.gmtime(start)),
            "load_before": before, "load_after": load(), "load_during": load_during(start, time.time())}


def arm_dir_name(name: str, seed: int) -> str:
    """Seed 0 keeps the historical folder names; another training seed gets its own."""
    return name if seed == 0 else f"{name}-s{seed}"


def train_args(name: str, run_dir: Path, seed: int = 0, rounds_override: int | None = None) -> list[str]:
    extra, rounds = ARMS[name]
    seed_args = [] if seed == 0 else ["--set", f"seed={seed}"]
    return ["train", "spo", *BASE, "--set", f"max_rounds={rounds_override or rounds}", *seed_args, *extra,
            "--out", str(run_dir)]


def compare(a: Path, b: Path, out: Path) -> dict:
    subprocess.run([EXE, "eval", "--compare", str(a), str(b), "--out", str(out)], check=True, capture_output=True,
                   cwd=ROOT)
    return json.loads(out.read_text())


def evaluate(folder: Path, lora: Path | None, limit: int, out: Path) -> dict:
    gen = ["generate", "--backbone", "tiny", "--prompt-set", "tiny-val", "--limit", str(limit), "--seed", "0",
           "--out", str(folder), "--batch-size", "25", "--overwrite"] + (["--lora", str(lora)] if lora else [])
    info = {"command": "spobench " + " ".join(gen)}
    if not (folder / "results.json").exists():
        info["generate"] = run_timed(gen, out / f"{folder.name}.generate.log")
        info["eval"] = run_timed(["eval", "--metrics", "toy_alignment,toy_aesthetic", "--images", str(folder)],
                                 out / f"{folder.name}.eval.log")
    return info


def arm(name: str, out: Path, limit: int, base: Path, seed: int = 0, rounds_override: int | None = None,
        done=lambda row: None) -> dict:
    """Train one arm, then generate and pair its images against the base; ``done(row)`` after each phase."""
    tag = arm_dir_name(name, seed)
    run_dir = out / tag
    args = train_args(name, run_dir, seed, rounds_override)
    row: dict = {"arm": name, "seed": seed, "dir": tag, "command": "spobench " + " ".join(args),
                 "rounds": rounds_override or ARMS[name][1]}
    if not (run_dir / "summary.json").exists():
        row |= run_timed(args + ["--overwrite"], out / f"{tag}.train.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    row["counters"] = summary["counters"]
    row["steps"] = summary["progress"]["step"]
    rounds_log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    rr = [x for x in rounds_log if x.get("kind") == "round"]
    row["kept_pairs"] = sum(x["kept_pairs"] for x in rr)
    row["round_s"] = [round(x["round_s"], 1) for x in rr]  # wall per round: arms side by side compare round by round
    row["pools"] = sum(x["pools"] for x in rr)
    row["config"] = json.loads((run_dir / "config.json").read_text())
    done(row)
    row["evaluation"] = evaluate(out / f"gen-{tag}", run_dir / "lora", limit, out)
    row["compare"] = compare(out / f"gen-{tag}", base, out / f"compare-{tag}.json")
    done(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "speed_to_result")
    ap.add_argument("--arms", default="paper,fast")
    ap.add_argument("--limit", type=int, default=500, help="validation prompts per evaluation")
    ap.add_argument("--seed", type=int, default=0, help="training seed of every arm (validation seed stays 0)")
    ap.add_argument("--concurrent", action="store_true", help="run the arms at the same time (same load)")
    ap.add_argument("--base-results", type=Path, default=None,
                    help="an evaluated base (results.json over the same prompts, seed 0) instead of generating it")
    ap.add_argument("--paper-results", type=Path, default=None,
                    help="also pair every arm against these official-settings images (e.g. the README run's)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    ap.add_argument("--rounds", type=int, default=None, help="every arm this many rounds (a quick check of the script)")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for k, (extra, rounds) in ARMS.items():
            print(f"{k}: {rounds} rounds {' '.join(extra)}")
        return
    names = [n.strip() for n in a.arms.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"error: --arms: unknown arm(s) {', '.join(unknown)} (see --list)")
    a.out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    threading.Thread(target=sample_load, args=(stop,), daemon=True).start()
    doc: dict = {"limit": a.limit, "seed": a.seed, "concurrent": a.concurrent,
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0), "cpus": os.cpu_count(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "arms": []}
    lock = threading.Lock()

    def write(row: dict | None = None) -> None:
        with lock:
            if row is not None and row not in doc["arms"]:
                doc["arms"].append(row)
            doc["load_samples"] = [[time.strftime("%H:%M:%S", time.gmtime(t)), x] for t, x in LOAD_SAMPLES]
            text = json.dumps(doc, indent=1)
            (a.out / "speed_to_result.json").write_text(text)
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(text)

    if a.base_results:
        base = a.base_results
        doc["base"] = {"results": str(base)}
    else:
        base = a.out / "gen-base"
        doc["base"] = evaluate(base, None, a.limit, a.out)
    write()

    def job(n: str) -> dict:
        """One arm; a failed (or killed) arm becomes a row saying so, with the rounds it finished, so the
        other arms of a concurrent run still get their comparisons."""
        try:
            return arm(n, a.out, a.limit, base, a.seed, a.rounds, done=write)
        except (SystemExit, subprocess.CalledProcessError) as e:
            row = {"arm": n, "seed": a.seed, "dir": arm_dir_name(n, a.seed), "failed": str(e), "compare": None}
            log = a.out / row["dir"] / "log.jsonl"
            if log.exists():
                rr = [x for x in map(json.loads, log.read_text().splitlines()) if x.get("kind") == "round"]
                row["rounds_finished"] = len(rr)
                row["round_s"] = [round(x["round_s"], 1) for x in rr]
            write(row)
            return row

    if a.concurrent:
        with ThreadPoolExecutor(len(names)) as pool:
            rows = list(pool.map(job, names))
    else:
        rows = [job(n) for n in names]
    paper = next((r for r in rows if r["arm"] == "paper" and "failed" not in r), None)
    for r in rows:  # each arm paired by seed against the official-settings run's own images too
        if "failed" in r:
            continue
        if paper is not None and r is not paper:
            r["compare_vs_paper"] = compare(a.out / f"gen-{r['dir']}", a.out / f"gen-{paper['dir']}",
                                            a.out / f"compare-{r['dir']}-vs-paper.json")
        if a.paper_results:
            r["compare_vs_paper_results"] = compare(a.out / f"gen-{r['dir']}", a.paper_results,
                                                    a.out / f"compare-{r['dir']}-vs-paper-results.json")
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    stop.set()
    write()
    for r in rows:
        if "failed" in r:
            print(r["arm"], f"seed {r['seed']}", "failed:", r["failed"])
            continue
        print(r["arm"], f"seed {r['seed']}", r["rounds"], "rounds", f"wall {r.get('wall_s', float('nan')):.0f} s",
              f"cpu {r.get('cpu_s', float('nan')):.0f} s", json.dumps(r["compare"])[:300])


if __name__ == "__main__":
    main()
