"""LoRA: the reference model is the adapter switched off, files interoperate with diffusers."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from spobench.models.backbones.lora_files import LORA_WEIGHT_NAME
from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone
from spobench.models.backbones.tiny import TinyBackbone
from spobench.core.errors import ModelLoadError


def _inputs(bb, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *bb.latent_shape(res), generator=g)
    return x, torch.tensor([901, 51]), bb.encode_prompts(["a red circle", "two blue squares"], res)


def _perturb(bb, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bb.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def _out(bb, x, t, cond):
    return bb.unet_forward(x, t, cond)


def test_lora_disabled_is_exactly_the_base_model():
    bb = TinyBackbone.build(0)
    x, t, cond = _inputs(bb, 32)
    before = _out(bb, x, t, cond)
    params = bb.add_lora(rank=4)
    assert params and all(p.requires_grad for p in params)
    assert {id(p) for p in bb.trainable_parameters()} == {id(p) for p in params}
    assert torch.equal(_out(bb, x, t, cond), before)  # lora_B starts at zero
    _perturb(bb)
    with bb.lora_disabled():
        assert torch.equal(_out(bb, x, t, cond), before)
    assert not torch.allclose(_out(bb, x, t, cond), before)



def test_lora_switch_matches_diffusers_and_restores_training_state():
    """The cached per-layer switch must do what diffusers' module-walking one does: same outputs
    off and on, LoRA parameters trainable again afterwards, also when the adapter is re-added."""
    bb = TinyBackbone.build(0)
    x, t, cond = _inputs(bb, 32)
    bb.add_lora(rank=4)
    _perturb(bb)
    with bb.lora_disabled():
        ours_off = _out(bb, x, t, cond)
    bb.unet.disable_adapters()
    theirs_off = _out(bb, x, t, cond)
    bb.unet.enable_adapters()
    assert torch.equal(ours_off, theirs_off)
    on = _out(bb, x, t, cond)
    assert not torch.equal(on, ours_off)
    assert all(p.requires_grad for n, p in bb.unet.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in bb.unet.named_parameters() if "lora_" not in n)
    with pytest.raises(RuntimeError), bb.lora_disabled():
        raise RuntimeError("boom")  # an error inside must still switch the adapter back on
    assert torch.equal(_out(bb, x, t, cond), on)
    bb.unet.delete_adapters("default")  # a new adapter: the switch must find its layers, not the old ones
    bb.add_lora(rank=2, seed=3)
    _perturb(bb, seed=4)
    with bb.lora_disabled():
        off2 = _out(bb, x, t, cond)
    assert torch.equal(off2, theirs_off)  # the base model is unchanged by any adapter
    assert not torch.equal(_out(bb, x, t, cond), off2)


def test_dtype_is_the_frozen_parts_dtype():
    bb = TinyBackbone.build(0)
    bb.add_lora(rank=4)
    assert bb.dtype == bb.unet.dtype == torch.float32
    bb.to(dtype=torch.bfloat16)
    assert bb.dtype == torch.bfloat16  # LoRA parameters stay float32 (see Backbone.to)
    assert all(p.dtype == torch.float32 for n, p in bb.unet.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("which", ["tiny", "sdxl"])
def test_saved_lora_loads_in_diffusers(which, tiny_dir, sdxl_dir, tmp_path):
    folder, cls, pipe_cls, res = {
        "tiny": (tiny_dir, TinyBackbone, StableDiffusionPipeline, 32),
        "sdxl": (sdxl_dir, SDXLBackbone, StableDiffusionXLPipeline, 16),
    }[which]
    bb = cls.load(folder)
    bb.add_lora(rank=4, alpha=8)  # alpha != rank: the adapter metadata must carry the scaling
    _perturb(bb)
    x, t, cond = _inputs(bb, res)
    ours = _out(bb, x, t, cond)
    path = bb.save_lora(tmp_path / "lora")
    assert path == tmp_path / "lora" / LORA_WEIGHT_NAME and path.exists()

    pipe = pipe_cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    with torch.no_grad():
        theirs = pipe.unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)

    fresh = cls.load(folder)
    fresh.load_lora(tmp_path / "lora")
    assert fresh.lora_rank == 4
    assert torch.allclose(_out(fresh, x, t, cond), ours, atol=1e-6)
    with fresh.lora_disabled(), bb.lora_disabled():
        assert torch.equal(_out(fresh, x, t, cond), _out(bb, x, t, cond))


def test_tiny_lora_refused_by_sd15(sd15_dir, tmp_path):
    tiny = TinyBackbone.build(0)
    tiny.add_lora(rank=4)
    tiny.save_lora(tmp_path / "lora")
    sd = SD15Backbone.load(sd15_dir)
    x, t, cond = _inputs(sd, 16)
    before = _out(sd, x, t, cond)
    with pytest.raises(ModelLoadError) as err:
        sd.load_lora(tmp_path / "lora")
    assert "sd15" in str(err.value) and "\n" not in str(err.value)
    assert not sd.has_lora and not getattr(sd.unet, "peft_config", {})
    assert torch.equal(_out(sd, x, t, cond), before)  # nothing left behind
    sd.add_lora(rank=2)  # and a fresh adapter can still be attached
    assert sd.has_lora and sd.trainable_parameters()


def test_rank_mismatch_refused(tmp_path):
    a = TinyBackbone.build(0)
    a.add_lora(rank=4)
    a.save_lora(tmp_path / "lora")
    b = TinyBackbone.build(0)
    b.add_lora(rank=8)
    with pytest.raises(ModelLoadError):
        b.load_lora(tmp_path / "lora")


def test_missing_or_corrupt_lora_file(tmp_path):
    bb = TinyBackbone.build(0)
    with pytest.raises(ModelLoadError):
        bb.load_lora(tmp_path)
    (tmp_path / LORA_WEIGHT_NAME).write_bytes(b"garbage")
    with pytest.raises(ModelLoadError):
        bb.load_lora(tmp_path)
    assert not bb.has_lora
