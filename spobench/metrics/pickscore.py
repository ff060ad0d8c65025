"""PickScore v1 (Kirstain et al., 2023) on transformers' CLIP.

``yuvalkirstain/PickScore_v1`` is a transformers ``CLIPModel`` folder (CLIP-H/14 fine-tuned on
Pick-a-Pic); its processor is ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s. The score follows the
PickScore README's inference code::

    pixels = processor(images)            # shortest side -> 224 (PIL bicubic), centre crop 224, CLIP mean/std
    ids    = tokenizer(prompts, padding=True, truncation=True, max_length=77)
    score  = logit_scale.exp() * cos(get_image_features(pixels), get_text_features(ids))

(about 20-23 for real images). The image processor is transformers' PIL backend
(``CLIPImageProcessorPil``: the numpy/PIL "slow" processor the reference code ran), configured by the
processor folder's ``preprocessor_config.json``. Each (image, prompt) pair is scored on its own
prompt; padding within a batch does not change a score (causal text attention, EOS pooling). The
tokenizer is the processor folder's, as in the reference, quirks included: laion's config makes "!"
the pad token, so transformers tokenizes every "!" in a prompt as id 0 (open_clip would not).

Where the weights come from (nothing is downloaded, no remote code runs):

* the model: ``<weights>/PickScore_v1/``, or ``<weights>`` itself if it holds the model's
  ``config.json`` and weights, or ``yuvalkirstain/PickScore_v1`` in the local Hugging Face cache;
* the processor: ``<weights>/CLIP-ViT-H-14-laion2B-s32B-b79K/`` or that repo in the local cache.

``<weights>`` is ``--weights DIR`` or ``$SPOBENCH_WEIGHTS/pickscore``. ``checkpoint_sha256`` is the
sha256 of the model's weight file (of its shards' hashes when sharded).

Formats: the official ``yuvalkirstain/PickScore_v1`` ships both ``model.safetensors`` and
``pytorch_model.bin``; only ``model.safetensors`` is read (a pickle-only folder is refused), through
:func:`spobench.core.weights.load_pretrained`: a missing, unexpected, wrong-shaped or NaN weight is an error
naming the file and the key, never a randomly initialised model that still gives scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from spobench.metrics.base import Metric, sha256_of, weights_root
from spobench.metrics.clip_common import (
    combined_sha256,
    has_model_weights,
    has_tokenizer,
    image_embeds,
    l2_normalize,
    load_clip_model,
    load_clip_tokenizer,
    resolve_folder,
    text_embeds,
    weight_files,
)

from spobench.core.errors import MissingWeightsError

MODEL_ID = "yuvalkirstain/PickScore_v1"
MODEL_DIR = "PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PROCESSOR_DIR = "CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_LENGTH = 77


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and has_model_weights(folder)


def _is_processor(folder: Path) -> bool:
    return (folder / "preprocessor_config.json").is_file() and has_tokenizer(folder)


def locate(weights: str | Path | None) -> tuple[Path, Path]:
    """(model folder, processor folder), or :class:`MissingWeightsError` naming what is missing."""
    given = Path(weights) if weights else None
    folder = (given.parent if given is not None and given.is_file() else given) or weights_root() / "pickscore"
    model = resolve_folder([folder / MODEL_DIR, folder], MODEL_ID, _is_model)
    processor = resolve_folder([folder / PROCESSOR_DIR, folder], PROCESSOR_ID, _is_processor)
    missing = []
    if model is None:
        missing.append(f"the model {MODEL_ID} (config.json + model.safetensors; "
                       f"`hf download {MODEL_ID}`, or add --local-dir {folder / MODEL_DIR})")
    if processor is None:
        missing.append(f"the processor {PROCESSOR_ID} (preprocessor_config.json + tokenizer files; "
                       f"`hf download {PROCESSOR_ID} --include '*.json' --include '*.txt'`, "
                       f"or add --local-dir {folder / PROCESSOR_DIR})")
    if missing:
        raise MissingWeightsError(
            f"metric 'pickscore' needs {' and '.join(missing)}: not found in {folder} nor in the local Hugging "
            f"Face cache. Download them as shown, or pass --weights DIR (or set SPOBENCH_WEIGHTS)."
        )
    return model, processor


def load_image_processor(folder: str | Path):
    """The PIL-backend CLIP image processor configured by ``folder``'s preprocessor_config.json."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_pretrained(str(folder), local_files_only=True)


class PickScore(Metric):
    """PickScore v1: ``logit_scale.exp() * cos(image, prompt)`` with CLIP-H/14 (higher is better)."""

    name = "pickscore"
    version = "1"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", batch_size: int = 16, **options):
        super().__init__(weights=weights, device=device, batch_size=batch_size, model=MODEL_ID,
                         processor=PROCESSOR_ID, image_processor="transformers CLIPImageProcessorPil", **options)
        self.model_dir, self.processor_dir = locate(weights)
        self.checkpoint_sha256 = combined_sha256([sha256_of(f) for f in weight_files(self.model_dir)])
        self._model = None
        self._tokenizer = None
        self._image_processor = None

    def load(self):
        if self._model is None:
            self._image_processor = load_image_processor(self.processor_dir)
            self._tokenizer = load_clip_tokenizer(self.processor_dir, MAX_LENGTH)
            self._model = load_clip_model(self.model_dir, self.device)
        return self._model

    def pixel_values(self, images: Sequence) -> torch.Tensor:
        self.load()
        return self._image_processor(images=list(images), return_tensors="pt")["pixel_values"].float()

    def score_batch(self, images: list, prompts: list[str]) -> torch.Tensor:
        model = self.load()
        pixels = self.pixel_values(images).to(self.device)
        text = self._tokenizer(prompts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        img = l2_normalize(image_embeds(model, pixels))
        txt = l2_normalize(text_embeds(model, text.input_ids.to(self.device), text.attention_mask.to(self.device)))
        return model.logit_scale.exp() * (img * txt).sum(-1)
