"""``compile=true`` on the CPU is refused where its LoRA gradients were found wrong or were never checked: a
compiled backward that silently disagrees with eager would train another model than the one asked for."""

import shutil

import pytest

from clitools import run
from contract import assert_clean_failure
from spobench.core.errors import InputError
from spobench.trainers.base import check_compile_gradients

SETS = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
        "resolution=16", "scorer=metric:toy_aesthetic", "prompts=tiny-train", "prompt_limit=1", "compile=true"]


def test_only_checked_backbones_compile_on_the_cpu():
    check_compile_gradients("tiny", "cpu")  # checked: test_spo.py::test_compiled_unet_gives_the_same_round
    check_compile_gradients("sd15", "cuda:0")  # not refused off the CPU (the GPU check measures it)
    for name in ("sd15", "sdxl", "tiny-flow"):
        with pytest.raises(InputError, match=f"setting 'compile'.*{name} UNet gave LoRA gradients 12% away"):
            check_compile_gradients(name, "cpu")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="without a C++ compiler the toolchain check refuses first")
def test_train_spo_sd15_compile_is_one_line_and_leaves_nothing(tmp_path):
    from spobench.models.backbones.testing import make_sd15_folder

    model, out = make_sd15_folder(tmp_path / "sd15"), tmp_path / "run"
    r = run("train", "spo", "--backbone", "sd15", "--model", model, "--out", out,
            *[a for s in SETS for a in ("--set", s)])
    assert_clean_failure(r.returncode, r.stderr, ["setting 'compile'", "sd15", "compile=false"], None, None)
    assert not out.exists()
