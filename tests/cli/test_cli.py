"""Every command run the way a user runs it: the installed `spobench` executable in a subprocess."""

import subprocess
import sys

import pytest

from clitools import run


def test_ls_lists_every_kind_without_importing_torch():
    code = ("import sys; from spobench.cli import main; sys.argv=['spobench','ls']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'spobench ls imported torch'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for word in ("trainers", "metrics", "backbones", "recipes", "prompt-sets", "spo", "tiny", "table8"):
        assert word in r.stdout


@pytest.mark.parametrize("kind", ["trainers", "metrics", "backbones", "recipes", "prompt-sets"])
def test_ls_kind(kind):
    r = run("ls", kind)
    assert r.returncode == 0 and kind in r.stdout


def test_ls_unknown_kind_fails():
    r = run("ls", "widgets")
    assert r.returncode != 0


@pytest.mark.parametrize("cmd", ["ls", "generate", "train", "eval", "reproduce"])
def test_every_command_has_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "Usage" in r.stdout and len(r.stdout) > 200


def test_unknown_trainer_suggests_and_exits_2_without_traceback():
    r = run("train", "spp")
    assert r.returncode == 2
    assert "unknown trainer 'spp'; did you mean 'spo'?" in r.stderr
    assert "Traceback" not in r.stderr


def test_reproduce_without_weights_names_them_and_writes_nothing(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "SPOBENCH_WEIGHTS": str(tmp_path / "weights")}
    r = run("reproduce", "table8", "--backbone", "sd15", "--out", str(tmp_path / "run"), env=env)
    assert r.returncode == 2 and "stable-diffusion-v1-5" in r.stderr and "hf download" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_debug_shows_traceback(tmp_path):
    env = {"HF_HUB_OFFLINE": "1"}
    r = run("--debug", "reproduce", "table8", "--backbone", "sd15", "--out", str(tmp_path / "run"), env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_eval_unknown_metric(tmp_path):
    r = run("eval", "--metrics", "pickscor", "--images", str(tmp_path))
    assert r.returncode == 2 and "did you mean 'pickscore'" in r.stderr


def test_generate_bad_prompt_file(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"\x00\x01binary")
    r = run("generate", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "p.txt" in r.stderr and "binary" in r.stderr
    assert not (tmp_path / "o").exists()


def test_generate_unknown_backbone(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n")
    r = run("generate", "--backbone", "sd2", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown backbone 'sd2'" in r.stderr


@pytest.mark.parametrize("trainer, own", [("spo", ["kappa", "beta", "threshold"]), ("mspo", ["inner_steps"]),
                                          ("ddpo", ["reward"]), ("diffusion-dpo", ["pairs"])])
def test_train_settings_lists_every_setting_and_trains_nothing(trainer, own, tmp_path):
    r = run("train", trainer, "--settings", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert {"seed", "epochs", "lr", "compile", "dtype", *own} <= names
    assert "compile (bool, default False)" in r.stdout
    assert not (tmp_path / "o").exists()
