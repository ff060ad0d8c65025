"""Loaders: offline, from folders shaped like the real ones; every failure is one ModelLoadError line."""

import json
import shutil

import pytest
import torch

from spobench.models.backbones import load_backbone
from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone
from spobench.models.backbones.tiny import TinyBackbone
from spobench.core.errors import ModelLoadError


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("name,fixture,cls", [("sd15", "sd15_dir", SD15Backbone), ("sdxl", "sdxl_dir", SDXLBackbone),
                                              ("tiny", "tiny_dir", TinyBackbone)])
def test_load_offline(name, fixture, cls, request, offline):
    folder = request.getfixturevalue(fixture)
    bb = load_backbone(name, str(folder))
    assert type(bb) is cls and bb.name == name
    ident = bb.identity()
    assert ident["backbone"] == name and ident["source"] == str(folder) and ident["model_id"]
    # DDIM whatever the folder ships (SD: PNDM, SDXL: Euler), SD's "leading" spacing + offset.
    assert type(bb.scheduler).__name__ == "DDIMScheduler"
    assert bb.scheduler.config.clip_sample is False
    assert bb.timesteps(20).tolist() == list(range(951, 0, -50))
    assert bb.prediction_type == ("v_prediction" if name == "tiny" else "epsilon")
    assert bb.pixel_space == (name == "tiny")
    assert not any(p.requires_grad for m in bb.modules().values() for p in m.parameters())


def test_missing_folder(tmp_path, offline):
    with pytest.raises(ModelLoadError) as err:
        load_backbone("sd15", str(tmp_path / "nope"))
    msg = _one_line(err)
    assert str(tmp_path / "nope") in msg and "does not exist" in msg


def test_unknown_hub_id_offline(offline):
    with pytest.raises(ModelLoadError) as err:
        SD15Backbone.load("nobody-here/not-a-model-xyz")
    msg = _one_line(err)
    assert "nobody-here/not-a-model-xyz" in msg and "HF_HUB_OFFLINE" in msg and "hf download" in msg


def test_default_hub_id_offline_not_cached(offline, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        SDXLBackbone.load()
    assert "stabilityai/stable-diffusion-xl-base-1.0" in _one_line(err)


def test_hub_id_from_cache_offline(sd15_dir, offline, monkeypatch, tmp_path):
    """A hub id resolves to the cached snapshot, with no network, and records its revision."""
    from huggingface_hub import constants

    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    shutil.copytree(sd15_dir, repo / "snapshots" / rev)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    bb = SD15Backbone.load("someone/tiny-sd")
    assert bb.identity()["model_id"] == "someone/tiny-sd" and bb.identity()["revision"] == rev


@pytest.mark.parametrize("name,fixture,component", [
    ("sd15", "sd15_dir", "unet"), ("sd15", "sd15_dir", "tokenizer"),
    ("sdxl", "sdxl_dir", "text_encoder_2"), ("tiny", "tiny_dir", "vae")])
def test_missing_component(name, fixture, component, request, tmp_path, offline):
    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(fixture), folder)
    shutil.rmtree(folder / component)
    with pytest.raises(ModelLoadError) as err:
        load_backbone(name, str(folder))
    msg = _one_line(err)
    assert str(folder) in msg and f"{component}/" in msg


def test_pickle_only_weights_refused(sd15_dir, tmp_path, offline):
    folder = tmp_path / "model"
    shutil.copytree(sd15_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").rename(folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        SD15Backbone.load(folder)
    assert "safetensors only" in _one_line(err)


def test_corrupt_weights(sd15_dir, tmp_path, offline):
    folder = tmp_path / "model"
    shutil.copytree(sd15_dir, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError) as err:
        SD15Backbone.load(folder)
    assert "vae/" in _one_line(err)


@pytest.mark.parametrize("name,fixture,owner", [
    ("tiny", "sd15_dir", "sd15"), ("tiny", "sdxl_dir", "sdxl"), ("sd15", "tiny_dir", "tiny"), ("sdxl", "tiny_dir", "tiny"),
    ("sd15", "sdxl_dir", "sdxl"), ("sdxl", "sd15_dir", "sd15")])
def test_wrong_backbone(name, fixture, owner, request, offline):
    folder = request.getfixturevalue(fixture)
    with pytest.raises(ModelLoadError) as err:
        load_backbone(name, str(folder))
    msg = _one_line(err)
    assert str(folder) in msg and f"'{owner}' backbone" in msg and f"--backbone {owner}" in msg


def test_tiny_needs_its_marker(sd15_dir, tmp_path, offline):
    folder = tmp_path / "model"
    shutil.copytree(sd15_dir, folder)
    (folder / "model_index.json").unlink()  # no hint at all which backbone this is
    with pytest.raises(ModelLoadError) as err:
        TinyBackbone.load(folder)
    assert "not a tiny model folder" in _one_line(err)


def test_tiny_default_without_shipped_weights_builds(monkeypatch, tmp_path, caplog):
    from spobench.models.backbones import tiny

    monkeypatch.setattr(tiny, "PRETRAINED_DIR", tmp_path / "absent")
    with caplog.at_level("WARNING"):
        bb = TinyBackbone.load()
    assert "random" in caplog.text
    ref = TinyBackbone.build(0)
    assert all(torch.equal(a, b) for a, b in zip(bb.unet.state_dict().values(), ref.unet.state_dict().values()))


def test_tiny_default_uses_shipped_folder(monkeypatch, tiny_dir):
    from spobench.models.backbones import tiny

    monkeypatch.setattr(tiny, "PRETRAINED_DIR", tiny_dir)
    assert TinyBackbone.load().source == str(tiny_dir)


def test_marker(tiny_dir):
    assert json.loads((tiny_dir / "spobench_backbone.json").read_text()) == {"backbone": "tiny", "pixel_space": True}


def test_save_refused_with_lora(tmp_path):
    from spobench.core.errors import SpobenchError

    bb = TinyBackbone.build(0)
    bb.add_lora()
    with pytest.raises(SpobenchError):
        bb.save_pretrained(tmp_path / "x")


def test_to_dtype_moves_text_encoder(sdxl_dir):
    bb = SDXLBackbone.load(sdxl_dir, dtype=torch.float16)
    assert bb.unet.dtype == bb.text_encoder.dtype == bb.text_encoder_2.dtype == torch.float16
    assert bb.vae.dtype == torch.float32  # force_upcast: SDXL's VAE overflows in fp16
    bb.to(dtype=torch.bfloat16)
    assert bb.text_encoder_2.dtype == torch.bfloat16
