"""Released checkpoints in their published layouts: UNet-only folders (top level or unet/), a VAE
override, full folders and LoRA files in every key layout, from folders or an offline hub cache."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from spobench.models.backbones import load_backbone
from spobench.models.backbones.lora_files import LORA_WEIGHT_NAME
from spobench.models.backbones.testing import (
    LORA_KEY_STYLES,
    fake_hub_cache,
    make_lora_file,
    make_unet_folder,
    make_vae_folder,
)
from spobench.core.errors import ModelLoadError


def _out(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *bb.latent_shape(16), generator=g)
    with torch.no_grad():
        return bb.predict(x, 500, bb.encode_prompts(["a red cat"], 16), guidance_scale=1.0)


def _unet_file(folder, layout):
    return (folder / "unet" if layout == "unet" else folder) / "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout", ["unet", "top"])
def test_unet_only_folder_replaces_the_base_unet(backbone, layout, request, tmp_path, offline):
    base = request.getfixturevalue(f"{backbone}_dir")
    released = make_unet_folder(tmp_path / "dpo", base, layout=layout)
    bb = load_backbone(backbone, str(base), unet=str(released))
    want = load_file(str(_unet_file(released, layout)))
    got = bb.unet.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    plain = load_backbone(backbone, str(base))
    assert not torch.allclose(_out(bb), _out(plain))  # another UNet, same text encoders
    te, te0 = bb.text_encoder.state_dict(), plain.text_encoder.state_dict()
    assert all(torch.equal(te[k], te0[k]) for k in te0)
    assert bb.identity()["overrides"] == {"unet": str(released.resolve())}


def test_base_without_unet_is_fine_when_the_unet_is_overridden(sd15_dir, tmp_path, offline):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(sd15_dir, base)
    shutil.rmtree(base / "unet")
    with pytest.raises(ModelLoadError, match="unet/"):
        load_backbone("sd15", str(base))
    bb = load_backbone("sd15", str(base), unet=str(make_unet_folder(tmp_path / "u", sd15_dir)))
    assert bb.unet.config.cross_attention_dim == 32


def test_vae_override_like_sdxl_vae_fp16_fix(sdxl_dir, tmp_path, offline):
    vae = make_vae_folder(tmp_path / "vae-fix", sdxl_dir)
    assert (vae / "config.json").exists() and (vae / "diffusion_pytorch_model.safetensors").exists()
    bb = load_backbone("sdxl", str(sdxl_dir), vae=str(vae))
    want = load_file(str(vae / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(want[k], v) for k, v in bb.vae.state_dict().items())
    assert bb.vae.config.force_upcast is False  # the fixed VAE is not upcast in fp16
    plain = load_backbone("sdxl", str(sdxl_dir))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(bb.decode(z), plain.decode(z))


def test_hub_ids_resolve_from_the_offline_cache(sdxl_dir, tmp_path, monkeypatch, offline):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache, "stabilityai/stable-diffusion-xl-base-1.0", sdxl_dir)
    fake_hub_cache(cache, "mapo-t2i/mapo-beta", make_unet_folder(tmp_path / "mapo", sdxl_dir, layout="top"))
    fake_hub_cache(cache, "madebyollin/sdxl-vae-fp16-fix", make_vae_folder(tmp_path / "vae", sdxl_dir))
    bb = load_backbone("sdxl", None, unet="mapo-t2i/mapo-beta", vae="madebyollin/sdxl-vae-fp16-fix")
    assert bb.identity()["overrides"] == {"unet": "mapo-t2i/mapo-beta@" + "0" * 40,
                                          "vae": "madebyollin/sdxl-vae-fp16-fix@" + "0" * 40}
    with pytest.raises(ModelLoadError) as err:
        load_backbone("sdxl", None, unet="mhdang/dpo-sdxl-text2image-v1")
    msg = str(err.value)
    assert "\n" not in msg and "mhdang/dpo-sdxl-text2image-v1" in msg and "HF_HUB_OFFLINE" in msg


def test_wrong_components_are_refused_by_name(sd15_dir, sdxl_dir, tmp_path, offline):
    vae = make_vae_folder(tmp_path / "vae", sdxl_dir)
    with pytest.raises(ModelLoadError, match="is a AutoencoderKL, not a UNet2DConditionModel"):
        load_backbone("sdxl", str(sdxl_dir), unet=str(vae))
    with pytest.raises(ModelLoadError, match="not an SDXL base UNet|cross_attention_dim"):
        load_backbone("sdxl", str(sdxl_dir), unet=str(make_unet_folder(tmp_path / "u15", sd15_dir)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no config.json"):
        load_backbone("sd15", str(sd15_dir), unet=str(tmp_path / "empty"))


def _poison(file, key_filter, value=float("nan"), drop=False):
    sd = load_file(str(file))
    k = next(k for k in sorted(sd) if key_filter(k))
    if drop:
        del sd[k]
    else:
        sd[k] = sd[k].clone()
        sd[k].view(-1)[0] = value
    save_file(sd, str(file), metadata={"format": "pt"})
    return k


def test_nan_or_missing_unet_weights_are_refused(sd15_dir, tmp_path, offline):
    released = make_unet_folder(tmp_path / "nan", sd15_dir, layout="unet")
    key = _poison(_unet_file(released, "unet"), lambda k: k.endswith("conv_in.weight"))
    with pytest.raises(ModelLoadError) as err:
        load_backbone("sd15", str(sd15_dir), unet=str(released))
    assert "NaN" in str(err.value) and str(_unet_file(released, "unet")) in str(err.value) and key in str(err.value)
    released = make_unet_folder(tmp_path / "missing", sd15_dir, layout="top")
    _poison(_unet_file(released, "top"), lambda k: k.startswith("up_blocks"), drop=True)
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        load_backbone("sd15", str(sd15_dir), unet=str(released))


@pytest.mark.parametrize("backbone", ["sd15", "sdxl"])
def test_every_lora_key_layout_gives_the_same_model(backbone, request, tmp_path, offline):
    base = request.getfixturevalue(f"{backbone}_dir")
    plain = load_backbone(backbone, str(base))
    ref = None
    for style in LORA_KEY_STYLES:
        f = make_lora_file(tmp_path / style, plain, style=style, seed=3)
        bb = load_backbone(backbone, str(base))
        bb.load_lora(f.parent)
        out = _out(bb)
        if ref is None:
            ref = out
            assert not torch.allclose(out, _out(plain), atol=1e-6)  # the LoRA does something
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=style)
    # ... and what diffusers' own loader makes of the published (diffusers-key) layout
    pipe_bb = load_backbone(backbone, str(base))
    pipe = pipe_bb.pipeline()
    pipe.load_lora_weights(str(tmp_path / "diffusers"), weight_name=LORA_WEIGHT_NAME)
    torch.testing.assert_close(_out(pipe_bb), ref, rtol=0, atol=1e-5)


def test_kohya_alpha_scales_the_update(sd15_dir, tmp_path, offline):
    plain = load_backbone("sd15", str(sd15_dir))
    f = make_lora_file(tmp_path / "k", plain, style="kohya", rank=4)
    sd = load_file(str(f))
    full = load_backbone("sd15", str(sd15_dir))
    full.load_lora(f)
    for k in sd:
        if k.endswith(".alpha"):
            sd[k] = torch.tensor(2.0)  # alpha / rank = 1/2
    save_file(sd, str(f), metadata={"format": "pt"})
    half = load_backbone("sd15", str(sd15_dir))
    half.load_lora(f)
    lin = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    x = torch.randn(3, 16)
    m_full, m_half, m_base = (dict(b.unet.named_modules())[lin] for b in (full, half, plain))
    with torch.no_grad():
        d_full, d_half = m_full(x) - m_base(x), m_half(x) - m_base(x)
    torch.testing.assert_close(d_half, d_full / 2, rtol=1e-5, atol=1e-6)


def test_bad_lora_files_are_refused(sd15_dir, sdxl_dir, tmp_path, offline):
    bb = load_backbone("sd15", str(sd15_dir))
    f = make_lora_file(tmp_path / "nan", bb, style="diffusers")
    key = _poison(f, lambda k: "lora.up" in k)
    with pytest.raises(ModelLoadError, match="NaN") as err:
        bb.load_lora(f)
    assert key in str(err.value) and not bb.has_lora
    xl = load_backbone("sdxl", str(sdxl_dir))
    f = make_lora_file(tmp_path / "xl", xl, style="attn-procs")
    with pytest.raises(ModelLoadError, match="sd15"):
        bb.load_lora(f)
    assert not bb.has_lora
    f = make_lora_file(tmp_path / "te", bb, style="diffusers")
    sd = load_file(str(f)) | {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora.down.weight":
                              torch.zeros(4, 32)}
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match="text-encoder LoRA"):
        bb.load_lora(f)
    f = make_lora_file(tmp_path / "drop", bb, style="diffusers", metadata=True)
    _poison(f, lambda k: "lora.up" in k, drop=True)
    with pytest.raises(ModelLoadError, match="missing 1 key"):
        bb.load_lora(f)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_lora_weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        bb.load_lora(tmp_path / "pickle")
    assert json  # (imported for fixtures that write metadata)
