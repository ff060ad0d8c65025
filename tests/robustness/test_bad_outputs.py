"""Bad output folders and faults while writing (issue 14: "Runs that are not the run asked for",
"Files lost", "Reproducibility you can check"). Each case runs the command a user would run and
asserts the contract of tests/contract.py: exit 2, ONE error line naming the input, nothing left
behind or changed. The guard they all exercise is ``spobench.core.outdir`` (unit tests:
tests/core/test_outdir.py).

Faults that need injecting (a full disk, a read-only file system as root, who may write anywhere
despite chmod) call ``spobench.cli.main`` in-process with a monkeypatch, as test_bad_inputs.py does.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clitools import run
from contract import assert_clean_failure, snapshot

slow = pytest.mark.slow
TRAIN = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
         "prompts=tiny-train", "prompt_limit=3", "epochs=1", "checkpoint_every=1", "scorer=metric:toy_aesthetic"]
GEN = ["--prompt-set", "tiny-val", "--limit", "2", "--steps", "2"]


def _sets(settings):
    return [a for s in settings for a in ("--set", s)]


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "data").mkdir(exist_ok=True)
    (path / "data" / "results.csv").write_text("1,2,3\n")
    return path


def _a_file(t: Path) -> Path:
    (t / "afile").write_text("not a folder")
    return t / "afile"


@pytest.fixture(scope="module")
def spo_run(finished_spo_run):
    """A tiny SPO run stopped after one round (a checkpoint, a final LoRA, a summary). Shared with the other
    robustness catalogue that asks for the same settings (tests/conftest.py)."""
    return finished_spo_run(TRAIN + ["max_rounds=1"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A finished `spobench generate` folder (2 images, seed 0)."""
    out = tmp_path_factory.mktemp("gen") / "images"
    r = run("generate", *GEN, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(src: Path, t: Path, name: str = "run") -> Path:
    shutil.copytree(src, t / name)
    return t / name


def _no_checkpoints(run_dir: Path, t: Path) -> Path:
    out = _copy(run_dir, t)
    shutil.rmtree(out / "checkpoints")
    return out


def _killed_before_first_checkpoint(run_dir: Path, t: Path) -> Path:
    """What a run killed in its first round leaves: config, log, marker; no checkpoint, no result."""
    out = _no_checkpoints(run_dir, t)
    for p in ("lora", "summary.json", "tb"):
        shutil.rmtree(out / p, ignore_errors=True) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
    return out


def _ckpt(out: Path) -> Path:
    return out / "checkpoints" / "checkpoint-000001"


def _edit(out: Path, name: str, how) -> Path:
    file = _ckpt(out) / name
    how(file)
    return out


def _set_config(file: Path, **values) -> None:
    file.write_text(json.dumps(json.loads(file.read_text()) | values))


# id -> (fixture or None, build(fixture value, tmp_path) -> (argv, names in the error, folder that must not change), cwd)
def _items():
    return {
        # --overwrite replaces only a folder spobench made
        "overwrite-user-folder/generate": (None, lambda f, t: (
            ["generate", *GEN, "--out", _user_folder(t / "o"), "--overwrite"], [t / "o", "--overwrite refused"], t / "o")),
        "overwrite-user-folder/train": (None, lambda f, t: (
            ["train", "spo", "--out", _user_folder(t / "o"), "--overwrite", *_sets(TRAIN)],
            [t / "o", "not made by spobench"], t / "o")),
        "overwrite-user-folder/toy-data": (None, lambda f, t: (
            ["toy", "data", "--pairs", "2", "--base-samples", "0", "--out", _user_folder(t / "o"), "--overwrite"],
            [t / "o", "--overwrite refused"], t / "o")),
        "overwrite-user-folder/toy-clip": (None, lambda f, t: (
            ["toy", "clip", "--out", _user_folder(t / "o"), "--overwrite"], [t / "o", "--overwrite refused"], t / "o")),
        "overwrite-cwd-with-user-files": (None, lambda f, t: (
            ["generate", *GEN, "--out", ".", "--overwrite"], ["--overwrite refused"], _user_folder(t / "cwd"))),
        # an --out spobench cannot write
        "out-under-a-file/generate": (None, lambda f, t: (
            ["generate", *GEN, "--out", _a_file(t) / "sub"], [t / "afile", "is a file"], t / "afile")),
        "out-under-a-file/train": (None, lambda f, t: (
            ["train", "spo", "--out", _a_file(t) / "sub", *_sets(TRAIN)], [t / "afile", "is a file"], t / "afile")),
        "out-under-a-file/toy-pretrain": (None, lambda f, t: (
            ["toy", "pretrain", "--steps", "1", "--out", _a_file(t) / "sub"], [t / "afile", "is a file"], t / "afile")),
        "out-is-a-file/reproduce": (None, lambda f, t: (
            ["reproduce", "ci_regression", "--out", _a_file(t)], [t / "afile", "not a folder"], t / "afile")),
        "eval-spm-out-is-a-folder": (None, lambda f, t: (
            ["eval-spm", t / "spm", "--pairs", t / "pairs.parquet", "--out", _user_folder(t / "res.json")],
            [t / "res.json", "is a folder"], t / "res.json")),
        # --resume continues the run it is given, or refuses
        "resume-without-checkpoints/train": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _no_checkpoints(r, t), "--resume", *_sets(TRAIN + ["max_rounds=1"])],
            [t / "run", "--resume cannot continue", "summary.json"], t / "run")),
        "resume-changed-seed/train": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _copy(r, t), "--resume", "--set", "seed=5"], ["'seed'", "differs"], t / "run")),
        "resume-changed-seed-before-first-checkpoint/train": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _killed_before_first_checkpoint(r, t), "--resume", *_sets(TRAIN + ["seed=5"])],
            ["'seed'", "differs"], t / "run")),
        "resume-other-seed/generate": ("images", lambda g, t: (
            ["generate", *GEN, "--seed", "9", "--out", _copy(g, t), "--resume"],
            [t / "run" / "manifest.jsonl", "00000.png", "seed 0", "9"], t / "run")),
        "resume-other-prompts/generate": ("images", lambda g, t: (
            ["generate", "--prompt-set", "tiny-train", "--limit", "2", "--steps", "2", "--out", _copy(g, t), "--resume"],
            [t / "run" / "manifest.jsonl", "00000.png", "prompt"], t / "run")),
        "resume-fewer-prompts/generate": ("images", lambda g, t: (
            ["generate", *GEN[:2], "--limit", "1", "--steps", "2", "--out", _copy(g, t), "--resume"],
            [t / "run" / "manifest.jsonl", "00001.png", "not one of the 1 images"], t / "run")),
        "resume-other-cfg/generate": ("images", lambda g, t: (
            ["generate", *GEN, "--cfg", "7", "--out", _copy(g, t), "--resume"],
            [t / "run" / "manifest.jsonl", "sampler.guidance_scale"], t / "run")),
        # malformed checkpoint sidecars name the checkpoint file
        "checkpoint-corrupt-progress": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _edit(_copy(r, t), "progress.json", lambda f: f.write_text('{"epoch": 0, "rou')),
             "--resume"], [_ckpt(t / "run") / "progress.json", "corrupt"], t / "run")),
        "checkpoint-progress-missing-a-count": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _edit(_copy(r, t), "progress.json", lambda f: f.write_text('{"epoch": 0}')),
             "--resume"], [_ckpt(t / "run") / "progress.json", "'round'"], t / "run")),
        "checkpoint-truncated-optimizer": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _edit(_copy(r, t), "optimizer.pt",
                                            lambda f: f.write_bytes(f.read_bytes()[:100])), "--resume"],
            [_ckpt(t / "run") / "optimizer.pt", "corrupt"], t / "run")),
        "checkpoint-config-bad-value": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _edit(_copy(r, t), "config.json", lambda f: _set_config(f, k="four")),
             "--resume"], [_ckpt(t / "run") / "config.json", "'k'"], t / "run")),
        "checkpoint-config-out-of-range": ("spo_run", lambda r, t: (
            ["train", "spo", "--out", _edit(_copy(r, t), "config.json", lambda f: _set_config(f, kappa=5000)),
             "--resume"], [_ckpt(t / "run") / "config.json", "'kappa'"], t / "run")),
    }


ITEMS = _items()
NEEDS_CWD = {"overwrite-cwd-with-user-files"}


@pytest.mark.parametrize("item", [pytest.param(k, marks=[slow] if v[0] == "spo_run" else []) for k, v in ITEMS.items()])
def test_bad_output(item, request, tmp_path):
    needs, build = ITEMS[item]
    value = request.getfixturevalue(needs) if needs else None
    argv, names, out = build(value, tmp_path)
    before = snapshot(out)
    r = run(*argv, cwd=out if item in NEEDS_CWD else None)
    assert_clean_failure(r.returncode, r.stderr, names, out, before)


# -- two processes on one --out -------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from spobench.core import outdir
with outdir.claim(sys.argv[1], command=sys.argv[3], resume=True):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(300)
"""


@pytest.fixture
def held(tmp_path):
    """Hold the lock of a folder the way a running command does (spobench.core.outdir.claim), so that the
    second process meets it at a known moment; SIGKILLed at the end, as a crash would."""
    procs = []

    def hold(folder: Path, command: str) -> Path:
        ready = tmp_path / f"ready-{len(procs)}"
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(ready), command])
        procs.append(proc)
        t0 = time.monotonic()
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() - t0 < 120, "the holder did not start"
            time.sleep(0.05)
        return folder

    yield hold
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_second_generate_on_a_locked_out_is_refused(images, held, tmp_path):
    out = held(_copy(images, tmp_path), "spobench generate")
    before = snapshot(out)
    r = run("generate", *GEN, "--out", out, "--resume")
    assert_clean_failure(r.returncode, r.stderr, [out, "another spobench process", "is writing this folder"], out,
                         before)


@slow
def test_second_train_on_a_locked_out_is_refused_and_resumes_once_the_holder_died(spo_run, held, tmp_path):
    out = held(_copy(spo_run, tmp_path), "spobench train spo")
    before = snapshot(out)
    r = run("train", "spo", "--out", out, "--resume", *_sets(TRAIN + ["max_rounds=2"]))
    assert_clean_failure(r.returncode, r.stderr, [out, "another spobench process"], out, before)


def test_a_lock_left_by_a_killed_process_does_not_block_resume(images, tmp_path):
    out = _copy(images, tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(tmp_path / "ready"), "x"])
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run("generate", *GEN, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote 2 images" in r.stdout


# -- faults injected in-process --------------------------------------------------------------------------
def _main(capsys, *argv) -> tuple[int, str]:
    from spobench.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    return exit_.value.code, capsys.readouterr().err


def test_read_only_location_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # root writes through chmod; what access(2) answers on a read-only mount is injected instead
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == ro and mode & os.W_OK else real(p, mode))
    code, err = _main(capsys, "generate", *GEN, "--out", ro / "images")
    assert_clean_failure(code, err, [ro / "images", f"{ro} is not writable"], ro, snapshot(ro))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod (covered by the injected case above)")
def test_chmod_read_only_folder_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = run("generate", *GEN, "--out", ro / "images")
        assert_clean_failure(r.returncode, r.stderr, [ro / "images", "not writable"], ro, snapshot(ro))
    finally:
        ro.chmod(0o755)


def test_read_only_file_system_mid_write_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    real = os.replace

    def replace(src, dst, *a, **k):
        if str(dst).endswith("00001.png"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "images"
    code, err = _main(capsys, "generate", *GEN, "--batch-size", "1", "--out", out)
    assert_clean_failure(code, err, [out / "00001.png", "Read-only file system"], None, None)
    # image 0 and its manifest row are whole and resumable; no temp file is left
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".spobench")) == ["00000.png",
                                                                                        "manifest.jsonl"]
    assert not [p for p in out.rglob("*.tmp")]


def _disk_full_when_writing(monkeypatch, name_part: str) -> None:
    """ENOSPC from fsync for the temp file whose name contains ``name_part`` (atomic writes fsync before
    the rename), the rest of the file system untouched."""
    real = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
@slow
def test_disk_full_in_the_first_checkpoint_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    _disk_full_when_writing(monkeypatch, ".checkpoint-000001.")
    out = tmp_path / "run"
    code, err = _main(capsys, "train", "spo", "--out", out, *_sets(TRAIN))
    assert_clean_failure(code, err, [out / "checkpoints" / "checkpoint-000001", "No space left on device"], out, None)


# -- reproducibility you can check ------------------------------------------------------------------------
@slow
def test_identical_runs_write_byte_identical_lora_files(spo_run, tmp_path):
    again = tmp_path / "again"
    r = run("train", "spo", "--out", again, *_sets(TRAIN + ["max_rounds=1"]), env={"PYTHONHASHSEED": "12345"})
    assert r.returncode == 0, r.stderr[-3000:]
    for rel in ("lora/pytorch_lora_weights.safetensors",
                "checkpoints/checkpoint-000001/lora/pytorch_lora_weights.safetensors"):
        a, b = (hashlib.sha256((d / rel).read_bytes()).hexdigest() for d in (spo_run, again))
        assert a == b, rel


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name an fd's file")
@slow
def test_disk_full_in_the_spm_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """train-spm's optimizer state goes through io.save_torch: torch.save given a path reported a full
    disk as a RuntimeError from its C++ writer (a traceback)."""
    from spobench.toyworld.pairs import make_dataset

    make_dataset(tmp_path / "data", n_pairs=8, seed=0)
    pairs = next((tmp_path / "data").rglob("*.parquet"))
    _disk_full_when_writing(monkeypatch, ".optimizer.pt.")
    out = tmp_path / "spm-run"
    code, err = _main(capsys, "train-spm", "--pairs", pairs, "--backbone", "tiny", "--steps", "2", "--batch-size",
                      "2", "--out", out)
    assert_clean_failure(code, err, [out / "checkpoint", "No space left on device"], out, None)
