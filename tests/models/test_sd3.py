"""The flow backbone against diffusers' StableDiffusion3Pipeline on a tiny folder of the real SD3 classes:
prompt encoding, the sigma grid, one guided velocity and a whole Euler ODE sample agree exactly."""

import pytest
import torch

from spobench.models.backbones import load_backbone
from spobench.models.backbones.base import Conditioning
from spobench.models.backbones.sd3 import FlowBackbone
from spobench.models.backbones.tiny_flow import TinyFlowBackbone


@pytest.fixture(scope="module", params=[False, True], ids=["clip-only", "with-t5"])
def sd3(request, tmp_path_factory):
    from spobench.models.backbones.testing import make_sd3_folder

    folder = make_sd3_folder(tmp_path_factory.mktemp("sd3") / "m", t5=request.param)
    return load_backbone("sd3", str(folder))


def test_family_and_facts(sd3):
    assert type(sd3) is FlowBackbone and sd3.family == "flow" and sd3.name == "sd3"
    assert sd3.prediction_type == "flow" and sd3.shift == 3.0
    assert sd3.latent_shape(16) == (16, 8, 8)
    ident = sd3.identity()
    assert ident["family"] == "flow" and ident["t5"] == (sd3.text_encoder_3 is not None)
    from spobench.core.errors import InputError

    with pytest.raises(InputError, match="DDIM"):
        sd3.alphas_cumprod
    assert not any(p.requires_grad for m in sd3.modules().values() for p in m.parameters())


def test_prompt_encoding_is_the_pipelines(sd3):
    pipe = sd3.pipeline()
    prompts = ["a red circle on the left", ""]
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True,
                                                      device="cpu")
    cond = sd3.encode_prompts(prompts)
    assert cond.hidden.shape == (2, 77 + 256, 64) and cond.pooled.shape == (2, 64)
    assert torch.equal(cond.hidden, emb) and torch.equal(cond.pooled, pooled)
    uncond = sd3.encode_unconditional(2)  # SD3 encodes "" (no zeroed negative branch); a batch of 1, cached
    assert torch.allclose(uncond.hidden, neg, atol=1e-6) and torch.allclose(uncond.pooled, neg_pooled, atol=1e-6)


def test_sigmas_are_the_schedulers_shifted_grid(sd3):
    s = sd3.sigmas(10)
    assert s.shape == (11,) and s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    def shift(u):  # t' = s t / (1 + (s - 1) t), s = 3
        return 3.0 * u / (1 + 2.0 * u)

    # FlowMatchEulerDiscreteScheduler: a linear grid from 1 to its (shifted) sigma_min of t = 1/1000, shifted
    assert torch.allclose(s[:-1], shift(torch.linspace(1.0, float(shift(torch.tensor(1e-3))), 10)), atol=1e-6)
    assert torch.allclose(sd3.timesteps(10), s[:-1] * 1000)


def test_euler_ode_sample_matches_the_pipeline(sd3):
    """dx = v dt from t = 1 to 0 on our sigmas with our guided velocity == the pipeline's latents."""
    pipe = sd3.pipeline()
    lat = torch.randn(2, *sd3.latent_shape(16), generator=torch.Generator().manual_seed(0))
    prompts = ["a blue square", "two green triangles"]
    ref = pipe(prompt=prompts, num_inference_steps=4, guidance_scale=4.5, latents=lat.clone(), height=16, width=16,
               output_type="latent").images
    cond, uncond = sd3.encode_prompts(prompts), sd3.encode_unconditional(2)
    x, s = lat.clone(), sd3.sigmas(4)
    for i in range(4):
        x = x + (s[i + 1] - s[i]) * sd3.predict(x, s[i], cond, uncond=uncond, guidance_scale=4.5)
    assert torch.allclose(x, ref, atol=1e-6)


def test_predict_cfg_is_one_call(sd3):
    cond = sd3.encode_prompts(["a red circle"] * 3)
    x = torch.randn(3, *sd3.latent_shape(16), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1.0, 0.5, 0.1])
    calls, rows = sd3.counters.unet_calls, sd3.counters.unet_rows_grad + sd3.counters.unet_rows_nograd
    guided = sd3.predict(x, t, cond, guidance_scale=3.0)
    assert sd3.counters.unet_calls - calls == 1  # both branches in one batch
    assert sd3.counters.unet_rows_grad + sd3.counters.unet_rows_nograd - rows == 6
    c, u = sd3.velocity(x, t, cond), sd3.velocity(x, t, sd3.encode_unconditional(3))
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)
    assert torch.equal(sd3.predict(x, t, cond), c)
    with pytest.raises(TypeError, match="keyword"):
        sd3.predict(x, t, cond, 3.0)


def test_velocity_feeds_t_times_1000(sd3):
    cond = sd3.encode_prompts(["a red circle"])
    x = torch.randn(1, *sd3.latent_shape(16))
    direct = sd3.transformer(hidden_states=x, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled,
                             timestep=torch.tensor([250.0]), return_dict=False)[0]
    assert torch.equal(sd3.velocity(x, 0.25, cond), direct)


def test_decode_uses_scaling_and_shift(sd3):
    z = torch.randn(1, *sd3.latent_shape(16))
    img = sd3.decode(z)
    assert img.shape == (1, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    raw = sd3.vae.decode(z / 1.5305 + 0.0609, return_dict=False)[0]
    assert torch.allclose(img, (raw / 2 + 0.5).clamp(0, 1), atol=1e-6)
    back = sd3.encode_images(img)
    assert back.shape == z.shape


def test_tiny_flow_build_is_deterministic_and_sd3_shaped():
    a, b = TinyFlowBackbone.build(seed=3), TinyFlowBackbone.build(seed=3)
    assert a.family == "flow" and a.pixel_space and a.latent_shape() == (3, 32, 32)
    assert all(torch.equal(p, q) for p, q in zip(a.transformer.parameters(), b.transformer.parameters()))
    cond = a.encode_prompts(["a red circle", "three blue squares"])
    assert cond.hidden.shape == (2, 16, 64)  # 16 CLIP tokens, no T5 zeros (max_sequence_length 0)
    x = torch.randn(2, 3, 32, 32)
    v = a.predict(x, 0.7, cond, guidance_scale=4.5)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert torch.equal(a.decode(x.clamp(-1, 1)), (x.clamp(-1, 1) / 2 + 0.5))  # pixel space


def test_tiny_flow_conditioning_concatenates():
    bb = TinyFlowBackbone.build(seed=0)
    c = Conditioning.cat([bb.encode_prompts(["a red circle"]), bb.encode_unconditional(2)])
    assert len(c) == 3 and c.pooled.shape == (3, 64)
