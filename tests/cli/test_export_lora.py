"""`spobench export-lora` through the installed CLI: a real tiny SD-1.5 SPO run exported in both formats
loads back through diffusers' pipeline with the run's UNet outputs; bad RUNs, an existing --out and runs of
whole models are refused with one line (tests/contract.py), and --help says what each format is for. A
corrupt LoRA file: tests/models/backbones/test_lora_export.py (read_lora's refusals)."""

import pytest
import torch

from clitools import run, run_together
from contract import assert_clean_failure, snapshot

TRAIN = ["k=2", "num_steps=4", "kappa=800", "threshold=0.0", "rollout_batch=1", "train_batch_size=2",
         "prompts=tiny-train", "prompt_limit=2", "epochs=1", "checkpoint_every=1", "max_rounds=1",
         "resolution=16", "lr=0.01", "scorer=metric:toy_aesthetic"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folders spobench's own writers make: an SD-1.5 LoRA folder (``save_lora``), a checkpoint of a tiny
    LoRA run and a run of whole-model weights (``save_checkpoint`` with ``LoraWeights`` / ``ModuleWeights``)."""
    from spobench.core.checkpoint import LoraWeights, ModuleWeights, save_checkpoint
    from spobench.models.backbones import load_backbone
    from spobench.models.backbones.testing import make_sd15_folder, make_tiny_folder

    root = tmp_path_factory.mktemp("export")
    bb = load_backbone("sd15", str(make_sd15_folder(root / "sd15")))
    bb.add_lora(4)
    bb.save_lora(root / "sd15-lora")
    tiny = load_backbone("tiny", str(make_tiny_folder(root / "tiny")))
    params = tiny.add_lora(4)
    progress = {"epoch": 0, "round": 1, "rounds_done": 1, "step": 1}
    save_checkpoint(root / "tiny-run", 1, weights=LoraWeights(tiny), optimizer=torch.optim.SGD(params, lr=0.1),
                    scheduler=None, progress=progress, config={}, trainer="spo")
    net = torch.nn.Linear(2, 2)
    save_checkpoint(root / "pretrain", 1, weights=ModuleWeights({"unet": net}, {"model": "tiny-world"}),
                    optimizer=torch.optim.SGD(net.parameters(), lr=0.1), scheduler=None, progress=progress,
                    config={}, trainer="tiny-pretrain")
    return root


def test_help_says_what_each_format_is_for():
    r = run("export-lora", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for words in ("--format diffusers", "pipe.load_lora_weights", "--format kohya", "ComfyUI", "AUTOMATIC1111",
                  "lora_unet_", "ss_*", "generate --lora"):
        assert words in text, words


def test_a_missing_or_foreign_run_is_one_line(tmp_path):
    r = run("export-lora", tmp_path / "nope", "--format", "kohya", cwd=tmp_path)
    assert_clean_failure(r.returncode, r.stderr, [tmp_path / "nope", "no such run folder"], None, None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run")
    before = snapshot(tmp_path)
    r = run("export-lora", tmp_path / "notes", "--format", "diffusers", cwd=tmp_path)
    assert_clean_failure(r.returncode, r.stderr, [tmp_path / "notes", "not a spobench run"], tmp_path, before)


def test_an_existing_out_is_refused_and_kept(runs, tmp_path):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"a user's file")
    r = run("export-lora", runs / "sd15-lora", "--format", "kohya", "--out", out)
    assert_clean_failure(r.returncode, r.stderr, [out, "already exists", "--overwrite"], out, snapshot(out))
    r = run("export-lora", runs / "sd15-lora", "--format", "kohya", "--out", tmp_path / "lora.pt")
    assert_clean_failure(r.returncode, r.stderr, ["lora.pt", ".safetensors"], None, None)


def test_a_whole_model_run_is_not_a_lora(runs, tmp_path):
    for where in (runs / "pretrain", runs / "pretrain" / "checkpoints" / "checkpoint-000001"):
        r = run("export-lora", where, "--format", "diffusers", cwd=tmp_path)
        assert_clean_failure(r.returncode, r.stderr, [where, "whole-model weights", "unet"], tmp_path, {})


def test_kohya_is_for_sd15_and_sdxl_runs(runs, tmp_path):
    ckpt = runs / "tiny-run" / "checkpoints" / "checkpoint-000001"
    r = run("export-lora", ckpt, "--format", "kohya", cwd=tmp_path)
    assert_clean_failure(r.returncode, r.stderr, [ckpt, "tiny", "--format diffusers"], tmp_path, {})


@pytest.mark.slow
def test_a_trained_run_round_trips_in_both_formats(runs, tmp_path):
    """`spobench train spo` on the SD-1.5-shaped folder, then both exports, loaded by diffusers' pipeline."""
    from safetensors import safe_open

    from spobench.models.backbones import load_backbone

    model, out = runs / "sd15", tmp_path / "spo-run"
    r = run("train", "spo", "--backbone", "sd15", "--model", model, "--out", out,
            *[a for s in TRAIN for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    files = {fmt: tmp_path / f"spo-{fmt}.safetensors" for fmt in ("diffusers", "kohya")}
    for file, r in zip(files.values(), run_together(*[("export-lora", out, "--format", fmt, "--out", file)
                                                      for fmt, file in files.items()])):
        assert r.returncode == 0, r.stderr[-3000:]
        assert str(file) in r.stdout
    with safe_open(str(files["kohya"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_name"] == str(model.resolve())
    assert meta["spobench_trainer"] == "spo" and meta["ss_network_dim"] == "4"

    def unet_out(bb):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, *bb.latent_shape(16), generator=g)
        with torch.no_grad():
            return bb.predict(x, 500, bb.encode_prompts(["a red cat", "a blue car"], 16), guidance_scale=1.0)

    trained = load_backbone("sd15", str(model))
    trained.load_lora(out / "lora")
    want = unet_out(trained)
    assert not torch.allclose(want, unet_out(load_backbone("sd15", str(model))), atol=1e-6)  # trained: not zero
    for fmt, file in files.items():
        bb = load_backbone("sd15", str(model))
        bb.pipeline().load_lora_weights(str(file))
        torch.testing.assert_close(unet_out(bb), want, rtol=0, atol=1e-5, msg=fmt)
    # a checkpoint folder, to the default --out (here): <run>-<checkpoint>-<format>.safetensors
    r = run("export-lora", out / "checkpoints" / "checkpoint-000001", "--format", "kohya", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    bb = load_backbone("sd15", str(model))
    bb.pipeline().load_lora_weights(str(tmp_path / "spo-run-checkpoint-000001-kohya.safetensors"))
    torch.testing.assert_close(unet_out(bb), want, rtol=0, atol=1e-5)  # one round: the checkpoint is the final
