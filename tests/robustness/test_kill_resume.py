"""SIGKILL a tiny `spobench train spo` run at several points, then `--resume` until it is done: the
final LoRA must be bit-identical to an uninterrupted run's, and no kill may leave a half-written
checkpoint (a checkpoint is written into a temp folder, its manifest last, then renamed into place).

Kill points come from a fixed seed, so the test is reproducible:

* by time, a moment after start-up (usually before the first round);
* by progress: once log.jsonl holds N round lines, after a further random delay (these land in
  rollouts, training steps, log appends or checkpoint writes, wherever the run happens to be);
* exactly in the middle of a checkpoint write, with the test-only hook
  ``SPOBENCH_TEST_KILL_AT=checkpoint-NNNNNN:files`` (tensors written, manifest not yet) or
  ``...:manifest`` (manifest written, folder not yet renamed); see
  ``spobench.core.checkpoint._test_kill_point``.

One session also ends with a truncated log line (as a kill in the middle of an append leaves it).
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clitools import EXE

ROUNDS = 10  # 5 prompts x 2 epochs, one prompt per round, a checkpoint after every round
SETTINGS = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
            "prompts=tiny-train", "prompt_limit=5", "epochs=2", "checkpoint_every=1", "keep_checkpoints=2",
            "scorer=metric:toy_aesthetic"]
ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _cmd(out: Path, resume: bool) -> list[str]:
    """The same command every time, as a user re-runs it (with --resume after a crash)."""
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return [EXE, "train", "spo", "--backbone", "tiny", "--out", str(out), *sets, *(["--resume"] if resume else [])]


def _start(out: Path, resume: bool, logs: Path, env: dict | None = None) -> subprocess.Popen:
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir()))
    return subprocess.Popen(_cmd(out, resume), stdout=open(logs / f"{n:02d}.out", "w"),
                            stderr=open(logs / f"{n:02d}.err", "w"), env={**os.environ, **ENV, **(env or {})})


def _round_lines(out: Path) -> int:
    try:
        text = (out / "log.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return sum('"kind": "round"' in line for line in text.splitlines())


def _complete_checkpoints(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*")) if root.is_dir() else []


def _check_atomic(out: Path) -> None:
    """Every checkpoint folder under its final name is complete: a manifest that lists its files."""
    for index in _complete_checkpoints(out):
        ckpt = out / "checkpoints" / f"checkpoint-{index:06d}"
        manifest = json.loads((ckpt / "manifest.json").read_text())
        files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert manifest["files"] == files, ckpt
        assert manifest["progress"]["rounds_done"] == index
        assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 300) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` holds; False if it ended by itself first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            return False
        assert time.monotonic() - t0 < timeout, "run made no progress"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _lora(out: Path) -> dict:
    return load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path, request):
    logs = tmp_path / "logs"
    ref = tmp_path / "uninterrupted"
    # the uninterrupted run works beside the killed ones (each is single-threaded; they share nothing)
    ref_err = tmp_path / "uninterrupted.err"
    ref_proc = subprocess.Popen(_cmd(ref, resume=False), stdout=subprocess.DEVNULL, stderr=open(ref_err, "w"),
                                env={**os.environ, **ENV})
    request.addfinalizer(lambda: ref_proc.poll() is None and ref_proc.kill())  # a failed test leaves no run

    rng = random.Random(8)  # fixed: the same kill points on every run of the test
    targets = sorted(rng.sample(range(1, ROUNDS), 5))
    plan = [("startup", rng.uniform(0.5, 3.0))]
    for kind, target in zip(["progress", "files", "progress", "manifest", "progress"], targets):
        plan.append((kind, target if kind != "progress" else (target, rng.uniform(0.0, 0.5))))

    out = tmp_path / "killed"
    kills, truncated_log = [], False
    for n, (kind, arg) in enumerate(plan):
        resume = n > 0
        if kind == "startup":
            proc = _start(out, resume, logs)
            t0 = time.monotonic()
            killed = _kill_when(proc, lambda: time.monotonic() - t0 >= arg, 0.0)
        elif kind == "progress":
            target, delay = arg
            proc = _start(out, resume, logs)
            killed = _kill_when(proc, lambda: _round_lines(out) >= target, delay)
        else:  # in the middle of writing checkpoint `index`, by the test hook
            index = max([arg, *[c + 1 for c in _complete_checkpoints(out)]])
            if index > ROUNDS:
                continue
            where = f"checkpoint-{index:06d}:{kind}"
            proc = _start(out, resume, logs, env={"SPOBENCH_TEST_KILL_AT": where})
            assert proc.wait(timeout=300) == -signal.SIGKILL, (where, (logs / f"{n:02d}.err").read_text()[-2000:])
            killed = True
            # the write was cut: only its temp folder exists, never a checkpoint without a manifest
            assert not (out / "checkpoints" / f"checkpoint-{index:06d}").exists()
            assert list((out / "checkpoints").glob(f".checkpoint-{index:06d}.*.tmp")), where
            assert max(_complete_checkpoints(out), default=0) < index
        if killed:
            kills.append((kind, arg, _complete_checkpoints(out)))
            assert proc.returncode == -signal.SIGKILL
        _check_atomic(out)
        if killed and not truncated_log and (out / "log.jsonl").exists() and _round_lines(out):
            with open(out / "log.jsonl", "a") as f:  # as if killed in the middle of appending a line
                f.write('{"kind": "train", "step": 99, "epoch": 0, "ro')
            truncated_log = True
    assert len(kills) >= 5, kills
    assert truncated_log
    assert any(k[0] in ("files", "manifest") for k in kills)

    for _ in range(3):  # --resume until done
        r = subprocess.run(_cmd(out, resume=True), capture_output=True, text=True, env={**os.environ, **ENV},
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        if json.loads((out / "summary.json").read_text())["complete"]:
            break
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["progress"]["rounds_done"] == ROUNDS

    assert ref_proc.wait(timeout=600) == 0, ref_err.read_text()[-3000:]
    assert json.loads((ref / "summary.json").read_text())["progress"]["rounds_done"] == ROUNDS
    a, b = _lora(ref), _lora(out)
    assert a.keys() == b.keys()
    for k in a:  # byte equality of every tensor
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert summary["progress"]["step"] == json.loads((ref / "summary.json").read_text())["progress"]["step"]

    _check_atomic(out)
    assert _complete_checkpoints(out) == [ROUNDS - 1, ROUNDS]  # keep_checkpoints=2
    leftovers = [p for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers  # killed writes' temp files are cleaned up by the next save
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # all whole lines
    assert [(r["epoch"], r["round"]) for r in rows if r["kind"] == "round"] == \
        [(e, i) for e in range(2) for i in range(5)]  # no duplicated or lost rounds
