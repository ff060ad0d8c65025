"""`spobench train spo` end to end through the installed executable (subprocesses), on the tiny backbone,
with the ``toy_aesthetic`` oracle as the pool scorer."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

EXE = shutil.which("spobench", path=str(Path(sys.executable).parent)) or "spobench"
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a small white square"]

SCORER = "metric:toy_aesthetic"  # the tiny world's oracle as the preference model


def spobench(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from spobench.models.backbones.testing import make_tiny_folder

    root = tmp_path_factory.mktemp("spo-cli")
    model = make_tiny_folder(root / "tiny-model")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return root, model, prompts


def _settings(prompts):
    sets = [f"prompts={prompts}", f"scorer={SCORER}", "k=2", "num_steps=4", "kappa=800", "epochs=1",
            "rollout_batch=1", "train_batch_size=2", "threshold=0.0", "checkpoint_every=1", "keep_checkpoints=2"]
    return [a for s in sets for a in ("--set", s)]


def _train_args(world, out, *extra, trainer="spo"):
    root, model, prompts = world
    return ("train", trainer, "--backbone", "tiny", "--model", str(model), "--out", str(out),
            *_settings(prompts), *extra)


def _train(world, out, *extra, trainer="spo"):
    return spobench(*_train_args(world, out, *extra, trainer=trainer))


@pytest.fixture(scope="module")
def two_runs(world):
    """The uninterrupted run and the first 2 rounds of an interrupted one (resumed in its test), side by side."""
    from clitools import run_together

    full, interrupted = world[0] / "full", world[0] / "interrupted"
    r_full, r_part = run_together(_train_args(world, full), _train_args(world, interrupted, "--set", "max_rounds=2"))
    return (full, r_full), (interrupted, r_part)


@pytest.fixture(scope="module")
def full_run(two_runs):
    out, r = two_runs[0]
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_train_writes_checkpoints_logs_and_a_diffusers_lora(world, full_run):
    out = full_run
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["checkpoint-000003", "checkpoint-000004"]  # 4 rounds, the last 2 kept
    manifest = json.loads((out / "checkpoints" / names[-1] / "manifest.json").read_text())
    assert manifest["backbone"]["backbone"] == "tiny" and manifest["progress"]["rounds_done"] == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["progress"]["step"] > 0
    c = summary["counters"]
    # steps 751, 501, 251, 1, all pooled: per prompt (1 + 3k) * 2 CFG rollout rows, 4k scorings
    assert c["reward_image_passes"] == 4 * 4 * 2 and c["vae_decodes"] == 4 * 4 * 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["kind"] == "round"]
    steps = [r for r in rows if r["kind"] == "train"]
    assert len(rounds) == 4 and all("kept_fraction" in r and "counters/unet_rows_grad" in r for r in rounds)
    kept_pairs = sum(r["kept_pairs"] for r in rounds)
    assert c["unet_rows_grad"] == 2 * kept_pairs  # one policy row per pair (x2 CFG)
    assert steps and all(k in steps[0] for k in ("loss", "accuracy", "abs_logratio", "clamp_frac", "grad_norm"))
    assert list((out / "tb").glob("events.out.tfevents.*"))

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(world[1]), safety_checker=None)
    pipe.load_lora_weights(str(out / "lora"), weight_name="pytorch_lora_weights.safetensors")
    ours = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().sum() > 0 for p in loaded.values())  # trained, non-zero B matrices
    n_loaded = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    assert n_loaded == sum(v.numel() for v in ours.values())


def test_resume_after_interruption_is_bit_identical(world, full_run, two_runs):
    out, r = two_runs[1]
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-000002").is_dir()
    # a budgeted stop still exports its LoRA, marked incomplete
    assert (out / "lora").is_dir() and json.loads((out / "summary.json").read_text())["complete"] is False
    r = spobench("train", "spo", "--backbone", "tiny", "--model", str(world[1]), "--out", str(out), "--resume",
                 "--set", "max_rounds=none")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout
    a = load_file(str(full_run / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((full_run / "summary.json").read_text())
    sb = json.loads((out / "summary.json").read_text())
    assert sa["progress"]["step"] == sb["progress"]["step"]
    rounds = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds if r["kind"] == "round"] == [0, 1, 2, 3]  # no duplicated log lines
    for k in ("unet_rows_grad", "unet_rows_nograd", "reward_image_passes"):
        assert sa["counters"][k] == sb["counters"][k]  # counters add up over the two sessions


def test_existing_out_is_refused_without_resume_or_overwrite(world, full_run):
    r = _train(world, full_run)
    assert r.returncode == 2 and "not empty; pass --resume" in r.stderr and "Traceback" not in r.stderr


def test_resume_from_another_base_model_is_refused(world, full_run, tmp_path):
    from spobench.models.backbones.testing import make_tiny_folder

    other = make_tiny_folder(tmp_path / "other", seed=1)
    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    r = spobench("train", "spo", "--backbone", "tiny", "--model", str(other), "--out", str(out), "--resume")
    assert r.returncode == 2 and "checkpoint was trained on base model" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("setting, message", [
    ("k=1", "setting 'k' must be >= 2 (got 1)"),
    ("kapa=3", "unknown setting 'kapa' (did you mean 'kappa'?)"),
])
def test_bad_config_is_a_one_line_error(tmp_path, setting, message):
    r = spobench("train", "spo", "--out", str(tmp_path / "x"), "--set", setting)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "torchvision" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "x").exists()


def test_mspo_runs(world, tmp_path):
    r = _train(world, tmp_path / "mspo", "--set", "inner_steps=2", "--set", "max_rounds=1", trainer="mspo")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "mspo" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "round" and rows[-1]["pools"] == 2


def test_two_process_cpu_run(world, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine: 2 gloo processes.

    (``accelerate launch --cpu`` always takes accelerate's single-process launcher.) The trainer
    checks at each checkpoint that both processes hold the same LoRA."""
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    root, model, prompts = world
    args = ["train", "spo", "--backbone", "tiny", "--model", str(model), "--out", str(out), *_settings(prompts)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    cmd = [*launcher, EXE, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["complete"]
    assert summary["progress"]["rounds_done"] == 2  # 4 prompts / (1 per process x 2 processes)
    assert sorted(p.name for p in (out / "checkpoints" / "checkpoint-000002").glob("rng_rank*.pt")) == \
        ["rng_rank0.pt", "rng_rank1.pt"]
    assert summary["counters"]["reward_image_passes"] == 4 * 4 * 2  # same work as one process
