"""spobench.core.outdir: the one guard every command's --out goes through (marker, lock, undo), and the
io writers it relies on (one-line OutputError for any OSError, byte-deterministic safetensors)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spobench.core import outdir
from spobench.core.errors import InputError, OutputError
from spobench.core.io import atomic_dir, atomic_file, atomic_write_text, canonical_safetensors, write_safetensors


def _tree(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else None


# -- check: what may be written ------------------------------------------------------------------------
def test_absent_or_empty_folder_is_fine_a_non_empty_one_needs_a_flag(tmp_path):
    outdir.check(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    outdir.check(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("1")
    with pytest.raises(InputError, match="not empty; pass --resume or --overwrite"):
        outdir.check(tmp_path / "full")
    with pytest.raises(InputError, match="only one of --resume and --overwrite"):
        outdir.check(tmp_path / "new", resume=True, overwrite=True)


def test_overwrite_refuses_a_folder_spobench_did_not_make(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match=r"notes: --overwrite refused: this folder was not made by spobench"):
        outdir.check(mine, overwrite=True)
    with pytest.raises(InputError, match="--overwrite refused"):
        with outdir.claim(mine, command="test", overwrite=True):
            raise AssertionError("not reached")
    assert (mine / "thesis.tex").read_text() == "years of work" and _tree(mine) == ["thesis.tex"]


def test_overwrite_refuses_home_even_with_a_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / outdir.MARKER).write_text("{}")
    (tmp_path / "x").write_text("1")
    with pytest.raises(InputError, match="--overwrite refused"):
        outdir.check(tmp_path, overwrite=True)


def test_out_under_a_file_and_unwritable_places_are_one_line(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError, match=rf"{tmp_path / 'f' / 'sub'}: cannot create it: {tmp_path / 'f'} is a file"):
        outdir.check(tmp_path / "f" / "sub")
    with pytest.raises(InputError, match="exists and is not a folder"):
        outdir.check(tmp_path / "f")
    # root may write anywhere despite chmod: inject the refusal access(2) gives on a read-only mount
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match=rf"{tmp_path / 'ro'}: cannot create it: {tmp_path} is not writable"):
        outdir.check(tmp_path / "ro")


def test_check_file_refuses_a_folder_where_the_file_goes(tmp_path):
    (tmp_path / "res.json").mkdir()
    with pytest.raises(InputError, match=r"--out .*res.json: is a folder"):
        outdir.check_file(tmp_path / "res.json")
    outdir.check_file(tmp_path / "ok.json")


TRAIN = {"results": ("summary.json", "lora")}  # the rules `spobench train` passes (trainers/base.py)


def test_run_dir_policy(tmp_path):  # moved from tests/trainers/test_spo.py (trainers' check_run_dir is this now)
    outdir.check(tmp_path / "new", resume=False, overwrite=False, **TRAIN)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty; pass --resume"):
        outdir.check(tmp_path / "old", resume=False, overwrite=False, **TRAIN)
    outdir.check(tmp_path / "old", resume=True, overwrite=False, **TRAIN)
    with pytest.raises(InputError, match="--overwrite refused: this folder was not made by spobench"):
        outdir.check(tmp_path / "old", resume=False, overwrite=True, **TRAIN)  # issue 14: only spobench's own folders
    from spobench.core.outdir import write_marker

    write_marker(tmp_path / "old", "train spo")
    outdir.check(tmp_path / "old", resume=False, overwrite=True, **TRAIN)


def test_resume_without_a_checkpoint_refuses_to_replace_a_finished_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / ".checkpoint-000001.ab12cd_9.tmp").mkdir(parents=True)  # killed before its first
    (out / "log.jsonl").write_text("{}\n")
    outdir.check(out, resume=True, **TRAIN)  # nothing to lose: it starts over
    (out / "summary.json").write_text("{}")
    with pytest.raises(InputError, match=r"run: --resume cannot continue this run: it has no complete checkpoint "
                                         r"in .*checkpoints \(it holds summary.json\)"):
        outdir.check(out, resume=True, **TRAIN)
    outdir.check(out, resume=True)  # a command without checkpoints (generate) has no such rule
    (out / "summary.json").unlink()
    (out / "checkpoints" / "checkpoint-000002").mkdir()  # no manifest.json: incomplete
    with pytest.raises(InputError, match=r"holds checkpoints/ without a complete checkpoint"):
        outdir.check(out, resume=True, **TRAIN)
    (out / "checkpoints" / "checkpoint-000002" / "manifest.json").write_text("{}")
    (out / "summary.json").write_text("{}")
    outdir.check(out, resume=True, **TRAIN)  # a complete checkpoint: it continues from there


def test_resume_needs_the_commands_own_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    outdir.check(out, resume=True, needs="plan.json", command="reproduce")  # empty: a fresh start
    (out / "images").mkdir()
    with pytest.raises(InputError, match=r"run: not a `spobench reproduce` run folder \(no plan.json\); choose another"):
        outdir.check(out, resume=True, needs="plan.json", command="reproduce")
    with pytest.raises(InputError, match="not empty; pass --resume"):  # without --resume: the usual refusal
        outdir.check(out, needs="plan.json", command="reproduce")
    (out / "plan.json").write_text("{}")
    outdir.check(out, resume=True, needs="plan.json", command="reproduce")


# -- claim: marker, undo ---------------------------------------------------------------------------------
def test_claim_marks_the_folder_and_overwrite_then_replaces_it(tmp_path):
    out = tmp_path / "run"
    with outdir.claim(out, command="generate") as c:
        assert c.fresh
        (out / "a.png").write_bytes(b"1")
    marker = json.loads((out / outdir.MARKER).read_text())
    assert marker["made_by"] == "spobench" and marker["command"] == "generate" and marker["created"]
    with outdir.claim(out, command="generate", overwrite=True):
        assert _tree(out) == [outdir.MARKER, outdir.REPLACED, f"{outdir.REPLACED}/{outdir.MARKER}",
                              f"{outdir.REPLACED}/a.png"]
        (out / "b.png").write_bytes(b"2")
    assert _tree(out) == [outdir.MARKER, "b.png"]


def test_a_failed_overwrite_gives_the_old_run_back(tmp_path):
    out = tmp_path / "run"
    with outdir.claim(out, command="generate"):
        (out / "a.png").write_bytes(b"old")
    before = {p: (out / p).read_bytes() for p in _tree(out)}
    with pytest.raises(InputError):
        with outdir.claim(out, command="generate", overwrite=True):
            (out / "b.png").write_bytes(b"new")
            raise InputError("bad prompt file found late")
    assert {p: (out / p).read_bytes() for p in _tree(out)} == before


def test_a_failed_fresh_run_leaves_nothing_unless_kept(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with pytest.raises(InputError):
        with outdir.claim(out, command="t"):
            (out / "half").write_text("x")
            raise InputError("late")
    assert not (tmp_path / "a").exists()  # the parents it made are gone too
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        with outdir.claim(tmp_path / "empty", command="t"):
            (tmp_path / "empty" / "half").write_text("x")
            raise InputError("late")
    assert _tree(tmp_path / "empty") == []
    with pytest.raises(InputError):
        with outdir.claim(tmp_path / "kept", command="t", keep=lambda: True):
            (tmp_path / "kept" / "checkpoint").write_text("x")
            raise InputError("late")
    assert "checkpoint" in _tree(tmp_path / "kept")


def test_a_failed_resume_changes_nothing(tmp_path):
    out = tmp_path / "legacy"  # a run folder from before the marker existed
    out.mkdir()
    (out / "log.jsonl").write_text("{}\n")
    with pytest.raises(InputError):
        with outdir.claim(out, command="t", resume=True):
            assert (out / outdir.MARKER).is_file()
            raise InputError("setting 'seed' differs")
    assert _tree(out) == ["log.jsonl"]


def test_an_oserror_in_the_block_is_one_line_naming_the_file(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(OutputError, match=r"/run/x: Read-only file system"):
        with outdir.claim(out, command="t"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out / "x"))
    assert not out.exists()


def test_stale_temps_of_killed_writes_are_removed_on_claim(tmp_path):
    out = tmp_path / "run"
    with outdir.claim(out, command="t"):
        (out / "keep.txt").write_text("1")
    (out / ".manifest.jsonl.ab12cd_9.tmp").write_text("half")
    (out / "lora").mkdir()
    (out / ".lora.zz99yy00.tmp").mkdir()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / ".checkpoint-000002.old").mkdir()
    (out / ".notes.tmp").write_text("a user's file of that shape is not ours")
    with outdir.claim(out, command="t", resume=True):
        pass
    assert _tree(out) == [".notes.tmp", outdir.MARKER, "checkpoints", "keep.txt", "lora"]


def test_nested_claims_of_one_folder_share_the_lock(tmp_path):
    with outdir.claim(tmp_path / "run", command="reproduce") as outer:
        with outdir.claim(tmp_path / "run", command="train") as inner:
            assert inner is outer


# -- the lock ------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from spobench.core import outdir
with outdir.claim(sys.argv[1], command="holder"):
    Path(sys.argv[2]).write_text("locked")
    time.sleep(120)
"""


def _holder(out: Path, ready: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(ready)])
    t0 = time.monotonic()
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() - t0 < 60, "holder did not start"
        time.sleep(0.05)
    return proc


def test_a_second_process_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out, tmp_path / "ready")
    try:
        with pytest.raises(OutputError, match=r"run: another spobench process \(`holder`\) is writing this folder"):
            with outdir.claim(out, command="second", resume=True):
                raise AssertionError("not reached")
        assert _tree(out) == [outdir.MARKER]  # the second one touched nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with outdir.claim(out, command="resumed", resume=True):  # the kernel dropped the dead holder's lock
        pass


# -- io writers ---------------------------------------------------------------------------------------
def test_atomic_writers_turn_any_oserror_into_one_line(tmp_path):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(OutputError, match=r"dir.json: cannot write it: Is a directory"):
        atomic_write_text(tmp_path / "dir.json", "{}")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=r"file/x.json: cannot write it: .*/file is a file, not a folder"):
        atomic_write_text(tmp_path / "file" / "x.json", "{}")
    with pytest.raises(OutputError, match=r"ckpt: cannot write it \(.*ckpt/optimizer.pt\): Read-only file system"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            with atomic_file(tmp / "optimizer.pt"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp / "optimizer.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "file"]


def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    import torch
    from safetensors.torch import load_file, safe_open

    t = {"b": torch.arange(3.0), "a": torch.ones(2, 2)}
    write_safetensors(tmp_path / "1.safetensors", t, {"format": "pt", "z": "1", "lora_adapter_metadata": "{}"})
    write_safetensors(tmp_path / "2.safetensors", dict(reversed(t.items())),
                      {"lora_adapter_metadata": "{}", "z": "1", "format": "pt"})
    one, two = (tmp_path / "1.safetensors").read_bytes(), (tmp_path / "2.safetensors").read_bytes()
    assert one == two and canonical_safetensors(one) == one
    back = load_file(tmp_path / "1.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    with safe_open(tmp_path / "1.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "z": "1", "lora_adapter_metadata": "{}"}


SAVE_LORA = """
import sys
from spobench.models.backbones import load_backbone
bb = load_backbone("tiny", None)
bb.add_lora(4, seed=0)
bb.save_lora(sys.argv[1])
"""


def test_a_saved_lora_has_the_same_sha256_in_every_process(tmp_path):
    digests = set()
    for hash_seed in ("1", "2"):  # safetensors' and peft's set orders followed the string hash seed
        out = tmp_path / f"lora-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-c", SAVE_LORA, str(out)], check=True, env=env, capture_output=True)
        digests.add(hashlib.sha256((out / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1


# -- generate --resume: the same run or a refusal -------------------------------------------------------
def test_generate_resume_check_names_the_first_difference(tmp_path):
    from spobench.data.manifest import MANIFEST
    from spobench.eval.generate import check_resume, plan

    jobs = plan(["a red circle", "a blue square"], seed=3)
    common = {"sampler": {"num_steps": 2, "guidance_scale": 5.0}, "backbone": {"backbone": "tiny"},
              "lora": str(tmp_path / "lora")}
    (tmp_path / "lora").mkdir()
    rows = [{"index": j.index, "file": j.file, "prompt": j.prompt, "seed": j.seed, **common} for j in jobs]
    (tmp_path / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    check_resume(tmp_path, jobs, common)
    moved = common | {"lora": str(tmp_path / "x" / ".." / "lora")}  # the same folder, spelled another way
    check_resume(tmp_path, jobs, moved)
    with pytest.raises(InputError, match=r"00000.png was made with seed 3, this run gives 4 there"):
        check_resume(tmp_path, plan(["a red circle", "a blue square"], seed=4))
    with pytest.raises(InputError, match=r"00000.png was made with prompt 'a red circle'"):
        check_resume(tmp_path, plan(["a green star", "a blue square"], seed=3))
    with pytest.raises(InputError, match=r"00001.png is not one of the 1 images"):
        check_resume(tmp_path, plan(["a red circle"], seed=3))
    with pytest.raises(InputError, match=r"sampler.guidance_scale 5.0, this run uses 7.0"):
        check_resume(tmp_path, jobs, common | {"sampler": {"num_steps": 2, "guidance_scale": 7.0}})
    (tmp_path / MANIFEST).write_text('{"index": 0}\n')
    with pytest.raises(InputError, match=rf"{MANIFEST}:1: missing field 'file'"):
        check_resume(tmp_path, jobs)
