"""The step-aware preference model: exactly CLIP at init, time-dependent once trained, cached
text, differentiable preprocessing, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spobench.core.errors import InputError, MissingWeightsError
from spobench.models.spm import StepAwarePreferenceModel
from spobench.models.spm_preprocess import preprocess_images
from spobench.toyworld.tiny_clip import make_tiny_clip_folder, make_tiny_clip_tokenizer

PROMPTS = ["a red circle", "two blue squares", "a red circle"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=3)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 40, 48, generator=g)


def _by_hand(clip, tok, pixels, prompts):
    """PickScore computed from CLIPModel.get_image_features / get_text_features."""
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=pixels).pooler_output
        enc = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * (img * txt).sum(-1)


def _perturb_time(spm, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in spm.time_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_init_is_exactly_clip(clip_dir, images):
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(str(clip_dir)).eval()
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    plain = StepAwarePreferenceModel.from_clip(clip_dir, time_conditioned=False).eval()
    pp = spm.preprocess_cfg
    pixels = preprocess_images(images, pp["size"], pp["crop"], pp["mean"], pp["std"])
    want = _by_hand(ref, spm.tokenizer, pixels, PROMPTS)
    with torch.no_grad():
        for t in (0, 250, 500, 999, torch.tensor([3, 400, 950])):
            got = spm(images, t, PROMPTS)
            assert got.shape == (3,)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(images, 0, PROMPTS), want, atol=1e-5, rtol=0)
    # the wrapped CLIPModel called without a time vector is still the plain model
    with torch.no_grad():
        a = spm.clip.get_image_features(pixel_values=pixels).pooler_output
        b = ref.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_from_clip_instance_built_from_config(images):
    """A tiny CLIP from a config and a tokenizer made here, no folder involved."""
    from transformers import CLIPConfig, CLIPModel

    tok = make_tiny_clip_tokenizer(["red", "blue", "circle"])
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=8)
    clip = CLIPModel(cfg).eval()
    spm = StepAwarePreferenceModel.from_clip(clip, tokenizer=tok).eval()
    pp = spm.preprocess_cfg
    assert (pp["size"], pp["crop"]) == (16, 16)
    pixels = preprocess_images(images, 16, 16, pp["mean"], pp["std"])
    with torch.no_grad():
        enc = tok(PROMPTS, padding=True, return_tensors="pt")
        txt = clip.get_text_features(**enc).pooler_output
        img = clip.get_image_features(pixel_values=pixels).pooler_output
        want = clip.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        torch.testing.assert_close(spm(images, 700, PROMPTS), want, atol=1e-5, rtol=0)


def test_score_depends_on_t_only_when_time_conditioned(clip_dir, images):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    plain = StepAwarePreferenceModel.from_clip(clip_dir, time_conditioned=False).eval()
    _perturb_time(spm)
    assert not plain.time_parameters()
    with torch.no_grad():
        s0, s9 = spm(images, 0, PROMPTS), spm(images, 900, PROMPTS)
        assert (s0 - s9).abs().max() > 1e-3
        # per-row timesteps: row i is scored at its own t
        mixed = spm(images, torch.tensor([0, 900, 0]), PROMPTS)
        torch.testing.assert_close(mixed, torch.stack([s0[0], s9[1], s0[2]]), atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(images, 0, PROMPTS), plain(images, 900, PROMPTS), atol=0, rtol=0)
    # perturbing only the time MLP (modulation heads still zero) keeps the model exactly CLIP
    spm2 = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    with torch.no_grad():
        for p in spm2.time_embed.parameters():
            p.add_(1.0)
        torch.testing.assert_close(spm2(images, 0, PROMPTS), spm2(images, 900, PROMPTS), atol=0, rtol=0)


def test_text_cache(clip_dir, images):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    with torch.no_grad():
        first = spm(images, 10, PROMPTS)
        assert spm.text_encodes == 2  # two distinct prompts, each encoded once
        again = spm(images, 500, PROMPTS)
        spm(images[:1], 10, ["two blue squares"])
        assert spm.text_encodes == 2  # all hits
    torch.testing.assert_close(first, spm(images, 10, PROMPTS).detach())
    # a weight change (optimizer step) invalidates the cache
    opt = torch.optim.SGD(spm.clip.text_projection.parameters(), lr=0.1)
    spm.clip.text_projection.weight.grad = torch.randn_like(spm.clip.text_projection.weight)
    opt.step()
    with torch.no_grad():
        changed = spm(images, 10, PROMPTS)
    assert spm.text_encodes == 4
    assert not torch.allclose(changed, first)
    # training the text encoder: no cache, gradients reach it
    spm.train()
    before = spm.text_encodes
    spm(images, 10, PROMPTS).sum().backward()
    assert spm.text_encodes == before + 2
    assert spm.clip.text_projection.weight.grad.abs().sum() > 0
    assert again.shape == (3,)


def test_gradients_reach_images_and_time_heads(clip_dir, images):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).train()
    x = images.clone().requires_grad_(True)
    spm(x, 300, PROMPTS).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable preprocessing
    heads = [spm.layer_mods[0][1].weight, spm.pooled_mod[1].weight]
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)


def test_gradient_checkpointing_matches(clip_dir, images):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).train()
    _perturb_time(spm)
    ref = spm(images, 600, PROMPTS)
    ref.sum().backward()
    g_ref = spm.layer_mods[1][1].weight.grad.clone()
    spm.zero_grad()
    spm.enable_checkpointing()
    calls = []
    for layer in spm.clip.vision_model.encoder.layers:
        assert layer.gradient_checkpointing
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    out = spm(images, 600, PROMPTS)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(spm.layer_mods[1][1].weight.grad, g_ref)
    assert len(calls) == len(spm.layer_mods)  # the adaLN layers really ran checkpointed


def test_save_load_round_trip(clip_dir, images, tmp_path):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    _perturb_time(spm)
    spm.save(tmp_path / "spm")
    cfg = json.loads((tmp_path / "spm" / "spm_config.json").read_text())
    assert cfg["base_clip"] == str(clip_dir) and cfg["time_conditioned"] is True
    assert cfg["time_embedding"]["freq_dim"] == 256
    back = StepAwarePreferenceModel.load(tmp_path / "spm").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(images, 321, PROMPTS), spm(images, 321, PROMPTS), atol=0, rtol=0)
    # the saved clip/ folder is a standard CLIP folder (usable as a PickScore-style init)
    assert StepAwarePreferenceModel.from_clip(tmp_path / "spm" / "clip").time_conditioned

    plain = StepAwarePreferenceModel.from_clip(clip_dir, time_conditioned=False)
    plain.save(tmp_path / "plain")
    assert not (tmp_path / "plain" / "time_conditioning.safetensors").exists()
    assert StepAwarePreferenceModel.load(tmp_path / "plain").time_conditioned is False


def test_preprocessing_shape_and_normalisation():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.full((2, 3, 20, 30), 0.7)
    y = preprocess_images(x, 16, 16, mean, std)
    assert y.shape == (2, 3, 16, 16)
    want = (0.7 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(y[0, :, 5, 5], want, atol=1e-5, rtol=0)
    # centre crop: a wide image keeps its middle
    wide = torch.zeros(1, 3, 10, 30)
    wide[..., 10:20] = 1.0
    y = preprocess_images(wide, 10, 10, [0, 0, 0], [1, 1, 1])
    assert y.min() > 0.9
    # bicubic overshoot is clamped before normalising
    sharp = (torch.rand(1, 3, 64, 64) > 0.5).float()
    y = preprocess_images(sharp, 16, 16, [0, 0, 0], [1, 1, 1])
    assert y.min() >= 0 and y.max() <= 1
    with pytest.raises(InputError):
        preprocess_images(torch.rand(3, 8, 8), 8, 8, mean, std)


def test_preprocessing_close_to_clip_image_processor():
    """Our torch preprocessing vs transformers' PIL CLIPImageProcessor on a smooth image."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    h, w = 48, 64
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    arr = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx) * yy], -1)
    u8 = (arr * 255).round().astype(np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    want = torch.as_tensor(np.asarray(proc(images=Image.fromarray(u8), return_tensors="np")["pixel_values"]))
    x = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255
    got = preprocess_images(x, 24, 24, proc.image_mean, proc.image_std)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 0.03  # ~1/255 in [0, 1] units (PIL works on uint8)


def test_missing_folder_names_what_to_download(tmp_path):
    with pytest.raises(MissingWeightsError) as e:
        StepAwarePreferenceModel.from_clip(tmp_path / "nowhere")
    assert "yuvalkirstain/PickScore_v1" in str(e.value)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(e.value)
    with pytest.raises(MissingWeightsError):
        StepAwarePreferenceModel.load(tmp_path)


def test_missing_tokenizer_names_the_processor(clip_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / f, bare / f)
    with pytest.raises(MissingWeightsError) as e:
        StepAwarePreferenceModel.from_clip(bare)
    assert "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in str(e.value)
    # with the processor folder given separately (PickScore's layout) it loads
    spm = StepAwarePreferenceModel.from_clip(bare, processor=clip_dir)
    assert spm.preprocess_cfg["size"] == 32


def test_prompt_broadcast_and_mismatch(clip_dir, images):
    spm = StepAwarePreferenceModel.from_clip(clip_dir).eval()
    with torch.no_grad():
        one = spm(images, 5, ["a red circle"])
        torch.testing.assert_close(one, spm(images, 5, ["a red circle"] * 3))
        with pytest.raises(InputError):
            spm(images, 5, ["a", "b"])
        with pytest.raises(InputError):
            spm(images, torch.tensor([1, 2]), PROMPTS)
