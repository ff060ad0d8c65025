"""LAION aesthetic predictor v2 on a tiny CLIP folder and a head with the official key names."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import clip_fixtures as cf
from spobench.metrics import aesthetic
from spobench.metrics.clip_common import combined_sha256, resize_center_crop

from spobench.core.errors import MissingWeightsError, ModelLoadError


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def aes_dir(tmp_path, empty_hub_cache):
    folder = tmp_path / "aesthetic"
    cf.write_clip_model(folder / aesthetic.CLIP_DIR, seed=5, hidden_act="quick_gelu")
    head = cf.aesthetic_head_state_dict(cf.EMBED, seed=6)
    torch.save(head, folder / aesthetic.HEAD_FILE)
    return folder, head


def test_head_layout_is_the_official_one():
    head = aesthetic.AestheticHead(768)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout",
                                                       "Linear", "Linear"]


def test_score_equals_hand_computation(aes_dir):
    from transformers import CLIPModel

    folder, head = aes_dir
    metric = aesthetic.Aesthetic(weights=folder, batch_size=2)
    assert metric.needs_prompt is False
    imgs = cf.images(3)
    res = metric.score(imgs, None)
    assert res.scores.shape == (3,) and res.scores.dtype == np.float64
    clip = CLIPModel.from_pretrained(str(folder / aesthetic.CLIP_DIR)).eval()
    pix = []
    for im in imgs:  # torchvision Resize(32, bicubic) + CenterCrop(32), by hand
        w, h = im.size
        nw, nh = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
        r = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - 32) / 2)), int(round((nh - 32) / 2))
        arr = np.asarray(r.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
        pix.append((torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(cf.CLIP_MEAN)[:, None, None])
                   / torch.tensor(cf.CLIP_STD)[:, None, None])
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=torch.stack(pix)).pooler_output
        ref = cf.reference_aesthetic(head, emb).double().numpy()
    np.testing.assert_allclose(res.scores, ref, atol=1e-5)
    np.testing.assert_allclose(aesthetic.Aesthetic(weights=folder, batch_size=1).score(imgs).scores, res.scores, atol=1e-6)
    ident = metric.identity()
    assert ident.checkpoint_sha256 == combined_sha256([ident.options["head_sha256"], ident.options["clip_sha256"]])
    assert ident.options["head_sha256"] == aesthetic.sha256_of(folder / aesthetic.HEAD_FILE)


def test_center_crop_rounding_is_torchvision():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 50, 50))
    out = resize_center_crop(img, 224)  # -> 448x224, crop left = round(224/2) = 112
    assert out.size == (224, 224)
    cols = np.tile(np.arange(67, dtype=np.uint8)[None, :, None], (64, 1, 3))
    odd = resize_center_crop(Image.fromarray(cols), 64)  # no resize; margin 3 -> int(round(1.5)) = 2
    assert odd.size == (64, 64) and np.asarray(odd)[0, 0, 0] == 2  # transformers' crop would start at 1


def test_missing_weights(tmp_path, empty_hub_cache):
    with pytest.raises(MissingWeightsError) as e:
        aesthetic.Aesthetic(weights=tmp_path)
    assert aesthetic.HEAD_FILE in str(e.value) and aesthetic.CLIP_ID in str(e.value)


def test_clip_from_hub_cache_and_strict_head(tmp_path, empty_hub_cache):
    cf.write_clip_model(cf.fake_hub_cache(empty_hub_cache, aesthetic.CLIP_ID), seed=7)
    folder = tmp_path / "w"
    folder.mkdir()
    bad = cf.aesthetic_head_state_dict(cf.EMBED)
    bad["layers.1.weight"] = bad.pop("layers.0.weight")  # wrong layout
    torch.save(bad, folder / aesthetic.HEAD_FILE)
    metric = aesthetic.Aesthetic(weights=folder)
    assert metric.clip_dir.is_relative_to(empty_hub_cache)
    with pytest.raises(ModelLoadError):
        metric.score(cf.images(1))
    torch.save(cf.aesthetic_head_state_dict(768), folder / aesthetic.HEAD_FILE)  # 768-d head, 16-d CLIP
    with pytest.raises(ModelLoadError, match="768"):
        aesthetic.Aesthetic(weights=folder).score(cf.images(1))
