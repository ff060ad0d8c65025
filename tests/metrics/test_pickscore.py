"""PickScore on a tiny transformers CLIPModel folder + a laion-style processor folder."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import clip_fixtures as cf
from spobench.metrics import pickscore
from spobench.metrics.base import sha256_of

from spobench.core.errors import MissingWeightsError

PROMPTS = ["a red cat", "the green tree on a painting", "a photo of a blue car"]


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def pick_dir(tmp_path, empty_hub_cache):
    folder = tmp_path / "pickscore"
    cf.write_clip_model(folder / pickscore.MODEL_DIR, seed=3)
    cf.write_processor_folder(folder / pickscore.PROCESSOR_DIR, size=32)
    return folder


def _by_hand(model_dir, image, prompt):
    """Shortest side -> 32 (PIL bicubic), centre crop, CLIP normalisation, then logit_scale.exp() * cos."""
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    w, h = image.size
    s = 32 / min(w, h)
    im = image.convert("RGB").resize((int(w * s) if w > h else 32, int(h * s) if h > w else 32), Image.BICUBIC)
    left, top = (im.size[0] - 32) // 2, (im.size[1] - 32) // 2  # transformers' centre crop rounding
    arr = np.asarray(im.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 255
    x = (torch.from_numpy(arr).permute(2, 0, 1) - torch.tensor(cf.CLIP_MEAN)[:, None, None]) / torch.tensor(cf.CLIP_STD)[:, None, None]
    vocab, _ = cf.tiny_vocab()
    ids = torch.tensor([[vocab["<|startoftext|>"]] + [vocab[w + "</w>"] for w in prompt.split()] + [vocab["<|endoftext|>"]]])
    with torch.no_grad():
        img = model.get_image_features(pixel_values=x[None]).pooler_output[0]
        txt = model.get_text_features(input_ids=ids).pooler_output[0]
        return float(model.logit_scale.exp() * torch.dot(img, txt) / (img.norm() * txt.norm()))


def test_score_equals_hand_computation(pick_dir):
    metric = pickscore.PickScore(weights=pick_dir, batch_size=2)
    imgs = cf.images(3)
    res = metric.score(imgs, PROMPTS)
    assert res.scores.shape == (3,) and res.scores.dtype == np.float64
    hand = [_by_hand(pick_dir / pickscore.MODEL_DIR, im, p) for im, p in zip(imgs, PROMPTS)]
    np.testing.assert_allclose(res.scores, hand, atol=1e-4)
    # padding to the batch's longest prompt does not move a score
    np.testing.assert_allclose(pickscore.PickScore(weights=pick_dir, batch_size=1).score(imgs, PROMPTS).scores,
                               res.scores, atol=1e-5)
    ident = metric.identity()
    assert ident.checkpoint_sha256 == sha256_of(pick_dir / pickscore.MODEL_DIR / "model.safetensors")
    assert ident.options["model"] == pickscore.MODEL_ID and ident.options["processor"] == pickscore.PROCESSOR_ID


def test_missing_weights_names_both_ids(tmp_path, empty_hub_cache):
    with pytest.raises(MissingWeightsError) as e:
        pickscore.PickScore(weights=tmp_path)
    msg = str(e.value)
    assert pickscore.MODEL_ID in msg and pickscore.PROCESSOR_ID in msg
    assert f"hf download {pickscore.MODEL_ID}" in msg and f"hf download {pickscore.PROCESSOR_ID}" in msg
    # only the processor missing: only it is named
    cf.write_clip_model(tmp_path / pickscore.MODEL_DIR)
    with pytest.raises(MissingWeightsError) as e:
        pickscore.PickScore(weights=tmp_path)
    assert pickscore.PROCESSOR_ID in str(e.value) and f"model {pickscore.MODEL_ID}" not in str(e.value)


def test_found_in_local_hub_cache_only(tmp_path, empty_hub_cache):
    cf.write_clip_model(cf.fake_hub_cache(empty_hub_cache, pickscore.MODEL_ID), seed=4)
    cf.write_processor_folder(cf.fake_hub_cache(empty_hub_cache, pickscore.PROCESSOR_ID), size=32)
    metric = pickscore.PickScore(weights=tmp_path / "nothing-here")
    assert metric.model_dir.is_relative_to(empty_hub_cache)
    assert np.isfinite(metric.score(cf.images(2), PROMPTS[:2]).scores).all()


def test_model_folder_given_directly(tmp_path, empty_hub_cache):
    cf.write_clip_model(tmp_path / "m")
    cf.write_processor_folder(tmp_path / "m" / pickscore.PROCESSOR_DIR, size=32)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "clip"
    metric = pickscore.PickScore(weights=tmp_path / "m")
    assert metric.model_dir == tmp_path / "m"
