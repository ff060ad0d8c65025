"""The pool scorer glue: step scorers, the metric adapter, decoding and counting."""

import numpy as np
import pytest
import torch

from fakes import FakeBackbone
from spobench.engine.scoring import MetricScorer, StepScorer, load_step_scorer, make_pool_scorer
from spobench.core.errors import InputError
from spobench.metrics.base import MetricOutput


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, images, t, prompts):
        self.calls.append((images.shape[0], t, list(prompts)))
        return images.mean(dim=(1, 2, 3))


def test_pool_scorer_decodes_maps_prompts_and_counts():
    bb = FakeBackbone()
    rec = _Recorder()
    prompts = ["p0", "p1"]
    score = make_pool_scorer(bb, rec, prompts, batch_size=3)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = score(x0, 251, torch.tensor([0, 0, 1, 1]))
    assert out.shape == (4,)
    assert torch.allclose(out, ((x0 / 2 + 0.5).clamp(0, 1)).mean(dim=(1, 2, 3)))  # decode = pixel space
    assert rec.calls == [(3, 251, ["p0", "p0", "p1"]), (1, 251, ["p1"])]
    assert bb.counters.reward_image_passes == 4 and bb.counters.vae_decodes == 4
    assert isinstance(rec, StepScorer)


def test_an_official_spo_scorer_gets_x0_hat_unclamped():
    """The official SPO path clamps after its resize (issue 13 part 1): an SPM with resize "spo" sees
    the decoded image before any clamp; a "clip" SPM and a metric-like scorer see it clamped to [0, 1]."""
    x0 = torch.linspace(-1.6, 1.6, 4 * 3 * 8 * 8).reshape(4, 3, 8, 8)  # an x0_hat leaving [-1, 1]
    seen = {}
    for mode in ("spo", "clip", None):
        grab = _Grab(mode)
        make_pool_scorer(FakeBackbone(), grab, ["p"])(x0, 500, torch.zeros(4, dtype=torch.long))
        seen[mode] = (float(grab.images.min()), float(grab.images.max()))
    assert seen["spo"] == pytest.approx((-0.3, 1.3), abs=1e-6)
    assert seen["clip"] == seen[None] == (0.0, 1.0)


class _Grab:
    def __init__(self, mode):
        if mode:
            self.preprocess_cfg = {"resize": mode}

    def __call__(self, images, t, prompts):
        self.images = images
        return images.mean(dim=(1, 2, 3))


def test_a_scorer_that_counts_itself_is_not_counted_twice():
    bb = FakeBackbone()
    rec = _Recorder()
    rec.counters = bb.counters  # like an SPM given the backbone's counters
    make_pool_scorer(bb, rec, ["p"])(torch.zeros(2, 3, 8, 8), 0, torch.tensor([0, 0]))
    assert bb.counters.reward_image_passes == 0


def test_metric_scorer_ignores_t_and_passes_pil_images():
    class Metric:
        name = "m"

        def score(self, images, prompts):
            assert images[0].size == (8, 8) and images[0].mode == "RGB"
            return MetricOutput(np.array([len(p) for p in prompts], dtype=np.float64))

    s = MetricScorer(Metric())
    a = s(torch.rand(2, 3, 8, 8), 900, ["ab", "abcd"])
    b = s(torch.rand(2, 3, 8, 8), 0, ["ab", "abcd"])
    assert a.tolist() == b.tolist() == [2.0, 4.0] and a.dtype == torch.float32


def test_toy_aesthetic_as_a_step_scorer():
    s = load_step_scorer("metric:toy_aesthetic")
    scores = s(torch.rand(3, 3, 32, 32), 500, ["a red circle"] * 3)
    assert scores.shape == (3,) and ((0 <= scores) & (scores <= 10)).all()


def test_bad_scorer_spec():
    with pytest.raises(InputError, match="neither 'metric:<name>' nor an existing SPM folder"):
        load_step_scorer("no/such/spm")


def test_an_spm_folder_is_a_step_scorer_that_counts_its_passes(tmp_path):
    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder

    clip = make_tiny_clip_folder(tmp_path / "clip")
    StepAwarePreferenceModel.from_clip(clip).save(tmp_path / "spm")
    bb = FakeBackbone()
    spm = load_step_scorer(str(tmp_path / "spm"), counters=bb.counters)
    score = make_pool_scorer(bb, spm, ["a red circle", "a blue square"])
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    out = score(x0, 500, torch.tensor([0, 0, 1, 1]))
    assert out.shape == (4,) and torch.isfinite(out).all()
    assert bb.counters.reward_image_passes == 4 and bb.counters.reward_text_passes == 2


def test_an_spm_follows_the_frozen_dtype_and_pools_get_float32_scores(tmp_path):
    from spobench.models.spm import StepAwarePreferenceModel
    from spobench.toyworld.tiny_clip import make_tiny_clip_folder

    clip = make_tiny_clip_folder(tmp_path / "clip")
    StepAwarePreferenceModel.from_clip(clip).save(tmp_path / "spm")
    x0 = torch.rand(4, 3, 32, 32) * 2 - 1
    idx = torch.tensor([0, 0, 1, 1])
    out = {}
    for dtype in (None, torch.bfloat16):
        spm = load_step_scorer(str(tmp_path / "spm"), dtype=dtype)
        assert next(spm.parameters()).dtype == (dtype or torch.float32)
        out[dtype] = make_pool_scorer(FakeBackbone(), spm, ["a red circle", "a blue square"])(x0, 500, idx)
    assert out[torch.bfloat16].dtype == torch.float32
    assert torch.allclose(out[torch.bfloat16], out[None], rtol=0.05, atol=0.05)
    assert not torch.equal(out[torch.bfloat16], out[None])  # it really ran in bf16


def test_a_lower_is_better_metric_is_refused_as_a_scorer():
    class Distance:
        name, higher_is_better = "distance", False

        def score(self, images, prompts):
            return MetricOutput(np.zeros(len(images)))

    with pytest.raises(InputError, match="'distance' is lower-is-better"):
        MetricScorer(Distance())
