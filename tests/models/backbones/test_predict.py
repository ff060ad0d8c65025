"""Prompt encoding (checked against the diffusers pipelines), one-call CFG, schedules, VAE."""

import pytest
import torch

from spobench.models.backbones.sd import SD15Backbone, SDXLBackbone
from spobench.models.backbones.tiny import TinyBackbone

PROMPTS = ["a red circle above two blue squares", "zebra 123 \u00fc"]


@pytest.fixture(scope="module")
def tiny():
    return TinyBackbone.build(0)


@pytest.fixture(scope="module")
def sd15(sd15_dir):
    return SD15Backbone.load(sd15_dir)


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return SDXLBackbone.load(sdxl_dir)


@pytest.mark.parametrize("which", ["tiny", "sd15", "sdxl"])
def test_cfg_is_one_unet_call(which, request):
    bb = request.getfixturevalue(which)
    res = 32 if which == "tiny" else 16
    B = 2
    x = torch.randn(B, *bb.latent_shape(res))
    t = torch.tensor([951, 501])
    cond = bb.encode_prompts(PROMPTS, res)
    uncond = bb.encode_unconditional(B, res)
    bb.counters.reset()
    with torch.no_grad():
        out = bb.predict(x, t, cond, guidance_scale=5.0, uncond=uncond)
    assert bb.counters.unet_calls == 1 and bb.counters.unet_rows_nograd == 2 * B
    with torch.no_grad():
        c = bb.predict(x, t, cond)
        u = bb.predict(x, t, uncond)
    assert torch.allclose(out, u + 5.0 * (c - u), atol=1e-5)
    assert out.shape == x.shape


def test_timesteps(tiny):
    assert tiny.timesteps(20).tolist() == [951 - 50 * i for i in range(20)]


def test_sd15_encoding_matches_pipeline(sd15):
    pipe = sd15.pipeline()
    ref, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(sd15.encode_prompts(PROMPTS).hidden, ref)
    assert torch.equal(sd15.encode_unconditional(2).hidden, neg)


def test_sdxl_conditioning(sdxl):
    cond = sdxl.encode_prompts(PROMPTS, 1024)
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    un = sdxl.encode_unconditional(3, 512)
    assert un.hidden.shape == (3, 77, 64) and un.pooled.shape == (3, 32)
    assert not un.hidden.any() and not un.pooled.any()
    assert un.time_ids.tolist() == [[512, 512, 0, 0, 512, 512]] * 3
    # Same numbers as the diffusers pipeline (penultimate layers concatenated, te2's pooled projection).
    ref, neg, pooled, neg_pooled = sdxl.pipeline().encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond.hidden, ref) and torch.equal(cond.pooled, pooled)
    assert torch.equal(un.hidden[:2], neg) and torch.equal(un.pooled[:2], neg_pooled)


def test_tiny_conditioning_and_pixel_space(tiny):
    cond = tiny.encode_prompts(PROMPTS)
    assert cond.hidden.shape == (2, 32, 64) and cond.pooled is None
    assert tiny.latent_shape() == (3, 32, 32) and tiny.vae_scale_factor == 1
    img = torch.rand(2, 3, 32, 32)
    assert torch.allclose(tiny.decode(tiny.encode_images(img)), img, atol=1e-6)


def test_vae_round_trip_shapes(sd15):
    img = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        z = sd15.encode_images(img, generator=torch.Generator().manual_seed(0))
        assert z.shape == (2, *sd15.latent_shape(16)) == (2, 4, 8, 8)
        out = sd15.decode(z)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
