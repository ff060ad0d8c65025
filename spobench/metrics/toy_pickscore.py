"""``toy_pickscore``: the tiny world's learned preference metric (a PickScore at toy scale).

A tiny CLIP trained with PickScore's loss on the tiny world's generic preference pairs (clean
images; see :mod:`spobench.toyworld.pickscore_train` and ``spobench toy pickscore``), scored like
PickScore::

    score = logit_scale.exp() * cos(image_emb(image), text_emb(prompt))

so tiny runs report the paper's four-column shape (toy_pickscore, toy_aesthetic, toy_alignment,
...). Scoring goes through the same code the trainer used (:class:`spobench.models.spm.StepAwarePreferenceModel`
without time conditioning: its tokenizer and torch CLIP preprocessing; images that are not 32 x 32
are resized (short side, bicubic, antialiased) and centre-cropped to 32 x 32 one by one first).

Weights: ``--weights DIR`` (a CLIPModel folder with tokenizer, or a training run folder holding
``model/``), else the weights shipped in ``spobench/assets/toy-pickscore/`` (their provenance and
held-out accuracy are in ``toy_pickscore.json`` there). ``checkpoint_sha256`` is the sha256 of
``model.safetensors``.

Format: ``model.safetensors`` only (what ``spobench toy pickscore`` writes and spobench ships), loaded
strictly by :func:`.clip_common.load_clip_model`: a missing, unexpected, wrong-shaped or NaN weight is
an error naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import spobench
from spobench.core.errors import MissingWeightsError
from spobench.metrics.base import Metric, sha256_of
from spobench.metrics.clip_common import (combined_sha256, has_model_weights, has_tokenizer, load_clip_model,
                                          weight_files)

SHIPPED = spobench.ASSETS / "toy-pickscore"
MODEL_FILES = ("config.json", "model.safetensors")
RUN_SUBDIR = "model"  # `spobench toy pickscore --out RUN` writes RUN/model
HOW_TO_GET = ("Train one with `spobench toy data --out DATA --base-samples 0` then "
              "`spobench toy pickscore --pairs DATA/pairs.parquet --out RUN` and pass --weights toy_pickscore=RUN "
              "(or reinstall spobench: it ships them in spobench/assets/toy-pickscore).")


def _is_model(folder: Path) -> bool:
    # any weights file counts here, so that a pickle-only folder is refused by name (weight_files), not skipped
    return (folder / "config.json").is_file() and has_model_weights(folder) and has_tokenizer(folder)


def locate(weights: str | Path | None) -> Path:
    """The CLIPModel folder to load, or :class:`MissingWeightsError` naming the missing files."""
    if weights:
        folder = Path(weights).expanduser()
        if folder.is_file():
            folder = folder.parent
        candidates = [folder / RUN_SUBDIR, folder]
    else:
        folder = SHIPPED
        candidates = [folder]
    for c in candidates:
        if c.is_dir() and _is_model(c):
            return c
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if not has_tokenizer(folder):
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    raise MissingWeightsError(
        f"metric 'toy_pickscore' needs {', '.join(missing) or 'a CLIPModel folder'} in {folder} "
        f"(or in {folder / RUN_SUBDIR}) (not found). {HOW_TO_GET}")


def _to_tensor(image, size: int, crop: int) -> torch.Tensor:
    """A PIL image (or uint8 HWC array) -> (3, crop, crop) float in [0, 1]."""
    from spobench.models.spm_preprocess import preprocess_images

    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255)
    if x.shape[-2:] != (crop, crop):  # resize + crop only; normalisation happens in the model
        x = preprocess_images(x[None], size, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))[0]
    return x


class ToyPickScore(Metric):
    """``logit_scale.exp() * cos(image, prompt)`` with the tiny world's trained tiny CLIP."""

    name = "toy_pickscore"
    version = "1"
    needs_prompt = True

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 64, **options):
        self.model_dir = locate(weights)
        super().__init__(weights=weights, device=device, batch_size=batch_size,
                         model="shipped" if weights is None else str(self.model_dir), **options)
        self.checkpoint_sha256 = combined_sha256([sha256_of(f) for f in weight_files(self.model_dir)])
        self._model = None

    def load(self):
        if self._model is None:
            from spobench.models.spm import StepAwarePreferenceModel

            clip = load_clip_model(self.model_dir)
            # the tokenizer and preprocessor config come from the same folder, as from_clip(folder) reads them
            model = StepAwarePreferenceModel.from_clip(clip, processor=self.model_dir, time_conditioned=False)
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self._model

    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        model = self.load()
        pp = model.preprocess_cfg
        x = torch.stack([_to_tensor(im, pp["size"], pp["crop"]) for im in images])
        return model(x, None, prompts)
