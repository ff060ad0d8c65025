"""GenEval: vendored metadata, the decision rules on synthetic detections, the mmdet-style
post-processing on synthetic logits, and the plugin on a tiny random Mask2Former + CLIP."""

import json
import string
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spobench.core.errors import InputError, MissingWeightsError, ModelLoadError
from spobench.metrics import geneval_rules as gr
from spobench.metrics.geneval_rules import Detection


def det(label, box, score=0.95, color=None, mask=None):
    return Detection(label, tuple(float(v) for v in box), score, mask, color)


def judge(dets, meta, **kw):
    ok, reason, _ = gr.evaluate_detections(dets, meta, **kw)
    return ok, reason


# -- metadata -----------------------------------------------------------------------------------

def test_metadata_is_genevals_553_prompts():
    rows = gr.geneval_metadata()
    assert len(rows) == 553
    assert Counter(r["tag"] for r in rows) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                               "position": 100, "color_attr": 100}
    prompts = gr.geneval_prompts()
    assert prompts == [r["prompt"] for r in rows] and len(set(prompts)) == 553
    assert prompts[:3] == ["a photo of a bench", "a photo of a cow", "a photo of a bicycle"]
    assert prompts[457] == "a photo of a pink oven and a green motorcycle"
    assert prompts[530] == "a photo of a purple suitcase and an orange pizza"
    names = set(gr.OBJECT_NAMES)
    for r in rows:
        for clause in r.get("include", []) + r.get("exclude", []):
            assert clause["class"] in names
            assert clause.get("color", "red") in gr.COLORS
        assert r["tag"] in gr.TAGS
    assert gr.metadata_for_prompt("a photo of four benchs")["exclude"] == [{"class": "bench", "count": 5}]
    with pytest.raises(InputError, match="not one of GenEval"):
        gr.metadata_for_prompt("a photo of a unicorn")


def test_catalog_points_at_the_loaders():
    from spobench.core import catalog

    assert catalog.PROMPT_SETS.get("geneval")() == gr.geneval_prompts()
    from spobench.metrics.geneval import GenEval
    from spobench.metrics.imagereward import ImageReward

    assert catalog.METRICS.get("geneval") is GenEval
    assert catalog.METRICS.get("imagereward") is ImageReward


# -- rules, tag by tag --------------------------------------------------------------------------

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {"tag": "two_object", "include": [{"class": "bowl", "count": 1}, {"class": "skis", "count": 1}],
       "prompt": "a photo of a bowl and a skis"}
THREE = {"tag": "counting", "include": [{"class": "orange", "count": 3}], "exclude": [{"class": "orange", "count": 4}],
         "prompt": "a photo of three oranges"}
COLOR = {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "purple"}], "prompt": "a photo of a purple cup"}
POSITION = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                           {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                               {"class": "scissors", "count": 1, "color": "black"}],
              "prompt": "a photo of a pink handbag and a black scissors"}


def test_single_object():
    assert judge([det("bench", (0, 0, 10, 10), 0.31)], SINGLE) == (True, "")
    ok, reason = judge([det("bench", (0, 0, 10, 10), 0.3)], SINGLE)  # the threshold is strict: > 0.3
    assert not ok and reason == "expected bench>=1, found 0"
    assert not judge([det("chair", (0, 0, 10, 10))], SINGLE)[0]
    assert not judge([], SINGLE)[0]


def test_thresholds_compare_in_float32_like_geneval():
    # a detector score of float32(0.3) is 0.30000001192... as a Python float: above 0.3 in float64,
    # but GenEval compares its float32 score column, where it equals the threshold and is dropped
    at_03 = float(np.float32(0.3))
    assert at_03 > 0.3
    assert not judge([det("bench", (0, 0, 10, 10), at_03)], SINGLE)[0]
    assert judge([det("bench", (0, 0, 10, 10), float(np.nextafter(np.float32(0.3), np.float32(1))))], SINGLE)[0]
    # a score that only float64 sets apart from 0.9 is not above the counting threshold either
    boxes = [(i * 10, 0, i * 10 + 8, 8) for i in range(3)]
    assert not judge([det("orange", b, 0.95) for b in boxes[:2]] + [det("orange", boxes[2], 0.9 + 1e-9)], THREE)[0]


def test_two_object():
    assert judge([det("bowl", (0, 0, 5, 5), 0.4), det("skis", (5, 5, 9, 9), 0.5)], TWO)[0]
    ok, reason = judge([det("bowl", (0, 0, 5, 5), 0.4), det("skis", (5, 5, 9, 9), 0.2)], TWO)
    assert not ok and "expected skis>=1, found 0" in reason


def test_counting_uses_the_09_threshold_and_the_exclude_clause():
    boxes = [(i * 10, 0, i * 10 + 8, 8) for i in range(5)]
    three = [det("orange", b, 0.95) for b in boxes[:3]]
    assert judge(three, THREE)[0]
    # a 4th orange below 0.9 is not counted in a counting prompt...
    assert judge(three + [det("orange", boxes[3], 0.85)], THREE)[0]
    # ...but it would be in any other tag (threshold 0.3)
    assert len(gr.filter_detections(three + [det("orange", boxes[3], 0.85)], "two_object")["orange"]) == 4
    # two confident + one at 0.85: only two count
    ok, reason = judge(three[:2] + [det("orange", boxes[2], 0.85)], THREE)
    assert not ok and reason == "expected orange>=3, found 2"
    # four confident oranges: the exclude clause (< 4) fails
    ok, reason = judge(three + [det("orange", boxes[3], 0.91)], THREE)
    assert not ok and reason == "expected orange<4, found 4"
    # exactly 0.9 is not above the counting threshold
    assert not judge(three[:2] + [det("orange", boxes[2], 0.9)], THREE)[0]


def test_at_most_16_objects_per_class_most_confident_first():
    dets = [det("person", (i, 0, i + 1, 1), 0.31 + i * 0.01) for i in range(20)]
    kept = gr.filter_detections(dets, "two_object")["person"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted([d.score for d in dets], reverse=True)[:16]
    assert "person" not in gr.filter_detections([det("person", (0, 0, 1, 1), 0.2)], "single_object")


def test_colors_checks_the_most_confident_object():
    assert judge([det("cup", (0, 0, 10, 10), 0.9, "purple")], COLOR)[0]
    ok, reason = judge([det("cup", (0, 0, 10, 10), 0.9, "blue")], COLOR)
    assert not ok and reason.startswith("expected purple cup>=1, found 0 purple; and 1 blue")
    # only the top-`count` detections are classified: a purple cup ranked second does not help
    assert not judge([det("cup", (0, 0, 10, 10), 0.9, "blue"), det("cup", (20, 0, 30, 10), 0.8, "purple")], COLOR)[0]
    # a classifier callable replaces stored colours and sees only the kept top objects
    seen = []

    def clf(objs, cls):
        seen.append((cls, [o.score for o in objs]))
        return ["purple"] * len(objs)

    assert judge([det("cup", (0, 0, 10, 10), 0.9), det("cup", (20, 0, 30, 10), 0.8)], COLOR, classify_colors=clf)[0]
    assert seen == [("cup", [0.9])]


def test_color_attr():
    good = [det("handbag", (0, 0, 10, 10), 0.9, "pink"), det("scissors", (20, 0, 30, 10), 0.8, "black")]
    assert judge(good, COLOR_ATTR)[0]
    swapped = [det("handbag", (0, 0, 10, 10), 0.9, "black"), det("scissors", (20, 0, 30, 10), 0.8, "pink")]
    ok, reason = judge(swapped, COLOR_ATTR)
    assert not ok and "expected pink handbag" in reason and "expected black scissors" in reason
    assert not judge(good[:1], COLOR_ATTR)[0]


def test_position_pass_fail_and_missing_target():
    laptop = det("laptop", (0, 0, 10, 10), 0.9)
    assert judge([laptop, det("cow", (30, 0, 40, 10), 0.9)], POSITION)[0]
    ok, reason = judge([laptop, det("cow", (-40, 0, -30, 10), 0.9)], POSITION)
    assert not ok and reason == "expected cow right of target, found left of target"
    ok, reason = judge([det("cow", (30, 0, 40, 10), 0.9)], POSITION)
    assert not ok and "no target for cow to be right of" in reason
    # heavy overlap: the 0.1*(w_a + w_b) margin swallows the offset, no relation at all
    ok, reason = judge([laptop, det("cow", (1, 0, 11, 10), 0.9)], POSITION)
    assert not ok and reason == "expected cow right of target, found  target"


def test_relative_position_margin_and_direction_threshold():
    rel = gr.relative_position
    a = det("x", (0, 0, 10, 10))
    assert rel(a, det("y", (11, 0, 21, 10))) == {"left of"}  # offset -11, margin 2 -> -9, dx = -0.82
    assert rel(a, det("y", (2, 0, 12, 10))) == set()  # offset -2 <= margin 2
    assert rel(a, det("y", (2.5, 0, 12.5, 10))) == set()  # offset -2.5 -> -0.5, dx = -0.2: too weak
    assert rel(a, det("y", (10, 10, 20, 20))) == {"left of", "above"}  # diagonal, both components -0.57
    assert rel(det("y", (10, 10, 20, 20)), a) == {"right of", "below"}
    # point-like boxes (no margin): the direction component must exceed 0.5 strictly
    p = det("p", (0, 0, 0, 0))
    assert rel(p, det("q", (10, 17, 10, 17))) == {"left of", "above"}  # dx = -10/19.72 = -0.507
    assert rel(p, det("q", (10, 20, 10, 20))) == {"above"}  # dx = -0.447
    assert rel(p, det("q", (-10, 0, -10, 0))) == {"right of"}
    # the margin is a parameter (GenEval's position_threshold option)
    assert rel(a, det("y", (11, 0, 21, 10)), position_threshold=0.6) == set()


def test_summary_is_per_tag_accuracy_and_unweighted_overall():
    results = [("single_object", True)] * 3 + [("single_object", False)] + [("counting", False)] * 4 + [("position", 1.0)]
    s = gr.summarize(results)
    assert s["per_tag"] == {"single_object": 0.75, "counting": 0.0, "position": 1.0}
    assert s["overall"] == pytest.approx((0.75 + 0.0 + 1.0) / 3) and s["n_images"] == 9


def test_color_crop_pastes_mask_on_grey_and_crops_the_box():
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[..., 0] = 200
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 4:8] = True
    crop = np.asarray(gr.color_crop(Image.fromarray(arr), det("cup", (2, 4, 12, 12), mask=mask)))
    assert crop.shape == (8, 10, 3)  # rows 4..11, columns 2..11
    inside = crop[1:6, 2:6]
    assert (inside == [200, 0, 0]).all()
    assert (crop[0] == [0x99, 0x99, 0x99]).all() and (crop[:, 0] == [0x99, 0x99, 0x99]).all()
    whole = np.asarray(gr.color_crop(Image.fromarray(arr), det("cup", (2, 4, 12, 12)), crop=False))
    assert whole.shape == (20, 30, 3) and (whole == arr).all()  # no mask: the image itself


# -- detector post-processing on synthetic logits -----------------------------------------------

def reference_postprocess(cls_logits, mask_logits, pad_hw, img_hw, ori_hw, max_per_image=100):
    """mmdet 2.x, literally: upsample every query's mask, crop, rescale, then instance_postprocess."""
    num_classes = cls_logits.shape[1] - 1
    m = F.interpolate(mask_logits[None], size=pad_hw, mode="bilinear", align_corners=False)[0]
    m = m[:, :img_hw[0], :img_hw[1]]
    m = F.interpolate(m[:, None], size=ori_hw, mode="bilinear", align_corners=False)[:, 0]
    scores = F.softmax(cls_logits, dim=-1)[:, :-1]
    labels = torch.arange(num_classes).unsqueeze(0).repeat(cls_logits.shape[0], 1).flatten(0, 1)
    s, idx = scores.flatten(0, 1).topk(max_per_image, sorted=False)
    lab = labels[idx]
    mp = m[idx // num_classes]
    binary = (mp > 0).float()
    ms = (mp.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return lab, s * ms, binary.bool()


def test_instance_postprocess_matches_mmdet_on_synthetic_logits():
    from spobench.metrics import geneval as ge

    g = torch.Generator().manual_seed(0)
    Q, C = 7, 5
    cls_logits = torch.randn(Q, C + 1, generator=g) * 3
    mask_logits = torch.randn(Q, 8, 12, generator=g) * 4
    pad_hw, img_hw, ori_hw = (32, 48), (30, 45), (50, 75)
    out = ge.instance_postprocess(cls_logits, mask_logits, pad_hw, img_hw, ori_hw, max_per_image=20)
    lab, scores, masks = reference_postprocess(cls_logits, mask_logits, pad_hw, img_hw, ori_hw, max_per_image=20)
    order = torch.argsort(scores, descending=True)
    assert [d["label"] for d in out] == lab[order].tolist()
    assert np.allclose([d["score"] for d in out], scores[order].numpy(), atol=1e-6)
    for d, i in zip(out, order.tolist()):
        assert d["mask"].shape == ori_hw and (d["mask"] == masks[i].numpy()).all()
        ys, xs = np.nonzero(d["mask"])
        assert d["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    # masks of low-score detections are dropped (never used by a verdict); scores are unchanged
    lean = ge.instance_postprocess(cls_logits, mask_logits, pad_hw, img_hw, ori_hw, max_per_image=20, keep_masks_above=0.3)
    assert [d["score"] for d in lean] == [d["score"] for d in out]
    assert all((d["mask"] is None) == (d["score"] <= 0.3) for d in lean)


def test_mask2bbox_is_exclusive_and_zero_for_empty():
    from spobench.metrics.geneval import mask2bbox

    m = torch.zeros(2, 6, 9, dtype=torch.bool)
    m[0, 2:4, 3:7] = True
    assert mask2bbox(m).tolist() == [[3, 2, 7, 4], [0, 0, 0, 0]]


def test_detector_inputs_follow_mmdet_test_pipeline():
    from spobench.metrics import geneval as ge

    x, resized, original = ge.detector_inputs(Image.new("RGB", (1024, 1024), (124, 116, 104)))
    assert x.shape == (1, 3, 800, 800) and resized == (800, 800) and original == (1024, 1024)
    assert ge.rescale_size(768, 512) == (1200, 800)  # min(1333/768, 800/512) = 1.5625
    x, resized, _ = ge.detector_inputs(Image.new("RGB", (768, 512), (124, 116, 104)))
    assert x.shape == (1, 3, 800, 1216) and resized == (800, 1200)
    expect = (torch.tensor([124.0, 116, 104]) - torch.tensor(ge.PIXEL_MEAN)) / torch.tensor(ge.PIXEL_STD)
    assert torch.allclose(x[0, :, :800, :1200].mean((1, 2)), expect, atol=1e-5)
    assert (x[0, :, :, 1200:] == 0).all()  # padding after normalisation, with zeros


# -- plugin on tiny random models ---------------------------------------------------------------

def _tiny_weights(folder):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, Mask2FormerConfig, SwinConfig

    from spobench.metrics import geneval as ge

    torch.manual_seed(0)
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=80, num_queries=12, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, encoder_layers=1, decoder_layers=2, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_attention_heads=2, common_stride=4)
    detector = ge._instance_model_class()(cfg)
    detector.save_pretrained(folder / ge.DETECTOR_DIR)
    clip_dir = folder / ge.CLIP_DIR
    clip_dir.mkdir()
    vocab = {}
    for ch in string.ascii_lowercase + "-":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(clip_dir / "vocab.json"), str(clip_dir / "merges.txt")).save_pretrained(clip_dir)
    n = len(vocab)
    clip_cfg = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=16),
        projection_dim=16)
    CLIPModel(clip_cfg).save_pretrained(clip_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("geneval_weights")
    _tiny_weights(folder)
    return folder


def test_missing_weights_lists_what_to_download(tmp_path):
    from spobench.metrics.geneval import GenEval

    with pytest.raises(MissingWeightsError) as e:
        GenEval(weights=tmp_path)
    msg = str(e.value)
    for word in ("mask2former-swin-small-coco-instance", "clip-vit-large-patch14",
                 "facebook/mask2former-swin-small-coco-instance", "openai/clip-vit-large-patch14"):
        assert word in msg


def test_detector_loads_strictly(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from spobench.metrics import geneval as ge

    model = ge.load_detector(tiny_dir / ge.DETECTOR_DIR)
    assert model.config.num_labels == 80
    # the HF checkpoints carry the loss's class-weight buffer: tolerated; a missing weight is not
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir / ge.DETECTOR_DIR, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd["criterion.empty_weight"] = torch.ones(81)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    ge.load_detector(bad)
    sd.pop("class_predictor.weight")
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing"):
        ge.load_detector(bad)


def test_color_classifier_is_clip_benchmark_zero_shot(tiny_dir):
    from transformers import CLIPModel, CLIPTokenizer

    from spobench.metrics import geneval as ge

    clip = CLIPModel.from_pretrained(str(tiny_dir / ge.CLIP_DIR)).eval()
    tok = CLIPTokenizer.from_pretrained(str(tiny_dir / ge.CLIP_DIR))
    clf = ge.ColorClassifier(clip, tok)
    w = clf.class_weights("cup")
    assert w.shape == (16, 10) and torch.allclose(w.norm(dim=0), torch.ones(10), atol=1e-5)
    # column "red": mean of the three normalised template embeddings, renormalised
    texts = ["a photo of a red cup", "a photo of a red-colored cup", "a photo of a red object"]
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        emb = clip.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
        red = F.normalize(emb, dim=-1).mean(0)
    assert torch.allclose(w[:, 0], red / red.norm(), atol=1e-5)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    d = det("cup", (5, 5, 30, 25))
    logits = clf.logits(image, [d], "cup")
    assert logits.shape == (1, 10) and logits.abs().max() <= 100 + 1e-3
    assert clf(image, [d], "cup") == [gr.COLORS[int(logits.argmax())]]


def test_plugin_end_to_end_on_tiny_models(tiny_dir):
    from spobench.metrics.geneval import GenEval

    metric = GenEval(weights=tiny_dir)
    mid = metric.identity()
    assert mid.options["detector"] == "mask2former-hf" and len(mid.checkpoint_sha256) == 64
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = ["a photo of a bench", "a photo of three oranges"]
    out = metric.score(images, prompts)  # metadata looked up by prompt
    assert out.tags == ["single_object", "counting"]
    assert set(out.scores.tolist()) <= {0.0, 1.0} and len(out.details) == 2
    dets = metric.detect(images[0])
    assert len(dets) == 100  # top-100 of 12 queries x 80 classes
    assert all(d.label in gr.OBJECT_NAMES for d in dets)
    assert all(d.mask is None or d.mask.shape == (48, 64) for d in dets)


def test_plugin_verdicts_with_stubbed_detector(tiny_dir, monkeypatch):
    from spobench.metrics.geneval import GenEval

    metric = GenEval(weights=tiny_dir)
    metric.load()
    found = {
        0: [det("bench", (0, 0, 10, 10), 0.8)],
        1: [det("orange", (i * 10, 0, i * 10 + 8, 8), 0.95) for i in range(3)],
        2: [det("cup", (0, 0, 10, 10), 0.9)],
    }
    calls = iter(range(3))
    monkeypatch.setattr(metric, "detect", lambda image: found[next(calls)])
    monkeypatch.setattr(metric, "_colors", lambda image, dets, cls: ["purple"] * len(dets))
    rows = [gr.metadata_for_prompt(p) for p in ("a photo of a bench", "a photo of three oranges")] + [COLOR]
    images = [Image.new("RGB", (16, 16))] * 3
    out = metric.score(images, [r["prompt"] for r in rows], rows)
    assert out.scores.tolist() == [1.0, 1.0, 1.0] and out.tags == ["single_object", "counting", "colors"]
    # equal scores: np.argsort(...)[::-1] on float32, GenEval's call, puts the last one first here
    assert out.details[1]["detected"]["orange"][0] == [20.0, 0.0, 28.0, 8.0, 0.95]
