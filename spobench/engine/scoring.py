"""How samples are judged (SPO's pool candidates at t, DDPO's and D3PO's x_0): the step scorer
protocol and its adapters.

A :class:`StepScorer` scores images (the decoded x0_hat of noisy candidates, or x_0 itself at the
last step) at the timestep the candidates sit at. The step-aware preference model (SPM, paper
Sec. 4.2, ``spobench/models/spm.py``) is one; :class:`MetricScorer` turns any metric plugin into one that
ignores t (the paper's Table 5 "PickScore" row, or an oracle such as ``toy_aesthetic`` in the tiny
world).

:func:`make_pool_scorer` glues a step scorer to the ``Scorer`` hook (``spobench.engine.rollout``;
SPO's ``pool_rollout`` calls it, the online trainers call it on x_0 at t = 0): it decodes the
x0_hat latents with the backbone's VAE, maps each row to its prompt and counts the scorer's image
passes in ``backbone.counters.reward_image_passes`` (VAE decodes are counted by the backbone).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from spobench.engine.rollout import Scorer


@runtime_checkable
class StepScorer(Protocol):
    """Scores N images of candidates at timestep ``t`` against their prompts; higher is better."""

    def __call__(self, images: torch.Tensor, t: int, prompts: Sequence[str]) -> torch.Tensor:
        """``images`` (N, 3, H, W) in [0, 1]; ``t`` the candidates' timestep (0 = clean);
        returns (N,) scores on the scale the scorer's softmax is meant for (SPM: logit-scaled)."""
        ...


def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) floats in [0, 1] -> PIL images (rounded to uint8 like a saved PNG)."""
    from PIL import Image

    arr = images.detach().float().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class MetricScorer:
    """A metric plugin (``spobench/metrics/base.py``: ``score(list[PIL], prompts) -> MetricOutput``) used as a
    step scorer. It ignores ``t``: the metric judges x0_hat as if it were a clean image."""

    def __init__(self, metric):
        if not getattr(metric, "higher_is_better", True):  # SPO keeps the highest, DDPO/D3PO maximise it
            from spobench.core.errors import InputError

            raise InputError(f"metric {getattr(metric, 'name', type(metric).__name__)!r} is lower-is-better; "
                             "a scorer or reward must rise with preference")
        self.metric = metric

    @property
    def name(self) -> str:
        return f"metric:{getattr(self.metric, 'name', type(self.metric).__name__)}"

    def __call__(self, images: torch.Tensor, t: int, prompts: Sequence[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        out = self.metric.score(to_pil(images), list(prompts))
        return torch.as_tensor(out.scores, dtype=torch.float32).reshape(-1)


def make_pool_scorer(backbone, step_scorer: StepScorer, prompts: Sequence[str],
                     batch_size: int | None = None) -> Scorer:
    """A ``Scorer`` hook for one pool rollout (or one batch of final samples) of ``prompts``.

    It is called with x0_hat latents (N, C, H, W), the candidates' timestep and, per row, the
    index of its prompt in ``prompts``. Rows are decoded and scored ``batch_size`` at a time (all at
    once when None) to bound VAE/SPM memory.
    """
    prompts = list(prompts)

    counts_itself = getattr(step_scorer, "counters", None) is backbone.counters  # e.g. an SPM given the counters
    # the official SPO scoring path clamps after its resize (spobench.models.spm RESIZE_MODES): an imported SPM
    # gets the decoded x0_hat unclamped; every other scorer (and spobench's own SPMs) a clamped image
    clamp = (getattr(step_scorer, "preprocess_cfg", None) or {}).get("resize") != "spo"

    @torch.no_grad()
    def score(x0_hat: torch.Tensor, t: int, prompt_idx: torch.Tensor) -> torch.Tensor:
        n = x0_hat.shape[0]
        step = batch_size or n
        names = [prompts[i] for i in prompt_idx.tolist()]
        parts = []
        for s in range(0, n, step):
            images = backbone.decode(x0_hat[s:s + step], clamp=clamp)
            if not counts_itself:
                backbone.counters.reward_image_passes += images.shape[0]
            parts.append(torch.as_tensor(step_scorer(images, int(t), names[s:s + step])).float().reshape(-1).cpu())
        scores = torch.cat(parts)
        if scores.shape[0] != n:
            raise ValueError(f"step scorer returned {scores.shape[0]} scores for {n} images")
        return scores

    return score


def load_step_scorer(spec: str, device="cpu", counters=None, dtype=None) -> StepScorer:
    """A step scorer from a config string: ``metric:<name>`` (any registered metric, t ignored) or
    the path of an SPM folder (``StepAwarePreferenceModel.save``; an official SPO checkpoint becomes one
    with ``spobench spm import``). ``counters`` (the backbone's)
    lets an SPM count its own image and text passes. ``dtype``: the SPM's weights (a frozen part,
    like the backbone's: a trainer passes its ``dtype`` setting); metrics keep their own."""
    from spobench.core.errors import InputError

    if spec.startswith("metric:"):
        from spobench.core.catalog import METRICS

        name = spec.removeprefix("metric:")
        metric = METRICS.get(name)(device=str(device))
        return MetricScorer(metric)
    from pathlib import Path

    if not Path(spec).exists():
        raise InputError(f"setting 'scorer': {spec!r} is neither 'metric:<name>' nor an existing SPM folder")
    if not Path(spec).is_dir():
        from spobench.models.spm_official import import_hint

        raise InputError(f"setting 'scorer': {import_hint(spec)}")
    from spobench.models.spm import StepAwarePreferenceModel

    spm = StepAwarePreferenceModel.load(spec).to(device=device, dtype=dtype).eval().requires_grad_(False)
    if counters is not None:
        spm.counters = counters
    return spm
