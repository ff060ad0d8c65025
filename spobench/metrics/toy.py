"""The tiny world's oracle metrics as plugins: ``toy_alignment`` and ``toy_aesthetic``.

Both need no weights and judge any RGB image (renders or a diffusion model's samples); images that
are not 32 x 32 are box-resampled to it first. The rules are in :mod:`spobench.toyworld.oracle`:

* ``toy_alignment``: 1.0 if the image passes every check of its prompt (object count, shapes,
  colours, sizes, places, relation) else 0.0, with the prompt's GenEval-like tag, so the evaluator
  reports per-tag accuracy and the overall unweighted mean over tags as GenEval does. Prompts must be
  tiny-world grammar prompts (:mod:`spobench.toyworld.grammar`); others fail with an InputError.
* ``toy_aesthetic``: a prompt-free quality score on [0, 10] (grain, soft edges, misfit of shapes,
  colour impurity, low contrast, stray specks, background tint/texture).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from spobench.core.errors import InputError
from spobench.metrics.base import Metric, MetricOutput
from spobench.toyworld import grammar, oracle


def _scene(prompt: str) -> grammar.Scene:
    try:
        return grammar.parse(prompt)
    except ValueError as e:
        raise InputError(f"toy_alignment only judges tiny-world prompts: {e}") from None


class ToyAlignment(Metric):
    """GenEval-style rule check of tiny-world images against their prompts (1.0 / 0.0 per image)."""

    name = "toy_alignment"
    version = "1"
    needs_prompt = True

    def score(self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict] | None = None) -> MetricOutput:
        if len(images) != len(prompts):
            raise InputError(f"toy_alignment got {len(images)} images but {len(prompts)} prompts")
        scenes = [_scene(p) for p in prompts]
        scores, tags, details = [], [], []
        for img, scene in zip(images, scenes):
            an = oracle.analyze(img)
            ok, reason = oracle.check(an, scene)
            scores.append(float(ok))
            tags.append(scene.tag)
            details.append({"reason": reason, "objects": [o.as_dict() for o in an.objects]})
        return MetricOutput(np.asarray(scores, dtype=np.float64), tags, details)


class ToyAesthetic(Metric):
    """Prompt-free tiny-world image quality on a 0-10 scale."""

    name = "toy_aesthetic"
    version = "1"
    needs_prompt = False

    def score(self, images: Sequence, prompts: Sequence[str] | None = None,
              metadata: Sequence[dict] | None = None) -> MetricOutput:
        scores, details = [], []
        for img in images:
            s, d = oracle.aesthetic(img)
            scores.append(s)
            details.append(d)
        return MetricOutput(np.asarray(scores, dtype=np.float64), None, details)
