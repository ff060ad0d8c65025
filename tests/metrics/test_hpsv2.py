"""HPSv2 on a tiny open_clip-layout checkpoint, through the real loader (torch.load weights_only,
conversion, strict load), checked against an independent pure-torch open_clip forward."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import clip_fixtures as cf
from spobench.metrics import hpsv2
from spobench.metrics.clip_common import open_clip_ids, resize_longest_pad
from spobench.metrics.convert_open_clip import convert_state_dict, load_open_clip_state_dict

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError

PROMPTS = ["a red cat!", "the green tree on a painting", "a photo of a blue car &amp; a dog"]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hps_dir(tmp_path, empty_hub_cache):
    folder = tmp_path / "hpsv2"
    folder.mkdir()
    sd = cf.open_clip_state_dict(seed=1)
    torch.save({"state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    cf.write_tokenizer(folder / hpsv2.TOKENIZER_DIR)
    return folder, sd


def test_conversion_matches_reference_open_clip_forward():
    sd = cf.open_clip_state_dict(seed=0, attn_mask=True)
    model = load_open_clip_state_dict(sd)
    assert model.config.vision_config.num_attention_heads == cf.VISION["heads"]
    assert model.config.text_config.num_attention_heads == cf.TEXT["heads"]
    assert model.config.vision_config.hidden_act == "gelu"
    pixels = torch.randn(2, 3, cf.VISION["image"], cf.VISION["image"])
    ids = torch.stack([cf.open_clip_ids(["a", "red", "cat"]), cf.open_clip_ids(["the", "green", "tree", "on", "a", "photo"])])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(input_ids=ids).pooler_output
    ref_img = cf.reference_image_features(sd, pixels, cf.VISION["heads"])
    ref_txt = cf.reference_text_features(sd, ids, cf.TEXT["heads"])
    assert torch.allclose(img, ref_img, atol=1e-5, rtol=0), (img - ref_img).abs().max()
    assert torch.allclose(txt, ref_txt, atol=1e-5, rtol=0), (txt - ref_txt).abs().max()
    assert torch.allclose(model.logit_scale, sd["logit_scale"])


def test_conversion_is_strict():
    sd = cf.open_clip_state_dict(seed=0)
    with pytest.raises(ModelLoadError, match="visual.unexpected"):
        convert_state_dict({**sd, "visual.unexpected": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if k != "transformer.resblocks.1.ln_2.bias"}
    with pytest.raises(ModelLoadError, match="missing"):
        load_open_clip_state_dict(missing)
    odd = {**sd, "transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(7, cf.TEXT["width"])}
    with pytest.raises(ModelLoadError, match="shape"):
        load_open_clip_state_dict(odd)
    bad_mask = {**sd, "attn_mask": torch.zeros(77, 77)}
    with pytest.raises(ModelLoadError, match="causal"):
        convert_state_dict(bad_mask)


def test_preprocess_pads_not_crops():
    img = Image.new("RGB", (100, 50), (255, 128, 0))  # wide: zero bands top and bottom
    x = resize_longest_pad(img, 224)
    assert x.shape == (3, 224, 224)
    zero = (torch.zeros(3) - torch.tensor(cf.CLIP_MEAN)) / torch.tensor(cf.CLIP_STD)
    band = zero[:, None, None].expand(3, 56, 224)
    assert torch.allclose(x[:, :56], band) and torch.allclose(x[:, 168:], band)
    content = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(cf.CLIP_MEAN)) / torch.tensor(cf.CLIP_STD)
    assert torch.allclose(x[:, 56:168], content[:, None, None].expand(3, 112, 224), atol=1e-5)
    # the same for a tall image: bands left and right, odd padding split floor/ceil like open_clip
    y = resize_longest_pad(Image.new("RGB", (45, 100), (10, 20, 30)), 224)
    new_w = round(45 * 2.24)  # 101 -> pad 123 = 61 left + 62 right
    assert torch.allclose(y[:, :, :61], zero[:, None, None].expand(3, 224, 61))
    assert torch.allclose(y[:, :, 61 + new_w:], zero[:, None, None].expand(3, 224, 62))
    assert not torch.allclose(y[:, :, 61], zero[:, None].expand(3, 224))
    # HPSv2 resizes the float tensor (ToTensor first): torch bicubic, antialiased, no uint8 rounding,
    # no clamp (tgxs002/HPSv2 hpsv2/src/open_clip/transform.py); antialias=False is torchvision < 0.17
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8))
    out = resize_longest_pad(noisy, 224, antialias=True)
    new_h = round(300 * 224 / 500)
    floats = torch.from_numpy(np.asarray(noisy, dtype=np.float32) / 255).permute(2, 0, 1)
    ref = torch.nn.functional.interpolate(floats[None], size=(new_h, 224), mode="bicubic", align_corners=False,
                                          antialias=True)[0]
    top = (224 - new_h) // 2
    mean, std = torch.tensor(cf.CLIP_MEAN)[:, None, None], torch.tensor(cf.CLIP_STD)[:, None, None]
    assert torch.allclose(out[:, top:top + new_h], (ref - mean) / std, atol=1e-5)
    # enlarging hard black/white stripes: bicubic overshoots [0, 1], and the result is not on the uint8 grid
    stripes = Image.fromarray((np.arange(20)[None, :, None] % 2 * 255).repeat(10, 0).repeat(3, 2).astype(np.uint8))
    pixels = resize_longest_pad(stripes, 224) * std + mean
    assert pixels.min() < -1e-2 and pixels.max() > 1 + 1e-2  # not clamped
    assert not torch.allclose(pixels * 255, (pixels * 255).round(), atol=1e-3)  # not rounded to uint8
    assert not torch.allclose(out, resize_longest_pad(noisy, 224, antialias=False), atol=1e-2)


def test_missing_weights_names_files(tmp_path, empty_hub_cache):
    with pytest.raises(MissingWeightsError) as e:
        hpsv2.HPSv2(weights=tmp_path)
    msg = str(e.value)
    assert "HPS_v2.1_compressed.pt" in msg and "xswu/HPSv2" in msg and hpsv2.TOKENIZER_ID in msg
    assert "hf download" in msg
    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt"):
        hpsv2.HPSv2(weights=tmp_path, version="v2.0")
    with pytest.raises(InputError):
        hpsv2.HPSv2(weights=tmp_path, version="v3")


def test_missing_weights_default_folder(tmp_path, empty_hub_cache, monkeypatch):
    monkeypatch.setenv("SPOBENCH_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="nowhere"):
        hpsv2.HPSv2()


def test_score_matches_reference(hps_dir):
    folder, sd = hps_dir
    metric = hpsv2.HPSv2(weights=folder, batch_size=2)
    ident = metric.identity()
    assert ident.options["version"] == "v2.1" and ident.options["antialias"] is True
    assert ident.checkpoint_sha256 == hpsv2.sha256_of(folder / "HPS_v2.1_compressed.pt")
    imgs = cf.images(3)
    res = metric.score(imgs, PROMPTS)
    assert res.scores.shape == (3,) and res.scores.dtype == np.float64
    # open_clip's ids: zero padding, and "!" stays a BPE symbol although the folder's pad token is "!"
    ids = open_clip_ids(metric._tokenizer, ["a red cat", "a red cat!", "a " * 100], 77)
    assert torch.equal(ids[0], cf.open_clip_ids(["a", "red", "cat"]))
    vocab, _ = cf.tiny_vocab()
    assert ids[1, :6].tolist() == [vocab["<|startoftext|>"], vocab["a</w>"], vocab["red</w>"], vocab["cat</w>"],
                                   vocab["!</w>"], vocab["<|endoftext|>"]] and ids[1, 6:].eq(0).all()
    assert ids[2, 0] == vocab["<|startoftext|>"] and ids[2, -1] == vocab["<|endoftext|>"] and ids[2, 1:-1].eq(vocab["a</w>"]).all()
    assert hpsv2.clean_prompt("  a &amp;amp;  b ") == "a & b"  # open_clip's basic_clean + whitespace_clean
    ids = open_clip_ids(metric._tokenizer, [hpsv2.clean_prompt(p) for p in PROMPTS], 77)
    pixels = torch.stack([resize_longest_pad(im, cf.VISION["image"]) for im in imgs])
    ref_img = cf.reference_image_features(sd, pixels, cf.VISION["heads"])
    ref_txt = cf.reference_text_features(sd, ids, cf.TEXT["heads"])
    ref = torch.nn.functional.cosine_similarity(ref_img, ref_txt).double().numpy()
    np.testing.assert_allclose(res.scores, ref, atol=1e-5)
    # batching does not change scores
    np.testing.assert_allclose(hpsv2.HPSv2(weights=folder, batch_size=1).score(imgs, PROMPTS).scores, res.scores, atol=1e-6)
    assert metric.score([], []).scores.shape == (0,)
    with pytest.raises(ValueError):
        metric.score(imgs, PROMPTS[:2])


def test_v20_plain_state_dict_and_hub_cache(tmp_path, empty_hub_cache):
    """v2.0 file as a bare state dict with a DataParallel prefix, both found in the local HF cache."""
    sd = cf.open_clip_state_dict(seed=2)
    snap = cf.fake_hub_cache(empty_hub_cache, hpsv2.HUB_REPO)
    torch.save({"module." + k: v.half() for k, v in sd.items()}, snap / "HPS_v2_compressed.pt")
    cf.write_tokenizer(cf.fake_hub_cache(empty_hub_cache, hpsv2.TOKENIZER_ID))
    metric = hpsv2.HPSv2(weights=tmp_path / "empty", version="2.0")
    assert metric.identity().options["version"] == "v2.0"
    assert metric.checkpoint == snap / "HPS_v2_compressed.pt"
    score = metric.score(cf.images(1), PROMPTS[:1]).scores
    assert np.isfinite(score).all() and -1 <= score[0] <= 1


def test_unreadable_or_wrong_checkpoint(tmp_path, empty_hub_cache):
    folder = tmp_path / "w"
    cf.write_tokenizer(folder / hpsv2.TOKENIZER_DIR)
    (folder / "HPS_v2.1_compressed.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError):
        hpsv2.HPSv2(weights=folder).score(cf.images(1), ["a"])
    sd = cf.open_clip_state_dict(vocab=cf.vocab_size() + 5)  # tokenizer does not match the checkpoint
    torch.save({"state_dict": sd}, folder / "HPS_v2.1_compressed.pt")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        hpsv2.HPSv2(weights=folder).score(cf.images(1), ["a"])
